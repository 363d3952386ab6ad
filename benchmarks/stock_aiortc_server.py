"""The baseline users of stock aiortc live with: one decoded camera, re-encoded for every viewer.

    python benchmarks/stock_aiortc_server.py RTSP_URL PORT

Serves MediaStream's offer/answer on ``ws://127.0.0.1:PORT/ws`` (so ``viewers.py`` works
unchanged), with the textbook aiortc set-up: ``MediaPlayer`` decoding the camera,
``MediaRelay`` fanning the decoded frames out, and aiortc's sender encoding VP8 for each viewer.
Prints ``READY`` when it listens. For comparison only; not part of MediaStream.
"""

from __future__ import annotations

import json
import sys

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaPlayer, MediaRelay
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


async def main(url: str, port: int) -> None:
    async with trio_asyncio.open_loop():
        player = await trio_asyncio.aio_as_trio(_open_player)(url)
        relay = MediaRelay()

        async def handler(request: WebSocketRequest) -> None:
            ws = await request.accept()
            mine: list[RTCPeerConnection] = []
            try:
                while True:
                    message = json.loads(await ws.get_message())
                    if message.get("type") != "offer":
                        continue
                    answer = await trio_asyncio.aio_as_trio(_answer)(
                        message["payload"]["sdp"], relay.subscribe(player.video), mine
                    )
                    await ws.send_message(
                        json.dumps(
                            {
                                "type": "answer",
                                "streamId": message["streamId"],
                                "sessionId": message["payload"].get("sessionId"),
                                "payload": answer,
                            }
                        )
                    )
            except ConnectionClosed:
                pass  # the viewers left: their peers stop encoding below
            finally:
                with trio.CancelScope(shield=True):
                    for pc in mine:
                        await trio_asyncio.aio_as_trio(pc.close)()

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_websocket, handler, "127.0.0.1", port, None)
            print("READY", flush=True)


async def _open_player(url: str) -> MediaPlayer:
    return MediaPlayer(url, options={"rtsp_transport": "tcp"})


async def _answer(sdp: str, track: object, peers: list[RTCPeerConnection]) -> str:
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    peers.append(pc)
    pc.addTrack(track)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
    await pc.setLocalDescription(await pc.createAnswer())
    return str(pc.localDescription.sdp)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
