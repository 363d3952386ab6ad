"""Fan-out cost: one RTSP camera to N viewers in another process; server CPU per viewer.

    python benchmarks/fanout.py [--viewers 1,10,20] [--seconds 20] [--mount /h264]
                                [--json results.json]

The server runs as ``mediastream serve`` in its own process with the camera always on; the
viewers (aiortc, no decoding) run in a third process. For each viewer count the script
measures the server's CPU time over a window and the RTP packets the viewers received and
lost, then prints a table. The 0-viewer row is the camera ingest alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    PYTHON,
    ROOT,
    cpu_seconds,
    mediastream_server,
    print_table,
    rss_bytes,
    rtsp_camera,
)


def measure(pid: int, seconds: float, viewer: subprocess.Popen[str] | None) -> dict[str, float]:
    before_stats = _viewer_stats(viewer)
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
    after_stats = _viewer_stats(viewer)
    wall = wall_after - wall_before
    packets = after_stats["packetsReceived"] - before_stats["packetsReceived"]
    lost = after_stats["packetsLost"] - before_stats["packetsLost"]
    return {
        "cpu_percent": 100 * (cpu_after - cpu_before) / wall,
        "packets_per_s": packets / wall,
        "loss_percent": 100 * lost / max(1, packets + lost),
        "rss_mb": rss_bytes(pid) / 2**20,
    }


def _viewer_stats(viewer: subprocess.Popen[str] | None) -> dict[str, int]:
    if viewer is None:
        return {"packetsReceived": 0, "packetsLost": 0}
    assert viewer.stdin is not None and viewer.stdout is not None
    viewer.stdin.write("stats\n")
    viewer.stdin.flush()
    return dict(json.loads(viewer.stdout.readline()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--viewers", default="1,10,20")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--mount", default="/h264")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.viewers.split(",")]

    results = []
    with rtsp_camera() as camera_port, tempfile.TemporaryDirectory() as tmp:
        config = (
            f'[[streams]]\nid = "cam"\nsource = "rtsp://127.0.0.1:{camera_port}{args.mount}"\n'
            "on_demand = false\n"
        )
        with mediastream_server(config, Path(tmp)) as (url, pid):
            time.sleep(3)  # let the camera connect and settle
            ingest = measure(pid, args.seconds, None)
            results.append({"viewers": 0, **ingest})
            for count in counts:
                viewer = subprocess.Popen(
                    [
                        PYTHON,
                        str(ROOT / "benchmarks" / "viewers.py"),
                        url.replace("http", "ws") + "/ws",
                        "cam",
                        str(count),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
                assert viewer.stdout is not None and viewer.stdin is not None
                if viewer.stdout.readline().strip() != "READY":
                    raise SystemExit(f"viewers did not connect ({count})")
                time.sleep(2)
                row = measure(pid, args.seconds, viewer)
                viewer.stdin.close()
                viewer.wait(timeout=30)
                row["per_viewer_cpu_percent"] = (row["cpu_percent"] - ingest["cpu_percent"]) / count
                row["us_per_packet"] = (
                    1e6
                    * (row["cpu_percent"] - ingest["cpu_percent"])
                    / 100
                    / max(1, row["packets_per_s"])
                )
                results.append({"viewers": count, **row})
                time.sleep(2)

    print(
        f"\nFan-out, one RTSP camera ({args.mount}), server CPU in % of one core, "
        f"{args.seconds:.0f} s windows"
    )
    print_table(
        ["viewers", "server CPU %", "per viewer %", "µs/packet", "packets/s", "loss %", "RSS MB"],
        [
            [
                r["viewers"],
                r["cpu_percent"],
                r.get("per_viewer_cpu_percent", "-"),
                r.get("us_per_packet", "-"),
                r["packets_per_s"],
                r["loss_percent"],
                r["rss_mb"],
            ]
            for r in results
        ],
    )
    if args.json:
        args.json.write_text(json.dumps({"mount": args.mount, "results": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
