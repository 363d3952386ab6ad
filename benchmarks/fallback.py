"""Video over the socket (the fallback) against WebRTC: latency behind live and server CPU.

    python benchmarks/fallback.py [--tiles 4] [--seconds 30] [--mount /h264] [--audio]
                                  [--json out.json]

The GStreamer test camera restreamed as ``--tiles`` streams on ``test-multi-stream.html`` in
headless Chromium, twice: every tile through the fallback (``?fallback=always``: fMP4 over the
one socket into Media Source Extensions), then every tile over WebRTC. Every second each tile's
playhead is sampled; for the fallback, *behind* is how far the playhead trails the newest
buffered frame (what the engine keeps under a second; on loopback the newest fragment arrives
within milliseconds of its frame leaving the camera's fan-out). Reports frames per second per
tile, behind (median / max), and the server's CPU in % of one core, per viewer. With
``--audio`` (and a mount with sound, e.g. ``--mount /h264-aac``) the tiles play the camera's
sound too (the fallback's fMP4 then has an audio track; WebRTC gets the Opus encoded once),
and each tile's decoded audio bytes per second are reported (``webkitAudioDecodedByteCount``,
which counts the sound of Media Source Extensions only, not WebRTC's). Frames Chromium itself
dropped (``droppedVideoFrames``: decoded too late, the browser's CPU) are reported too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    cpu_seconds,
    mediastream_server,
    print_table,
    rtsp_camera,
)

SAMPLE = """() => [...document.querySelectorAll('.stream-card video')].map((v) => ({
    frames: v.getVideoPlaybackQuality().totalVideoFrames,
    dropped: v.getVideoPlaybackQuality().droppedVideoFrames,
    audioBytes: v.webkitAudioDecodedByteCount || 0,
    behind: v.buffered.length ? v.buffered.end(v.buffered.length - 1) - v.currentTime : null,
}))"""
ALL_LIVE = """([count, text]) => {
    const pills = [...document.querySelectorAll('.stream-card .pill')];
    return pills.length === count && pills.every((pill) => pill.textContent === text);
}"""


def run(
    url: str, pid: int, browser: Any, *, tiles: int, seconds: int, fallback: bool, audio: bool
) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": 1600, "height": 1200})
    mode = "always" if fallback else "never"
    page.goto(f"{url}/static/test-multi-stream.html?fallback={mode}{'&audio=1' if audio else ''}")
    page.click("#connect-all")
    page.wait_for_function(
        ALL_LIVE, arg=[tiles, "live (fallback)" if fallback else "live"], timeout=60_000
    )
    time.sleep(3)  # everyone past its first frames
    server_before = cpu_seconds(pid)
    started = time.monotonic()
    samples = [page.evaluate(SAMPLE)]
    for _ in range(seconds):
        time.sleep(max(0.0, started + len(samples) - time.monotonic()))
        samples.append(page.evaluate(SAMPLE))
    wall = time.monotonic() - started
    server_cpu = 100 * (cpu_seconds(pid) - server_before) / wall
    page.click("#disconnect-all")
    page.close()
    fps = [(samples[-1][i]["frames"] - samples[0][i]["frames"]) / wall for i in range(tiles)]
    dropped = [(samples[-1][i]["dropped"] - samples[0][i]["dropped"]) / wall for i in range(tiles)]
    audio_rates = [
        (samples[-1][i]["audioBytes"] - samples[0][i]["audioBytes"]) / wall for i in range(tiles)
    ]
    behind = [tile["behind"] for sample in samples for tile in sample if tile["behind"] is not None]
    return {
        "transport": "fallback (MSE)" if fallback else "WebRTC",
        "fps_min": min(fps),
        # frames Chromium itself dropped (decoded too late: the browser's CPU, not the server)
        "dropped_per_s_max": max(dropped),
        "audio_decoded_bytes_per_s_min": min(audio_rates),
        "behind_median_s": statistics.median(behind) if fallback and behind else None,
        "behind_max_s": max(behind) if fallback and behind else None,
        "server_cpu_percent": server_cpu,
        "server_cpu_percent_per_viewer": server_cpu / tiles,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=30)
    parser.add_argument("--mount", default="/h264")
    parser.add_argument("--audio", action="store_true", help="play the cameras' sound too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with rtsp_camera(prime=args.mount) as camera_port, tempfile.TemporaryDirectory() as tmp:
        config = BENCH_LIMITS + "".join(
            f'[[streams]]\nid = "cam-{n:02d}"\nsource = "rtsp://127.0.0.1:{camera_port}{args.mount}"\n'
            f"on_demand = false\n"
            for n in range(1, args.tiles + 1)
        )
        with mediastream_server(config, Path(tmp)) as (url, pid), sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            results = [
                run(
                    url,
                    pid,
                    browser,
                    tiles=args.tiles,
                    seconds=args.seconds,
                    fallback=fallback,
                    audio=args.audio,
                )
                for fallback in (True, False)
            ]
            browser.close()

    print(
        f"\nFallback vs WebRTC: {args.tiles} tiles of {args.mount}"
        f"{' with sound' if args.audio else ''} in one Chromium tab, {args.seconds} s each"
    )
    print_table(
        [
            "transport",
            "fps (min)",
            "dropped by Chromium/s (max)",
            "MSE audio decoded, B/s (min)",
            "behind newest frame (median / max)",
            "server CPU %",
            "per viewer",
        ],
        [
            [
                r["transport"],
                f"{r['fps_min']:.1f}",
                f"{r['dropped_per_s_max']:.1f}",
                f"{r['audio_decoded_bytes_per_s_min']:.0f}" if r["transport"] != "WebRTC" else "–",
                "–"
                if r["behind_median_s"] is None
                else f"{r['behind_median_s']:.2f} s / {r['behind_max_s']:.2f} s",
                r["server_cpu_percent"],
                r["server_cpu_percent_per_viewer"],
            ]
            for r in results
        ],
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"tiles": args.tiles, "mount": args.mount, "audio": args.audio, "results": results},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
