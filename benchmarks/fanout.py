"""Fan-out cost: one RTSP camera to N viewers; server CPU per viewer and per RTP packet.

    python benchmarks/fanout.py [--server mediastream|janus|transcoding] [--viewers 1,10,50,100]
                                [--mount /h264-busy] [--seconds 20] [--json results.json]

The server runs in its own process with the camera always on; the viewers run in other
processes (aiortc peers that do not decrypt or decode, but send the RTCP a browser sends:
receiver reports, REMB, NACKs on gaps; ``--silent`` for viewers that only count packets,
``--drop 0.01`` to lose 1 % of packets on arrival and have them NACKed). For each
viewer count the server's CPU time (user + system, /proc) is measured over a window, with the
packets the viewers received and the ones they missed (sequence-number gaps). The 0-viewer
row is the camera ingest alone; "per viewer" and "µs/packet" subtract it.

Servers:
    mediastream   this project, H.264 passed through
    janus         Janus (Debian's package), streaming plugin restreaming the same camera
    transcoding   stock aiortc: the camera decoded once, VP8 encoded for each viewer
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    cpu_seconds,
    free_port,
    join_together,
    mediastream_server,
    print_table,
    rss_bytes,
    rtsp_camera,
)

VIEWERS = str(ROOT / "benchmarks" / "viewers.py")
#: What each viewer process counts (see viewers.py's ``_stats``).
COUNTERS = (
    "packetsReceived",
    "packetsLost",
    "rtcpSent",
    "nacksSent",
    "retransmissionsReceived",
)


class ViewerProcesses:
    """N viewers spread over processes of at most ``per_process`` each."""

    def __init__(
        self,
        target: str,
        count: int,
        per_process: int,
        *,
        janus: bool,
        options: tuple[str, ...] | list[str] = (),
        cpus: str | None = None,
    ) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        pin = ["taskset", "-c", cpus] if cpus else []
        for index in range(math.ceil(count / per_process)):
            share = min(per_process, count - index * per_process)
            command = [*pin, PYTHON, VIEWERS, target, "cam", str(share), *options]
            command += ["--janus"] if janus else []
            self.processes.append(
                subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )
        try:
            join_together(self.processes, f"{count} viewers")
        except SystemExit:
            self.close()
            raise

    def stats(self) -> dict[str, Any]:
        """Every process's counters summed, its lists (answer and keyframe times) joined."""
        totals: dict[str, Any] = {key: 0 for key in COUNTERS}
        totals.update(answerSeconds=[], keyframeSeconds=[])
        for process in self.processes:
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write("stats\n")
            process.stdin.flush()
            line = json.loads(process.stdout.readline())
            for key, value in line.items():
                totals[key] += value
        return totals

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(process.pid) for process in self.processes)

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                process.stdin.close()
        for process in self.processes:
            process.wait(timeout=60)
            if process.stdout is not None:
                process.stdout.close()


def measure(pid: int, seconds: float, viewers: ViewerProcesses | None) -> dict[str, float]:
    before = viewers.stats() if viewers else dict.fromkeys(COUNTERS, 0)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    client_before = viewers.cpu_seconds() if viewers else 0.0
    time.sleep(seconds)
    cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
    client_after = viewers.cpu_seconds() if viewers else 0.0
    after = viewers.stats() if viewers else before
    wall = wall_after - wall_before
    packets = after["packetsReceived"] - before["packetsReceived"]
    lost = after["packetsLost"] - before["packetsLost"]
    return {
        **{
            f"{key}_per_s": (after[key] - before[key]) / wall
            for key in ("rtcpSent", "nacksSent", "retransmissionsReceived")
        },
        "cpu_percent": 100 * (cpu_after - cpu_before) / wall,
        "packets_per_s": packets / wall,
        "loss_percent": 100 * lost / max(1, packets + lost),
        "rss_mb": rss_bytes(pid) / 2**20,
        "client_cpu_percent": 100 * (client_after - client_before) / wall,
    }


@contextmanager
def server(
    kind: str,
    camera_url: str,
    tmp: Path,
    *,
    cpus: str | None = None,
    environment: dict[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """The server under test; yields (the viewers' target, its pid). ``cpus``: pin it to
    these; ``environment``: added to MediaStream's."""
    if kind == "mediastream":
        config = (
            BENCH_LIMITS + f'[[streams]]\nid = "cam"\nsource = "{camera_url}"\non_demand = false\n'
        )
        with mediastream_server(config, tmp, cpus=cpus, environment=environment) as (url, pid):
            yield url.replace("http", "ws") + "/ws", pid
    elif kind == "janus":
        from janus import running_janus

        with running_janus(camera_url, cpus=cpus) as (url, pid):
            yield url, pid
    else:
        port = free_port()
        process = subprocess.Popen(
            [PYTHON, str(ROOT / "benchmarks" / "stock_aiortc_server.py"), camera_url, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != "READY":
            raise SystemExit("the stock aiortc server did not start")
        try:
            yield f"ws://127.0.0.1:{port}/ws", process.pid
        finally:
            process.terminate()
            process.wait(timeout=15)
            process.stdout.close()


def run(
    kind: str, mount: str, counts: list[int], seconds: float, per_process: int, options: list[str]
) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with rtsp_camera() as camera_port, tempfile.TemporaryDirectory() as tmp:
        camera_url = f"rtsp://127.0.0.1:{camera_port}{mount}"
        with server(kind, camera_url, Path(tmp)) as (target, pid):
            time.sleep(3)  # let the camera connect and settle
            ingest = measure(pid, seconds, None)
            results.append({"viewers": 0, **ingest})
            for count in counts:
                viewers = ViewerProcesses(
                    target, count, per_process, janus=kind == "janus", options=options
                )
                try:
                    time.sleep(2)
                    row = measure(pid, seconds, viewers)
                finally:
                    viewers.close()
                added = row["cpu_percent"] - ingest["cpu_percent"]
                row["per_viewer_cpu_percent"] = added / count
                row["us_per_packet"] = 1e6 * added / 100 / max(1, row["packets_per_s"])
                results.append({"viewers": count, **row})
                time.sleep(2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--server", choices=("mediastream", "janus", "transcoding"), default="mediastream"
    )
    parser.add_argument("--viewers", default="1,10,50,100")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--mount", default="/h264-busy")
    parser.add_argument("--per-process", type=int, default=25, help="viewers per load process")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--silent", action="store_true", help="viewers send no RTCP (old mode)")
    parser.add_argument("--drop", type=float, default=0.0, help="viewers lose this fraction")
    args = parser.parse_args()
    counts = [int(n) for n in args.viewers.split(",")]
    options = ["--silent"] if args.silent else ["--drop", str(args.drop)]
    results = run(args.server, args.mount, counts, args.seconds, args.per_process, options)

    print(
        f"\nFan-out: {args.server}, one RTSP camera ({args.mount}); CPU in % of one core, "
        f"{args.seconds:.0f} s windows"
    )
    print_table(
        ["viewers", "server CPU %", "per viewer %", "µs/packet", "packets/s", "loss %",
         "server RSS MB", "viewers' CPU %", "RTCP/s", "NACKs/s", "RTX/s"],
        [
            [r["viewers"], r["cpu_percent"], r.get("per_viewer_cpu_percent", "-"),
             r.get("us_per_packet", "-"), r["packets_per_s"], r["loss_percent"], r["rss_mb"],
             r["client_cpu_percent"], r["rtcpSent_per_s"], r["nacksSent_per_s"],
             r["retransmissionsReceived_per_s"]]
            for r in results
        ],
    )  # fmt: skip
    if args.json:
        summary = {"server": args.server, "mount": args.mount, "seconds": args.seconds}
        args.json.write_text(json.dumps({**summary, "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
