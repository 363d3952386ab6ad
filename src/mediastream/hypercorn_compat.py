"""Everything MediaStream changes inside Hypercorn, in one place.

Hypercorn is the stack's HTTP server; seven of its behaviours had to change, each a small,
upstreamable patch applied by :func:`install` (idempotent) and guarded by
``tests/unit/test_hypercorn_compat.py``, which names what moved if an upgrade breaks one:

1. **Each connection is a failure boundary.** An exception raised while Hypercorn (or wsproto,
   or h11) handles one connection used to leave ``TCPServer.run``, then
   ``trio.serve_listeners``, then ``hypercorn.trio.serve``: one client could stop the whole
   process. Now it ends that connection only; it is logged once with the client's address and
   counted by the server the connection belongs to (``mediastream_connection_failures_total``).
2. **An oversized WebSocket message stays refused, and is measured in bytes.** Hypercorn 0.18
   answers a message over ``websocket_max_message_size`` with close code 1009 but kept the
   aborted message's buffer; the next message on the socket was appended to it, and a binary
   message after a text one raised ``TypeError`` (the crash that (1) now contains anyway). It
   also counted text in characters, so a text message of four-byte characters could be four
   times the cap in bytes; the buffer now counts UTF-8 bytes (``WebsocketBuffer.extend``).
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
5. **EOF is sent under the send lock.** ``TCPServer._close`` sent EOF without the connection's
   send lock; a writer starting its send meanwhile got ``trio.BusyResourceError``, which Quart
   logged as an error with a traceback (a protocol error right after answered messages hit it).
6. **The closing handshake is bounded and read to its end** (``WSStream._handle_events``, our
   copy, and ``WSStream._send_wsproto_event``). Hypercorn stopped handling a read at a refused
   message, so the client's close reply queued behind another message waited for a read that
   never came; and after its own close frame it waited for the reply for ever. Now data
   messages after the server's close frame are discarded while the reply is looked for, and a
   client that has not answered within :data:`CLOSE_HANDSHAKE_TIMEOUT` has its connection
   closed (RFC 6455 section 7.1.1: the server closes the TCP connection).
7. **Pings are rate-limited.** Hypercorn answers WebSocket pings itself, unseen by the
   application's message limit: a socket sending more pings than :func:`limit_pings` allows
   (per second, bursts of as many) is closed with 1008 naming the limit, logged and counted
   (``mediastream_connection_failures_total{reason="ping_flood"}``). Its pongs need no
   separate bound: each is written before the next read, so a client that does not read its
   pongs stops being read.

Nothing else in MediaStream imports Hypercorn's (or wsproto's) internals.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable
from io import BytesIO, StringIO
from typing import Any, Final

import hypercorn.config
import hypercorn.protocol.events
import hypercorn.protocol.ws_stream
import hypercorn.trio.tcp_server
import trio
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

from .limits import TokenBucket

log = logging.getLogger(__name__)

#: Called with the reason each time a connection is ended for a failure (the exception's class
#: name) or for a ping flood (:data:`PING_FLOOD`).
ConnectionFailureHandler = Callable[[str], None]

#: How long the server waits for the client's answer to its close frame before it closes the
#: TCP connection itself (seconds; a browser answers at once).
CLOSE_HANDSHAKE_TIMEOUT: Final = 5.0
#: The reason counted for a socket closed for sending too many pings.
PING_FLOOD: Final = "ping_flood"

_FAILURE_HANDLER_ATTRIBUTE: Final = "mediastream_connection_failed"
_PINGS_PER_SECOND_ATTRIBUTE: Final = "mediastream_pings_per_second"
#: Per WebSocket stream: its ping budget, and the event set when the stream has closed.
_PING_BUCKET_ATTRIBUTE: Final = "_mediastream_pings"
_CLOSED_EVENT_ATTRIBUTE: Final = "_mediastream_closed"
#: The replaced methods, by class and name: the patches are applied once per process.
_ORIGINALS: dict[tuple[type, str], Any] = {}


def install() -> None:
    """Apply the patches (idempotent; the first call in a process does the work)."""
    server_class = hypercorn.trio.tcp_server.TCPServer
    buffer_class = hypercorn.protocol.ws_stream.WebsocketBuffer
    stream_class = hypercorn.protocol.ws_stream.WSStream
    _patch(server_class, "run", _contained_run)
    _patch(server_class, "protocol_send", _shielded_protocol_send)
    _patch(server_class, "_close", _close_under_send_lock)
    _patch(buffer_class, "extend", _extend_in_bytes_unless_overflowed)
    _patch(stream_class, "handle", _handle_noting_the_close)
    _patch(stream_class, "_handle_events", _handle_events_through_the_close)
    _patch(stream_class, "_send_wsproto_event", _send_with_a_bounded_close)
    # Hypercorn makes the extension by this module-level name in ``Handshake.accept``.
    setattr(hypercorn.protocol.ws_stream, "PerMessageDeflate", BoundedPerMessageDeflate)  # noqa: B010


def limit_inflation(max_message_bytes: int) -> None:
    """Inflate no compressed WebSocket message beyond ``max_message_bytes``.

    Process-wide, like the patch: with several servers in one process (the tests), the
    largest of their caps applies to all.
    """
    limit = BoundedPerMessageDeflate.max_message_bytes
    BoundedPerMessageDeflate.max_message_bytes = max(limit or 0, max_message_bytes)


def limit_pings(config: hypercorn.config.Config, per_second: float) -> None:
    """Close a WebSocket served with ``config`` with 1008 once it sends more than
    ``per_second`` pings a second (sustained; bursts of as many). Unset: no limit."""
    setattr(config, _PINGS_PER_SECOND_ATTRIBUTE, per_second)


def original(cls: type, name: str) -> Any:
    """The method :func:`install` replaced (for the tests that put a bug back)."""
    return _ORIGINALS[(cls, name)]


def on_connection_failure(
    config: hypercorn.config.Config, handler: ConnectionFailureHandler
) -> None:
    """Have ``handler`` told of every contained failure of a connection served with ``config``,
    and of every socket it closes for a ping flood.

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


def _close_under_send_lock(original: Any) -> Any:
    async def _close(self: hypercorn.trio.tcp_server.TCPServer) -> None:
        lock = self.send_lock
        owner = lock.statistics().owner
        if owner is None:
            # Hypercorn sent EOF outside the lock: a writer starting its send meanwhile hit the
            # stream's send-conflict check (BusyResourceError), which Quart logs as an error.
            # Under the lock, the writer waits, then finds the stream closed, which Hypercorn
            # handles.
            lock.acquire_nowait()
            try:
                await original(self)
            finally:
                lock.release()
        elif owner is trio.lowlevel.current_task():
            await original(self)  # closing from inside a failed send: the lock is ours
        else:
            # A writer is sending, maybe to a client that reads nothing (the send is
            # shielded), so the lock may never come free. No EOF then: closing the stream wakes
            # that send with ClosedResourceError, which Hypercorn handles.
            await self.stream.aclose()

    return _close


def _extend_in_bytes_unless_overflowed(original: Any) -> Any:
    too_large = hypercorn.protocol.ws_stream.FrameTooLargeError

    def extend(self: hypercorn.protocol.ws_stream.WebsocketBuffer, event: Message[Any]) -> None:
        if self.length > self.max_length:
            # The socket is closing with 1009; a later message must not join the aborted one.
            raise too_large()
        data = event.data
        # Hypercorn counted text in characters: up to 4 bytes each.
        self.length += len(data.encode()) if isinstance(data, str) else len(data)
        if self.length > self.max_length:
            raise too_large()  # refused before it is buffered
        if self.value is None:
            self.value = StringIO() if isinstance(event, TextMessage) else BytesIO()
        self.value.write(data)

    return extend


def _handle_noting_the_close(original: Any) -> Any:
    async def handle(self: hypercorn.protocol.ws_stream.WSStream, event: Any) -> None:
        try:
            await original(self, event)
        finally:
            closed = getattr(self, _CLOSED_EVENT_ATTRIBUTE, None)
            if closed is not None and self.closed:
                closed.set()

    return handle


def _handle_events_through_the_close(original: Any) -> Any:
    """Hypercorn's ``WSStream._handle_events``, changed where the comments say."""

    async def _handle_events(self: hypercorn.protocol.ws_stream.WSStream) -> None:
        for event in self.connection.events():
            if isinstance(event, Message):
                if self.connection.state is not ConnectionState.OPEN:
                    # Our close frame is out (a refused message, a ping flood, the application
                    # closing): data that follows is discarded, and the loop goes on to the
                    # client's close reply. Hypercorn stopped here until the next read.
                    continue
                try:
                    self.buffer.extend(event)
                except hypercorn.protocol.ws_stream.FrameTooLargeError:
                    await self._send_wsproto_event(
                        CloseConnection(code=CloseReason.MESSAGE_TOO_BIG)
                    )
                    continue  # Hypercorn: break
                if event.message_finished:
                    assert self.app_put is not None  # the application runs once accepted
                    await self.app_put(self.buffer.to_message())
                    self.buffer.clear()
            elif isinstance(event, Ping):
                if self.connection.state is not ConnectionState.OPEN:
                    continue  # closing: no pong is due (wsproto would refuse to send one)
                if not _ping_allowed(self):
                    await _close_for_ping_flood(self)
                    continue
                await self._send_wsproto_event(event.response())
            elif isinstance(event, CloseConnection):
                if self.connection.state == ConnectionState.REMOTE_CLOSING:
                    await self._send_wsproto_event(event.response())
                await self.send(hypercorn.protocol.events.StreamClosed(stream_id=self.stream_id))

    return _handle_events


def _ping_allowed(stream: hypercorn.protocol.ws_stream.WSStream) -> bool:
    per_second = getattr(stream.config, _PINGS_PER_SECOND_ATTRIBUTE, None)
    if per_second is None:
        return True
    now = trio.current_time()
    bucket = getattr(stream, _PING_BUCKET_ATTRIBUTE, None)
    if bucket is None:
        bucket = TokenBucket(per_second, per_second, now)
        setattr(stream, _PING_BUCKET_ATTRIBUTE, bucket)
    return bucket.try_take(now)


async def _close_for_ping_flood(stream: hypercorn.protocol.ws_stream.WSStream) -> None:
    per_second = getattr(stream.config, _PINGS_PER_SECOND_ATTRIBUTE)
    reason = f"more than {per_second:g} pings a second"
    log.warning("%s: %s; closing the socket (1008)", _client(stream), reason)
    await stream._send_wsproto_event(
        CloseConnection(code=CloseReason.POLICY_VIOLATION, reason=reason)
    )
    handler = getattr(stream.config, _FAILURE_HANDLER_ATTRIBUTE, None)
    if handler is not None:
        handler(PING_FLOOD)


def _send_with_a_bounded_close(original: Any) -> Any:
    async def _send_wsproto_event(self: hypercorn.protocol.ws_stream.WSStream, event: Any) -> None:
        if (
            isinstance(event, CloseConnection)
            and self.connection.state is ConnectionState.OPEN
            and not hasattr(self, _CLOSED_EVENT_ATTRIBUTE)
        ):
            # Our close frame goes first: the client owes the reply, for a bounded time. The
            # clock starts before the frame is sent: a client that reads nothing can hold that
            # send (shielded, in Hypercorn) for ever, and closing the connection ends it.
            closed = trio.Event()
            setattr(self, _CLOSED_EVENT_ATTRIBUTE, closed)
            self.task_group.spawn(_end_an_unanswered_close, self, closed)
        await original(self, event)

    return _send_wsproto_event


async def _end_an_unanswered_close(
    stream: hypercorn.protocol.ws_stream.WSStream, closed: trio.Event
) -> None:
    with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT):
        await closed.wait()
        return
    if stream.closed:
        return
    log.info(
        "%s: no answer to the server's close frame within %g s; closing the connection",
        _client(stream),
        CLOSE_HANDSHAKE_TIMEOUT,
    )
    # What Hypercorn does when the reply comes: end the stream, and with it the connection.
    await stream.send(hypercorn.protocol.events.StreamClosed(stream_id=stream.stream_id))


def _client(stream: hypercorn.protocol.ws_stream.WSStream) -> str:
    if stream.client is None:
        return "unknown client"
    host, port = stream.client
    return f"{host}:{port}"


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
