"""What ``hypercorn_compat`` relies on inside Hypercorn: if an upgrade moves it, this says what."""

from __future__ import annotations

import hashlib
import inspect

import hypercorn.protocol.events
import hypercorn.protocol.ws_stream
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, Ping, Pong, TextMessage
from wsproto.frame_protocol import CloseReason

from mediastream import hypercorn_compat

#: sha256 of Hypercorn 0.18's ``WSStream._handle_events``, of which hypercorn_compat keeps a
#: changed copy (``_handle_events_through_the_close``).
HANDLE_EVENTS_FINGERPRINT = "b90f3f595ff9fd4722f15769e9c40d113838a1deb6f3ecc0f63dc8ffc1d7f8e8"


def test_hypercorn_still_has_what_the_patches_replace() -> None:
    hypercorn_compat.install()
    tcp_server = hypercorn.trio.tcp_server.TCPServer
    for name in ("run", "protocol_send", "_close"):
        assert inspect.iscoroutinefunction(hypercorn_compat.original(tcp_server, name)), (
            f"hypercorn.trio.tcp_server.TCPServer.{name} is gone or no longer async: "
            "hypercorn_compat patches it"
        )
    assert "self.stream = stream" in inspect.getsource(tcp_server.__init__), (
        "TCPServer no longer keeps its stream as .stream: the failure log reads the client's "
        "address from it"
    )
    assert "self.config = config" in inspect.getsource(tcp_server.__init__), (
        "TCPServer no longer keeps its Config as .config: the failure handler travels on it"
    )
    assert "self.send_lock = trio.Lock()" in inspect.getsource(tcp_server.__init__), (
        "TCPServer no longer serialises its sends with .send_lock: the EOF patch takes it"
    )
    close = inspect.getsource(hypercorn_compat.original(tcp_server, "_close"))
    assert "self.stream.send_eof()" in close and "self.stream.aclose()" in close, (
        "TCPServer._close no longer sends EOF then closes: the patch that runs it under the "
        "send lock (or closes without EOF while a send runs) assumes both"
    )
    assert "TCPServer" in inspect.getsource(hypercorn.trio.run.worker_serve), (
        "hypercorn.trio.serve no longer serves connections with TCPServer: the connection "
        "boundary would not be applied"
    )
    buffer = hypercorn.protocol.ws_stream.WebsocketBuffer
    assert {"length", "max_length"} <= set(vars(buffer(1))), (
        "WebsocketBuffer no longer tracks length/max_length: the overflow patch reads them"
    )
    assert hasattr(hypercorn.protocol.ws_stream, "FrameTooLargeError")
    assert {"value", "length", "max_length"} <= set(vars(buffer(1))), (
        "WebsocketBuffer's fields moved: hypercorn_compat's extend (counting bytes) sets them"
    )


def test_hypercorn_websocket_stream_still_has_what_the_close_and_ping_patches_use() -> None:
    hypercorn_compat.install()
    stream = hypercorn.protocol.ws_stream.WSStream
    for name in ("handle", "_handle_events", "_send_wsproto_event"):
        assert inspect.iscoroutinefunction(hypercorn_compat.original(stream, name)), (
            f"hypercorn.protocol.ws_stream.WSStream.{name} is gone or no longer async: "
            "hypercorn_compat patches it"
        )
    fields = inspect.getsource(stream.__init__)
    for field in (
        "self.app_put",
        "self.buffer",
        "self.client",
        "self.closed",
        "self.config",
        "self.connection",
        "self.send",
        "self.stream_id",
        "self.task_group",
    ):
        assert f"{field}:" in fields or f"{field} =" in fields, (
            f"WSStream no longer has {field}: hypercorn_compat's close and ping patches use it"
        )
    original = inspect.getsource(hypercorn_compat.original(stream, "_handle_events"))
    assert hashlib.sha256(original.encode()).hexdigest() == HANDLE_EVENTS_FINGERPRINT, (
        "Hypercorn's WSStream._handle_events changed: hypercorn_compat runs its own copy "
        "(_handle_events_through_the_close); carry the change over, then update the fingerprint"
    )
    assert hasattr(hypercorn.protocol.events, "StreamClosed")
    assert {"OPEN", "LOCAL_CLOSING", "REMOTE_CLOSING"} <= set(ConnectionState.__members__)
    assert CloseReason.POLICY_VIOLATION == 1008 and CloseReason.MESSAGE_TOO_BIG == 1009
    assert Ping(b"x").response() == Pong(b"x")


def test_an_overflowed_websocket_buffer_refuses_every_later_message() -> None:
    hypercorn_compat.install()
    buffer = hypercorn.protocol.ws_stream.WebsocketBuffer(max_length=10)
    too_large = hypercorn.protocol.ws_stream.FrameTooLargeError
    with pytest.raises(too_large):
        buffer.extend(TextMessage(data="x" * 11))
    # Unpatched, this raised TypeError: the bytes went into the aborted text message's buffer.
    with pytest.raises(too_large):
        buffer.extend(BytesMessage(data=b"\x00binary"))


def test_a_websocket_buffer_counts_text_in_utf8_bytes() -> None:
    hypercorn_compat.install()
    buffer = hypercorn.protocol.ws_stream.WebsocketBuffer(max_length=10)
    buffer.extend(TextMessage(data="ü" * 3, message_finished=False))  # 6 bytes, 3 characters
    buffer.extend(TextMessage(data="😀"))  # 4 more: exactly the cap
    assert buffer.length == 10
    assert buffer.to_message()["text"] == "üüü😀"
    buffer.clear()
    with pytest.raises(hypercorn.protocol.ws_stream.FrameTooLargeError):
        buffer.extend(TextMessage(data="😀" * 3))  # 3 characters, 12 bytes


def test_the_patches_are_applied_once_per_process() -> None:
    hypercorn_compat.install()
    run = hypercorn.trio.tcp_server.TCPServer.run
    hypercorn_compat.install()
    assert hypercorn.trio.tcp_server.TCPServer.run is run
    original = hypercorn_compat.original(hypercorn.trio.tcp_server.TCPServer, "run")
    assert run.__wrapped__ is original


def test_wsproto_still_has_what_the_bounded_inflater_reads() -> None:
    """The bound itself is played against a live server (a deflate bomb, test_ws_frames.py)."""
    hypercorn_compat.install()
    deflate = hypercorn.protocol.ws_stream.PerMessageDeflate
    assert deflate is hypercorn_compat.BoundedPerMessageDeflate, (
        "Hypercorn no longer makes its permessage-deflate extension by this module-level name"
    )
    for name in ("_inbound_compressed", "_inbound_is_compressible", "_decompressor"):
        assert hasattr(deflate(), name), f"wsproto's PerMessageDeflate has no {name} any more"
