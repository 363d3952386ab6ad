"""One stream watched over the signaling socket itself, for a browser WebRTC can't reach.

The stream's H.264 (and its Opus or AAC audio, where the browser's Media Source Extensions take
it) goes to the browser as fragmented MP4 (``media/fmp4.py``) in binary WebSocket messages
tagged with the stream id (the framing is :func:`frame_binary`; ``docs/protocol.md`` has it
for clients). G.711 audio has no MSE codec in Chromium: such a stream's fallback is video only
(logged, and :attr:`FallbackSession.audio_omitted` says why).

A fallback is a session of its own kind: it runs beside the stream's WebRTC session on the same
socket, so a page can retry WebRTC while the fallback plays and end the fallback (``close``
with ``payload.fallback``) once WebRTC shows a picture.

Task tree of a fallback session (a cancel scope inside its socket's nursery)::

    FallbackSession.run              cancel scope: ``end()``, the socket closing, the stream
    │                                stopped or deleted, a new fallback or a ``close``
    └── with stream.open_viewer()    counted viewer, bounded frame queue (the fan-out's), on
        │    (stream.open_audio())   the quality asked for; one for its audio if it is sent
        └── nursery
            ├── forward the state of the quality played to the client
            ├── follow the quality (``quality_follower.py``): the page's ``quality`` messages
            │   move the viewer to another quality (at its cached keyframe)
            └── send: init segment, then a fragment per frame, one message at a time
                (the frames that waited meanwhile go together in the next); after a move,
                the new quality's init segment, then its frames on the viewer's timeline

Back-pressure: the session hands the socket one message and waits until it is written before
it takes the next frames from its queues; the next message carries every frame that waited
meanwhile (one fragment each, at most :data:`MAX_BATCH_FRAMES`), so a socket that is slow to
write gets fewer, larger messages rather than a backlog of round trips. A socket slower than
the stream fills each stream's own bounded queue, where the fan-out's policy skips that stream
to its next keyframe (counted as drops); the socket's shared outbox never holds more than one
message per stream, so the streams stay interleaved and the socket's other messages are never
crowded out.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import struct
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from .errors import ErrorCode, SignalingError
from .feeds import QualityFeed
from .media.fanout import Subscriber, SubscriberStatistics
from .media.fmp4 import (
    MSE_AUDIO_CODECS,
    AudioTrack,
    Fmp4Error,
    Fmp4Remuxer,
    InitSegment,
    decode_time,
    end_time,
    shift_decode_time,
)
from .media.frames import VIDEO_CLOCK_RATE, EncodedFrame
from .media.source_contract import SourceInfo
from .protocol import Fallback, QualityRequest
from .quality_follower import QualityFollower
from .registry import Stream
from .session import forward_states, serve_reporting_failure

log = logging.getLogger(__name__)

FRAMING_VERSION: Final = 1
#: frames one binary message may carry (a slow socket's backlog; about a second of video and
#: sound, a few hundred kilobytes at camera bitrates)
MAX_BATCH_FRAMES: Final = 64


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
    """Each stream quality's one fMP4 remuxer, shared by its fallback viewers on every socket.

    A remuxer lives while a fallback viewer of its stream's quality does (its fragment cache is
    then freed); a stream replaced through the API gets new ones. One per quality, as each
    quality is a stream of frames of its own (its own parameter sets, timeline and frame
    durations).
    """

    def __init__(self) -> None:
        #: (stream id, quality) → (the stream object, its remuxer, fallback viewers using it)
        self._by_feed: dict[tuple[str, str], tuple[Stream, Fmp4Remuxer, int]] = {}

    def get(self, stream: Stream, quality: str | None = None) -> Fmp4Remuxer | None:
        """The remuxer the fallback viewers of ``stream``'s ``quality`` (None: the default)
        are using now, if any."""
        entry = self._by_feed.get((stream.id, quality or stream.quality().name))
        return entry[1] if entry is not None and entry[0] is stream else None

    @contextlib.contextmanager
    def open(self, stream: Stream, quality: str) -> Iterator[Fmp4Remuxer]:
        """Use the remuxer of ``stream``'s ``quality`` (made on first use) while the block runs."""
        key = (stream.id, quality)
        entry = self._by_feed.get(key)
        if entry is None or entry[0] is not stream:
            entry = (stream, Fmp4Remuxer(), 0)
        remuxer = entry[1]
        self._by_feed[key] = (stream, remuxer, entry[2] + 1)
        try:
            yield remuxer
        finally:
            current = self._by_feed.get(key)
            if current is not None and current[1] is remuxer:  # not replaced meanwhile
                if current[2] > 1:
                    self._by_feed[key] = (stream, remuxer, current[2] - 1)
                else:
                    del self._by_feed[key]


def _take_in_turn(subscribers: list[Subscriber], limit: int) -> list[EncodedFrame]:
    """The queued frames, one from each subscriber in turn (each queue's order kept), until
    the queues are empty or ``limit`` is reached (give or take a turn)."""
    frames: list[EncodedFrame] = []
    while len(frames) < limit:
        taken = [frame for s in subscribers if (frame := s.get_nowait()) is not None]
        if not taken:
            break
        frames.extend(taken)
    return frames


class _ViewerTimeline:
    """One fallback viewer's decode times, continuous across its moves between qualities.

    Each quality has its own timeline; the fragments a quality's remuxer builds carry that
    timeline's times and are shared by its viewers. A viewer that moved is sent them shifted
    (a copy, :func:`shift_decode_time`): the new quality's first frame, its cached keyframe,
    starts where the last frame sent ended, and the frames after it keep their spacing. So
    the decode times of a SourceBuffer never go back and leave no gap: Media Source
    Extensions stall at a gap, and treat a jump back as a new segment.

    The keyframe is as old as the new quality's cached GOP, so the picture now trails live by
    that much (the page's player jumps to the live edge when it is more than a second
    behind, as for a viewer who just joined). The audio is shifted by the same wall time, so
    sound stays with the picture; where that would go back, it continues from where it was.
    """

    def __init__(self) -> None:
        self._video_shift = 0  # 90 kHz ticks
        self._audio_shift: int | None = 0  # the audio clock's ticks; None: due at the next
        self._video_end: int | None = None
        self._audio_end: int | None = None
        self._rebasing = False

    def rebase(self) -> None:
        """The next video fragment (a keyframe) is the first of another quality's timeline."""
        if self._video_end is not None:
            self._rebasing = True
            self._audio_shift = None

    def place_video(self, fragment: bytes) -> bytes:
        if self._rebasing:
            assert self._video_end is not None
            self._rebasing = False
            self._video_shift = self._video_end - decode_time(fragment)
        placed = shift_decode_time(fragment, self._video_shift)
        self._video_end = end_time(placed)
        return placed

    def place_audio(self, fragment: bytes, clock_rate: int) -> bytes | None:
        """``fragment`` on the viewer's timeline; None: dropped (it came before the picture
        of the quality it belongs to)."""
        if self._audio_shift is None:
            if self._rebasing:
                # Sound of the new quality before its picture: the shift is not known yet,
                # and a lost 20 ms is better than a jump.
                return None
            shift = self._video_shift * clock_rate // VIDEO_CLOCK_RATE
            if self._audio_end is not None:
                shift = max(shift, self._audio_end - decode_time(fragment))
            self._audio_shift = shift
        placed = shift_decode_time(fragment, self._audio_shift)
        self._audio_end = end_time(placed)
        return placed


class FallbackSession:
    """One stream's fMP4 over the socket (the ``fallback`` message); ``close`` ends it.

    The socket keeps it apart from the stream's WebRTC session (``SignalingConnection
    .fallbacks``): ICE candidates never reach it, and an offer does not end it. It starts on
    the quality ``request`` asks for (pinned, or ``auto`` from its tile) and follows the page's
    ``quality`` messages like a WebRTC session, without a network veto (see
    :meth:`request_quality`).
    """

    def __init__(
        self,
        stream: Stream,
        *,
        send_binary: SendBinary,
        post: Post,
        post_error: PostError,
        client: str,
        remuxers: Remuxers,
        audio_codecs: tuple[str, ...] = (),
        request: Fallback | None = None,
    ) -> None:
        self.stream = stream
        self._audio_codecs = audio_codecs
        self._remuxers = remuxers
        self._send_binary = send_binary
        self._post = post
        self._post_error_to = post_error
        self._label = f"{client} {stream.id} (fallback)"
        self._cancel_scope = trio.CancelScope()
        self._end_reason = "socket closed"
        self._subscriber: Subscriber | None = None
        self._init_sent: InitSegment | None = None
        self._quality = QualityFollower(
            stream,
            requested=request.quality if request is not None else None,
            tile=request.tile if request is not None else None,
            post=post,
            label=self._label,
        )
        self._timeline = _ViewerTimeline()
        #: after a move: the new quality's frames start at a keyframe, never a P-frame
        self._keyframe_due = False
        self.fragments_sent = 0
        self.audio_fragments_sent = 0
        #: binary messages of fragments (a message carries every fragment that waited)
        self.messages_sent = 0
        #: the audio track sent (None: video only), once the source's codec is known
        self.audio: AudioTrack | None = None
        #: why the stream's audio is not sent, when it has audio but it is not
        self.audio_omitted: str | None = None
        #: the quality whose frames were sent last (None before the first)
        self.quality_sent: str | None = None
        #: moves from one quality to another, each starting with an init segment and a keyframe
        self.switches = 0

    session_id: str | None = None

    def subscriber_statistics(self) -> SubscriberStatistics | None:
        return self._subscriber.statistics() if self._subscriber is not None else None

    @property
    def ending(self) -> bool:
        """Whether the session was told to end (it may not have finished yet)."""
        return self._cancel_scope.cancel_called

    def end(self, reason: str) -> None:
        """End the session now. Idempotent."""
        if not self._cancel_scope.cancel_called:
            self._end_reason = reason
        self._cancel_scope.cancel()

    def request_quality(self, request: QualityRequest) -> None:
        """The page pins a quality, asks for ``auto`` and/or reports its tile: the fallback
        moves to the quality chosen (starting at its cached keyframe, after a new init
        segment) and answers with a ``quality`` message. Taken whatever ``sessionId`` the
        request names: the fallback has none, and it follows the page's wish even while a
        WebRTC session beside it is asked the same.

        No network veto: the socket is TCP, whose back-pressure already skips a slow
        viewer to the next keyframe (see the module's docstring).

        Raises:
            SignalingError: ``unknown_quality``, naming the stream's qualities (nothing changes).
        """
        self._quality.request(request)

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
                "%s: session ended (%s) after %d fragments (%d of them audio, %d switches)",
                self._label,
                self._end_reason,
                self.fragments_sent,
                self.audio_fragments_sent,
                self.switches,
            )

    async def _serve(self) -> None:
        self._quality.check()
        start = self._quality.choose().name
        # A cluster node that neither owns nor replicates the stream claims it or becomes a
        # replica of it first (else no frame would come; ``cluster_unavailable`` if Redis is).
        await self.stream.serve_locally()
        with self.stream.open_viewer(end=self._stream_unavailable, quality=start) as subscriber:
            self._subscriber = subscriber
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward_states)
                # Decided once, from what the first quality's source carried when it (last)
                # opened: a camera's streams carry the same sound, so the init segments of
                # its other qualities announce the same audio track (a quality whose audio
                # codec differs would be sent under this one's: not supported, as for WebRTC).
                info = self.stream.quality(start).source_info
                if info is None:
                    info = await self.stream.wait_source_info(start)
                self.audio = self._audio_track(info)
                with contextlib.ExitStack() as stack:
                    audio = None
                    if self.audio is not None:
                        kind = "source_audio" if self.audio.codec == "aac" else "audio"
                        audio = stack.enter_context(self.stream.open_audio(kind, start))
                    nursery.start_soon(self._quality.follow, subscriber, audio)
                    await self._send_frames(subscriber, audio)

    def _audio_track(self, info: SourceInfo) -> AudioTrack | None:
        """The audio track to send: the stream's audio if the browser takes its codec; the
        camera's AAC as it came in preference to the Opus made from it for WebRTC."""
        codec = info.audio_codec
        if codec is None:
            return None
        if info.source_audio_config:
            aac = AudioTrack(
                "aac",
                info.source_audio_clock_rate,
                info.source_audio_channels,
                info.source_audio_config,
            )
            if aac.mse_codec in self._audio_codecs:
                return aac
        mse_codec = MSE_AUDIO_CODECS.get(codec.lower())
        if mse_codec is None:
            self.audio_omitted = (
                f"{codec} audio has no Media Source Extensions codec in browsers; video only"
            )
        elif mse_codec not in self._audio_codecs:
            self.audio_omitted = (
                f"the browser did not ask for {mse_codec} audio"
                if self._audio_codecs
                else "the browser asked for video only"
            )
        else:
            return AudioTrack(codec.lower(), info.audio_clock_rate)
        log.info("%s: %s", self._label, self.audio_omitted)
        return None

    async def _send_frames(self, video: Subscriber, audio: Subscriber | None) -> None:
        """Send the queued frames: whatever waits (video and audio taken in turn, at most
        :data:`MAX_BATCH_FRAMES`) in one message, then wait for more.

        One message at a time, each awaited until written: while it is, new frames wait in
        the queues, and the next message takes them all. A socket that is slow to write gets
        fewer, larger messages instead of a backlog; a fast one, one frame per message.

        The frames taken at once are all of one quality: a move to another quality
        (:meth:`Stream.switch_viewer`) is synchronous and restarts the queues with the new
        quality's cached GOP from its keyframe. The first frames of a quality go out through
        that quality's remuxer, after its init segment, on the viewer's one timeline.
        """
        queued = trio.Event()

        def wake() -> None:
            queued.set()

        subscribers = [video] if audio is None else [video, audio]
        for subscriber in subscribers:
            subscriber.set_wakeup(wake)
        with contextlib.ExitStack() as holding:
            remuxer: Fmp4Remuxer | None = None
            while True:
                # Read with the frames, in the same synchronous step: they are its frames.
                playing = self.stream.quality_of(video)
                frames = _take_in_turn(subscribers, MAX_BATCH_FRAMES)
                if not frames or playing is None:
                    await queued.wait()
                    queued = trio.Event()
                    continue
                if playing != self.quality_sent:
                    # Done with the quality left: its remuxer (and its cached fragments) goes.
                    holding.close()
                    remuxer = holding.enter_context(self._remuxers.open(self.stream, playing))
                    if self.quality_sent is not None:
                        self.switches += 1
                        self._timeline.rebase()
                        self._keyframe_due = True
                        log.info("%s: now sending quality %s", self._label, playing)
                    self.quality_sent = playing
                assert remuxer is not None
                await self._send_batch(frames, self.stream.quality(playing), remuxer)

    async def _send_batch(
        self, frames: list[EncodedFrame], feed: QualityFeed, remuxer: Fmp4Remuxer
    ) -> None:
        """``frames`` (all of ``feed``) as fragments in one message, after an init segment
        where a keyframe brings new parameter sets (or a new quality)."""
        batch: list[bytes] = []
        audio_in_batch = 0
        for frame in frames:
            try:
                if frame.kind != "video":
                    fragment = self._audio_fragment(frame, remuxer)
                    if fragment is not None:
                        batch.append(fragment)
                        audio_in_batch += 1
                    continue
                if self._keyframe_due and not frame.keyframe:
                    continue  # the move starts the queue at a keyframe: never reached
                self._keyframe_due = False
                if frame.keyframe:
                    # The size is the SPS's; the source's figures only where it has none.
                    info = feed.source_info
                    width, height = (info.width, info.height) if info is not None else (0, 0)
                    init = remuxer.init_for(frame, width, height, self.audio)
                    if init is not self._init_sent:
                        # What came before belongs to the old init: send it first.
                        await self._send_fragments(batch, audio_in_batch)
                        batch, audio_in_batch = [], 0
                        await self._send_binary(
                            frame_binary(BinaryKind.INIT, self.stream.id, init.data)
                        )
                        self._init_sent = init
                if self._init_sent is None:
                    continue  # the queue starts at a keyframe; this cannot be reached
                batch.append(self._timeline.place_video(remuxer.fragment(frame)))
            except Fmp4Error as exc:
                raise SignalingError(
                    ErrorCode.STREAM_UNAVAILABLE,
                    f"This stream's video can't be sent over the socket: {exc}",
                    stream_id=self.stream.id,
                ) from None
        await self._send_fragments(batch, audio_in_batch)

    async def _send_fragments(self, fragments: list[bytes], audio_fragments: int) -> None:
        """One binary message of ``fragments`` (moof + mdat pairs, appended as one)."""
        if not fragments:
            return
        # Counted as they are handed over: then every fragment built for this viewer counts.
        self.fragments_sent += len(fragments)
        self.audio_fragments_sent += audio_fragments
        self.messages_sent += 1
        payload = b"".join(fragments)
        await self._send_binary(frame_binary(BinaryKind.FRAGMENT, self.stream.id, payload))

    def _audio_fragment(self, frame: EncodedFrame, remuxer: Fmp4Remuxer) -> bytes | None:
        if self._init_sent is None or self.audio is None:
            return None  # sound starts with the picture: its track is announced by the init
        try:
            fragment = remuxer.fragment(frame, self.audio.clock_rate)
        except Fmp4Error as exc:
            log.info("%s: an audio frame was not sent: %s", self._label, exc)
            return None  # a lost audio frame is a 20 ms click, not a reason to end the session
        return self._timeline.place_audio(fragment, self.audio.clock_rate)

    async def _forward_states(self) -> None:
        # The state of the quality it plays, as a WebRTC session's.
        await forward_states(self.stream, self._subscriber, self._post)

    def _stream_unavailable(self, code: ErrorCode, message: str) -> None:
        if self.ending:
            return
        self._post_error(code, message)
        self.end(message)

    def _post_error(self, code: ErrorCode, message: str) -> None:
        self._post_error_to(code, message, self.stream.id, None)
