"""Time to first frame: warm (joining a running stream mid-GOP) and cold (on-demand start).

    python benchmarks/first_frame.py [--client aiortc|chromium] [--viewers 1,30] [--rounds 5]
                                     [--json results.json]

One RTSP test camera (1 s and 4 s GOPs), ``mediastream serve`` in its own process. Each round
N viewers join at once, each on its own socket (as separate tabs would), and the time from
starting to connect to the first decoded frame is recorded:

- aiortc: from creating the peer connection to the first frame out of aiortc's decoder;
- chromium: WebRTCEngine's own timeToFirstFrameMs (connect() to the first painted frame),
  and the jitter-buffer delay a few seconds later (how far behind live the picture is).

Warm rounds join at a random point of the GOP of an always-on stream; cold rounds start an
on-demand stream whose source is stopped. Prints p50/p95 per case and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
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
    rtsp_camera,
)

GOPS = {"gop1": "/h264-gop1", "gop4": "/h264-gop4"}


def config_text(camera_port: int) -> str:
    lines = [BENCH_LIMITS, "[media]\non_demand_grace = 0\n"]
    for gop, mount in GOPS.items():
        url = f"rtsp://127.0.0.1:{camera_port}{mount}"
        lines.append(f'[[streams]]\nid = "warm-{gop}"\nsource = "{url}"\non_demand = false\n')
        lines.append(f'[[streams]]\nid = "cold-{gop}"\nsource = "{url}"\non_demand = true\n')
    return "".join(lines)


def wait_stopped(url: str, stream_id: str) -> None:
    deadline = time.monotonic() + 20
    while get_json(f"{url}/api/streams/{stream_id}")["running"]:
        if time.monotonic() > deadline:
            raise SystemExit(f"{stream_id} did not stop")
        time.sleep(0.1)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


# --- aiortc viewers -----------------------------------------------------------------------


def run_aiortc(url: str, stream_id: str, count: int) -> list[dict[str, float]]:
    import trio

    return trio.run(_aiortc_round, url, stream_id, count)


async def _aiortc_round(url: str, stream_id: str, count: int) -> list[dict[str, float]]:
    import trio
    import trio_asyncio

    results: list[dict[str, float]] = []
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(_aiortc_viewer, url, stream_id, results)
    return results


async def _aiortc_viewer(url: str, stream_id: str, results: list[dict[str, float]]) -> None:
    import trio
    import trio_asyncio
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from trio_websocket import open_websocket_url

    aio = trio_asyncio.aio_as_trio
    started = time.perf_counter()
    async with open_websocket_url(url.replace("http", "ws") + "/ws") as ws:
        pc = await aio(_make_pc)(RTCConfiguration, RTCPeerConnection)
        try:
            transceiver = pc.addTransceiver("video", direction="recvonly")
            connected = trio.Event()

            @pc.on("connectionstatechange")
            def _on_state() -> None:
                if pc.connectionState == "connected":
                    connected_at.append(time.perf_counter())
                    connected.set()

            connected_at: list[float] = []
            await aio(pc.setLocalDescription)(await aio(pc.createOffer)())
            offered = time.perf_counter()
            await ws.send_message(
                json.dumps(
                    {
                        "type": "offer",
                        "streamId": stream_id,
                        "payload": {"sdp": pc.localDescription.sdp},
                    }
                )
            )
            while True:
                message = json.loads(await ws.get_message())
                if message["type"] == "answer":
                    break
                if message["type"] == "error":
                    raise SystemExit(f"server error: {message}")
            answered = time.perf_counter()
            await aio(pc.setRemoteDescription)(RTCSessionDescription(message["payload"], "answer"))
            with trio.fail_after(30):
                await aio(transceiver.receiver.track.recv)()
            first = time.perf_counter()
            results.append(
                {
                    "first_frame_ms": 1000 * (first - started),
                    "offer_ms": 1000 * (offered - started),  # the client making its offer
                    "answer_ms": 1000 * (answered - offered),  # the server answering
                    "connect_ms": 1000 * ((connected_at or [first])[0] - answered),  # ICE + DTLS
                    "media_ms": 1000 * (first - (connected_at or [first])[0]),  # to a decoded frame
                }
            )
        finally:
            await aio(pc.close)()


async def _make_pc(configuration: Any, peer_connection: Any) -> Any:
    return peer_connection(configuration(iceServers=[]))


# --- Chromium viewers ---------------------------------------------------------------------

ENGINE_STATS = """async () => {
    const engine = window.msViewer.engine;
    const stats = engine && engine.getStats();
    if (!stats || stats.timeToFirstFrameMs === null) return null;
    return {ttff: stats.timeToFirstFrameMs, jitter: stats.jitterBufferMs};
}"""


def run_chromium(browser: Any, url: str, stream_id: str, count: int) -> list[dict[str, float]]:
    pages = [browser.new_page(viewport={"width": 320, "height": 240}) for _ in range(count)]
    for page in pages:  # as close to "at once" as one driver can start them
        page.goto(f"{url}/static/viewer.html?stream={stream_id}", wait_until="commit")
    results = []
    for page in pages:
        page.wait_for_function(ENGINE_STATS, timeout=60_000)
    time.sleep(4)  # let every viewer settle, then read how far behind live each one is
    for page in pages:
        sample = page.evaluate(ENGINE_STATS)
        results.append(
            {
                "first_frame_ms": float(sample["ttff"]),
                "jitter_buffer_ms": float(sample["jitter"] or 0),
            }
        )
        page.close()
    return results


# --- the run --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--client", choices=("aiortc", "chromium"), default="aiortc")
    parser.add_argument("--viewers", default="1,30")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    counts = [int(n) for n in args.viewers.split(",")]

    rows: list[dict[str, Any]] = []
    browser = playwright = None
    with (
        rtsp_camera() as camera_port,
        tempfile.TemporaryDirectory() as tmp,
        mediastream_server(config_text(camera_port), Path(tmp)) as (url, _pid),
    ):
        if args.client == "chromium":
            from playwright.sync_api import sync_playwright

            playwright = sync_playwright().start()
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        time.sleep(3)  # the always-on streams are running
        for gop in GOPS:
            for mode in ("warm", "cold"):
                stream_id = f"{mode}-{gop}"
                for count in counts:
                    samples: list[dict[str, float]] = []
                    for _ in range(args.rounds):
                        if mode == "cold":
                            wait_stopped(url, stream_id)
                        else:
                            time.sleep(random.uniform(0.2, 4.2))  # a random point of the GOP
                        if browser is not None:
                            samples += run_chromium(browser, url, stream_id, count)
                        else:
                            samples += run_aiortc(url, stream_id, count)
                    rows.append(summarise(gop, mode, count, samples))
                    print(rows[-1], file=sys.stderr)
        if browser is not None:
            browser.close()
            playwright.stop()

    print(f"\nTime to first frame, {args.client} viewers, {args.rounds} rounds per case (ms)")
    headers = ["GOP", "start", "viewers", "samples", "p50", "p95", "max"]
    if args.client == "chromium":
        headers.append("behind live p50 (jitter buffer)")
    print_table(
        headers,
        [
            [r["gop"], r["mode"], r["viewers"], r["samples"], r["p50_ms"], r["p95_ms"], r["max_ms"]]
            + ([r["jitter_buffer_p50_ms"]] if args.client == "chromium" else [])
            for r in rows
        ],
    )
    if args.json:
        args.json.write_text(json.dumps({"client": args.client, "rows": rows}, indent=2))


def summarise(gop: str, mode: str, count: int, samples: list[dict[str, float]]) -> dict[str, Any]:
    ttff = [s["first_frame_ms"] for s in samples]
    row: dict[str, Any] = {
        "gop": {"gop1": "1 s", "gop4": "4 s"}[gop],
        "mode": mode,
        "viewers": count,
        "samples": len(ttff),
        "p50_ms": round(statistics.median(ttff)),
        "p95_ms": round(percentile(ttff, 0.95)),
        "max_ms": round(max(ttff)),
    }
    for phase in ("offer_ms", "answer_ms", "connect_ms", "media_ms"):
        values = [s[phase] for s in samples if phase in s]
        if values:
            row[f"{phase.removesuffix('_ms')}_p50_ms"] = round(statistics.median(values))
    jitter = [s["jitter_buffer_ms"] for s in samples if "jitter_buffer_ms" in s]
    if jitter:
        row["jitter_buffer_p50_ms"] = round(statistics.median(jitter))
    return row


if __name__ == "__main__":
    main()
