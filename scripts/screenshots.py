"""Take the README's screenshots of the three pages while they play, and of the camera
wall's layouts (1, 2×2, 3×3, 4×4; dashboard.png is "fit all").

    .venv/bin/python scripts/screenshots.py        # writes docs/screenshots/*.png

Starts ``mediastream serve`` with sixteen synthetic cameras and drives Debian's Chromium.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]
CAMERAS = [
    ("lobby", "Lobby", "testsrc2"), ("gate", "Main gate", "smptehdbars"),
    ("yard", "Yard", "life"), ("dock", "Loading dock", "testsrc"),
    ("hall", "Hall", "cellauto"), ("roof", "Roof", "mandelbrot"),
    ("garage", "Garage", "rgbtestsrc"), ("store", "Store room", "pal75bars"),
    ("office", "Office", "yuvtestsrc"),
    ("lift", "Lift lobby, ground floor", "pal100bars"), ("car-park", "Car park", "testsrc2"),
    ("north", "North fence", "life"), ("south", "South fence", "cellauto"),
    ("server-room", "Server room", "smptebars"), ("canteen", "Canteen", "mandelbrot"),
    ("stairs", "Stairs, west wing", "testsrc"),
]
# The wall's layouts, and the file each is shot into ("fit all" is dashboard.png).
LAYOUTS = [("1", "wall-1.png"), ("2", "wall-2x2.png"), ("3", "wall-3x3.png"), ("4", "wall-4x4.png")]
PLAYING = """(selector) => [...document.querySelectorAll(selector)].length > 0 &&
    [...document.querySelectorAll(selector)].every(
        (v) => v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 20)"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "screens.toml"
        config.write_text("".join(
            f'[[streams]]\nid = "{i}"\nname = "{n}"\n'
            f'source = "pattern:{p}?size=640x360&fps=15&kbps=400&gop=30"\n'
            for i, n, p in CAMERAS
        ))
        server = subprocess.Popen(
            [sys.executable, "-m", "mediastream", "serve", "--config", str(config),
             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(100):
                try:
                    urllib.request.urlopen(base + "/healthz", timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.1)
            shoot(base)
        finally:
            server.terminate()
            server.wait(timeout=15)


def shoot(base: str) -> None:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 860})
        page.goto(f"{base}/static/dashboard.html?layout=fit")
        page.wait_for_function(PLAYING, arg=".tile video", timeout=60_000)
        page.wait_for_timeout(1500)  # let the bitrate figures appear
        page.screenshot(path=str(OUT / "dashboard.png"))
        for layout, name in LAYOUTS:
            page.select_option("#wall-layout", layout)
            page.wait_for_function(PLAYING, arg=".tile:not([hidden]) video", timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(OUT / name))
        page.goto(f"{base}/static/test-multi-stream.html")
        page.click("#connect-all")
        page.wait_for_function(PLAYING, arg=".stream-card video", timeout=30_000)
        page.wait_for_timeout(2500)
        page.screenshot(path=str(OUT / "test-multi-stream.png"), full_page=True)
        page.goto(f"{base}/static/viewer.html?stream=lobby")
        page.wait_for_function(PLAYING, arg="#video", timeout=30_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(OUT / "viewer.png"))
        browser.close()
    print(f"screenshots written to {OUT}")


if __name__ == "__main__":
    main()
