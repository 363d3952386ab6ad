"""The camera wall: one Chromium tab playing 16 streams over one socket, for 60 seconds.

    python benchmarks/wall.py [--tiles 16] [--seconds 60] [--mount /h264-busy] [--json out.json]
    python benchmarks/wall.py --qualities /h264-720,/h264-180 [--quality auto|main] [--switches 10]
    python benchmarks/wall.py --peer-connection shared      # the page's one peer connection

Sixteen streams (all restreaming the GStreamer test camera, so the server ingests sixteen RTSP
sessions and decodes nothing) on ``dashboard.html`` in headless Chromium (Debian's). Every
second each tile's decoded-frame count is sampled: a *stall* is a tile-second with no new
frame. Reports the page's WebSocket count, frames per second per tile, stalls, and the CPU of
the server and of the browser (all its processes), in % of one core.

With ``--qualities MAIN,SUB`` every stream has two qualities (main and sub, two mounts of the
camera) and the tiles play ``--quality``: ``auto`` (each tile the smallest that covers it: sub
in the grid) or ``main`` (pinned on every tile, as a wall without per-tile quality plays).
The received bitrate of the whole page is reported too, and with ``auto`` the time from a
tile made full screen (as a double-click does) to its first frame painted at main's
resolution: the first time (main's source opens) and ``--switches`` more on the same tile
(main still running, its GOP cached), then back to sub (Escape) after each. The wall uses its
"by size" layout (``?layout=scroll``: tiles of about 300 px, the grid these figures were first
measured on), where sub covers every tile.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    CLOCK_TICKS,
    cpu_seconds,
    get_json,
    mediastream_server,
    print_table,
    rtsp_camera,
)
from common import _keep_playing as keep_playing

RECEIVED_BYTES = """async () => {
    let total = 0;
    // Each connection once: with peerConnection=shared every tile's engine has the same one.
    const pcs = new Set([...window.msDashboard.tiles.values()].map((t) => t.engine.pc));
    for (const pc of pcs) {
        if (!pc) continue;
        for (const stat of (await pc.getStats()).values()) {
            if (stat.type === 'inbound-rtp' && stat.kind === 'video') total += stat.bytesReceived;
        }
    }
    return total;
}"""
ALL_WIDTH = """(width) => [...document.querySelectorAll('.tile video')]
    .every((v) => v.videoWidth === width)"""
#: Make a tile full screen (or press Escape) and measure until its first frame at ``width`` is
#: painted. Without a user gesture the browser may refuse full screen: the wall then enlarges
#: the tile over the page instead, which asks for main just the same.
SWITCH = """async ([streamId, width, key]) => {
    const tile = document.querySelector(`.tile[data-stream-id="${streamId}"]`);
    const video = tile.querySelector('video');
    const start = performance.now();
    if (key) document.dispatchEvent(new KeyboardEvent('keydown', {key}));
    else window.msDashboard.layout.toggleFullscreen(streamId);
    return await new Promise((resolve) => {
        const check = (now, meta) => meta.width === width
            ? resolve(performance.now() - start) : video.requestVideoFrameCallback(check);
        video.requestVideoFrameCallback(check);
    });
}"""
FRAMES = """() => Object.fromEntries([...document.querySelectorAll('.tile')].map((t) => [
    t.dataset.streamId, t.querySelector('video').getVideoPlaybackQuality().totalVideoFrames,
]))"""
ALL_LIVE = """(count) => [...document.querySelectorAll('.tile')]
    .filter((t) => t.dataset.state === 'live').length === count"""


def chromium_cpu_seconds() -> float:
    """CPU time of the Chromium processes this script started (its descendants: other
    Chromiums on a shared machine are not counted), ended ones included (a reaped child's CPU
    is in its parent's cutime/cstime)."""
    parents: dict[int, int] = {}
    chromium: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            # Debian's /usr/bin/chromium is a script that execs /usr/lib/chromium/chromium,
            # whose child processes rewrite their command line into one space-separated string.
            program = (entry / "cmdline").read_bytes().split(b"\0")[0].split(b" ")[0]
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        if program.endswith(b"/chromium"):
            chromium[pid] = sum(int(value) for value in fields[11:15]) / CLOCK_TICKS

    def ours(pid: int) -> bool:
        for _ in range(64):
            if pid == os.getpid():
                return True
            if pid <= 1:
                return False
            pid = parents.get(pid, 0)
        return False

    # A Chromium child is counted once: alive on its own, or ended in its parent's total.
    return sum(cpu for pid, cpu in chromium.items() if ours(pid))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--mount", default="/h264-busy")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--qualities", help="MAIN,SUB mounts: every stream has both")
    parser.add_argument("--quality", choices=("auto", "main"), default="auto")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument(
        "--peer-connection",
        choices=("own", "shared"),
        default="own",
        help="a peer connection per tile (default) or the page's one (?peerConnection=shared)",
    )
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    main_mount, sub_mount = (args.qualities or ",").split(",")
    playing = (
        (main_mount if args.quality == "main" else sub_mount) if args.qualities else args.mount
    )
    with (
        rtsp_camera(prime=playing) as camera_port,
        tempfile.TemporaryDirectory() as tmp,
        # Both mounts playing before sixteen sessions join either (see rtsp_camera's prime).
        also_playing(camera_port, sub_mount if playing == main_mount else main_mount)
        if args.qualities
        else contextlib.nullcontext(),
    ):
        camera = f"rtsp://127.0.0.1:{camera_port}"
        if args.qualities:
            config = BENCH_LIMITS + "".join(
                f'[[streams]]\nid = "cam-{n:02d}"\nqualities = [{{name = "main", source = '
                f'"{camera}{main_mount}"}}, {{name = "sub", source = "{camera}{sub_mount}"}}]\n'
                for n in range(1, args.tiles + 1)
            )
        else:
            config = BENCH_LIMITS + "".join(
                f'[[streams]]\nid = "cam-{n:02d}"\nsource = "{camera}{args.mount}"\n'
                for n in range(1, args.tiles + 1)
            )
        with mediastream_server(config, Path(tmp)) as (url, pid), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1920, "height": 1200})
            shared = "&peerConnection=shared" if args.peer_connection == "shared" else ""
            page.goto(f"{url}/static/dashboard.html?layout=scroll{shared}")
            page.wait_for_function(
                ALL_LIVE,
                arg=args.tiles,
                timeout=60_000,
            )
            if args.qualities and args.quality == "main":
                page.evaluate(
                    "() => { for (const t of window.msDashboard.tiles.values()) "
                    "t.engine.setQuality('main'); }"
                )
            if args.qualities:
                width = 1280 if args.quality == "main" else 320  # the test camera's mounts
                page.wait_for_function(ALL_WIDTH, arg=width, timeout=120_000)
            time.sleep(3)  # everyone past its first frames
            # The server's count: the page's socket may be the browser's, in a shared worker.
            sockets = get_json(f"{url}/api/stats")["sockets"]["open"]
            server_before, browser_before = cpu_seconds(pid), chromium_cpu_seconds()
            received_before = page.evaluate(RECEIVED_BYTES)
            started = time.monotonic()
            samples = [page.evaluate(FRAMES)]
            for _ in range(args.seconds):
                time.sleep(max(0.0, started + len(samples) - time.monotonic()))
                samples.append(page.evaluate(FRAMES))
            wall = time.monotonic() - started
            server_cpu = 100 * (cpu_seconds(pid) - server_before) / wall
            browser_cpu = 100 * (chromium_cpu_seconds() - browser_before) / wall
            received_kbps = (page.evaluate(RECEIVED_BYTES) - received_before) * 8 / wall / 1000
            switches: dict[str, object] = {}
            if args.qualities and args.quality == "auto" and args.switches:
                switches = measure_switches(page, args.switches)
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
        "received_kbps": received_kbps,
        "quality": args.quality if args.qualities else None,
        "peer_connection": args.peer_connection,
        **switches,
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
    print(f"received by the page: {received_kbps:.0f} kbit/s")
    if switches:
        print(
            "full screen -> first main frame painted: first {first_ms:.0f} ms (main's source "
            "opens); then p50 {p50_ms:.0f} ms, max {max_ms:.0f} ms over {count} switches; back to "
            "sub p50 {back_p50_ms:.0f} ms".format(**switches)
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


@contextlib.contextmanager
def also_playing(port: int, mount: str) -> Iterator[None]:
    """Keep a second mount of the camera playing through a client of our own."""
    playing, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=keep_playing, args=(port, mount, playing, stop), daemon=True)
    thread.start()
    if not playing.wait(timeout=20):
        raise SystemExit(f"the RTSP test camera did not play {mount}")
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def measure_switches(page: Any, count: int) -> dict[str, object]:
    """Make cam-01 full screen and put it back ``count + 1`` times: ms to its first main frame
    painted (the first time main's source has to open) and back to sub."""
    to_main, to_sub = [], []
    for _ in range(count + 1):
        to_main.append(page.evaluate(SWITCH, ["cam-01", 1280, None]))
        time.sleep(1)  # watched for a moment, as an operator would
        to_sub.append(page.evaluate(SWITCH, ["cam-01", 320, "Escape"]))
        time.sleep(1)
    warm = to_main[1:]
    return {
        "first_ms": to_main[0],
        "p50_ms": statistics.median(warm),
        "max_ms": max(warm),
        "count": len(warm),
        "back_p50_ms": statistics.median(to_sub),
        "to_main_ms": to_main,
        "to_sub_ms": to_sub,
    }


if __name__ == "__main__":
    main()
