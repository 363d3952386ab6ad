"""Everything MediaStream changes inside Hypercorn, in one place.

Hypercorn is the stack's HTTP server; four of its behaviours had to change, each a small,
upstreamable patch applied by :func:`install` (idempotent) and guarded by
``tests/unit/test_hypercorn_compat.py``, which names what moved if an upgrade breaks one:

1. **Each connection is a failure boundary.** An exception raised while Hypercorn (or wsproto,
   or h11) handles one connection used to leave ``TCPServer.run``, then
   ``trio.serve_listeners``, then ``hypercorn.trio.serve``: one client could stop the whole
   process. Now it ends that connection only; it is logged once with the client's address and
   counted by the server the connection belongs to (``mediastream_connection_failures_total``).
2. **An oversized WebSocket message stays refused.** Hypercorn 0.18 answers a message over
   ``websocket_max_message_size`` with close code 1009 but keeps the aborted message's buffer;
   the next message on the socket was appended to it, and a binary message after a text one
   raised ``TypeError`` (the crash that (1) now contains anyway).
3. **Keep-alive with Quart-Trio.** Hypercorn (re)starts a connection's idle timer from inside
   the request task, which Quart-Trio cancels right after the response; the timer was then
   never armed, so idle keep-alive connections were never closed and ``Connection: close``
   responses never closed the socket. Running ``TCPServer.protocol_send`` shielded lets it
   finish; ``tests/integration/test_http.py`` reads a response to EOF to keep this honest.

4. **A compressed message is never inflated past the cap.** Hypercorn negotiates
   permessage-deflate (wsproto's extension), which inflated each read without bound before the
   message cap was checked: 64 KiB of compressed zeros became 64 MiB (found by the frame
   fuzzer, ``tests/integration/test_ws_frames.py``). The extension now inflates at most one
   byte past ``websocket_max_message_size`` per message and then closes with 1009.

Nothing else in MediaStream imports Hypercorn's (or wsproto's) internals.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from typing import Any, Final

import hypercorn.config
import hypercorn.protocol.ws_stream
import hypercorn.trio.tcp_server
import trio
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

log = logging.getLogger(__name__)

#: Called with the failure's reason (the exception's class name) for each contained failure.
ConnectionFailureHandler = Callable[[str], None]

_FAILURE_HANDLER_ATTRIBUTE: Final = "mediastream_connection_failed"
#: The replaced methods, by class and name: the patches are applied once per process.
_ORIGINALS: dict[tuple[type, str], Any] = {}


def install() -> None:
    """Apply the patches (idempotent; the first call in a process does the work)."""
    server_class = hypercorn.trio.tcp_server.TCPServer
    buffer_class = hypercorn.protocol.ws_stream.WebsocketBuffer
    _patch(server_class, "run", _contained_run)
    _patch(server_class, "protocol_send", _shielded_protocol_send)
    _patch(buffer_class, "extend", _extend_unless_overflowed)
    # Hypercorn makes the extension by this module-level name in ``Handshake.accept``.
    setattr(hypercorn.protocol.ws_stream, "PerMessageDeflate", BoundedPerMessageDeflate)  # noqa: B010


def limit_inflation(max_message_bytes: int) -> None:
    """Inflate no compressed WebSocket message beyond ``max_message_bytes``.

    Process-wide, like the patch: with several servers in one process (the tests), the
    largest of their caps applies to all.
    """
    limit = BoundedPerMessageDeflate.max_message_bytes
    BoundedPerMessageDeflate.max_message_bytes = max(limit or 0, max_message_bytes)


def original(cls: type, name: str) -> Any:
    """The method :func:`install` replaced (for the tests that put a bug back)."""
    return _ORIGINALS[(cls, name)]


def on_connection_failure(
    config: hypercorn.config.Config, handler: ConnectionFailureHandler
) -> None:
    """Have ``handler`` told of every contained failure of a connection served with ``config``.

    The patch is process-wide but each server (tests run several in one process) has its own
    Hypercorn ``Config``, so the handler travels on it.
    """
    setattr(config, _FAILURE_HANDLER_ATTRIBUTE, handler)


def _patch(cls: type, name: str, make: Callable[[Any], Any]) -> None:
    if (cls, name) in _ORIGINALS:
        return
    replaced = _ORIGINALS[(cls, name)] = getattr(cls, name)
    setattr(cls, name, functools.wraps(replaced)(make(replaced)))


def _contained_run(original: Any) -> Any:
    async def run(self: hypercorn.trio.tcp_server.TCPServer) -> None:
        client = _peer_address(self.stream)
        try:
            await original(self)
        except* Exception as group:
            # Hypercorn's own ``finally`` has closed the connection's stream by now.
            failure = _first_leaf(group)
            reason = type(failure).__name__
            log.error(
                "%s: connection failed inside the HTTP server (%s: %s); closed it, the server "
                "carries on",
                client,
                reason,
                failure,
                exc_info=failure,
            )
            handler = getattr(self.config, _FAILURE_HANDLER_ATTRIBUTE, None)
            if handler is not None:
                handler(reason)

    return run


def _shielded_protocol_send(original: Any) -> Any:
    async def protocol_send(self: hypercorn.trio.tcp_server.TCPServer, event: Any) -> None:
        with trio.CancelScope(shield=True):
            await original(self, event)

    return protocol_send


def _extend_unless_overflowed(original: Any) -> Any:
    def extend(self: hypercorn.protocol.ws_stream.WebsocketBuffer, event: Any) -> None:
        if self.length > self.max_length:
            # The socket is closing with 1009; a later message must not join the aborted one.
            raise hypercorn.protocol.ws_stream.FrameTooLargeError()
        original(self, event)

    return extend


class BoundedPerMessageDeflate(PerMessageDeflate):
    """wsproto's permessage-deflate, inflating each message at most one byte past the cap."""

    #: set by :func:`limit_inflation`; until then, Hypercorn's own default cap
    max_message_bytes: int | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._inflated = 0

    def frame_inbound_header(self, proto: Any, opcode: Any, rsv: Any, payload_length: int) -> Any:
        if self._inbound_compressed is None:  # the first frame of a message
            self._inflated = 0
        return super().frame_inbound_header(proto, opcode, rsv, payload_length)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        assert self._decompressor is not None
        cap = self.max_message_bytes or hypercorn.config.Config.websocket_max_message_size
        room = cap - self._inflated + 1
        try:
            inflated = self._decompressor.decompress(bytes(data), room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated > cap or self._decompressor.unconsumed_tail:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated


def _first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    assert isinstance(first, Exception)
    return first


def _peer_address(stream: Any) -> str:
    """``host:port`` of the client (TLS streams wrap the socket stream)."""
    socket_stream = getattr(stream, "transport_stream", stream)
    try:
        host, port, *_ = socket_stream.socket.getpeername()
    except (AttributeError, OSError, ValueError):
        return "unknown client"
    return f"{host}:{port}"
