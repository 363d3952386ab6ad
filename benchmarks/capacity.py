"""Capacity: 10 cameras x 20 viewers on this machine; packet loss and server CPU.

    python benchmarks/capacity.py [--cameras 10] [--viewers 20] [--seconds 30]
                                  [--mount /h264-busy] [--json out.json]

Ten streams restream the GStreamer test camera (ten RTSP sessions into the server), each
watched by twenty viewers (aiortc, counting packets, one process per camera, a socket each).
Reports the server's CPU, the RTP packets delivered per second, the loss (sequence gaps at
the viewers), the frames per second the cameras delivered and the frames the server's fan-out
dropped (a viewer falling behind loses whole frames before they are numbered, so that loss
would not show as gaps). The camera, the server and the viewers share this machine's cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    cpu_seconds,
    get_json,
    join_together,
    mediastream_server,
    print_table,
    rss_bytes,
    rtsp_camera,
)


def stats(processes: list[subprocess.Popen[str]]) -> tuple[int, int]:
    received = lost = 0
    for process in processes:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("stats\n")
        process.stdin.flush()
        line = json.loads(process.stdout.readline())
        received += line["packetsReceived"]
        lost += line["packetsLost"]
    return received, lost


def source_frames(url: str) -> tuple[int, int]:
    """Frames published and dropped, summed over every stream."""
    streams = get_json(url + "/api/streams")["streams"]
    return (
        sum(s["framesPublished"] for s in streams),
        sum(s["framesDropped"] for s in streams),
    )


def wait_settled(url: str, quiet: float = 5, limit: float = 90) -> float:
    """Wait until no frame has been dropped for ``quiet`` seconds (the connection storm of
    200 viewers joining at once is over); returns the seconds it took."""
    started = time.monotonic()
    last_change, last = started, source_frames(url)[1]
    while time.monotonic() - last_change < quiet and time.monotonic() - started < limit:
        time.sleep(0.5)
        dropped = source_frames(url)[1]
        if dropped != last:
            last_change, last = time.monotonic(), dropped
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--cameras", type=int, default=10)
    parser.add_argument("--viewers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--mount", default="/h264-busy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with rtsp_camera(prime=args.mount) as camera_port, tempfile.TemporaryDirectory() as tmp:
        config = BENCH_LIMITS + "".join(
            f'[[streams]]\nid = "cam-{n}"\nsource = "rtsp://127.0.0.1:{camera_port}{args.mount}"\n'
            "on_demand = false\n"
            for n in range(args.cameras)
        )
        with mediastream_server(config, Path(tmp)) as (url, pid):
            time.sleep(3)
            processes = [
                subprocess.Popen(
                    [
                        PYTHON,
                        str(ROOT / "benchmarks" / "viewers.py"),
                        url.replace("http", "ws") + "/ws",
                        f"cam-{n}",
                        str(args.viewers),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for n in range(args.cameras)
            ]
            try:
                join_together(processes, "capacity")
                settled = wait_settled(url)
                received_before, lost_before = stats(processes)
                published_before, dropped_before = source_frames(url)
                cpu_before, client_before, started = (
                    cpu_seconds(pid),
                    sum(cpu_seconds(p.pid) for p in processes),
                    time.monotonic(),
                )
                time.sleep(args.seconds)
                wall = time.monotonic() - started
                server_cpu = 100 * (cpu_seconds(pid) - cpu_before) / wall
                client_cpu = (
                    100 * (sum(cpu_seconds(p.pid) for p in processes) - client_before) / wall
                )
                received_after, lost_after = stats(processes)
                published_after, dropped_after = source_frames(url)
                rss = rss_bytes(pid) / 2**20
            finally:
                for process in processes:
                    if process.stdin is not None:
                        process.stdin.close()
                for process in processes:
                    process.wait(timeout=60)

    received = received_after - received_before
    lost = lost_after - lost_before
    result = {
        "cameras": args.cameras,
        "viewers_per_camera": args.viewers,
        "seconds": args.seconds,
        "server_cpu_percent": server_cpu,
        "viewers_cpu_percent": client_cpu,
        "packets_per_s": received / wall,
        "loss_percent": 100 * lost / max(1, received + lost),
        "settle_seconds": settled,
        "camera_fps": (published_after - published_before) / wall / args.cameras,
        "frames_dropped": dropped_after - dropped_before,
        "server_rss_mb": rss,
    }
    print(
        f"\nCapacity: {args.cameras} cameras x {args.viewers} viewers ({args.mount}),"
        f" {args.seconds:.0f} s, measured once joining had settled ({settled:.0f} s)"
    )
    print_table(
        [
            "cameras",
            "viewers",
            "server CPU %",
            "packets/s",
            "loss %",
            "camera fps",
            "frames dropped",
            "server RSS MB",
            "viewers' CPU %",
        ],
        [
            [
                args.cameras,
                args.cameras * args.viewers,
                server_cpu,
                result["packets_per_s"],
                result["loss_percent"],
                result["camera_fps"],
                result["frames_dropped"],
                rss,
                client_cpu,
            ]
        ],
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
