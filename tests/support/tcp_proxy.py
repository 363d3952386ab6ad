"""A loopback TCP proxy that can hold all traffic: one node cut off from Redis, the others not."""

from __future__ import annotations

import trio


class TcpProxy:
    """Forwards connections on its own port to ``127.0.0.1:target_port``.

    ``hold()`` stops forwarding in both directions (bytes wait, nothing is lost or closed):
    to the client, the server has gone silent, as in a network partition.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._flowing = trio.Event()
        self._flowing.set()

    def hold(self) -> None:
        self._flowing = trio.Event()

    def release(self) -> None:
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connect, listeners)
            task_status.started(self.port)

    async def _connect(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        async with client, server, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
            nursery.start_soon(self._pump, server, client, nursery.cancel_scope)

    async def _pump(
        self, source: trio.SocketStream, target: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        try:
            async for chunk in source:
                await self._flowing.wait()
                await target.send_all(chunk)
        except trio.BrokenResourceError:
            pass
        both.cancel()
