"""Load generator: N aiortc viewers of one stream, in this process, without decoding.

    python benchmarks/viewers.py WS_URL STREAM_ID COUNT [--sockets one|each]

Prints ``READY`` once every viewer's peer is connected, then answers each line on stdin
("stats") with one JSON line: packets received and lost, summed over viewers. Quits when
stdin closes. ``--sockets each`` (default) gives each viewer its own socket, as separate tabs
do; ``one`` puts them all on one socket (which needs one stream id per viewer: a socket has
one session per stream).
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from typing import Any

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from trio_websocket import open_websocket_url


class _DiscardingQueue(queue.Queue):  # type: ignore[type-arg]
    """Stands in for aiortc's decoder queue: frames are counted, never decoded."""

    frames = 0

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:  # the receiver stopping: let its decoder thread exit
            super().put(item, block, timeout)
        else:
            _DiscardingQueue.frames += 1


async def run(ws_url: str, stream_id: str, count: int, sockets: str) -> None:
    peers: list[RTCPeerConnection] = []
    socket_count = 1 if sockets == "one" else count
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        connections = []
        for _ in range(socket_count):
            connections.append(await nursery.start(_open_socket, ws_url))
        connected = trio.Semaphore(0)
        for index in range(count):
            ws, answers = connections[index % socket_count]
            pc = await trio_asyncio.aio_as_trio(_make_pc)()
            peers.append(pc)

            @pc.on("connectionstatechange")
            def _state(pc: RTCPeerConnection = pc) -> None:
                if pc.connectionState == "connected":
                    connected.release()

            transceiver = pc.addTransceiver("video", direction="recvonly")
            transceiver.receiver._RTCRtpReceiver__decoder_queue = _DiscardingQueue()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(
                await trio_asyncio.aio_as_trio(pc.createOffer)()
            )
            await ws.send_message(
                json.dumps(
                    {
                        "type": "offer",
                        "streamId": stream_id,
                        "payload": {"sdp": pc.localDescription.sdp, "sessionId": f"v{index}"},
                    }
                )
            )
            answer = await answers.receive()
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=answer, type="answer")
            )
        with trio.fail_after(60):
            for _ in range(count):
                await connected.acquire()
        print("READY", flush=True)
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        buffer = b""
        while data := await stdin.receive_some():
            buffer += data
            while b"\n" in buffer:
                _, buffer = buffer.split(b"\n", 1)
                print(json.dumps(await _stats(peers)), flush=True)
        for pc in peers:
            await trio_asyncio.aio_as_trio(pc.close)()
        nursery.cancel_scope.cancel()


async def _open_socket(ws_url: str, task_status: trio.TaskStatus[Any]) -> None:
    send, receive = trio.open_memory_channel[str](1000)
    async with open_websocket_url(ws_url, max_message_size=2**22) as ws:
        task_status.started((ws, receive))
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "answer":
                await send.send(message["payload"])
            elif message["type"] == "error":
                raise SystemExit(f"server error: {message}")


async def _make_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def _stats(peers: list[RTCPeerConnection]) -> dict[str, int]:
    totals = {"packetsReceived": 0, "packetsLost": 0, "frames": 0}
    for pc in peers:
        report = await trio_asyncio.aio_as_trio(pc.getStats)()
        for stat in report.values():
            if stat.type == "inbound-rtp":
                totals["packetsReceived"] += stat.packetsReceived
                totals["packetsLost"] += max(0, stat.packetsLost)
    totals["frames"] = _DiscardingQueue.frames
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ws_url")
    parser.add_argument("stream_id")
    parser.add_argument("count", type=int)
    parser.add_argument("--sockets", choices=("one", "each"), default="each")
    args = parser.parse_args()
    trio.run(run, args.ws_url, args.stream_id, args.count, args.sockets)


if __name__ == "__main__":
    main()
