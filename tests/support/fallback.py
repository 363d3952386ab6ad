"""A client of the fallback (video over the signaling socket): it asks for fallbacks and keeps
everything the server sends, in order.

    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "demo-1"})
        await client.wait_until(lambda: client.fragments("demo-1") >= 5)

Every wait is on what arrived, under a deadline; nothing here sleeps.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import trio
from trio_websocket import WebSocketConnection

from mediastream.fallback import BinaryKind, parse_binary


class FallbackClient:
    """A socket that asks for fallbacks and keeps everything the server sends, in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        #: (kind, streamId, payload) of every binary message, in arrival order
        self.binary: list[tuple[BinaryKind, str, bytes]] = []
        self._arrived = trio.Condition()

    async def send(self, message: dict[str, Any] | str) -> None:
        """Send ``message`` as JSON (a string as it is, for malformed input)."""
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def read(self) -> None:
        """Keep every message until the socket closes (run it in a nursery)."""
        while True:
            data = await self.ws.get_message()
            if isinstance(data, bytes):
                self.binary.append(parse_binary(data))
            else:
                self.messages.append(json.loads(data))
            async with self._arrived:
                self._arrived.notify_all()

    async def wait_until(self, condition: Callable[[], bool], timeout: float = 30) -> None:
        """Until ``condition()`` holds, checked as each message arrives."""
        with trio.fail_after(timeout):
            async with self._arrived:
                while not condition():
                    await self._arrived.wait()

    async def wait_error(self, timeout: float = 30) -> dict[str, Any]:
        """The first ``error`` message the socket got, once one has come."""
        await self.wait_until(lambda: any(m.get("type") == "error" for m in self.messages), timeout)
        return next(m for m in self.messages if m.get("type") == "error")

    def fragments(self, stream_id: str) -> int:
        """Fragments (moof + mdat) received for ``stream_id``, video and audio."""
        return sum(
            len(split_fragments(p))
            for k, s, p in self.binary
            if s == stream_id and k is BinaryKind.FRAGMENT
        )

    def media(self, stream_id: str) -> bytes:
        """Everything the stream received, in order: a playable fragmented MP4."""
        return b"".join(payload for _, s, payload in self.binary if s == stream_id)


def split_fragments(payload: bytes) -> list[bytes]:
    """The moof + mdat pairs of one binary message (a message carries one or more)."""
    boxes: list[bytes] = []
    position = 0
    while position < len(payload):
        (size,) = struct.unpack_from("!I", payload, position)
        boxes.append(payload[position : position + size])
        position += size
    assert [box[4:8] for box in boxes] == [b"moof", b"mdat"] * (len(boxes) // 2)
    return [boxes[i] + boxes[i + 1] for i in range(0, len(boxes), 2)]
