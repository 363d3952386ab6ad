"""Issue 13's performance targets, MediaStream and Janus in one run, browser-like viewers.

    python benchmarks/targets.py [--servers mediastream,janus] [--viewers 60] [--rounds 2]
                                 [--seconds 20] [--profile DIR] [--label NAME]
                                 [--only-idle] [--idle-windows N]

One RTSP camera (``/h264-busy``, SD). Each server in turn, pinned to CPU 0 (``taskset``); the
viewers' processes run where the scheduler puts them (``--viewer-cpus 1`` pins them; on a
shared machine that starves them), the camera ahead of the load:

1. the server settles with the camera on and no viewer: RSS, and its CPU over a window
   ("idle": the camera ingest alone);
2. N viewers join at once (their offers, or Janus's "watch" requests, all sent at the same
   moment from processes of 20): offer → answer, and offer → first complete keyframe (every
   packet of an access unit with an IDR slice, decrypted by the viewer);
3. the same N viewers watch (RTCP receiver reports, REMB, NACKs: see ``viewers.py``): server
   CPU over a window, per viewer added and per packet; RSS per viewer;
4. they leave; steps 2–3 again for each further round.

``--profile DIR`` samples the server with py-spy (``--nonblocking``, so the figures move
little) through each phase and writes the collapsed stacks there. ``--label`` names the run
in the JSON (``benchmarks/results/targets[-LABEL].json``): run the same script against two
checkouts (``PYTHONPATH=...``) for a before/after. ``--only-idle`` stops after step 1 (the
camera ingest alone), measured in ``--idle-windows`` windows of ``--seconds`` (median).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fanout import ViewerProcesses, measure, server

from common import CLOCK_TICKS, ROOT, cpu_seconds, print_table, rss_bytes, rtsp_camera

MOUNT = "/h264-busy"
SERVER_CPUS = "0"
PER_PROCESS = 20

#: The issue's targets: (what, key in the summary, target, lower is better).
TARGETS = [
    ("% of a core per added SD viewer", "per_viewer_cpu_percent", 0.18),
    ("µs of server CPU per RTP packet", "us_per_packet", None),
    ("idle process, % of a core", "idle_cpu_percent", 0.5),
    ("RSS before any viewer, MB", "rss_before_mb", 60.0),
    ("RSS per viewer, KB", "rss_per_viewer_kb", 400.0),
    ("joiners: offer → answer p50, ms", "answer_p50_ms", 60.0),
    ("joiners: first complete keyframe p50, ms", "keyframe_p50_ms", 150.0),
    ("joiners: first complete keyframe max, ms", "keyframe_max_ms", 300.0),
]


class Profiler:
    """py-spy sampling the server through one phase, if asked to."""

    def __init__(self, folder: Path | None, pid: int) -> None:
        self.folder, self.pid = folder, pid
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, name: str, seconds: float) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).parent / "py-spy"),
            *["record", "--nonblocking", "--rate", "200", "--format", "raw"],
            *["--duration", str(round(seconds)), "--pid", str(self.pid)],
            *["--output", str(self.folder / f"{name}.txt")],
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def wait(self) -> None:
        if self.process is not None:
            self.process.wait(timeout=120)
            self.process = None


def run_server(kind: str, camera_url: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"server": kind, "load_average_start": os.getloadavg()}
    options = ["--silent"] if args.silent else []
    with (
        tempfile.TemporaryDirectory() as tmp,
        server(kind, camera_url, Path(tmp), cpus=SERVER_CPUS) as (target, pid),
    ):
        profiler = Profiler(args.profile / kind if args.profile else None, pid)
        time.sleep(5)  # the camera connects, the server settles
        result["rss_before_mb"] = rss_bytes(pid) / 2**20
        idle_windows, idle_threads = [], []
        for window in range(args.idle_windows):
            profiler.start("idle" if window == 0 else f"idle-{window}", args.seconds)
            threads_before, wall_before = thread_cpu_seconds(pid), time.monotonic()
            idle_windows.append(measure(pid, args.seconds, None)["cpu_percent"])
            threads_after, wall = thread_cpu_seconds(pid), time.monotonic() - wall_before
            idle_threads.append(
                {
                    f"{name} ({tid})": 100 * (cpu - threads_before.get(tid, (name, 0.0))[1]) / wall
                    for tid, (name, cpu) in threads_after.items()
                    if cpu > threads_before.get(tid, (name, 0.0))[1]
                }
            )
            profiler.wait()
        idle = {"cpu_percent": statistics.median(idle_windows)}
        result["idle_cpu_percent"] = idle["cpu_percent"]
        result["idle_cpu_percent_windows"] = idle_windows
        result["idle_cpu_percent_by_thread"] = idle_threads
        if args.only_idle:
            result["load_average_end"] = os.getloadavg()
            return result
        rounds = []
        for index in range(args.rounds):
            rss_before = rss_bytes(pid)
            cpu_before = cpu_seconds(pid)
            profiler.start(f"join-{index}", 12)
            viewers = ViewerProcesses(
                target,
                args.viewers,
                PER_PROCESS,
                janus=kind == "janus",
                options=options,
                cpus=args.viewer_cpus,
            )
            try:
                join_cpu = cpu_seconds(pid) - cpu_before
                profiler.wait()
                time.sleep(3)
                joined = viewers.stats()
                profiler.start(f"watch-{index}", args.seconds)
                watching = measure(pid, args.seconds, viewers)
                profiler.wait()
                rss_with = rss_bytes(pid)
            finally:
                viewers.close()
            added = watching["cpu_percent"] - idle["cpu_percent"]
            answers = sorted(1000 * s for s in joined["answerSeconds"])
            keyframes = sorted(1000 * s for s in joined["keyframeSeconds"])
            rounds.append(
                {
                    **watching,
                    "join_server_cpu_ms": 1000 * join_cpu,
                    "answer_ms": answers,
                    "keyframe_ms": keyframes,
                    "keyframes_missing": args.viewers - len(keyframes),
                    "per_viewer_cpu_percent": added / args.viewers,
                    "us_per_packet": 1e6 * added / 100 / max(1.0, watching["packets_per_s"]),
                    "rss_per_viewer_kb": (rss_with - rss_before) / 1024 / args.viewers,
                }
            )
            print(f"{kind} round {index}: {_brief(rounds[-1])}", file=sys.stderr)
            time.sleep(3)
        result["rounds"] = rounds
        result["load_average_end"] = os.getloadavg()
    first = rounds[0]
    answers = [a for r in rounds for a in r["answer_ms"]]
    keyframes = [k for r in rounds for k in r["keyframe_ms"]]
    result.update(
        per_viewer_cpu_percent=statistics.median(r["per_viewer_cpu_percent"] for r in rounds),
        us_per_packet=statistics.median(r["us_per_packet"] for r in rounds),
        rss_per_viewer_kb=first["rss_per_viewer_kb"],  # later rounds reuse what was freed
        answer_p50_ms=statistics.median(answers) if answers else None,
        keyframe_p50_ms=statistics.median(keyframes) if keyframes else None,
        keyframe_max_ms=max(keyframes) if keyframes else None,
        join_server_cpu_ms_per_viewer=statistics.median(r["join_server_cpu_ms"] for r in rounds)
        / args.viewers,
    )
    return result


def thread_cpu_seconds(pid: int) -> dict[str, tuple[str, float]]:
    """User + system CPU time of each of a process's threads: {tid: (name, seconds)}."""
    threads = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # the thread ended
        threads[task.name] = (name, (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return threads


def _brief(row: dict[str, Any]) -> str:
    keys = ("cpu_percent", "per_viewer_cpu_percent", "us_per_packet", "packets_per_s",
            "loss_percent", "rtcpSent_per_s", "nacksSent_per_s", "join_server_cpu_ms")  # fmt: skip
    text = ", ".join(f"{k} {row[k]:.2f}" for k in keys)
    answers, keyframes = row["answer_ms"], row["keyframe_ms"]
    if answers:
        text += f", answer p50 {statistics.median(answers):.0f} ms"
    if keyframes:
        text += f", keyframe p50 {statistics.median(keyframes):.0f} max {max(keyframes):.0f} ms"
    return text + f", keyframes missing {row['keyframes_missing']}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--servers", default="mediastream,janus")
    parser.add_argument("--viewers", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--silent", action="store_true", help="viewers send no RTCP (old mode)")
    parser.add_argument("--profile", type=Path, help="write py-spy's samples here")
    parser.add_argument("--label", default="")
    parser.add_argument("--viewer-cpus", help="pin the viewers' processes (taskset -c)")
    parser.add_argument(
        "--only-idle", action="store_true", help="measure the idle server only (no viewers)"
    )
    parser.add_argument(
        "--idle-windows", type=int, default=1, help="idle windows of --seconds (median taken)"
    )
    args = parser.parse_args()

    results = []
    with rtsp_camera() as camera_port:
        camera_url = f"rtsp://127.0.0.1:{camera_port}{MOUNT}"
        for kind in args.servers.split(","):
            results.append(run_server(kind, camera_url, args))

    print(f"\nIssue 13's targets, {args.viewers} viewers, {args.rounds} rounds, one run")
    headers = ["target", "goal"]
    for r in results:
        headers.append(r["server"])
    rows = []
    for what, key, goal in TARGETS:
        if args.only_idle and key != "idle_cpu_percent" and key != "rss_before_mb":
            continue
        rows.append([what, "-" if goal is None else f"≤ {goal:g}"] + [r[key] for r in results])
    if args.only_idle:
        rows.append(["idle windows, % of a core", "-"]
                    + [" / ".join(f"{w:.2f}" for w in r["idle_cpu_percent_windows"])
                       for r in results])  # fmt: skip
        for r in results:
            for window, threads in enumerate(r["idle_cpu_percent_by_thread"]):
                busy = ", ".join(f"{name} {cpu:.2f}" for name, cpu in threads.items())
                print(f"{r['server']} idle window {window}, % of a core by thread: {busy}")
    else:
        rows.append(["server CPU per joiner, ms", "-"]
                    + [r["join_server_cpu_ms_per_viewer"] for r in results])  # fmt: skip
    rows.append(["load average (1 min), start / end", "-"]
                + [f"{r['load_average_start'][0]:.1f} / {r['load_average_end'][0]:.1f}"
                   for r in results])  # fmt: skip
    print_table(headers, rows)
    name = "targets" + (f"-{args.label}" if args.label else "") + ".json"
    path = ROOT / "benchmarks" / "results" / name
    summary = {"viewers": args.viewers, "rounds": args.rounds, "seconds": args.seconds,
               "silent": args.silent, "label": args.label, "only_idle": args.only_idle}  # fmt: skip
    path.write_text(json.dumps({**summary, "servers": results}, indent=2))
    print(f"written: {path}")


if __name__ == "__main__":
    main()
