"""The camera wall: one Chromium tab playing 16 streams over one socket, for 60 seconds.

    python benchmarks/wall.py [--tiles 16] [--seconds 60] [--mount /h264-busy] [--json out.json]

Sixteen streams (all restreaming the GStreamer test camera, so the server ingests sixteen RTSP
sessions and decodes nothing) on ``dashboard.html`` in headless Chromium (Debian's). Every
second each tile's decoded-frame count is sampled: a *stall* is a tile-second with no new
frame. Reports the page's WebSocket count, frames per second per tile, stalls, and the CPU of
the server and of the browser (all its processes), in % of one core.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    BENCH_LIMITS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    cpu_seconds,
    get_json,
    mediastream_server,
    print_table,
    rtsp_camera,
)

FRAMES = """() => Object.fromEntries([...document.querySelectorAll('.tile')].map((t) => [
    t.dataset.streamId, t.querySelector('video').getVideoPlaybackQuality().totalVideoFrames,
]))"""
ALL_LIVE = """(count) => [...document.querySelectorAll('.tile')]
    .filter((t) => t.dataset.state === 'live').length === count"""


def chromium_cpu_seconds() -> float:
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # Debian's /usr/bin/chromium is a script that execs /usr/lib/chromium/chromium,
            # whose child processes rewrite their command line into one space-separated string.
            program = (entry / "cmdline").read_bytes().split(b"\0")[0].split(b" ")[0]
            if program.endswith(b"/chromium"):
                total += cpu_seconds(int(entry.name))
        except OSError:
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--mount", default="/h264-busy")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with rtsp_camera(prime=args.mount) as camera_port, tempfile.TemporaryDirectory() as tmp:
        config = BENCH_LIMITS + "".join(
            f'[[streams]]\nid = "cam-{n:02d}"\nsource = "rtsp://127.0.0.1:{camera_port}{args.mount}"\n'
            for n in range(1, args.tiles + 1)
        )
        with mediastream_server(config, Path(tmp)) as (url, pid), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1920, "height": 1200})
            page.goto(f"{url}/static/dashboard.html")
            page.wait_for_function(
                ALL_LIVE,
                arg=args.tiles,
                timeout=60_000,
            )
            time.sleep(3)  # everyone past its first frames
            # The server's count: the page's socket may be the browser's, in a shared worker.
            sockets = get_json(f"{url}/api/stats")["sockets"]["open"]
            server_before, browser_before = cpu_seconds(pid), chromium_cpu_seconds()
            started = time.monotonic()
            samples = [page.evaluate(FRAMES)]
            for _ in range(args.seconds):
                time.sleep(max(0.0, started + len(samples) - time.monotonic()))
                samples.append(page.evaluate(FRAMES))
            wall = time.monotonic() - started
            server_cpu = 100 * (cpu_seconds(pid) - server_before) / wall
            browser_cpu = 100 * (chromium_cpu_seconds() - browser_before) / wall
            browser.close()

    per_tile_fps = {tile: (samples[-1][tile] - samples[0][tile]) / wall for tile in samples[0]}
    stalls = sum(
        1
        for before, after in itertools.pairwise(samples)
        for tile in before
        if after[tile] == before[tile]
    )
    result = {
        "tiles": args.tiles,
        "seconds": args.seconds,
        "websockets": sockets,
        "fps_min": min(per_tile_fps.values()),
        "fps_median": statistics.median(per_tile_fps.values()),
        "stalled_tile_seconds": stalls,
        "server_cpu_percent": server_cpu,
        "browser_cpu_percent": browser_cpu,
    }
    print(f"\nCamera wall: {args.tiles} tiles in one Chromium tab, {args.seconds} s")
    print_table(
        [
            "tiles",
            "WebSockets",
            "fps (min / median)",
            "stalled tile-seconds",
            "server CPU %",
            "browser CPU %",
        ],
        [
            [
                args.tiles,
                sockets,
                f"{result['fps_min']:.1f} / {result['fps_median']:.1f}",
                stalls,
                server_cpu,
                browser_cpu,
            ]
        ],
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
