"""Time to first frame of the 16th tile added to a page: one peer connection per tile versus one
shared by the page (``WebSocketManager.configure({ peerConnection: 'shared' })``).

    python benchmarks/shared_pc.py [--tiles 16] [--rounds 5] [--json results.json]

``mediastream serve`` runs in its own process with ``tiles`` small synthetic cameras. For each
round and each case, a fresh page of Debian's Chromium (``test-multi-stream.html``, with
``?peerConnection=shared`` for the shared case) plays ``tiles - 1`` tiles; once they all decode,
one more tile is added and its time to first frame is read from its engine (from ``connect()``
to the first frame painted, ``requestVideoFrameCallback``). Also: the page's RTCPeerConnections
(counted by a wrapper) and the server's, and the server's Trio tasks with every tile playing.
Run it on a quiet machine: the figures are times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common import BENCH_LIMITS, CHROMIUM, CHROMIUM_FLAGS, get_json, mediastream_server, print_table

CAMERA = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=50"
COUNT_PEER_CONNECTIONS = """(() => {
    const Native = window.RTCPeerConnection;
    window.msPeers = {made: 0, closed: 0};
    window.RTCPeerConnection = class extends Native {
        constructor(...args) { super(...args); window.msPeers.made += 1; }
        close() { if (this.signalingState !== 'closed') window.msPeers.closed += 1; super.close(); }
    };
})()"""
ALL_DECODING = """(ids) => ids.every((id) => {
    const stats = window.msTestPage.engines.get(id)?.getStats();
    return stats && stats.framesDecoded > 5;
})"""
FIRST_FRAME = """(id) => {
    const stats = window.msTestPage.engines.get(id)?.getStats();
    return stats && stats.timeToFirstFrameMs !== null ? stats.timeToFirstFrameMs : null;
}"""


def run_round(url: str, browser: Any, shared: bool, ids: list[str]) -> dict[str, Any]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.add_init_script(COUNT_PEER_CONNECTIONS)
    mode = "shared" if shared else "per-stream"
    page.goto(f"{url}/static/test-multi-stream.html?peerConnection={mode}")
    first, last = ids[:-1], ids[-1]
    page.evaluate("(ids) => ids.forEach((id) => window.msTestPage.addCard({id, name: id}))", first)
    page.wait_for_function(ALL_DECODING, arg=first, timeout=120_000, polling=200)
    page.evaluate("(id) => window.msTestPage.addCard({id, name: id})", last)
    page.wait_for_function(f"(id) => ({FIRST_FRAME})(id) !== null", arg=last, timeout=60_000)
    ttff = page.evaluate(FIRST_FRAME, last)
    page.wait_for_function(ALL_DECODING, arg=ids, timeout=60_000, polling=200)
    peers = page.evaluate("window.msPeers")
    stats = get_json(url + "/api/stats")
    page.close()
    return {
        "case": "one shared peer connection" if shared else "a peer connection per tile",
        "ttff_ms": ttff,
        "page_peer_connections": peers["made"] - peers["closed"],
        "server_peer_connections": stats["peerConnections"]["open"],
        "server_tasks": stats["tasks"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    ids = [f"cam-{n:02d}" for n in range(1, args.tiles + 1)]
    config = BENCH_LIMITS + "".join(
        f'[[streams]]\nid = "{stream_id}"\nsource = "{CAMERA}"\non_demand = false\n'
        for stream_id in ids
    )
    rounds: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        mediastream_server(config, Path(tmp)) as (url, _pid),
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            for _ in range(args.rounds):
                # Alternated, so a slow spell of the machine falls on both cases.
                for shared in (True, False):
                    rounds.append(run_round(url, browser, shared, ids))
        finally:
            browser.close()
    rows = []
    for case in dict.fromkeys(r["case"] for r in rounds):
        mine = [r for r in rounds if r["case"] == case]
        times = [r["ttff_ms"] for r in mine]
        rows.append(
            [
                case,
                statistics.median(times),
                min(times),
                max(times),
                mine[-1]["page_peer_connections"],
                mine[-1]["server_peer_connections"],
                mine[-1]["server_tasks"],
            ]
        )
    print(f"\nTime to first frame of tile {args.tiles} ({args.rounds} rounds)")
    print_table(
        [
            "case",
            "TTFF median (ms)",
            "min",
            "max",
            "page RTCPeerConnections",
            "server peers",
            "server tasks",
        ],
        rows,
    )
    if args.json:
        args.json.write_text(json.dumps(rounds, indent=2))


if __name__ == "__main__":
    main()
