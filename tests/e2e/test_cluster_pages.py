"""A cluster behind a load balancer, in real headless Chromium: the page's one socket is on a
node that is killed, and the page's own WebSocketManager brings every tile back.

Node A is a ``mediastream serve`` subprocess (killed with SIGKILL), node B runs in this
process, both on one real redis-server. A loopback TCP proxy stands in for the load balancer:
it forwards to A until A dies, then to B (what a health-checking balancer does).
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio
from playwright.sync_api import Browser

from mediastream.cluster.leases import NodeRecord
from mediastream.cluster.placement import choose_owner

from support.browser import ALL_VIDEOS_PLAYING, PageWatch, in_browser, wait_until_decoding_more
from support.commands import running_command
from support.redis import RedisServer
from support.servers import StartServer, free_port, make_config
from support.tcp_proxy import TcpProxy

PATTERN = "pattern:testsrc?size=160x120&fps=10&kbps=100&gop=10"
SRC = Path(__file__).parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
NODES = ("node-a", "node-b")


def streams_placed_on(node_id: str, count: int) -> list[str]:
    records = [NodeRecord(n, f"http://{n}") for n in NODES]
    found = [
        s
        for s in (f"cam-{i}" for i in range(64))
        if (owner := choose_owner(s, records)) is not None and owner.node_id == node_id
    ]
    return found[:count]


ON_A = streams_placed_on("node-a", 2)
ON_B = streams_placed_on("node-b", 2)
TILES_LIVE = "[...document.querySelectorAll('.tile')].every((t) => t.dataset.state === 'live')"
SOME_TILE_DOWN = "[...document.querySelectorAll('.tile')].some((t) => t.dataset.state !== 'live')"
PILLS = "[...document.querySelectorAll('.tile .pill')].map((p) => p.textContent)"


def node_a_config(path: Path, redis: RedisServer) -> Path:
    streams = "".join(
        f'[[streams]]\nid = "{s}"\nsource = "{PATTERN}"\non_demand = true\n\n'
        for s in sorted(ON_A + ON_B)
    )
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = 0\ndata_dir = "{path.parent / "node-a"}"\n\n'
        f"[media]\non_demand_grace = 1\n\n"
        f'[cluster]\nredis_url = "{redis.url}"\nnode_id = "node-a"\n\n{streams}'
    )
    return path


async def test_the_socket_node_killed_the_page_reconnects_through_the_balancer_and_every_tile_plays(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    b = await start_server(
        make_config(
            [{"id": s, "source": PATTERN, "on_demand": True} for s in sorted(ON_A + ON_B)],
            cluster={"redis_url": redis_server.url, "node_id": "node-b"},
        )
    )
    b_port = int(b.url.rsplit(":", 1)[1])
    command = [sys.executable, "-m", "mediastream", "serve", "--config",
               str(node_a_config(tmp_path / "a.toml", redis_server))]  # fmt: skip
    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:
        a: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process, command, stderr=subprocess.PIPE, check=False, env=ENV
            )
        )
        try:
            assert a.stderr is not None
            log = b""
            with trio.fail_after(30):
                while b"started" not in log or b"MediaStream serving" not in log:
                    chunk = await a.stderr.receive_some()
                    assert chunk, log
                    log += chunk
            a_port = int(log.split(b"MediaStream serving")[1].split(b"\n")[0].rsplit(b":", 1)[1])
            balancer = TcpProxy(a_port)
            proxy_port = await nursery.start(balancer.serve)

            async def kill_a_and_take_it_out_of_the_balancer() -> None:
                balancer.target_port = b_port  # new connections go to B
                a.send_signal(signal.SIGKILL)  # the socket's node, and owner of ON_A
                await a.wait()

            def scenario(browser: Browser) -> list[str]:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                watch = PageWatch(page)
                # The page's own socket (not the browser's shared one), so the test sees it.
                page.goto(
                    f"http://127.0.0.1:{proxy_port}/static/dashboard.html?mediastreamShared=0"
                )
                page.wait_for_function("document.querySelectorAll('.tile').length === 4")
                page.wait_for_function(TILES_LIVE, timeout=30_000)
                page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=20_000)
                trio.from_thread.run(kill_a_and_take_it_out_of_the_balancer, trio_token=token)
                page.wait_for_function(SOME_TILE_DOWN, timeout=15_000)
                # Back by themselves: the manager reconnects (to B) and renegotiates every tile;
                # A's streams wait for A's record and lease to expire, then B claims them.
                page.wait_for_function(TILES_LIVE, timeout=60_000)
                wait_until_decoding_more(page, ".tile video", timeout=30_000)
                assert len(watch.sockets) == 2  # the first (on A), and the one on B
                assert watch.sockets[0].is_closed() and not watch.sockets[1].is_closed()
                return list(page.evaluate(PILLS))

            pills = await in_browser(scenario)
        finally:
            if a.returncode is None:
                a.kill()
            with trio.CancelScope(shield=True):
                await a.wait()
        nursery.cancel_scope.cancel()
    assert pills == ["live"] * 4  # over WebRTC from B, not the fallback over the socket
    cluster = b.services.cluster
    assert cluster is not None
    assert set(cluster.statistics().owned_streams) == set(ON_A + ON_B)
    for stream_id in ON_A:  # each of A's cameras read again once, by B
        stream = b.services.registry.get(stream_id)
        assert stream is not None and stream.statistics().encoders_opened == 1


async def test_with_two_workers_the_socket_worker_killed_the_page_comes_back_on_the_same_port(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    port = free_port()  # known in advance: the workers' node ids, and so placement, use it
    workers = [f"{socket.gethostname()}-{port}-w{k}" for k in (0, 1)]
    records = [NodeRecord(n, f"http://{n}") for n in workers]
    streams: list[str] = []
    for k in (0, 1):  # two streams placed on each worker
        streams += [
            s
            for s in (f"cam-{i}" for i in range(64))
            if (owner := choose_owner(s, records)) is not None and owner.node_id == workers[k]
        ][:2]
    config = tmp_path / "workers.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "data"}"\n\n'
        f"[media]\non_demand_grace = 1\n\n"
        f'[cluster]\nredis_url = "{redis_server.url}"\n\n'
        + "".join(
            f'[[streams]]\nid = "{s}"\nsource = "{PATTERN}"\non_demand = true\n\n'
            for s in sorted(streams)
        )
    )
    token = trio.lowlevel.current_trio_token()
    async with running_command("serve", "--config", str(config), "--workers", "2") as (
        parent,
        log,
    ):
        for k in (0, 1):
            await log.wait_for(rf'cluster node "{workers[k]}" .* started')

        async def kill_the_sockets_worker() -> None:
            opened = await log.wait_for(r"\[w(\d)\] mediastream\.signaling: .*socket opened")
            assert log.text.count("socket opened") == 1, log.text  # the page's one socket
            index = int(opened[1])
            pid = int(re.findall(rf"worker {index} started \(pid (\d+)\)", log.text)[-1])
            os.kill(pid, signal.SIGKILL)
            await log.wait_for(rf"worker {index} \(pid {pid}\) was killed by SIGKILL")

        def scenario(browser: Browser) -> None:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            watch = PageWatch(page)
            page.goto(f"http://127.0.0.1:{port}/static/dashboard.html?mediastreamShared=0")
            page.wait_for_function("document.querySelectorAll('.tile').length === 4")
            page.wait_for_function(TILES_LIVE, timeout=30_000)
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=20_000)
            trio.from_thread.run(kill_the_sockets_worker, trio_token=token)
            page.wait_for_function(SOME_TILE_DOWN, timeout=15_000)
            # The manager reconnects on the same port (to the other worker, or the restarted
            # one) and every tile plays again; the killed worker's streams once its leases
            # have expired.
            page.wait_for_function(TILES_LIVE, timeout=60_000)
            wait_until_decoding_more(page, ".tile video", timeout=30_000)
            assert len(watch.sockets) == 2
            assert watch.sockets[0].is_closed() and not watch.sockets[1].is_closed()
            assert page.evaluate(PILLS) == ["live"] * 4

        await in_browser(scenario)
        parent.send_signal(signal.SIGTERM)
        text = await log.read_to_end()
        with trio.fail_after(30):
            await parent.wait()
    assert parent.returncode == 0, text
