"""What ``hypercorn_compat`` relies on inside Hypercorn: if an upgrade moves it, this says what."""

from __future__ import annotations

import inspect

import hypercorn.protocol.ws_stream
import hypercorn.trio.run
import hypercorn.trio.tcp_server
import pytest
from wsproto.events import BytesMessage, TextMessage

from mediastream import hypercorn_compat


def test_hypercorn_still_has_what_the_patches_replace() -> None:
    tcp_server = hypercorn.trio.tcp_server.TCPServer
    for name in ("run", "protocol_send"):
        assert inspect.iscoroutinefunction(getattr(tcp_server, name, None)), (
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
    assert "TCPServer" in inspect.getsource(hypercorn.trio.run.worker_serve), (
        "hypercorn.trio.serve no longer serves connections with TCPServer: the connection "
        "boundary would not be applied"
    )
    buffer = hypercorn.protocol.ws_stream.WebsocketBuffer
    assert {"length", "max_length"} <= set(vars(buffer(1))), (
        "WebsocketBuffer no longer tracks length/max_length: the overflow patch reads them"
    )
    assert hasattr(hypercorn.protocol.ws_stream, "FrameTooLargeError")


def test_an_overflowed_websocket_buffer_refuses_every_later_message() -> None:
    hypercorn_compat.install()
    buffer = hypercorn.protocol.ws_stream.WebsocketBuffer(max_length=10)
    too_large = hypercorn.protocol.ws_stream.FrameTooLargeError
    with pytest.raises(too_large):
        buffer.extend(TextMessage(data="x" * 11))
    # Unpatched, this raised TypeError: the bytes went into the aborted text message's buffer.
    with pytest.raises(too_large):
        buffer.extend(BytesMessage(data=b"\x00binary"))


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
