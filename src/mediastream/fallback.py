"""One stream watched over the signaling socket itself, for a browser WebRTC can't reach.

The stream's H.264 goes to the browser's Media Source Extensions as fragmented MP4
(``media/fmp4.py``) in binary WebSocket messages tagged with the stream id (the framing is
:func:`frame_binary`; ``docs/protocol.md`` has it for clients).

Task tree of a fallback session (a cancel scope inside its socket's nursery)::

    FallbackSession.run              cancel scope: ``end()``, the socket closing, the stream
    │                                stopped or deleted, or a new offer for the stream
    └── with stream.open_viewer()    counted viewer, bounded frame queue (the fan-out's)
        └── nursery
            ├── forward the stream's state changes to the client
            └── send: init segment, then one fragment per frame, one at a time

Back-pressure: the session hands the socket one fragment and waits until it is written
before it takes the next frame from its queue. A slow socket therefore fills each stream's own
bounded queue, where the fan-out's policy skips that stream to its next keyframe (counted as
drops); the socket's shared outbox never holds more than one fragment per stream, so the
streams stay interleaved and the socket's other messages are never crowded out.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from . import protocol
from .errors import ErrorCode, SignalingError
from .media.fanout import Subscriber, SubscriberStatistics
from .media.fmp4 import Fmp4Error, Fmp4Remuxer, InitSegment
from .protocol import IceCandidate
from .registry import Stream
from .session import SessionPhase, serve_reporting_failure

log = logging.getLogger(__name__)

FRAMING_VERSION: Final = 1


class BinaryKind(enum.IntEnum):
    """What a binary message carries (the low 4 bits of its first byte)."""

    INIT = 1  # an fMP4 init segment (ftyp + moov): (re)start the SourceBuffer with it
    FRAGMENT = 2  # one fMP4 media fragment (moof + mdat)


def frame_binary(kind: BinaryKind, stream_id: str, payload: bytes) -> bytes:
    """One binary message: ``version << 4 | kind``, the stream id's length (2 bytes, big
    endian), the stream id in UTF-8, then the payload."""
    name = stream_id.encode()
    return bytes([FRAMING_VERSION << 4 | kind]) + struct.pack("!H", len(name)) + name + payload


def parse_binary(data: bytes) -> tuple[BinaryKind, str, bytes]:
    """The inverse of :func:`frame_binary` (for tests and tools).

    Raises:
        ValueError: naming what is wrong with the message.
    """
    if len(data) < 3:
        raise ValueError(f"binary message of {len(data)} bytes is shorter than its header")
    version, kind = data[0] >> 4, data[0] & 0x0F
    if version != FRAMING_VERSION:
        raise ValueError(f"binary framing version {version}; expected {FRAMING_VERSION}")
    (length,) = struct.unpack_from("!H", data, 1)
    if 3 + length > len(data):
        raise ValueError(f"stream id of {length} bytes overruns the message")
    return BinaryKind(kind), data[3 : 3 + length].decode(), data[3 + length :]


#: Writes one binary message to the socket; returns once it has been written.
SendBinary = Callable[[bytes], Awaitable[None]]
Post = Callable[[str], None]
PostError = Callable[[ErrorCode, str, str | None, str | None], None]


class Remuxers:
    """Each stream's one fMP4 remuxer, shared by its fallback viewers on every socket.

    A remuxer lives while a fallback viewer of its stream does (its fragment cache is then
    freed); a stream replaced through the API gets a new one.
    """

    def __init__(self) -> None:
        #: stream id → (the stream object, its remuxer, fallback viewers using it)
        self._by_stream: dict[str, tuple[Stream, Fmp4Remuxer, int]] = {}

    def get(self, stream: Stream) -> Fmp4Remuxer | None:
        """The remuxer ``stream``'s fallback viewers are using now, if any."""
        entry = self._by_stream.get(stream.id)
        return entry[1] if entry is not None and entry[0] is stream else None

    @contextlib.contextmanager
    def open(self, stream: Stream) -> Iterator[Fmp4Remuxer]:
        """Use ``stream``'s remuxer (made on first use) for as long as the block runs."""
        entry = self._by_stream.get(stream.id)
        if entry is None or entry[0] is not stream:
            entry = (stream, Fmp4Remuxer(), 0)
        remuxer = entry[1]
        self._by_stream[stream.id] = (stream, remuxer, entry[2] + 1)
        try:
            yield remuxer
        finally:
            current = self._by_stream.get(stream.id)
            if current is not None and current[1] is remuxer:  # not replaced meanwhile
                if current[2] > 1:
                    self._by_stream[stream.id] = (stream, remuxer, current[2] - 1)
                else:
                    del self._by_stream[stream.id]


class FallbackSession:
    """One stream's fMP4 over the socket (the ``fallback`` message); ``close`` ends it."""

    #: like a WebRTC session that has connected: a new offer replaces it at once.
    phase = SessionPhase.CONNECTED

    def __init__(
        self,
        stream: Stream,
        *,
        send_binary: SendBinary,
        post: Post,
        post_error: PostError,
        client: str,
        remuxers: Remuxers,
    ) -> None:
        self.stream = stream
        self._remuxers = remuxers
        self._send_binary = send_binary
        self._post = post
        self._post_error_to = post_error
        self._label = f"{client} {stream.id} (fallback)"
        self._cancel_scope = trio.CancelScope()
        self._end_reason = "socket closed"
        self._subscriber: Subscriber | None = None
        self._init_sent: InitSegment | None = None
        self.fragments_sent = 0

    session_id: str | None = None

    def subscriber_statistics(self) -> SubscriberStatistics | None:
        return self._subscriber.statistics() if self._subscriber is not None else None

    def end(self, reason: str) -> None:
        """End the session now. Idempotent."""
        if not self._cancel_scope.cancel_called:
            self._end_reason = reason
        self._cancel_scope.cancel()

    def add_candidate(self, candidate: IceCandidate) -> None:
        raise SignalingError(
            ErrorCode.NO_SESSION,
            "ICE candidate for a stream playing over the socket (fallback); send an offer first",
            stream_id=self.stream.id,
        )

    async def run(self) -> None:
        """Serve the session until it ends; never raises except Cancelled."""
        log.info("%s: session started", self._label)
        try:
            failure = await serve_reporting_failure(
                self._serve, self._cancel_scope, self._post_error, self._label, "fallback"
            )
            if failure is not None:
                self._end_reason = failure
        finally:
            log.info(
                "%s: session ended (%s) after %d fragments",
                self._label,
                self._end_reason,
                self.fragments_sent,
            )

    async def _serve(self) -> None:
        with (
            self.stream.open_viewer(end=self._stream_unavailable) as subscriber,
            self._remuxers.open(self.stream) as remuxer,
        ):
            self._subscriber = subscriber
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_states)
                await self._send_frames(subscriber, remuxer)

    async def _send_frames(self, subscriber: Subscriber, remuxer: Fmp4Remuxer) -> None:
        queued = trio.Event()

        def wake() -> None:
            queued.set()

        subscriber.set_wakeup(wake)
        while True:
            frame = subscriber.get_nowait()
            if frame is None:
                await queued.wait()
                queued = trio.Event()
                continue
            if frame.kind != "video":
                continue
            try:
                if frame.keyframe:
                    info = self.stream.source_info or await self.stream.wait_source_info()
                    init = remuxer.init_for(frame, info.width, info.height)
                    if init is not self._init_sent:
                        await self._send_binary(
                            frame_binary(BinaryKind.INIT, self.stream.id, init.data)
                        )
                        self._init_sent = init
                if self._init_sent is None:
                    continue  # the queue starts at a keyframe; this cannot be reached
                fragment = remuxer.fragment(frame)
            except Fmp4Error as exc:
                raise SignalingError(
                    ErrorCode.STREAM_UNAVAILABLE,
                    f"This stream's video can't be sent over the socket: {exc}",
                    stream_id=self.stream.id,
                ) from None
            await self._send_binary(frame_binary(BinaryKind.FRAGMENT, self.stream.id, fragment))
            self.fragments_sent += 1

    async def _forward_states(self) -> None:
        last: tuple[str, str | None] | None = None
        while True:
            current = (str(self.stream.state), self.stream.detail)
            if current != last:
                last = current
                self._post(protocol.state(self.stream.id, current[0], current[1]))
            await self.stream.wait_changed()

    def _stream_unavailable(self, reason: str) -> None:
        self._post_error(ErrorCode.STREAM_UNAVAILABLE, f"Unavailable: {reason}")
        self.end(reason)

    def _post_error(self, code: ErrorCode, message: str) -> None:
        self._post_error_to(code, message, self.stream.id, None)
