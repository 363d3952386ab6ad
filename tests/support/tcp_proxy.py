"""A loopback TCP proxy for Redis: hold all traffic (one node cut off from Redis, the others
not), or lose pub/sub messages on their way to a subscriber (what a network or a Redis
failover does to pub/sub, which delivers at most once)."""

from __future__ import annotations

import trio

#: how a pushed pub/sub message starts, in RESP3 and in RESP2
_MESSAGE_FRAMES = (b">3\r\n$7\r\nmessage\r\n", b"*3\r\n$7\r\nmessage\r\n")


class TcpProxy:
    """Forwards connections on its own port to ``127.0.0.1:target_port``.

    ``hold()`` stops forwarding in both directions (bytes wait, nothing is lost or closed):
    to the client, the server has gone silent, as in a network partition.
    ``drop_messages(n, containing)`` makes the next ``n`` pub/sub messages pushed to a subscribed
    connection vanish (whole RESP frames, so the connection itself stays sound); the
    publisher was told they were delivered.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.dropped = 0
        self._to_drop = 0
        self._drop_containing = b""
        self._flowing = trio.Event()
        self._flowing.set()
        self._dropped_changed = trio.Event()

    def hold(self) -> None:
        self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    def drop_messages(self, count: int, containing: bytes = b"") -> None:
        """Lose the next ``count`` messages (those whose frame contains ``containing``)."""
        self._to_drop, self._drop_containing = count, containing

    async def wait_dropped(self, count: int) -> None:
        while self.dropped < count:
            await self._dropped_changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connect, listeners)
            task_status.started(self.port)

    async def _connect(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        subscribed = trio.Event()
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope, subscribed)
            nursery.start_soon(self._pump_replies, server, client, nursery.cancel_scope, subscribed)

    async def _pump(
        self,
        source: trio.SocketStream,
        target: trio.SocketStream,
        both: trio.CancelScope,
        subscribed: trio.Event,
    ) -> None:
        try:
            async for chunk in source:
                if b"SUBSCRIBE" in chunk.upper():
                    subscribed.set()
                await self._flowing.wait()
                await target.send_all(chunk)
        except trio.BrokenResourceError:
            pass
        both.cancel()

    async def _pump_replies(
        self,
        source: trio.SocketStream,
        target: trio.SocketStream,
        both: trio.CancelScope,
        subscribed: trio.Event,
    ) -> None:
        """Server to client, frame by frame once the client subscribed (to drop messages)."""
        pending = b""
        try:
            async for chunk in source:
                await self._flowing.wait()
                if not subscribed.is_set():
                    await target.send_all(chunk)
                    continue
                pending += chunk
                forward = b""
                while (end := _frame_end(pending, 0)) is not None:
                    frame, pending = pending[:end], pending[end:]
                    if (
                        self._to_drop
                        and frame.startswith(_MESSAGE_FRAMES)
                        and self._drop_containing in frame
                    ):
                        self._to_drop -= 1
                        self.dropped += 1
                        self._dropped_changed.set()
                        self._dropped_changed = trio.Event()
                    else:
                        forward += frame
                if forward:
                    await target.send_all(forward)
        except trio.BrokenResourceError:
            pass
        both.cancel()


def _frame_end(data: bytes, start: int) -> int | None:
    """Where the RESP2/RESP3 frame starting at ``start`` ends; None if it is incomplete."""
    line_end = data.find(b"\r\n", start)
    if line_end < 0:
        return None
    kind, head, after = data[start : start + 1], data[start + 1 : line_end], line_end + 2
    if kind in (b"+", b"-", b":", b"_", b"#", b",", b"("):
        return after
    if kind in (b"$", b"=", b"!"):
        length = int(head)
        end = after + length + 2 if length >= 0 else after
        return end if end <= len(data) else None
    if kind in (b"*", b">", b"~", b"%", b"|"):
        count = int(head)
        for _ in range(max(count, 0) * (2 if kind in (b"%", b"|") else 1)):
            end_of_item = _frame_end(data, after)
            if end_of_item is None:
                return None
            after = end_of_item
        if kind == b"|":  # an attribute is followed by the frame it describes
            return _frame_end(data, after)
        return after
    raise ValueError(f"not RESP: {data[start : start + 20]!r}")
