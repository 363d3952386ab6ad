"""Cluster capacity: what 1 worker vs ``serve --workers 2`` holds at < 0.5 % loss.

    python benchmarks/cluster_capacity.py [--what viewers,cameras] [--workers 1,2]
        [--viewers 40,80,120,160,200] [--cameras 8,16,24,32,40] [--streams 4]
        [--seconds 20] [--loss 0.5] [--server-cpus 0,1 --viewer-cpus 2-7] [--json out.json]

A real ``redis-server`` (loopback, no persistence), the GStreamer test camera, and
``mediastream serve --workers N`` with ``[cluster] redis_url`` (N = 1 is one cluster node).
For each worker count, the load steps up until the viewers' loss (sequence gaps, browser-like
viewers from ``viewers.py``: RTCP RR, REMB, NACKs) reaches the limit; the capacity is the last
step below it.

- ``viewers``: ``--streams`` streams of the busy SD mount (``/h264-busy``, ~100 packets/s),
  each its own RTSP session, with the viewers spread evenly over them, a socket each. The
  stream ids are chosen so that placement (rendezvous hashing over the workers' node ids,
  computed here the same way) gives each worker as many streams: a stream is owned, and its
  media sent, by one node (replicas are issue 12), so viewers spread over cores only by
  spreading streams.
- ``cameras``: always-on cameras ingested, each its own RTSP session to the same mount, with
  one viewer each.
- ``ingest``: always-on cameras ingested with **no viewer** (a cluster places always-on
  streams by itself): the only load generator is the camera. A step is held when every
  stream is owned and its owner published at least 90 % of the first step's frame rate per
  camera; the rates are read from each worker's ``/api/streams`` (its own counters), asked on
  the connection its ``/healthz`` named the worker on.

A step fails when the loss reaches the limit, or when its viewers receive less than 90 % of
the packet rate per viewer of the first step (a camera not read, a server behind).

Reported per step: loss, packets/s delivered, the server's CPU (the parent and its workers)
and the viewers' CPU. Unpinned, everything — camera, Redis, server, load generators — shares
the machine's cores. The load generator costs ~3× the server per packet (docs/benchmarks.md),
so on a 2-core machine it runs out long before one worker does: measuring what a second
worker adds needs cores for the viewers beyond the server's (``--server-cpus 0,1
--viewer-cpus 2-7`` on an 8-core machine).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    cpu_seconds,
    free_port,
    join_together,
    print_table,
    rtsp_camera,
)

sys.path.insert(0, str(ROOT / "src"))
from mediastream.cluster.leases import NodeRecord
from mediastream.cluster.placement import choose_owner

SETTLE = 5.0  # seconds after every viewer connected before measuring
#: one mount for every stream: primed (kept playing) before the load, as capacity.py does.
MOUNT = "/h264-busy"
#: a step also fails when its viewers get less than this share of the first step's packet
#: rate (a camera that could not be read, or a server that fell behind, shows no gaps).
MIN_RATE_SHARE = 0.9


@contextmanager
def redis_server() -> Iterator[int]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is missing (Debian: apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--protected-mode", "no", "--logfile", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _redis_answers(port):
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.1)
        yield port
    finally:
        process.kill()
        process.wait()


def _redis_command(port: int, *words: str) -> bytes:
    command = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(command.encode())
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def _redis_answers(port: int) -> bool:
    try:
        return _redis_command(port, "PING").startswith(b"+PONG")
    except OSError:
        return False


def node_ids(workers: int, port: int) -> list[str]:
    """The ids the workers will take (``cluster.node_identity``)."""
    host = socket.gethostname()
    if workers == 1:
        return [f"{host}-{port}"]
    return [f"{host}-{port}-w{k}" for k in range(workers)]


def balanced_stream_ids(nodes: list[str], count: int, prefix: str) -> list[str]:
    """``count`` stream ids that placement spreads evenly over ``nodes``."""
    records = [NodeRecord(n, f"http://{n}") for n in nodes]
    per_node = {n: 0 for n in nodes}
    share = -(-count // len(nodes))
    chosen: list[str] = []
    index = 0
    while len(chosen) < count:
        stream_id = f"{prefix}-{index}"
        index += 1
        owner = choose_owner(stream_id, records)
        assert owner is not None
        if per_node[owner.node_id] < share:
            per_node[owner.node_id] += 1
            chosen.append(stream_id)
    return chosen


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the workers)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in children.read_text().split() if children.exists() else []:
        with suppress(FileNotFoundError):  # a worker being restarted
            total += cpu_seconds(int(child))
    return total


@contextmanager
def cluster_server(
    workers: int, streams: list[str], camera_url: str, redis_port: int, port: int, tmp: Path,
    cpus: str | None = None,
) -> Iterator[tuple[str, int]]:  # fmt: skip
    config = tmp / f"cluster-{workers}.toml"
    config.write_text(
        BENCH_LIMITS
        + f'\n[server]\ndata_dir = "{tmp / "data"}"\n\n'
        + f'[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n\n'
        + "".join(
            f'[[streams]]\nid = "{s}"\nsource = "{camera_url}"\non_demand = false\n\n'
            for s in streams
        )
    )
    log_level = os.environ.get("BENCH_LOG_LEVEL", "warning")
    process = subprocess.Popen(
        [*(["taskset", "-c", cpus] if cpus else []), PYTHON, "-m", "mediastream", "serve",
         "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--log-level", log_level, "--workers", str(workers)],
        cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready once every worker's node record is in Redis.
        deadline = time.monotonic() + 60
        expected = {f"ms:node:{n}".encode() for n in node_ids(workers, port)}
        while not all(key in _redis_command(redis_port, "KEYS", "ms:node:*") for key in expected):
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"--workers {workers} did not start")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def viewer_stats(processes: list[subprocess.Popen[str]]) -> tuple[int, int]:
    received = lost = 0
    for process in processes:
        assert process.stdin is not None and process.stdout is not None
        try:
            process.stdin.write("stats\n")
            process.stdin.flush()
            line = json.loads(process.stdout.readline())
        except (BrokenPipeError, json.JSONDecodeError):
            raise StepFailed(f"a viewers process ended early (pid {process.pid})") from None
        received += line["packetsReceived"]
        lost += line["packetsLost"]
    return received, lost


def frames_by_owner(url: str, workers: int) -> dict[str, tuple[str, int]]:
    """stream id -> (its owner, frames its owner has published), from every worker's own
    ``/api/streams``: new connections until each worker answered (the parent hands the
    listening socket to all of them), ``/healthz`` then ``/api/streams`` on one connection."""
    host, port = url.removeprefix("http://").split(":")
    answers: dict[str, list[dict[str, Any]]] = {}
    deadline = time.monotonic() + 30
    while len(answers) < workers:
        if time.monotonic() > deadline:
            raise StepFailed(f"only workers {sorted(answers)} answered")
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.request("GET", "/healthz")
            health = connection.getresponse()
            health.read()
            node = health.headers["X-MediaStream-Node"]
            connection.request("GET", "/api/streams")
            answers[node] = json.loads(connection.getresponse().read())["streams"]
        finally:
            connection.close()
    frames: dict[str, tuple[str, int]] = {}
    for node, streams in answers.items():
        for stream in streams:
            owner = (stream.get("owner") or {}).get("node")
            if owner == node:
                frames[stream["id"]] = (node, stream["framesPublished"])
    return frames


def measure_ingest(
    url: str, pid: int, workers: int, streams: list[str], seconds: float
) -> dict[str, Any]:
    """Always-on ``streams`` with no viewer: the frame rate each owner publishes."""
    # Placed, every stream publishing, and the owners settled: the first worker up claims
    # every always-on stream and hands the others' share over (docs/cluster.md, Placement),
    # and those camera sessions opening again must not fall in the measured window.
    deadline = time.monotonic() + 90
    previous: dict[str, tuple[str, int]] = {}
    while True:
        before = frames_by_owner(url, workers)
        placed = len(before) == len(streams) and min(f for _, f in before.values()) > 0
        owners = {s: owner for s, (owner, _) in before.items()}
        if placed and owners == {s: owner for s, (owner, _) in previous.items()}:
            break
        if time.monotonic() > deadline:
            raise StepFailed(f"owners of {len(streams)} streams never settled")
        previous = before
        time.sleep(3)
    time.sleep(SETTLE)
    before = frames_by_owner(url, workers)
    server_before = process_tree_cpu(pid)
    started = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - started
    server_cpu = 100 * (process_tree_cpu(pid) - server_before) / wall
    after = frames_by_owner(url, workers)
    rates = sorted(
        (after[s][1] - before[s][1]) / wall if s in after and after[s][0] == before[s][0] else 0.0
        for s in streams
    )
    per_node = {
        n: sum(1 for owner, _ in after.values() if owner == n)
        for n in node_ids(workers, int(url.rsplit(":", 1)[1]))
    }
    return {
        "viewers": 0, "streams": len(streams), "loss_percent": 0.0,
        "packets_per_s": sum(rates), "packets_per_s_per_viewer": rates[0],
        "frames_per_s_slowest": rates[0], "frames_per_s_median": rates[len(rates) // 2],
        "streams_per_node": per_node,
        "server_cpu_percent": server_cpu, "viewers_cpu_percent": 0.0,
    }  # fmt: skip


class StepFailed(Exception):
    """A viewers.py process ended early (it prints why: a server error, a connect failure)."""


def measure(
    url: str, pid: int, viewers: dict[str, int], seconds: float, cpus: str | None = None
) -> dict[str, Any]:
    """``viewers``: stream id -> viewer count (one viewers.py process per stream).

    Raises:
        StepFailed
    """
    processes = [
        subprocess.Popen(
            [
                *(["taskset", "-c", cpus] if cpus else []),
                PYTHON,
                str(ROOT / "benchmarks" / "viewers.py"),
                url.replace("http", "ws") + "/ws",
                stream_id,
                str(count),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for stream_id, count in viewers.items()
    ]
    try:
        join_together(processes, "cluster capacity")
        time.sleep(SETTLE)
        received_before, lost_before = viewer_stats(processes)
        server_before = process_tree_cpu(pid)
        clients_before = sum(cpu_seconds(p.pid) for p in processes)
        started = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - started
        server_cpu = 100 * (process_tree_cpu(pid) - server_before) / wall
        clients_cpu = 100 * (sum(cpu_seconds(p.pid) for p in processes) - clients_before) / wall
        received_after, lost_after = viewer_stats(processes)
    finally:
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    received, lost = received_after - received_before, lost_after - lost_before
    return {
        "viewers": sum(viewers.values()),
        "streams": len(viewers),
        "loss_percent": 100 * lost / max(1, received + lost),
        "packets_per_s": received / wall,
        "packets_per_s_per_viewer": received / wall / max(1, sum(viewers.values())),
        "server_cpu_percent": server_cpu,
        "viewers_cpu_percent": clients_cpu,
    }


def ramp(
    what: str, workers: int, steps: list[int], args: argparse.Namespace, camera_port: int,
    redis_port: int, tmp: Path, baseline: dict[str, float],
) -> list[dict[str, Any]]:  # fmt: skip
    """Step the load up until a step is not held; ``baseline`` keeps the first step's packet
    rate per viewer for each ``what``, shared by every worker count."""
    results: list[dict[str, Any]] = []
    for step in steps:
        port = free_port()
        nodes = node_ids(workers, port)
        if what == "viewers":
            streams = balanced_stream_ids(nodes, args.streams, "cam")
            load = {s: step // len(streams) for s in streams}
        elif what == "ingest":
            streams = balanced_stream_ids(nodes, step, "cam")
            load = {}
        else:
            streams = balanced_stream_ids(nodes, step, "cam")
            load = dict.fromkeys(streams, 1)
        camera = f"rtsp://127.0.0.1:{camera_port}{MOUNT}"
        _redis_command(redis_port, "FLUSHALL")
        server = cluster_server(workers, streams, camera, redis_port, port, tmp, args.server_cpus)
        try:
            with server as (url, pid):
                if what == "ingest":
                    measured = measure_ingest(url, pid, workers, streams, args.seconds)
                else:
                    measured = measure(url, pid, load, args.seconds, args.viewer_cpus)
        except (StepFailed, SystemExit) as exc:  # join_together exits on a failed join
            print(f"{what}: {workers} worker(s), {step}: FAILED: {exc}", flush=True)
            measured = {
                "viewers": sum(load.values()), "streams": len(load), "loss_percent": 100.0,
                "packets_per_s": 0.0, "packets_per_s_per_viewer": 0.0,
                "server_cpu_percent": 0.0, "viewers_cpu_percent": 0.0, "error": str(exc),
            }  # fmt: skip
        result = {"what": what, "workers": workers, **measured}
        if what in ("cameras", "ingest"):
            result["cameras"] = step
        rate = result["packets_per_s_per_viewer"]
        expected = baseline.setdefault(what, rate)
        result["held"] = result["loss_percent"] < args.loss and rate >= MIN_RATE_SHARE * expected
        results.append(result)
        print(
            f"{what}: {workers} worker(s), {step}: loss {result['loss_percent']:.2f} %, "
            f"{rate:.0f} packets/s per viewer, server {result['server_cpu_percent']:.0f} % CPU, "
            f"viewers {result['viewers_cpu_percent']:.0f} % CPU, load average "
            f"{os.getloadavg()[0]:.1f}{'' if result['held'] else ' -- NOT HELD'}",
            flush=True,
        )
        if not result["held"]:
            break
    return results


def capacity(results: list[dict[str, Any]], what: str) -> tuple[int, bool]:
    """The last step held and whether any step was not."""
    key = "viewers" if what == "viewers" else "cameras"
    held = [r[key] for r in results if r["held"]]
    return (max(held) if held else 0), not all(r["held"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--what", default="viewers,cameras")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--viewers", default="40,80,120,160,200")
    parser.add_argument("--cameras", default="8,16,24,32,40")
    parser.add_argument(
        "--ingest", default="20,40,60,80,100,120", help="always-on cameras, no viewer"
    )
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--loss", type=float, default=0.5, help="loss limit, percent")
    parser.add_argument("--server-cpus", help="pin the server (parent and workers): taskset -c")
    parser.add_argument("--viewer-cpus", help="pin the load generators: taskset -c")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    whats = args.what.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)

    results: list[dict[str, Any]] = []
    baseline: dict[str, float] = {}
    with (
        rtsp_camera(prime=MOUNT) as camera_port,
        redis_server() as redis_port,
        tempfile.TemporaryDirectory() as tmp,
    ):
        for what in whats:
            steps = [int(s) for s in getattr(args, what).split(",")]
            for workers in worker_counts:
                results += ramp(
                    what, workers, steps, args, camera_port, redis_port, Path(tmp), baseline
                )

    print(f"\nCluster capacity (loss limit {args.loss} %, {args.seconds:.0f} s per step)")
    print_table(
        ["what", "workers", "viewers", "streams", "loss %", "packets/s", "per viewer",
         "server CPU %", "viewers' CPU %", "held"],
        [[r["what"], r["workers"], r["viewers"], r["streams"], r["loss_percent"],
          r["packets_per_s"], r["packets_per_s_per_viewer"], r["server_cpu_percent"],
          r["viewers_cpu_percent"], "yes" if r["held"] else "no"]
         for r in results],
    )  # fmt: skip
    for what in whats:
        held = {
            w: capacity([r for r in results if r["what"] == what and r["workers"] == w], what)
            for w in worker_counts
        }  # fmt: skip
        summary = ", ".join(
            f"{w} worker(s): {n}{'' if reached else '+ (limit not reached)'}"
            for w, (n, reached) in held.items()
        )
        print(f"{what} held under {args.loss} % loss: {summary}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
