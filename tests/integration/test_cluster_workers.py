"""``mediastream serve --workers N`` and drain, with real processes and a real redis-server.

The workers test runs the real command (a parent and its worker processes on one port); the
drain test runs node A as a ``mediastream serve`` subprocess (it gets a real SIGTERM) and node
B in this process, with aiortc viewers holding one signaling socket each.
"""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import trio

from mediastream.cluster.leases import NodeRecord, current_owner, live_nodes
from mediastream.cluster.placement import choose_owner
from mediastream.cluster.redis_client import open_redis
from mediastream.server import RunningServer

from support.cluster import (
    PATTERN,
    cluster_of,
    pattern_streams,
    start_cluster,
    start_node,
    wait_peer_failed,
    wait_registered,
)
from support.commands import running_command
from support.http import get
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import open_viewer


def config_file(
    path: Path, redis: RedisServer, stream_ids: list[str], *, node_id: str = "", port: int = 0
) -> Path:
    streams = "".join(
        f'[[streams]]\nid = "{s}"\nsource = "{PATTERN}"\non_demand = true\n\n' for s in stream_ids
    )
    node = f'node_id = "{node_id}"\n' if node_id else ""
    path.write_text(
        f'[server]\nhost = "127.0.0.1"\nport = {port}\ngraceful_timeout = 3\n'
        f'data_dir = "{path.parent / (node_id or "workers")}"\n\n'
        f"[media]\non_demand_grace = 1\n\n"
        f'[cluster]\nredis_url = "{redis.url}"\n{node}drain_timeout = 10\n\n{streams}'
    )
    return path


async def nodes_answering(url: str, expected: int, attempts: int = 200) -> set[str]:
    """The node ids that answer ``/healthz`` on ``url`` over fresh connections, until
    ``expected`` different ones have (or ``attempts`` requests were made)."""
    seen: set[str] = set()
    for _ in range(attempts):
        response = await get(f"{url}/healthz")
        assert response.status == 200
        seen.add(response.headers["x-mediastream-node"])
        if len(seen) == expected:
            break
    return seen


async def test_two_workers_share_one_port_a_killed_worker_is_restarted_sigterm_ends_all(
    redis_server: RedisServer, tmp_path: Path, aio_loop: None
) -> None:
    config = config_file(tmp_path / "workers.toml", redis_server, ["cam-1", "cam-2"])
    async with running_command("serve", "--config", str(config), "--workers", "2") as (
        parent,
        log,
    ):
        port = int((await log.wait_for(r"2 workers on http://127\.0\.0\.1:(\d+)"))[1])
        url = f"http://127.0.0.1:{port}"
        pids = {}
        for index in (0, 1):
            pids[index] = int((await log.wait_for(rf"worker {index} started \(pid (\d+)\)"))[1])
            await log.wait_for(rf'cluster node "[^"]+-{port}-w{index}" .* started')
        names = {f"{socket.gethostname()}-{port}-w{index}" for index in (0, 1)}
        async with open_redis(redis_server.url) as client:
            assert {n.node_id for n in await live_nodes(client)} == names
        # Both workers accept on the one port.
        assert await nodes_answering(url, 2) == names

        # A stream played through the shared port decodes (one worker owns it).
        async with open_viewer(f"ws://127.0.0.1:{port}/ws") as viewer:
            played = await viewer.play("cam-1", trickle=True)
            await played.wait_frames(5)

        # A worker killed without a word is started again by the parent.
        mark = len(log.text)
        os.kill(pids[0], signal.SIGKILL)
        await log.wait_for(rf"worker 0 \(pid {pids[0]}\) was killed by SIGKILL", after=mark)
        restarted = int((await log.wait_for(r"worker 0 started \(pid (\d+)\)", after=mark))[1])
        assert restarted != pids[0]
        await log.wait_for(r'cluster node "[^"]+-w0" .* started', after=mark)
        assert await nodes_answering(url, 2) == names
        async with open_viewer(f"ws://127.0.0.1:{port}/ws") as viewer:
            await (await viewer.play("cam-2", trickle=True)).wait_frames(5)

        # SIGTERM to one worker: it drains and exits cleanly, and the parent starts it again.
        mark = len(log.text)
        os.kill(restarted, signal.SIGTERM)
        await log.wait_for(
            r'\[w0\] mediastream\.cluster\.routing: node "[^"]+" drained in', after=mark
        )
        await log.wait_for(rf"worker 0 \(pid {restarted}\) exited with status 0", after=mark)
        restarted = int((await log.wait_for(r"worker 0 started \(pid (\d+)\)", after=mark))[1])
        await log.wait_for(r'cluster node "[^"]+-w0" .* started', after=mark)

        # SIGTERM to the parent: forwarded, every worker drains and stops, the parent last.
        parent.send_signal(signal.SIGTERM)
        text = await log.read_to_end()
        with trio.fail_after(30):
            await parent.wait()
    assert parent.returncode == 0, text
    assert text.count("SIGTERM received, shutting down") == 3, text  # one worker, then both
    assert len(re.findall(r'node "[^"]+" drained in', text)) == 3, text
    assert "all workers stopped (exit status 0)" in text
    assert "Traceback" not in text
    for pid in (pids[1], restarted):
        assert not _running(pid)
    async with open_redis(redis_server.url) as client:
        assert await live_nodes(client) == []


async def test_workers_without_redis_is_refused_naming_the_option(tmp_path: Path) -> None:
    config = tmp_path / "alone.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\n')
    async with running_command("serve", "--config", str(config), "--workers", "2") as (
        process,
        log,
    ):
        text = await log.read_to_end()
        with trio.fail_after(10):
            await process.wait()
    assert process.returncode == 2
    assert "--workers 2 needs [cluster] redis_url" in text
    assert "Traceback" not in text


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# --- drain ---------------------------------------------------------------------------------

NODES = ("node-a", "node-b")


def stream_placed_on(node_id: str, skip: int = 0) -> str:
    records = [NodeRecord(n, f"http://{n}") for n in NODES]
    found = [
        s
        for s in (f"cam-{i}" for i in range(64))
        if (owner := choose_owner(s, records)) is not None and owner.node_id == node_id
    ]
    return found[skip]


async def test_drain_hands_a_stream_over_and_its_remote_viewer_plays_again_from_one_new_ingest(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    on_a, on_b = stream_placed_on("node-a"), stream_placed_on("node-b")
    streams = [on_a, on_b]
    b = await start_node(start_server, redis_server.url, "node-b", pattern_streams(streams))
    await wait_registered(b)
    config = config_file(tmp_path / "a.toml", redis_server, streams, node_id="node-a")
    async with (
        running_command("serve", "--config", str(config)) as (a, log),
        open_redis(redis_server.url) as client,
    ):
        port = int(
            (await log.wait_for(r"MediaStream serving \d+ streams on http://[\d.]+:(\d+)"))[1]
        )
        await log.wait_for(r'cluster node "node-a"')
        async with (
            open_viewer(b.ws_url) as viewer,
            open_viewer(f"ws://127.0.0.1:{port}/ws") as on_a_socket,
        ):
            # B's socket watches A's stream (relayed, media from A); A's socket watches B's.
            first = await viewer.play(on_a, trickle=True)
            await first.wait_frames(5)
            assert cluster_of(b).statistics().relayed_sessions == 1
            assert ingests(b, on_a) == 0
            await (await on_a_socket.play(on_b, trickle=True)).wait_frames(3)
            owner = await current_owner(client, on_a)
            assert owner is not None and owner.node_id == "node-a"

            mark = len(viewer.messages)
            a.send_signal(signal.SIGTERM)
            told = await wait_peer_failed(viewer, on_a, mark)
            assert "handed the stream over" in told["payload"], told
            assert "send a new offer" in told["payload"], told
            # Handed over: nobody holds the lease until a viewer comes back, and A's record
            # says draining, so the re-offer places the stream on B.
            again = await viewer.play(on_a, trickle=True)
            await again.wait_frames(5)
            assert on_a in cluster_of(b).statistics().owned_streams
            assert ingests(b, on_a) == 1  # exactly one new camera session, on B
            # A's own socket is closed as going away once the handover is done.
            code, _ = await on_a_socket.wait_closed(timeout=30)
            assert code == 1001
        text = await log.read_to_end()
        with trio.fail_after(30):
            await a.wait()
    assert a.returncode == 0, text
    assert re.search(r'node "node-a" draining: handing over 1 streams \(1 viewers', text), text
    assert 'node "node-a" drained in' in text, text
    assert "Traceback" not in text


def ingests(server: RunningServer, stream_id: str) -> int:
    stream = server.services.registry.get(stream_id)
    assert stream is not None
    return stream.statistics().encoders_opened


async def test_a_draining_node_gets_no_new_stream_and_says_so_on_healthz(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    on_a = stream_placed_on("node-a")
    a, b = await start_cluster(start_server, redis_server.url, NODES, pattern_streams([on_a]))
    assert (await get(f"{a.url}/healthz")).status == 200
    await cluster_of(a).drain(5)  # what a shutdown request does first; A owns nothing
    health = await get(f"{a.url}/healthz")
    assert (health.status, health.json()) == (503, {"status": "draining"})
    assert health.headers["x-mediastream-node"] == "node-a"
    async with open_redis(redis_server.url) as client:
        states = {n.node_id: n.state for n in await live_nodes(client)}
    assert states == {"node-a": "draining", "node-b": "serving"}
    # A stream placement would give A, asked for on A's own socket, is placed on B.
    async with open_viewer(a.ws_url) as viewer:
        await (await viewer.play(on_a, trickle=True)).wait_frames(5)
    assert cluster_of(b).statistics().owned_streams == (on_a,)
    assert ingests(a, on_a) == 0 and ingests(b, on_a) == 1


async def test_a_node_restarted_under_its_id_waits_out_its_old_lease_then_plays(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # What a worker restarted by --workers meets: its previous run's lease, under its own id.
    stream_id = stream_placed_on("node-a")
    config = config_file(tmp_path / "a.toml", redis_server, [stream_id], node_id="node-a")
    async with (
        running_command("serve", "--config", str(config)) as (first_run, log),
        open_redis(redis_server.url) as client,
    ):
        port = int(
            (await log.wait_for(r"MediaStream serving \d+ streams on http://[\d.]+:(\d+)"))[1]
        )
        await log.wait_for(r'cluster node "node-a"')
        async with open_viewer(f"ws://127.0.0.1:{port}/ws") as viewer:
            await (await viewer.play(stream_id, trickle=True)).wait_frames(3)
            first_run.kill()  # SIGKILL: its lease stays in Redis until it expires
            with trio.fail_after(30):
                await first_run.wait()
        old = await current_owner(client, stream_id)
        assert old is not None and old.node_id == "node-a"

        streams = pattern_streams([stream_id])
        again = await start_node(start_server, redis_server.url, "node-a", streams)
        async with open_viewer(again.ws_url) as viewer:
            await (await viewer.play(stream_id, trickle=True)).wait_frames(5, timeout=30)
        new = await current_owner(client, stream_id)
        assert new is not None and new.node_id == "node-a" and new.epoch > old.epoch
        assert ingests(again, stream_id) == 1
