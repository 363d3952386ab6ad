"""WHEP vs the socket: offer→answer and answer→first frame for the same aiortc viewer.

    python benchmarks/whep.py [--rounds 20] [--json benchmarks/results/whep.json]

One RTSP test camera (/h264-busy, 2 s GOP), ``mediastream serve`` with one always-on stream.
Each round runs one viewer over WHEP (POST the offer to /whep/<id>, 201 with the answer, then
DELETE the session) and one over a WebSocket (offer message, answer message), alternating,
each after a random pause so both join at random points of the GOP. Per viewer:

- answer: from sending the offer to holding the answer (HTTP 201 received / answer message);
- first frame: from holding the answer to the first frame out of aiortc's decoder.

Prints p50/max per path and the load average (the machine may be shared), and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from common import BENCH_LIMITS, mediastream_server, print_table, rtsp_camera

STREAM_ID = "bench"
MOUNT = "/h264-busy"


def config_text(camera_port: int) -> str:
    source = f"rtsp://127.0.0.1:{camera_port}{MOUNT}"
    return (
        f'{BENCH_LIMITS}[[streams]]\nid = "{STREAM_ID}"\nsource = "{source}"\non_demand = false\n'
    )


def _post_offer(url: str, sdp: str) -> tuple[int, str, str]:
    """POST the offer; (status, answer SDP, Location). Blocking: run in a thread."""
    offer = urllib.request.Request(
        url, data=sdp.encode(), method="POST", headers={"Content-Type": "application/sdp"}
    )
    with urllib.request.urlopen(offer, timeout=30) as response:
        return response.status, response.read().decode(), response.headers["Location"]


def _delete(url: str) -> None:
    with urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10):
        pass


async def _viewer(url: str, path: str) -> dict[str, float]:
    """One aiortc viewer over ``path`` ("whep" or "socket"); its two timings in ms."""
    import trio
    import trio_asyncio
    from aiortc import RTCConfiguration, RTCPeerConnection
    from trio_websocket import open_websocket_url

    aio = trio_asyncio.aio_as_trio

    async def make() -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: no internet here

    pc = await aio(make)()
    try:
        transceiver = pc.addTransceiver("video", direction="recvonly")
        await aio(pc.setLocalDescription)(await aio(pc.createOffer)())
        sdp = pc.localDescription.sdp
        if path == "whep":
            offered = time.perf_counter()
            status, answer, location = await trio.to_thread.run_sync(
                _post_offer, f"{url}/whep/{STREAM_ID}", sdp
            )
            answered = time.perf_counter()
            if status != 201:
                raise SystemExit(f"WHEP answered {status}, not 201")
            session = urllib.parse.urljoin(url + "/", location)
            result = await _first_frame(pc, transceiver, answer, offered, answered)
            await trio.to_thread.run_sync(_delete, session)
            return result
        async with open_websocket_url(url.replace("http", "ws") + "/ws") as ws:
            offered = time.perf_counter()
            message = {"type": "offer", "streamId": STREAM_ID, "payload": {"sdp": sdp}}
            await ws.send_message(json.dumps(message))
            while True:
                reply = json.loads(await ws.get_message())
                if reply["type"] == "answer":
                    break
                if reply["type"] == "error":
                    raise SystemExit(f"server error: {reply}")
            answered = time.perf_counter()
            return await _first_frame(pc, transceiver, reply["payload"], offered, answered)
    finally:
        await aio(pc.close)()


async def _first_frame(
    pc: Any, transceiver: Any, answer: str, offered: float, answered: float
) -> dict[str, float]:
    import trio
    import trio_asyncio
    from aiortc import RTCSessionDescription

    aio = trio_asyncio.aio_as_trio
    await aio(pc.setRemoteDescription)(RTCSessionDescription(answer, "answer"))
    with trio.fail_after(30):
        await aio(transceiver.receiver.track.recv)()
    first = time.perf_counter()
    return {"answer_ms": 1000 * (answered - offered), "first_frame_ms": 1000 * (first - answered)}


async def _rounds(url: str, rounds: int) -> dict[str, list[dict[str, float]]]:
    import trio
    import trio_asyncio

    samples: dict[str, list[dict[str, float]]] = {"whep": [], "socket": []}
    async with trio_asyncio.open_loop():
        for index in range(rounds):
            for path in ("whep", "socket") if index % 2 == 0 else ("socket", "whep"):
                await trio.sleep(random.uniform(0.2, 2.2))  # a random point of the 2 s GOP
                samples[path].append(await _viewer(url, path))
                print(path, samples[path][-1], file=sys.stderr)
    return samples


def summarise(samples: list[dict[str, float]]) -> dict[str, Any]:
    row: dict[str, Any] = {"samples": len(samples)}
    for key in ("answer_ms", "first_frame_ms"):
        values = [s[key] for s in samples]
        row[f"{key.removesuffix('_ms')}_p50_ms"] = round(statistics.median(values), 1)
        row[f"{key.removesuffix('_ms')}_max_ms"] = round(max(values), 1)
    return row


def main() -> None:
    import trio

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    load_before = os.getloadavg()
    with (
        rtsp_camera(prime=MOUNT) as camera_port,
        tempfile.TemporaryDirectory() as tmp,
        mediastream_server(config_text(camera_port), Path(tmp)) as (url, _pid),
    ):
        time.sleep(3)  # the always-on stream is running
        samples = trio.run(_rounds, url, args.rounds)
    load_after = os.getloadavg()

    rows = {path: summarise(values) for path, values in samples.items()}
    print(f"\nWHEP vs the socket, one aiortc viewer at a time, {args.rounds} rounds (ms)")
    print_table(
        ["path", "samples", "answer p50", "answer max", "first frame p50", "first frame max"],
        [
            [
                path,
                r["samples"],
                r["answer_p50_ms"],
                r["answer_max_ms"],
                r["first_frame_p50_ms"],
                r["first_frame_max_ms"],
            ]
            for path, r in rows.items()
        ],
    )
    load = {
        "before": [round(v, 2) for v in load_before],
        "after": [round(v, 2) for v in load_after],
    }
    print(f"load average (1/5/15 min) before {load['before']}, after {load['after']}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"rounds": args.rounds, "load_average": load, "rows": rows, "samples": samples},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
