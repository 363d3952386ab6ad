"""A raw WebSocket client for fuzzing: the upgrade and every frame written byte by byte.

A WebSocket library refuses to send most of what a frame-level fuzzer needs (reserved bits,
unmasked or fragmented control frames, continuations out of place, lengths that lie, invalid
UTF-8), so this client builds frames itself and reads the server's frames to learn how it
reacted::

    async with open_raw_websocket(server.ws_url) as ws:
        await ws.send_frame(Opcode.PING, b"x" * 126)        # too long for a control frame
        closure = await ws.wait_closed()
        assert closure.code in (1002, None)

The frame functions (:func:`build_frame`, :func:`close_payload`, :class:`FrameReader`,
:func:`handshake_request`) do no I/O and are unit-tested on their own; :class:`RawWebSocket`
is the thin Trio shell around them.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import trio

#: RFC 6455 section 1.3: the GUID the server appends to the client's key.
WEBSOCKET_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The masking key of RFC 6455's own examples (section 5.7); any fixed key keeps frames pure.
RFC_EXAMPLE_MASK: Final = bytes.fromhex("37fa213d")
#: The largest payload a control frame may carry (RFC 6455 section 5.5).
MAX_CONTROL_PAYLOAD: Final = 125
#: What the client reports when the TCP connection ended without a close frame (section 7.1.5).
ABNORMAL_CLOSURE: Final = 1006
_RECEIVE_BYTES: Final = 65536

LengthForm = Literal[7, 16, 64]


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 section 5.2); 3–7 and 11–15 are reserved."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @staticmethod
    def is_control(opcode: int) -> bool:
        return bool(opcode & 0x8)


# --- frames, without I/O ---------------------------------------------------------------------


def mask_payload(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` (masking and unmasking are the same)."""
    if len(key) != 4:
        raise ValueError(f"a masking key is 4 bytes, not {len(key)}")
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def encode_length(length: int, form: LengthForm | None = None) -> tuple[int, bytes]:
    """The 7-bit length field and its extension for ``length``.

    Args:
        length: the declared payload length; anything from 0 to 2**64 - 1, true or not.
        form: force the 7-bit, 16-bit or 64-bit encoding (RFC 6455 requires the shortest;
            a longer one is a protocol error a fuzzer wants to send). None: the shortest.

    Returns:
        (the low seven bits of the second header byte, the extended length bytes).
    """
    if form is None:
        form = 7 if length <= MAX_CONTROL_PAYLOAD else 16 if length <= 0xFFFF else 64
    if form == 7:
        if length > 127:
            raise ValueError(f"length {length} does not fit the 7-bit field")
        return length, b""
    if form == 16:
        if length > 0xFFFF:
            raise ValueError(f"length {length} does not fit the 16-bit field")
        return 126, struct.pack("!H", length)
    if length >= 2**64:
        raise ValueError(f"length {length} does not fit the 64-bit field")
    return 127, struct.pack("!Q", length)


def build_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = RFC_EXAMPLE_MASK,
    length: int | None = None,
    length_form: LengthForm | None = None,
) -> bytes:
    """One frame, every header field explicit, whether the RFC allows it or not.

    Args:
        opcode: 0–15, reserved ones included.
        payload: the (unmasked) payload bytes written after the header.
        fin: the FIN bit.
        rsv: the three RSV bits as a number 0–7 (4 = RSV1, 2 = RSV2, 1 = RSV3).
        mask: the masking key; None sends an unmasked frame (illegal from a client).
        length: the length to declare; None declares ``len(payload)``. A different value
            makes a lying frame: shorter splits the payload into the next frame's header,
            longer leaves the server waiting for bytes that never come.
        length_form: see :func:`encode_length`.
    """
    if not 0 <= opcode <= 0xF:
        raise ValueError(f"opcode {opcode} does not fit four bits")
    if not 0 <= rsv <= 7:
        raise ValueError(f"rsv {rsv} does not fit three bits")
    declared = len(payload) if length is None else length
    short, extended = encode_length(declared, length_form)
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    second = (0x80 if mask is not None else 0) | short
    header = bytes([first, second]) + extended
    if mask is None:
        return header + payload
    return header + mask + mask_payload(payload, mask)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    """A close frame's payload: the 2-byte code, then the reason (any bytes, UTF-8 or not)."""
    if code is None:
        return reason
    return struct.pack("!H", code) + reason


def fragments(
    opcode: int, payload: bytes, sizes: Iterable[int], *, mask: bytes | None = RFC_EXAMPLE_MASK
) -> list[bytes]:
    """``payload`` as one message cut into frames of ``sizes`` bytes (the rest in the last)."""
    pieces: list[bytes] = []
    start = 0
    for size in sizes:
        pieces.append(payload[start : start + size])
        start += size
    pieces.append(payload[start:])
    return [
        build_frame(
            opcode if index == 0 else Opcode.CONTINUATION,
            piece,
            fin=index == len(pieces) - 1,
            mask=mask,
        )
        for index, piece in enumerate(pieces)
    ]


@dataclass(frozen=True)
class ServerFrame:
    """A frame the server sent, unmasked and checked only as far as parsing needs."""

    fin: bool
    rsv: int
    opcode: int
    masked: bool
    payload: bytes

    @property
    def close_code(self) -> int | None:
        """A close frame's code (None for an empty close payload)."""
        if self.opcode != Opcode.CLOSE or len(self.payload) < 2:
            return None
        return int(struct.unpack("!H", self.payload[:2])[0])

    @property
    def close_reason(self) -> bytes:
        return self.payload[2:] if self.opcode == Opcode.CLOSE else b""


class FrameReader:
    """Incremental parser of the frames a server sends (no I/O: feed bytes, take frames)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[ServerFrame]:
        """Add received bytes; return every frame now complete, in order."""
        self._buffer += data
        frames = []
        while (frame := self._next()) is not None:
            frames.append(frame)
        return frames

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._buffer)

    def _next(self) -> ServerFrame | None:
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        short = buffer[1] & 0x7F
        offset = 2
        if short == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif short == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            offset = 10
        else:
            length = short
        masked = bool(buffer[1] & 0x80)
        key = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            key = bytes(buffer[offset : offset + 4])
            offset += 4
        if len(buffer) < offset + length:
            return None
        payload = bytes(buffer[offset : offset + length])
        if masked:
            payload = mask_payload(payload, key)
        frame = ServerFrame(
            fin=bool(buffer[0] & 0x80),
            rsv=(buffer[0] >> 4) & 0x7,
            opcode=buffer[0] & 0xF,
            masked=masked,
            payload=payload,
        )
        del buffer[: offset + length]
        return frame


def accept_token(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1((key + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_request(
    host: str,
    path: str = "/ws",
    *,
    key: str,
    headers: Iterable[tuple[str, str]] = (),
) -> bytes:
    """The HTTP/1.1 upgrade request, as bytes."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def new_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


# --- the Trio shell --------------------------------------------------------------------------


class HandshakeFailed(Exception):
    def __init__(self, status: int, head: bytes) -> None:
        self.status = status
        self.head = head
        super().__init__(f"upgrade answered with HTTP {status}: {head[:200]!r}")


class ProtocolViolation(AssertionError):
    """The server sent something RFC 6455 forbids it to send."""


@dataclass(frozen=True)
class Closure:
    """How the connection ended, seen from the client.

    ``code`` is the server's close code, or None when the TCP connection ended without a close
    frame (a client reports that as 1006); ``how`` is ``"close frame"``, ``"eof"`` or
    ``"reset"`` (the last thing that happened to the TCP connection).
    """

    code: int | None
    reason: bytes
    how: str

    @property
    def reported_code(self) -> int:
        """What a browser's ``CloseEvent.code`` would say."""
        return ABNORMAL_CLOSURE if self.code is None else self.code


@dataclass
class RawWebSocket:
    """One client connection; frames go out as given, frames in are parsed and recorded.

    Resource handling: the connection's TCP stream is closed by :func:`open_raw_websocket`
    (or :meth:`reset`). Cancellation: any method may be cancelled; the stream is then in an
    unknown state and should only be closed.
    """

    stream: trio.SocketStream
    reader: FrameReader = field(default_factory=FrameReader)
    #: whole data messages from the server (text decoded), in order
    messages: list[str | bytes] = field(default_factory=list)
    #: the payload of every pong frame received, in order
    pong_payloads: list[bytes] = field(default_factory=list)
    closure: Closure | None = None
    #: the server accepted permessage-deflate (RFC 7692): its data frames may set RSV1
    deflate: bool = False
    _inflater: Any = None
    _frames: list[ServerFrame] = field(default_factory=list)
    _fragments: list[ServerFrame] = field(default_factory=list)

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are; a connection the server has ended does not raise (reading
        will tell how it ended)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.stream.send_all(data)

    async def send_frame(self, opcode: int, payload: bytes = b"", **fields: Any) -> None:
        """Build a frame (see :func:`build_frame` for ``fields``) and send it."""
        await self.send_raw(build_frame(opcode, payload, **fields))

    async def send_text(self, text: str) -> None:
        await self.send_frame(Opcode.TEXT, text.encode())

    async def send_close(self, code: int | None = 1000, reason: bytes = b"") -> None:
        await self.send_frame(Opcode.CLOSE, close_payload(code, reason))

    async def receive_frame(self) -> ServerFrame | None:
        """The next frame from the server, or None once the connection has ended."""
        while not self._frames:
            if self.closure is not None and self.closure.how != "close frame":
                return None
            try:
                data = await self.stream.receive_some(_RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._record_end("reset")
                return None
            if not data:
                self._record_end("eof")
                return None
            self._frames.extend(self.reader.feed(data))
        frame = self._frames.pop(0)
        self._check(frame)
        return frame

    async def send_eof(self) -> None:
        """Half-close: a TCP FIN, after which this side sends nothing more."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.send_eof()

    async def wait_closed(self, *, answer: bool = True) -> Closure:
        """Read (and record) everything until the server ends the connection.

        With ``answer``, a close frame from the server is answered with one (as RFC 6455 asks
        of the side that did not start the closing handshake), then the connection is read to
        its end.
        """
        while (frame := await self.receive_frame()) is not None:
            if frame.opcode == Opcode.CLOSE and answer:
                await self.send_raw(build_frame(Opcode.CLOSE, frame.payload[:2]))
        assert self.closure is not None
        return self.closure

    async def probe(self, marker: str | None = None) -> bool:
        """Ask the application for a pong; True once it answers, False if the socket ends.

        Every data message before the pong is kept in :attr:`messages`.
        """
        marker = marker or os.urandom(6).hex()
        await self.send_text(json.dumps({"type": "ping", "payload": {"probe": marker}}))
        return await self.wait_pong(marker)

    async def wait_pong(self, marker: str) -> bool:
        while (frame := await self.receive_frame()) is not None:
            if frame.opcode == Opcode.CLOSE:
                # Answer and read to the end; the caller learns the code from ``closure``.
                await self.send_raw(build_frame(Opcode.CLOSE, frame.payload[:2]))
                continue
            message = self._collect(frame)
            if isinstance(message, str) and marker in message:
                reply = json.loads(message)
                if reply.get("type") == "pong" and reply.get("payload") == {"probe": marker}:
                    return True
        return False

    def reset(self) -> None:
        """End the connection with a TCP RST (SO_LINGER 0), as a crashing client would."""
        sock = self.stream.socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        self._record_end("reset")

    def _collect(self, frame: ServerFrame) -> str | bytes | None:
        if frame.opcode in (Opcode.PING, Opcode.PONG):
            return None
        self._fragments.append(frame)
        if not frame.fin:
            return None
        first, *_ = self._fragments
        data = b"".join(f.payload for f in self._fragments)
        self._fragments.clear()
        if first.rsv & 4:
            if self._inflater is None:
                self._inflater = zlib.decompressobj(-15)
            data = self._inflater.decompress(data + b"\x00\x00\xff\xff")
        message: str | bytes = data
        if first.opcode == Opcode.TEXT:
            try:
                message = data.decode("utf-8")
            except UnicodeDecodeError:
                raise ProtocolViolation(f"the server sent invalid UTF-8: {data[:80]!r}") from None
        self.messages.append(message)
        return message

    def _check(self, frame: ServerFrame) -> None:
        if frame.masked:
            raise ProtocolViolation("the server sent a masked frame")
        allowed = 4 if self.deflate and frame.opcode in (Opcode.TEXT, Opcode.BINARY) else 0
        if frame.rsv & ~allowed:
            raise ProtocolViolation(f"the server set RSV bits {frame.rsv:#o}")
        if frame.opcode not in set(Opcode):
            raise ProtocolViolation(f"the server sent reserved opcode {frame.opcode:#x}")
        if frame.opcode == Opcode.CLOSE and self.closure is None:
            self.closure = Closure(frame.close_code, frame.close_reason, "close frame")
        elif frame.opcode == Opcode.PONG:
            self.pong_payloads.append(frame.payload)

    def _record_end(self, how: str) -> None:
        if self.closure is None:
            self.closure = Closure(None, b"", how)
        elif self.closure.how == "close frame":
            # Keep the code; note that the TCP connection has ended too.
            self.closure = Closure(self.closure.code, self.closure.reason, f"close frame, {how}")


def split_ws_url(url: str) -> tuple[str, int, str]:
    """``ws://host:port/path?query`` as (host, port, path with query)."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"a ws:// URL is needed, not {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname, parts.port or 80, path


async def read_http_head(stream: trio.SocketStream, limit: int = 65536) -> tuple[bytes, bytes]:
    """Read an HTTP response head; returns (head, bytes read after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


@contextlib.asynccontextmanager
async def open_raw_websocket(
    url: str, *, headers: Iterable[tuple[str, str]] = ()
) -> AsyncIterator[RawWebSocket]:
    """Connect, upgrade by hand, check the server's accept token; close the stream after.

    Raises:
        HandshakeFailed: the server answered with anything but 101 and the right token.
    """
    host, port, path = split_ws_url(url)
    stream = await trio.open_tcp_stream(host, port)
    try:
        key = new_key()
        await stream.send_all(handshake_request(f"{host}:{port}", path, key=key, headers=headers))
        head, rest = await read_http_head(stream)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
        answered = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in header_lines)
        }
        if status != 101 or answered.get("sec-websocket-accept") != accept_token(key):
            raise HandshakeFailed(status, head)
        extensions = answered.get("sec-websocket-extensions", "")
        ws = RawWebSocket(stream, deflate="permessage-deflate" in extensions)
        ws._frames.extend(ws.reader.feed(rest))
        yield ws
    finally:
        with contextlib.suppress(OSError, trio.TrioInternalError):
            await stream.aclose()
