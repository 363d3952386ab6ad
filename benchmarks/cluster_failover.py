"""Cluster failover: the owner of a page's streams killed (SIGKILL) → every tile decoding again.

    python benchmarks/cluster_failover.py [--kills 10] [--streams 3] [--json FILE]

One real ``redis-server`` (tests/support/redis.py), the GStreamer RTSP test camera (/h264, a
2 s GOP, primed so the mount is always playing, as a real camera is), and two nodes as
``mediastream serve`` processes: node-a holds the page's one socket (an aiortc viewer with one
tile per stream), node-b owns the streams (they are picked so that placement gives them to
node-b). Each round starts node-b, plays every tile until it decodes, kills node-b with
SIGKILL and waits until every tile decodes again. The viewer behaves as the page's engine
does: on ``peer_failed`` it waits the engine's first retry delay (1 s plus up to 20 %
jitter, ``WebSocketManager.backoffDelay(0)``) and sends a new offer on the same socket.

Per tile and kill (seconds from the kill):

- told: the tile's ``peer_failed`` arrived (the socket node noticed the owner's death);
- answer: the answer to the re-offer arrived (includes any wait for the dead owner's lease
  and the new claim);
- decoding: the first frame of the new peer connection came out of aiortc's decoder
  (ICE, the new owner's camera session, the camera's next keyframe).

``--steady`` makes the first kill wait until Redis has been up for a lease's TTL (before that,
nobody is judged gone by its liveness connection, and the first kill fails over slower).

Prints p50 and max of each, and of the time until the last tile of a kill decodes, and the
load average (the machine may be shared); writes every sample as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BENCH_LIMITS, ROOT, print_table, rtsp_camera, start_mediastream, wait_healthy

sys.path.insert(0, str(ROOT / "tests"))

MOUNT = "/h264"
NODES = ("node-a", "node-b")
#: the page engine's first retry delay: WebSocketManager.backoffDelay(0) = 1000 ms + ≤ 20 %.
ENGINE_RETRY = (1.0, 1.2)  # seconds


def node_config(
    node_id: str, workdir: Path, redis_url: str, camera: int, streams: list[str]
) -> str:
    source = f"rtsp://127.0.0.1:{camera}{MOUNT}"
    text = f'{BENCH_LIMITS}[server]\ndata_dir = "{workdir / "data"}"\n\n'
    text += "[media]\non_demand_grace = 1\n\n"
    text += f'[cluster]\nredis_url = "{redis_url}"\nnode_id = "{node_id}"\n\n'
    for stream_id in streams:
        text += f'[[streams]]\nid = "{stream_id}"\nsource = "{source}"\non_demand = true\n\n'
    return text


def start_node(
    node_id: str, tmp: Path, redis_url: str, camera: int, streams: list[str]
) -> tuple[subprocess.Popen[bytes], str]:
    workdir = tmp / node_id
    workdir.mkdir(exist_ok=True)
    log = (workdir / "server.log").open("ab")
    process, port = start_mediastream(
        node_config(node_id, workdir, redis_url, camera, streams),
        workdir,
        log_level=os.environ.get("BENCH_LOG_LEVEL", "info"),
        output=log,
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, timeout=30)
    return process, url


async def _wait_until(predicate: Any, what: str, limit: float = 30) -> None:
    """Poll ``predicate`` (an async callable) every 50 ms: Redis keys have no event to wait on."""
    import trio

    deadline = trio.current_time() + limit
    while not await predicate():
        if trio.current_time() > deadline:
            raise SystemExit(f"timed out waiting until {what}")
        await trio.sleep(0.05)


async def _round(
    a_url: str, b_process: subprocess.Popen[bytes], redis: Any, streams: list[str]
) -> list[dict[str, float]]:
    """One kill: play every stream from node-b through node-a's socket, kill node-b, time."""
    import trio
    import trio_asyncio

    from support.viewer import open_viewer

    async def owned_by_b() -> bool:
        values = [await redis.get(f"ms:owner:{s}") for s in streams]
        return all(v is not None and v.startswith("node-b|") for v in values)

    samples: list[dict[str, float]] = []
    async with open_viewer(a_url.replace("http", "ws") + "/ws") as viewer:
        for stream_id in streams:
            await (await viewer.play(stream_id, trickle=True)).wait_frames(5, timeout=30)
        await _wait_until(owned_by_b, "node-b owns every stream")
        mark = len(viewer.messages)
        killed = time.monotonic()
        os.kill(b_process.pid, signal.SIGKILL)

        async def recover(stream_id: str) -> None:
            told_message = await viewer.wait_for(
                lambda m: m.get("streamId") == stream_id and m.get("type") == "error",
                after=mark,
                timeout=60,
            )
            told = time.monotonic()
            if told_message.get("code") != "peer_failed":
                raise SystemExit(f"{stream_id}: expected peer_failed, got {told_message}")
            # The old peer connection is closed as the engine does (it fails to reach the
            # dead owner; aiortc's close of it can take long: not waited for here).
            old = viewer.streams[stream_id].pc
            nursery.start_soon(trio_asyncio.aio_as_trio(old.close))
            await trio.sleep(random.uniform(*ENGINE_RETRY))
            for _attempt in range(10):  # the engine retries an offer that fails, too
                offered = time.monotonic()
                try:
                    played = await viewer.play(stream_id, trickle=True)
                    break
                except Exception as exc:  # any failure: the engine retries
                    print(f"{stream_id}: re-offer failed ({exc}); retrying", file=sys.stderr)
                    await trio.sleep(random.uniform(*ENGINE_RETRY))
            else:
                raise SystemExit(f"{stream_id}: no answer after 10 offers")
            answered = time.monotonic()
            await played.wait_frames(1, timeout=60)
            decoding = time.monotonic()
            samples.append(
                {
                    "stream": stream_id,  # type: ignore[dict-item]
                    "told_s": told - killed,
                    "offered_s": offered - killed,
                    "answer_s": answered - killed,
                    "decoding_s": decoding - killed,
                }
            )

        async with trio.open_nursery() as nursery:
            for stream_id in streams:
                nursery.start_soon(recover, stream_id)
        worst = max(s["decoding_s"] for s in samples)
        print(f"every tile decoding {worst:.2f} s after the kill: {samples}", file=sys.stderr)
    return samples


async def _run(args: argparse.Namespace, tmp: Path, camera: int) -> dict[str, Any]:
    import trio
    import trio_asyncio

    from mediastream.cluster.leases import LEASE_TTL
    from mediastream.cluster.placement import stream_ids_placed_on
    from mediastream.cluster.redis_client import open_redis

    from support.redis import running_redis

    streams = stream_ids_placed_on("node-b", NODES, args.streams)
    samples: list[dict[str, float]] = []
    with running_redis() as redis_server:
        url = redis_server.url
        a_process, a_url = start_node("node-a", tmp, url, camera, streams)
        try:
            async with trio_asyncio.open_loop(), open_redis(url) as redis:
                if args.steady:
                    # Nodes are judged gone by their liveness connection only once Redis has
                    # been up for a lease's TTL (a restart must not read as every node dying).
                    uptime = int((await redis.info("server"))["uptime_in_seconds"])
                    await trio.sleep(max(0.0, LEASE_TTL + 1 - uptime))
                for kill in range(args.kills):
                    b_process, _ = start_node("node-b", tmp, url, camera, streams)

                    async def b_registered() -> bool:
                        return bool(await redis.exists(["ms:node:node-b"]))

                    try:
                        await _wait_until(b_registered, "node-b registered")
                        round_samples = await _round(a_url, b_process, redis, streams)
                    finally:
                        b_process.kill()
                        b_process.wait()
                    samples.extend(round_samples)
                    print(f"kill {kill + 1} done", file=sys.stderr)

                    async def released() -> bool:
                        values = [await redis.get(f"ms:owner:{s}") for s in streams]
                        return all(v is None for v in values)

                    # node-a gives the streams up once the viewer has left (on-demand grace),
                    # so that the restarted node-b is placed and claims them again.
                    await _wait_until(released, "streams released", limit=60)
        finally:
            a_process.terminate()
            a_process.wait(timeout=15)
    return {"streams": streams, "samples": samples}


def main() -> None:
    import trio

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="keep the nodes' logs in this directory")
    parser.add_argument(
        "--steady",
        action="store_true",
        help="first kill only once Redis has been up for a lease's TTL",
    )
    args = parser.parse_args()

    load_before = os.getloadavg()
    with rtsp_camera(prime=MOUNT) as camera, tempfile.TemporaryDirectory() as tmp:
        workdir = args.logs or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        result = trio.run(_run, args, workdir, camera)
    load_after = os.getloadavg()

    samples = result["samples"]
    rows = []
    for key in ("told_s", "offered_s", "answer_s", "decoding_s"):
        values = [s[key] for s in samples]
        rows.append([key.removesuffix("_s"), statistics.median(values), max(values)])
    # The figure that matters: per kill, the time until the *last* tile decodes.
    per_kill = [
        max(s["decoding_s"] for s in samples[i : i + args.streams])
        for i in range(0, len(samples), args.streams)
    ]
    rows.append(["every tile decoding", statistics.median(per_kill), max(per_kill)])
    print(f"\nOwner killed, {args.kills} kills x {args.streams} tiles: seconds from the kill")
    print_table(["event", "p50", "max"], rows)
    load = {
        "before": [round(v, 2) for v in load_before],
        "after": [round(v, 2) for v in load_after],
    }
    print(f"load average (1/5/15 min) before {load['before']}, after {load['after']}")
    if args.json:
        result.update(per_kill_s=per_kill, load_average=load)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
