"""Replicas: one camera, three nodes, ``max_viewers_per_node = 20``, 60 viewers.

    python benchmarks/replicas.py [--viewers 60] [--cap 20] [--seconds 20] [--json out.json]
    python benchmarks/replicas.py --max-relays 1 --chain-only [--seconds 20]

A real ``redis-server`` (loopback), the GStreamer test camera counting its RTSP sessions
(``--report-sessions``) and three ``mediastream serve`` nodes, each its own process and
port. Two runs of the same load, every viewer's socket on node 0:

- ``spread``: ``max_viewers_per_node = --cap``: the owner serves ``cap`` viewers, replicas
  (the other nodes, fed over the relay) serve the rest;
- ``owner only``: ``max_viewers_per_node = 0``: the owner serves every viewer.

Reported per run: the camera's RTSP sessions (connections made, most at once: the camera is
read once), the viewers' loss (sequence gaps at browser-like ``viewers.py`` viewers), each
node's CPU and open peer connections. In ``spread``, two decoding viewers in this process —
one joined first (served by the owner), one joined last (served by a replica) — record when
each access unit arrives; the same frame (identical bytes: the relay forwards the owner's
payloads) is matched at both, and the replica's extra latency is the difference (p50, p95).

``--max-relays N`` adds a ``chain`` run: ``max_viewers_per_node = 1``,
``max_relays_per_node = N``, and only three decoding viewers joining one after the other: the
owner serves the first, a replica fed by the owner the second, and (N = 1) a replica fed by
that replica (depth 2) the third. Each later viewer's extra latency against the owner's is
reported per depth (read from ``/api/streams``' replicas). ``--chain-only`` runs just that.

Everything shares this machine's cores (camera, Redis, three nodes, the load generator):
run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster_capacity import _redis_command, redis_server

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    SYSTEM_PYTHON,
    cpu_seconds,
    free_port,
    join_together,
    print_table,
)

sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

NODES = ("node-0", "node-1", "node-2")
STREAM = "lobby"
SETTLE = 5.0  # seconds after every viewer connected before measuring
#: seconds after the replica's viewer plays before its frames count for latency: it started
#: with the cached GOP (older frames sent at once), then catches up with the live edge.
CATCH_UP = 3.0


class CountingCamera:
    """The test camera, its ``SESSIONS <n>`` lines followed in a thread."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [SYSTEM_PYTHON, str(ROOT / "tests" / "support" / "rtsp_camera.py"),
             "--report-sessions"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if not line or line[0] != "READY":
            raise SystemExit("the RTSP test camera did not start (see README: test set-up)")
        self.port = int(line[1])
        self.current = self.peak = self.connects = 0
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("SESSIONS "):
                count = int(line.split()[1])
                self.connects += max(0, count - self.current)
                self.current, self.peak = count, max(self.peak, count)

    def reset(self) -> None:
        self.peak, self.connects = self.current, 0

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=10)


@contextlib.contextmanager
def cluster(
    camera: CountingCamera, redis_port: int, cap: int, tmp: Path, max_relays: int = 0
) -> Iterator[list[Any]]:
    """Three nodes; yields ``[(node id, ws url, http url, process)]``."""
    _redis_command(redis_port, "FLUSHALL")
    nodes = []
    try:
        for node_id in NODES:
            port = free_port()
            config = tmp / f"{node_id}-{cap}.toml"
            config.write_text(
                BENCH_LIMITS
                + f'\n[server]\ndata_dir = "{tmp / node_id}"\n\n'
                + f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n'
                + f'node_id = "{node_id}"\nmax_viewers_per_node = {cap}\n'
                + f"max_relays_per_node = {max_relays}\n\n"
                + f'[[streams]]\nid = "{STREAM}"\n'
                + f'source = "rtsp://127.0.0.1:{camera.port}/h264-busy"\non_demand = true\n'
            )
            process = subprocess.Popen(
                [PYTHON, "-m", "mediastream", "serve", "--config", str(config), "--host",
                 "127.0.0.1", "--port", str(port), "--log-level",
                 os.environ.get("BENCH_LOG_LEVEL", "warning")],
                cwd=ROOT,
            )  # fmt: skip
            nodes.append(
                (node_id, f"ws://127.0.0.1:{port}/ws", f"http://127.0.0.1:{port}", process)
            )
        deadline = time.monotonic() + 60
        expected = {f"ms:node:{n}".encode() for n in NODES}
        while not all(k in _redis_command(redis_port, "KEYS", "ms:node:*") for k in expected):
            if time.monotonic() > deadline:
                raise SystemExit("the nodes did not start")
            time.sleep(0.2)
        yield nodes
    finally:
        for *_, process in nodes:
            process.terminate()
        for *_, process in nodes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def open_peers(http_url: str) -> int:
    with urllib.request.urlopen(http_url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("mediastream_peer_connections_open"):
                return int(float(line.split()[-1]))
    return 0


def viewer_stats(process: subprocess.Popen[str]) -> tuple[int, int]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write("stats\n")
    process.stdin.flush()
    line = json.loads(process.stdout.readline())
    return line["packetsReceived"], line["packetsLost"]


class LatencyProbe:
    """Decoding viewers in a thread of their own (Trio + aiortc): the first joins now (the
    owner serves it), the others (``count`` in all) one after the other when
    :meth:`join_second` is called; arrival times of each access unit, by its bytes."""

    def __init__(self, ws_url: str, count: int = 2) -> None:
        self.ws_url = ws_url
        self.arrivals: list[dict[int, float]] = [{} for _ in range(count)]
        self.first_playing = threading.Event()
        self.second_playing = threading.Event()
        self._join_second = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        #: frames the owner's viewer received from then on are compared (perf_counter)
        self.live_since = float("inf")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join_second(self) -> None:
        self._join_second.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            import trio_asyncio

            trio_asyncio.run(self._main)
        except BaseException as exc:  # reported by the caller
            self.error = exc
            self.first_playing.set()
            self.second_playing.set()

    async def _main(self) -> None:
        import trio

        from support import viewer as viewer_module

        arrivals = self.arrivals
        sinks: dict[int, int] = {}
        original = viewer_module._RecordingQueue.put

        def put(queue: Any, item: Any, block: bool = True, timeout: float | None = None) -> None:
            if item is not None and id(queue._sink) in sinks:
                data = bytes(item[1].data)
                arrivals[sinks[id(queue._sink)]].setdefault(hash(data), time.perf_counter())
                queue._sink.clear()  # only the times are kept
            original(queue, item, block, timeout)

        viewer_module._RecordingQueue.put = put  # type: ignore[method-assign]
        async with viewer_module.open_viewer(self.ws_url) as first:
            played = await first.play(STREAM, trickle=True, capture=True)
            sinks[id(played.access_units)] = 0
            await played.wait_frames(5, timeout=60)
            self.first_playing.set()
            await trio.to_thread.run_sync(self._join_second.wait)
            async with contextlib.AsyncExitStack() as stack:
                for index in range(1, len(arrivals)):
                    later = await stack.enter_async_context(viewer_module.open_viewer(self.ws_url))
                    played_later = await later.play(STREAM, trickle=True, capture=True)
                    sinks[id(played_later.access_units)] = index
                    await played_later.wait_frames(5, timeout=60)
                self.live_since = time.perf_counter() + CATCH_UP
                self.second_playing.set()
                await trio.to_thread.run_sync(self._stop.wait)

    def extra_latency_ms(self, index: int = 1) -> list[float]:
        """Per frame both viewers received live (not the cached GOP a later one started
        with): its arrival at viewer ``index`` (on a replica) less its arrival at the
        owner's."""
        owner, replica = self.arrivals[0], self.arrivals[index]
        return [
            1000 * (replica[h] - owner[h])
            for h in replica.keys() & owner.keys()
            if owner[h] >= self.live_since
        ]


def run(
    label: str, cap: int, args: argparse.Namespace, camera: CountingCamera, redis_port: int,
    tmp: Path,
) -> dict[str, Any]:  # fmt: skip
    camera.reset()
    with cluster(camera, redis_port, cap, tmp) as nodes:
        ws_url = nodes[0][1]
        probe = LatencyProbe(ws_url) if cap else None
        if probe is not None:
            probe.first_playing.wait(timeout=90)
        viewers = subprocess.Popen(
            [PYTHON, str(ROOT / "benchmarks" / "viewers.py"), ws_url, STREAM, str(args.viewers)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            join_together([viewers], label)
            if probe is not None:
                probe.join_second()
                probe.second_playing.wait(timeout=90)
            time.sleep(SETTLE)
            received_before, lost_before = viewer_stats(viewers)
            cpu_before = [cpu_seconds(node[3].pid) for node in nodes]
            started = time.monotonic()
            time.sleep(args.seconds)
            wall = time.monotonic() - started
            cpu = [
                100 * (cpu_seconds(node[3].pid) - before) / wall
                for node, before in zip(nodes, cpu_before, strict=True)
            ]
            received_after, lost_after = viewer_stats(viewers)
            peers = [open_peers(node[2]) for node in nodes]
        finally:
            if viewers.stdin is not None:
                viewers.stdin.close()
            viewers.wait(timeout=60)
            if probe is not None:
                probe.stop()
    received, lost = received_after - received_before, lost_after - lost_before
    result: dict[str, Any] = {
        "run": label,
        "cap": cap,
        "viewers": args.viewers + (2 if probe is not None else 0),
        "camera_connects": camera.connects,
        "camera_peak_sessions": camera.peak,
        "loss_percent": 100 * lost / max(1, received + lost),
        "cpu_percent_per_node": cpu,
        "peers_per_node": peers,
        "load_average": os.getloadavg()[0],
    }
    if probe is not None:
        if probe.error is not None:
            result["latency_error"] = repr(probe.error)
        extra = sorted(probe.extra_latency_ms())
        if extra:
            result["replica_extra_latency_ms"] = {
                "frames": len(extra),
                "p50": statistics.median(extra),
                "p95": extra[int(0.95 * (len(extra) - 1))],
            }
    return result


def replica_depths(http_url: str) -> dict[str, int]:
    """node -> depth of the stream's replicas, as ``/api/streams`` lists them (0: the owner)."""
    with urllib.request.urlopen(f"{http_url}/api/streams/{STREAM}", timeout=5) as response:
        item = json.loads(response.read())
    depths = {r["node"]: r["depth"] for r in item["replicas"]}
    if item["owner"]:
        depths[item["owner"]["node"]] = 0
    return depths


def run_chain(
    args: argparse.Namespace, camera: CountingCamera, redis_port: int, tmp: Path
) -> dict[str, Any]:
    """Three decoding viewers, one per node of a chain: the extra latency of each depth."""
    camera.reset()
    with cluster(camera, redis_port, 1, tmp, max_relays=args.max_relays) as nodes:
        probe = LatencyProbe(nodes[0][1], count=3)
        try:
            probe.first_playing.wait(timeout=90)
            probe.join_second()
            probe.second_playing.wait(timeout=180)
            time.sleep(args.seconds)
            depths = replica_depths(nodes[0][2])
            peers = {node[0]: open_peers(node[2]) for node in nodes}
        finally:
            probe.stop()
    # Viewer i joined i-th: the owner served the first, then each node with room in turn.
    serving = sorted((depth, node) for node, depth in depths.items() if peers.get(node))
    result: dict[str, Any] = {
        "run": f"chain (max_relays_per_node = {args.max_relays})",
        "camera_connects": camera.connects,
        "camera_peak_sessions": camera.peak,
        "depths": {node: depth for depth, node in serving},
        "peers_per_node": list(peers.values()),
        "load_average": os.getloadavg()[0],
        "extra_latency_ms_by_depth": {},
    }
    if probe.error is not None:
        result["latency_error"] = repr(probe.error)
    for index in range(1, 3):
        extra = sorted(probe.extra_latency_ms(index))
        if extra and index < len(serving):
            result["extra_latency_ms_by_depth"][serving[index][0]] = {
                "frames": len(extra),
                "p50": statistics.median(extra),
                "p95": extra[int(0.95 * (len(extra) - 1))],
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--viewers", type=int, default=60)
    parser.add_argument("--cap", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--max-relays", type=int, default=0,
        help="also run a chain (max_viewers_per_node 1, max_relays_per_node N)",
    )  # fmt: skip
    parser.add_argument("--chain-only", action="store_true", help="run only the chain")
    args = parser.parse_args()
    camera = CountingCamera()
    results = []
    chained = None
    try:
        with redis_server() as redis_port, tempfile.TemporaryDirectory() as tmp:
            runs = () if args.chain_only else (("spread", args.cap), ("owner only", 0))
            for label, cap in runs:
                result = run(label, cap, args, camera, redis_port, Path(tmp))
                print(json.dumps(result), flush=True)
                results.append(result)
            if args.max_relays > 0:
                chained = run_chain(args, camera, redis_port, Path(tmp))
                print(json.dumps(chained), flush=True)
    finally:
        camera.close()
    if chained is not None:
        print_table(
            ["depth", "node", "camera sessions", "extra latency vs the owner's viewer p50/p95 ms"],
            [
                [depth, node,
                 f"{chained['camera_connects']} (peak {chained['camera_peak_sessions']})",
                 "{p50:.1f}/{p95:.1f}".format(**chained["extra_latency_ms_by_depth"][depth])
                 if depth in chained["extra_latency_ms_by_depth"] else "-"]
                for node, depth in chained["depths"].items()
            ],
        )  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps([*results, chained], indent=2))
        if not results:
            return
    print_table(
        ["run", "viewers", "camera sessions", "loss %", "CPU % per node", "peers per node",
         "replica extra latency p50/p95 ms"],
        [
            [r["run"], r["viewers"], f"{r['camera_connects']} (peak {r['camera_peak_sessions']})",
             r["loss_percent"], "/".join(f"{c:.0f}" for c in r["cpu_percent_per_node"]),
             "/".join(str(p) for p in r["peers_per_node"]),
             "{p50:.1f}/{p95:.1f}".format(**r["replica_extra_latency_ms"])
             if "replica_extra_latency_ms" in r else "-"]
            for r in results
        ],
    )  # fmt: skip
    if args.json and chained is None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
