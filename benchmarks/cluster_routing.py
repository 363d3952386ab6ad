"""The cost of routing: offer→answer for a stream owned elsewhere vs one owned by the socket's
node, at 1 and 30 simultaneous offers, and the Redis commands each offer costs.

    python benchmarks/cluster_routing.py [--rounds 10] [--json FILE]

One real ``redis-server`` (tests/support/redis.py) and two nodes as ``mediastream serve``
processes, node-a and node-b, each owning one test-pattern stream (placement picks which, the
ids are chosen so that ``local`` goes to node-a and ``remote`` to node-b). Both streams are
kept playing by a warm-up viewer, so every measured offer finds its stream owned and running:
what is measured is routing, not a camera starting. Every offer goes to node-a's socket:

- local: ``local`` is node-a's own: served from memory, no Redis;
- remote: ``remote`` is node-b's: owner read from Redis, the offer relayed through node-b's
  inbox, the answer (with node-b's addresses) relayed back.

Each offer comes from its own aiortc peer connection on its own socket, created before the
clock starts; the time is from sending the offer to receiving the answer (not applied: the
server's session then ends with the socket). At 30 the offers are sent together.

Redis commands: ``INFO commandstats`` before and after each batch; what the nodes do anyway
in the same time (liveness checks, renewals, the node watcher) is measured over an idle
window of the same length and subtracted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_LIMITS, ROOT, print_table, start_mediastream, wait_healthy

sys.path.insert(0, str(ROOT / "tests"))

PATTERN = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=50"
NODES = ("node-a", "node-b")


def node_config(node_id: str, workdir: Path, redis_url: str, streams: list[str]) -> str:
    text = f'{BENCH_LIMITS}[server]\ndata_dir = "{workdir / "data"}"\n\n'
    text += f'[cluster]\nredis_url = "{redis_url}"\nnode_id = "{node_id}"\n\n'
    for stream_id in streams:
        text += f'[[streams]]\nid = "{stream_id}"\nsource = "{PATTERN}"\non_demand = true\n\n'
    return text


async def _offers(count: int) -> list[Any]:
    import trio_asyncio
    from aiortc import RTCConfiguration, RTCPeerConnection

    aio = trio_asyncio.aio_as_trio
    peers = []
    for _ in range(count):
        pc = await aio(lambda: _make_pc(RTCPeerConnection, RTCConfiguration))()
        pc.addTransceiver("video", direction="recvonly")
        await aio(pc.setLocalDescription)(await aio(pc.createOffer)())
        peers.append(pc)
    return peers


async def _make_pc(peer_class: Any, configuration: Any) -> Any:
    return peer_class(configuration(iceServers=[]))  # no STUN: no internet here


async def _batch(ws_url: str, stream_id: str, count: int) -> list[float]:
    """``count`` offers for ``stream_id``, each on its own socket, sent together; the
    offer→answer time of each in ms."""
    import trio
    import trio_asyncio
    from trio_websocket import open_websocket_url

    peers = await _offers(count)
    times: list[float] = []
    go = trio.Event()

    async def one(pc: Any, ready: trio.Event) -> None:
        async with open_websocket_url(ws_url) as ws:
            ready.set()
            await go.wait()
            message = {
                "type": "offer",
                "streamId": stream_id,
                "payload": {"sdp": pc.localDescription.sdp},
            }
            sent = time.perf_counter()
            await ws.send_message(json.dumps(message))
            while True:
                reply = json.loads(await ws.get_message())
                if reply.get("streamId") != stream_id:
                    continue
                if reply["type"] == "answer":
                    times.append(1000 * (time.perf_counter() - sent))
                    return
                if reply["type"] == "error":
                    raise SystemExit(f"server error: {reply}")

    try:
        async with trio.open_nursery() as nursery:
            for pc in peers:
                ready = trio.Event()
                nursery.start_soon(one, pc, ready)
                await ready.wait()
            go.set()
    finally:
        for pc in peers:
            await trio_asyncio.aio_as_trio(pc.close)()
    return times


async def _commands(redis: Any) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values() if isinstance(v, dict))


async def _run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio
    import trio_asyncio

    from mediastream.cluster.placement import stream_ids_placed_on
    from mediastream.cluster.redis_client import open_redis

    from support.redis import running_redis
    from support.viewer import open_viewer

    local, remote = (stream_ids_placed_on(node, NODES, 1)[0] for node in NODES)
    results: dict[str, Any] = {"streams": {"local": local, "remote": remote}, "rows": []}
    with running_redis() as redis_server:
        processes = []
        urls = {}
        try:
            for node_id in NODES:
                workdir = tmp / node_id
                workdir.mkdir(parents=True, exist_ok=True)
                process, port = start_mediastream(
                    node_config(node_id, workdir, redis_server.url, [local, remote]),
                    workdir,
                    log_level=os.environ.get("BENCH_LOG_LEVEL", "warning"),
                )
                processes.append(process)
                urls[node_id] = f"http://127.0.0.1:{port}"
                wait_healthy(urls[node_id], process, timeout=30)
            ws_a = urls["node-a"].replace("http", "ws") + "/ws"
            async with trio_asyncio.open_loop(), open_redis(redis_server.url) as redis:
                deadline = time.monotonic() + 30  # both records in Redis (keys: polled)
                while await redis.exists(["ms:node:node-a", "ms:node:node-b"]) < 2:
                    if time.monotonic() > deadline:
                        raise SystemExit("the nodes did not register")
                    await trio.sleep(0.1)
                # Warm-up viewers keep both streams owned and running (and the remote one
                # relayed, as a page watching it would).
                async with open_viewer(ws_a) as warm:
                    for stream_id in (local, remote):
                        await (await warm.play(stream_id, trickle=True)).wait_frames(5)
                    for label, stream_id in (("local", local), ("remote", remote)):
                        for count in (1, 30):
                            rounds = args.rounds if count == 1 else max(1, args.rounds // 5)
                            times: list[float] = []
                            calls = 0
                            elapsed = 0.0
                            for _ in range(rounds):
                                before = await _commands(redis)
                                started = time.monotonic()
                                times += await _batch(ws_a, stream_id, count)
                                elapsed += time.monotonic() - started
                                calls += await _commands(redis) - before - 1  # less our INFO
                            # What the nodes do anyway over the same time, measured idle.
                            before = await _commands(redis)
                            await trio.sleep(elapsed)
                            idle = await _commands(redis) - before - 1
                            per_offer = (calls - idle) / (rounds * count)
                            row = {
                                "stream": label,
                                "simultaneous": count,
                                "offers": len(times),
                                "answer_p50_ms": round(statistics.median(times), 1),
                                "answer_max_ms": round(max(times), 1),
                                "redis_commands_per_offer": round(per_offer, 1),
                                "background_commands_per_s": round(idle / elapsed, 1),
                            }
                            print(row, file=sys.stderr)
                            results["rows"].append(row)
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=15)
    return results


def main() -> None:
    import trio

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        results = trio.run(_run, args, Path(tmp))
    load_after = os.getloadavg()
    print("\nOffer→answer through node-a's socket (ms), and Redis commands per offer")
    print_table(
        ["stream", "at once", "offers", "p50", "max", "Redis cmds/offer", "background cmds/s"],
        [
            [
                r["stream"],
                r["simultaneous"],
                r["offers"],
                r["answer_p50_ms"],
                r["answer_max_ms"],
                r["redis_commands_per_offer"],
                r["background_commands_per_s"],
            ]
            for r in results["rows"]
        ],
    )
    load = {
        "before": [round(v, 2) for v in load_before],
        "after": [round(v, 2) for v in load_after],
    }
    print(f"load average (1/5/15 min) before {load['before']}, after {load['after']}")
    if args.json:
        results["load_average"] = load
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
