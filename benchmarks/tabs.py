"""Three tabs of one browser, 16 tiles each: the one shared socket versus a socket per tab.

    python benchmarks/tabs.py [--tabs 3] [--tiles 16] [--json results.json]

``mediastream serve`` runs in its own process with tabs × tiles small synthetic cameras (every
tab shows cameras of its own: a camera shown in two tabs at once rides a second socket of the
shared worker, see docs/architecture.md). Debian's Chromium opens the tabs in one browser
context, each the page written for the per-stream engine (``examples/legacy-page.html``), once
as it is (the tabs share the shared worker's socket) and once with ``?mediastreamShared=0``
(a socket per tab). Each case gets a fresh server; once every tile plays, the server's own
figures: open sockets, sessions, Trio tasks and memory (RSS) above the idle server.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    CHROMIUM,
    CHROMIUM_FLAGS,
    get_json,
    mediastream_server,
    print_table,
    rss_bytes,
)

CAMERA = "pattern:testsrc?size=160x90&fps=5&kbps=40&gop=10"
PLAYING = """() => [...document.querySelectorAll('video')].length > 0 &&
    [...document.querySelectorAll('video')].every(
        (v) => v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 3)"""


def run_case(shared: bool, tabs: int, tiles: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    ids = [f"cam-{n:03d}" for n in range(1, tabs * tiles + 1)]
    config = BENCH_LIMITS + "".join(
        f'[[streams]]\nid = "{stream_id}"\nsource = "{CAMERA}"\n' for stream_id in ids
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        mediastream_server(config, Path(tmp)) as (url, pid),
        sync_playwright() as playwright,
    ):
        idle = {"rss": rss_bytes(pid), "tasks": get_json(url + "/api/stats")["tasks"]}
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        started = time.monotonic()
        pages = []
        for tab in range(tabs):
            page = context.new_page()
            chosen = ",".join(ids[tab * tiles : (tab + 1) * tiles])
            knob = "" if shared else "&mediastreamShared=0"
            page.goto(f"{url}/static/examples/legacy-page.html?streams={chosen}{knob}")
            pages.append(page)
        for page in pages:
            page.wait_for_function(PLAYING, timeout=120_000)
        all_playing = time.monotonic() - started
        stats = get_json(url + "/api/stats")
        metrics = pages[0].evaluate("WebSocketManager.getInstance().getMetrics()")
        result = {
            "case": "one shared socket" if shared else "a socket per tab",
            "tabs": tabs,
            "tiles": tabs * tiles,
            "sockets": stats["sockets"]["open"],
            "sessions": stats["sessions"],
            "tasks_added": stats["tasks"] - idle["tasks"],
            "rss_added_mb": (rss_bytes(pid) - idle["rss"]) / 2**20,
            "all_playing_s": all_playing,
            "page_says_shared": metrics["shared"],
        }
        context.close()
        browser.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tabs", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = [run_case(shared, args.tabs, args.tiles) for shared in (True, False)]
    print(f"\n{args.tabs} tabs x {args.tiles} tiles in one Chromium")
    print_table(
        ["case", "sockets", "sessions", "tasks added", "RSS added (MB)", "all playing (s)"],
        [
            [
                r["case"],
                r["sockets"],
                r["sessions"],
                r["tasks_added"],
                r["rss_added_mb"],
                r["all_playing_s"],
            ]
            for r in results
        ],
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
