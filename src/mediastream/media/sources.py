"""Sources: read a camera, a file or a test pattern once, and publish its frames.

Task tree of one running source (inside its stream's supervisor, see ``registry.py``)::

    run_source                 retries with backoff; owns the timeline and the state
    └── one attempt            nursery
        ├── reader thread      PyAV: open, demux, (transcode), packetize  -> bounded channel
        └── publisher          paces files and patterns in real time, rebases timestamps,
                               hands each frame to the sink (the stream's fan-out)

PyAV's blocking calls run in a worker thread with FFmpeg's open/read timeouts, so a dead
camera never blocks the event loop. RTSP cameras are asked for RTP over TCP first and over UDP
when they refuse TCP (``rtsp_transport = "auto"``); what worked is asked for first from then
on (see "RTSP transport" below). H.264 is passed through untouched (only its NAL units are
tidied: parameter sets in front of every keyframe, AVCC converted to Annex B); any other codec,
and every test pattern, is encoded to H.264 **once per source** here, whatever the number of
viewers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any, Final, Protocol, cast
from urllib.parse import urlsplit

import av
import av.audio
import av.container
import av.video
import trio
from aiortc.codecs.h264 import H264Encoder

from ..config import MediaConfig, SourceSpec, StreamConfig
from ..errors import SourceError
from ..redact import redact_text, redact_url
from .frames import (
    VIDEO_CLOCK_RATE,
    EncodedFrame,
    H264AccessUnitNormalizer,
    is_b_slice,
    split_annexb,
)
from .source_contract import SourceInfo, SourceSink, SourceState

log = logging.getLogger(__name__)

READER_CHANNEL_FRAMES: Final = 4  # frames read ahead of the publisher; small keeps pacing honest
READER_EXIT_WAIT: Final = 2.0  # seconds a stopping source waits for its reader thread
DEFAULT_TRANSCODE_KBPS: Final = 2000
DEFAULT_FPS: Final = 25
MAX_LAG: Final = 1.0  # seconds a paced source may fall behind before it re-anchors its clock


class _Timeline:
    """Maps each attempt's source timestamps onto one continuous, increasing timeline.

    Viewers keep their RTP stream across camera reconnects and file loops, so timestamps must
    never jump back; a gap in wall time becomes the same gap in media time. One timeline per
    track, in that track's RTP clock (90 kHz for video).
    """

    def __init__(self, clock_rate: int = VIDEO_CLOCK_RATE) -> None:
        self.clock_rate = clock_rate
        self._offset: int | None = None
        self._last_out: int | None = None
        self._last_wall = 0.0
        self._frame_gap = clock_rate // DEFAULT_FPS

    def new_attempt(self) -> None:
        self._offset = None

    def place(self, source_ts: int, now: float, *, paced: bool) -> int:
        if self._offset is None:
            if self._last_out is None:
                base = 0
            elif paced:
                base = self._last_out + self._frame_gap
            else:
                base = self._last_out + max(
                    self._frame_gap, round((now - self._last_wall) * self.clock_rate)
                )
            self._offset = base - source_ts
        out = source_ts + self._offset
        if self._last_out is not None:
            if out <= self._last_out:
                out = self._last_out + 1
            else:
                self._frame_gap = min(out - self._last_out, self.clock_rate)
        self._last_out = out
        self._last_wall = now
        return out


class Timelines(dict[str, _Timeline]):
    """A stream's timelines by track kind, kept across source restarts and edits.

    It also keeps the RTSP transport its camera was found to take, so that neither a
    reconnect nor the next start of an on-demand stream is refused again.
    """

    def __init__(self) -> None:
        super().__init__(video=_Timeline())
        self.rtsp_transport = RtspTransportMemory()


async def run_source(
    config: StreamConfig,
    media: MediaConfig,
    sink: SourceSink,
    *,
    timelines: Timelines | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run one source until cancelled: read, publish, and reopen it with backoff when it fails.

    Cancellation: the way to stop a source. The reader thread is told to stop and waited for
    (briefly; a thread blocked in FFmpeg I/O exits by itself at its read timeout).
    """
    spec = config.source
    label = f"{config.id} ({describe_source(spec)})"
    timelines = timelines if timelines is not None else Timelines()
    failures = 0
    ever_live = False
    transcode = False  # set for good once the H.264 turns out to need it (B-frames)
    task_status.started()
    sink.source_state(SourceState.STARTING)
    try:
        while True:
            for timeline in timelines.values():
                timeline.new_attempt()
            went_live = False
            started = trio.current_time()
            try:
                went_live = await _run_attempt(config, media, sink, timelines, label, transcode)
                if spec.kind != "rtsp" and went_live:
                    failures = 0
                    continue  # a file or pattern ended: loop it, seamlessly
                reason = "the source ended the stream" if went_live else "the source had no frames"
            except _NeedsTranscoding as exc:
                log.info("%s: %s; transcoding it to H.264 once for all viewers", label, exc)
                transcode = True
                continue
            except _AttemptFailed as exc:
                went_live, reason = exc.went_live, exc.reason
            except Exception as exc:
                # A bug, not a camera problem: log it loudly, and keep this stream (and the
                # server) alive by treating it as a failed attempt.
                log.exception("%s: source failed unexpectedly", label)
                reason = f"internal error ({type(exc).__name__})"
            ever_live = ever_live or went_live
            # A camera that ran for a good while starts the backoff afresh; one that keeps
            # dropping right after connecting (flapping) backs off like one that is down.
            healthy = went_live and trio.current_time() - started >= media.retry_max_delay
            failures = 1 if healthy else failures + 1
            delay = backoff_delay(failures, media.retry_initial_delay, media.retry_max_delay)
            state = SourceState.RECONNECTING if ever_live and failures <= 3 else SourceState.OFFLINE
            log.warning("%s: %s; retrying in %.1f s", label, reason, delay)
            sink.source_state(state, f"{reason}; retrying in {delay:.0f} s")
            sink.source_restarted()
            await trio.sleep(delay)
    finally:
        sink.source_state(SourceState.STOPPED)


class _NeedsTranscoding(Exception):
    """The source's H.264 can't be passed through as is (it has B-frames)."""


class _AttemptFailed(Exception):
    def __init__(self, reason: str, went_live: bool) -> None:
        self.reason = reason
        self.went_live = went_live


def backoff_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds before retry number ``failures``: doubling from ``initial``, capped, plus jitter.

    The jitter (up to +20 %, still under the cap) keeps many cameras that failed together from
    retrying in lockstep.
    """
    if failures <= 0:
        return 0.0
    base: float = min(initial * 2.0 ** min(failures - 1, 30), maximum)
    # The OS's randomness, not the random module's shared state.
    return min(base * (1 + secrets.SystemRandom().uniform(0, 0.2)), maximum)


async def _run_attempt(
    config: StreamConfig,
    media: MediaConfig,
    sink: SourceSink,
    timelines: Timelines,
    label: str,
    transcode: bool,
) -> bool:
    """Open the source once and publish until it ends; returns whether a frame went out.

    Raises:
        _AttemptFailed: the source could not be opened or stopped delivering.
    """
    paced = config.source.kind != "rtsp"
    send, receive = trio.open_memory_channel[_ReaderItem](READER_CHANNEL_FRAMES)
    reader = _ReaderThread(label, timelines.rtsp_transport)
    went_live = False
    failure: _ReaderFailed | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_run_reader_thread, config, media, transcode, send, reader)
            anchors: dict[str, tuple[float, int]] = {}
            async with receive:
                async for item in receive:
                    if isinstance(item, _ReaderFailed):
                        failure = item
                        break
                    if isinstance(item, SourceInfo):
                        log.info("%s: opened, %s", label, _describe_info(item))
                        if item.audio_codec and "audio" not in timelines:
                            timelines["audio"] = _Timeline(item.audio_clock_rate)
                        sink.source_opened(item)
                        continue
                    now = trio.current_time()
                    timeline = timelines[item.kind]
                    timestamp = timeline.place(item.timestamp, now, paced=paced)
                    if paced:
                        anchor = anchors.get(item.kind)
                        due = _due(anchor, timestamp, timeline.clock_rate) if anchor else now
                        if anchor is None or now - due > MAX_LAG:
                            anchors[item.kind] = anchor = (now, timestamp)
                        await trio.sleep_until(_due(anchor, timestamp, timeline.clock_rate))
                    sink.publish(dataclasses.replace(item, timestamp=timestamp))
                    if not went_live:
                        went_live = True
                        sink.source_state(SourceState.LIVE)
    finally:
        if not await reader.stop_and_wait():
            log.warning("%s: reader thread is still blocked in I/O; it ends at its timeout", label)
    # Raised out here: inside the nursery they would arrive wrapped in exception groups.
    if failure is not None and failure.needs_transcoding:
        raise _NeedsTranscoding(failure.reason)
    if failure is not None:
        raise _AttemptFailed(failure.reason, went_live)
    return went_live


def _due(anchor: tuple[float, int], timestamp: int, clock_rate: int) -> float:
    wall, media_ts = anchor
    return wall + (timestamp - media_ts) / clock_rate


def _describe_info(info: SourceInfo) -> str:
    text = f"{info.codec} {info.width}x{info.height}"
    if info.transcoded:
        text += ", transcoding to H.264 once for all viewers"
    if info.audio_codec:
        text += f"; audio {info.audio_source_codec}"
        text += (
            f" -> {info.audio_codec} (transcoded once)"
            if info.audio_transcoded
            else " (passed through)"
        )
    if info.rtsp_transport:
        text += f"; RTSP over {info.rtsp_transport.upper()}"
    return text


@dataclasses.dataclass(frozen=True, slots=True)
class _ReaderFailed:
    reason: str
    needs_transcoding: bool = False


_ReaderItem = EncodedFrame | SourceInfo | _ReaderFailed
#: What handing a frame to Trio raises once the attempt has been stopped.
_HANDOVER_STOPPED = (trio.Cancelled, trio.RunFinishedError, trio.BrokenResourceError)


class _ReaderThread:
    """The handshake between one attempt's reader thread and the Trio task that stops it."""

    def __init__(self, label: str, rtsp_transport: RtspTransportMemory) -> None:
        #: what the thread's log lines start with (the stream, its source without credentials)
        self.label = label
        #: what it learns about the camera's RTSP transport, for the next attempts
        self.rtsp_transport = rtsp_transport
        self.stop = threading.Event()
        self.exited = threading.Event()
        # Whoever takes this first decides: the thread runs, or it never will. An attempt
        # cancelled before its thread was spawned would otherwise wait for an exit that
        # never comes.
        self._claim = threading.Lock()

    def claim_for_thread(self) -> bool:
        return self._claim.acquire(blocking=False)

    async def stop_and_wait(self) -> bool:
        """Stop the thread and wait for it, at most READER_EXIT_WAIT; False if it is still busy."""
        self.stop.set()
        if self._claim.acquire(blocking=False):
            return True  # the thread never started, and now never will
        # Shielded, because this runs while the attempt is being cancelled, and bounded by the
        # wait's own timeout in the thread. A limiter of its own: the waits of many stopping
        # sources must not use up the threads Trio shares with everything else.
        with trio.CancelScope(shield=True):
            exited: bool = await trio.to_thread.run_sync(
                self.exited.wait, READER_EXIT_WAIT, limiter=trio.CapacityLimiter(1)
            )
        return exited


async def _run_reader_thread(
    config: StreamConfig,
    media: MediaConfig,
    transcode: bool,
    send: trio.MemorySendChannel[_ReaderItem],
    reader: _ReaderThread,
) -> None:
    def deliver(item: _ReaderItem) -> None:
        trio.from_thread.run(send.send, item)

    def read() -> None:
        if not reader.claim_for_thread():
            return  # the attempt was stopped before this thread got going
        try:
            _read(config, media, transcode, deliver, reader)
        except _NeedsTranscoding as exc:
            with contextlib.suppress(*_HANDOVER_STOPPED):
                deliver(_ReaderFailed(str(exc), needs_transcoding=True))
        except SourceError as exc:
            with contextlib.suppress(*_HANDOVER_STOPPED):
                deliver(_ReaderFailed(str(exc)))
        except _HANDOVER_STOPPED:
            pass  # the attempt was stopped while a frame was being handed over
        finally:
            reader.exited.set()

    async with send:
        # abandon_on_cancel: a thread stuck in FFmpeg I/O must not hold up cancellation; it
        # notices ``stop`` (or a failed delivery) and exits at its next frame or timeout.
        # A limiter of its own: a reader holds its thread for as long as the source runs, and
        # Trio's default limiter (40 threads, shared with the store and snapshots) would cap
        # the number of cameras and starve everything else.
        await trio.to_thread.run_sync(read, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1))


# --- the reader thread: PyAV only below this line, no Trio except ``deliver`` -----------------


def _read(
    config: StreamConfig,
    media: MediaConfig,
    transcode: bool,
    deliver: Callable[[_ReaderItem], None],
    reader: _ReaderThread,
) -> None:
    """Read until the source ends or ``reader.stop`` is set. Raises SourceError on failure."""
    spec = config.source
    stop = reader.stop
    rtsp_transport: str | None = None
    try:
        if spec.kind == "rtsp":
            container, rtsp_transport = _open_rtsp(config, media, reader)
        else:
            container = _open(config, media)
    except av.FFmpegError as exc:
        reason = _ffmpeg_reason(exc, f"no answer within {media.open_timeout:g} s", spec)
        raise SourceError(f"cannot open {describe_source(spec)}: {reason}") from None
    try:
        if not container.streams.video:
            raise SourceError(f"{describe_source(spec)} has no video track")
        video = container.streams.video[0]
        converter = _make_converter(video, spec, transcode)
        audio = container.streams.audio[0] if config.audio and container.streams.audio else None
        audio_converter = _make_audio_converter(audio) if audio is not None else None
        info = dataclasses.replace(converter.info, rtsp_transport=rtsp_transport)
        if audio_converter is not None:
            info = dataclasses.replace(
                info,
                audio_codec=audio_converter.rtp_codec,
                audio_clock_rate=audio_converter.clock_rate,
                audio_source_codec=audio_converter.source_codec,
                audio_transcoded=audio_converter.transcoded,
            )
        deliver(info)
        streams = [video] if audio_converter is None else [video, audio]
        for packet in container.demux(*streams):
            if stop.is_set():
                return
            if packet.stream.index == video.index:
                frames = converter.convert(packet)
            else:
                assert audio_converter is not None  # only its stream is demuxed besides video
                frames = audio_converter.convert(packet)
            for frame in frames:
                deliver(frame)
        for frame in converter.flush():
            deliver(frame)
    except av.FFmpegError as exc:
        reason = _ffmpeg_reason(exc, f"no data for {media.read_timeout:g} s (stalled)", spec)
        raise SourceError(f"reading {describe_source(spec)} failed: {reason}") from None
    finally:
        container.close()


def _open(config: StreamConfig, media: MediaConfig) -> av.container.InputContainer:
    """Open a file or a test pattern (RTSP cameras: :func:`_open_rtsp`)."""
    spec = config.source
    timeouts = (media.open_timeout, media.read_timeout)
    if spec.kind == "pattern":
        opts = spec.option_map
        size, fps = opts.get("size", "640x360"), opts.get("fps", DEFAULT_FPS)
        graph = f"{spec.location}=size={size}:rate={fps}"
        return av.open(graph, "r", format="lavfi", timeout=timeouts)
    return av.open(spec.location, "r", timeout=timeouts)


# --- RTSP transport: which lower transport to ask the camera for ----------------------------
#
# Many cameras take RTP over TCP (interleaved in the RTSP connection) and over UDP; some take
# only one and answer a SETUP for the other "461 Unsupported transport", which FFmpeg reports
# as EPROTONOSUPPORT ("Protocol not supported"). "auto" asks for TCP first (it passes NAT and
# firewalls and loses nothing) and, only on that refusal, for UDP at once, in a new RTSP
# session; whichever worked is asked for first from then on. A camera that stays silent over
# UDP is not a refusal: "auto" never guesses from timeouts. "tcp" and "udp" ask for that one
# alone, and a refusal names the setting that would work.

#: FFmpeg's error for RTSP "461 Unsupported transport".
RTSP_TRANSPORT_REFUSED: Final = errno.EPROTONOSUPPORT
RTSP_TRANSPORTS: Final = ("tcp", "udp")
#: seconds to wait before asking once more when the camera is busy right after a refusal
RTSP_BUSY_AFTER_REFUSAL_PAUSE: Final = 0.25


class RtspTransportMemory:
    """Which RTSP transport to ask a stream's camera for first ("auto" only).

    Written by the reader thread and read by the next one; one camera URL's knowledge: an
    edit that changes the URL starts afresh.
    """

    def __init__(self) -> None:
        self._location = ""
        self._first: str | None = None

    def first_choice(self, location: str) -> str | None:
        """The transport that last worked (or was left after a refusal), if any."""
        return self._first if location == self._location else None

    def remember(self, location: str, transport: str) -> bool:
        """Ask for ``transport`` first from now on; True if that is news."""
        news = self.first_choice(location) != transport
        self._location, self._first = location, transport
        return news


def rtsp_transport_order(setting: str, learned: str | None) -> tuple[str, ...]:
    """The transports to ask for, in order: a forced one alone; for "auto", what worked last
    (else TCP), then the other."""
    if setting != "auto":
        return (setting,)
    first = learned or "tcp"
    return (first, *(t for t in RTSP_TRANSPORTS if t != first))


def rtsp_refusal_reason(refused: Sequence[str], setting: str) -> str:
    """Why a camera can't be read when it refused every transport asked for, and the fix."""
    names = " and ".join(t.upper() for t in refused)
    reason = f"the camera refused RTSP over {names} (461 Unsupported transport)"
    if setting == "auto":
        return reason
    other = next(t for t in RTSP_TRANSPORTS if t != setting)
    return f'{reason}; set rtsp_transport = "{other}" (or "auto")'


def _open_rtsp(
    config: StreamConfig, media: MediaConfig, reader: _ReaderThread
) -> tuple[av.container.InputContainer, str]:
    """Open an RTSP camera over the first transport it takes; returns it and that transport.

    Raises:
        av.FFmpegError: anything but a refused transport.
        SourceError: the camera refused every transport the setting allows.
    """
    location, setting, memory = config.source.location, config.rtsp_transport, reader.rtsp_transport
    order = rtsp_transport_order(setting, memory.first_choice(location))
    refused: list[str] = []

    def open_over(transport: str) -> av.container.InputContainer:
        options = _rtsp_options(transport, media)
        timeouts = (media.open_timeout, media.read_timeout)
        try:
            return av.open(location, "r", options=options, timeout=timeouts)
        except av.error.HTTPServerError:
            if not refused or reader.stop.wait(RTSP_BUSY_AFTER_REFUSAL_PAUSE):
                raise
        # GStreamer's RTSP servers answer "503 Service Unavailable" to a DESCRIBE that comes
        # while they still tear down the session they just refused (5 times in 12 on loopback,
        # for under 10 ms): ask once more after a pause rather than after a whole backoff.
        return av.open(location, "r", options=options, timeout=timeouts)

    for transport in order:
        try:
            container = open_over(transport)
        except av.FFmpegError as exc:
            if exc.errno != RTSP_TRANSPORT_REFUSED:
                raise
            refused.append(transport)
            if len(refused) < len(order) and memory.remember(location, order[len(refused)]):
                # Remembered before trying it: should it fail for another reason (a camera
                # still busy), the next attempt starts with it all the same.
                log.info(
                    "%s: %s; asking for RTSP over %s instead, and first from now on",
                    reader.label,
                    rtsp_refusal_reason([transport], setting),
                    order[len(refused)].upper(),
                )
            continue
        if setting == "auto":
            memory.remember(location, transport)
        return container, transport
    reason = rtsp_refusal_reason(refused, setting)
    raise SourceError(f"cannot open {describe_source(config.source)}: {reason}")


def _rtsp_options(transport: str, media: MediaConfig) -> dict[str, str]:
    return {
        "rtsp_transport": transport,
        # FFmpeg's socket I/O timeout, in microseconds (``stimeout`` is gone since FFmpeg 5).
        "timeout": str(int(media.read_timeout * 1_000_000)),
        # Start fast: the codec parameters come from the camera's SDP, and probing the
        # stream would cost ~1 s of cold start (measured: 1.2 s open -> 0.12 s). Not
        # ``fflags=nobuffer``: that throws away the probed packets, first keyframe included.
        "analyzeduration": "0",
        "probesize": "32",
    }


class _Converter(Protocol):
    info: SourceInfo

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]: ...

    def flush(self) -> Iterator[EncodedFrame]: ...


def _make_converter(
    stream: av.video.stream.VideoStream, spec: SourceSpec, transcode: bool
) -> _Converter:
    codec = stream.codec_context.name
    if codec == "h264" and spec.kind != "pattern" and not transcode:
        return _H264Passthrough(stream)
    options = spec.option_map
    fps = int(options.get("fps", 0)) or _frame_rate(stream)
    if spec.kind == "pattern":
        label = "test pattern"
    elif codec == "h264":
        label = "h264 with B-frames"
    else:
        label = codec
    return _Transcoder(
        stream,
        source_codec=label,
        kbps=int(options.get("kbps", DEFAULT_TRANSCODE_KBPS)),
        fps=fps,
        gop=int(options.get("gop", 2 * fps)),
    )


def _frame_rate(stream: av.video.stream.VideoStream) -> int:
    rate = stream.average_rate or stream.guessed_rate
    return max(1, min(60, round(float(rate)))) if rate else DEFAULT_FPS


class _H264Passthrough:
    """H.264 in, the same H.264 out: NAL units tidied and packetized, never decoded."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        extradata = stream.codec_context.extradata or b""
        self._stream = stream
        self._bsf: av.bitstream.BitStreamFilterContext | None = None
        if extradata[:1] == b"\x01":
            # AVCC (MP4/MKV): length-prefixed NAL units; RTP needs Annex B start codes.
            self._bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream)
            extradata = b""
        self._normalizer = H264AccessUnitNormalizer(extradata)
        self._clock = _Clock(stream.time_base)
        ctx = stream.codec_context
        self.info = SourceInfo("h264", False, ctx.width or 0, ctx.height or 0)

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        packets = self._bsf.filter(packet) if self._bsf is not None else [packet]
        for unit in packets:
            if unit.size == 0:
                continue
            normalized = self._normalizer.normalize(split_annexb(bytes(unit)))
            if normalized is None:
                continue
            nal_units, keyframe = normalized
            if any(is_b_slice(nal) for nal in nal_units):
                # Browsers show only the keyframes of passed-through H.264 with B-frames.
                raise _NeedsTranscoding("the H.264 has B-frames")
            yield _frame(nal_units, self._clock.ticks(unit), keyframe)

    def flush(self) -> Iterator[EncodedFrame]:
        if self._bsf is not None:
            for unit in self._bsf.filter(None):
                yield from self.convert(unit)


class _Transcoder:
    """Anything else to H.264 (baseline, no B-frames, IDR every ``gop`` frames), once per source."""

    def __init__(
        self,
        stream: av.video.stream.VideoStream,
        *,
        source_codec: str,
        kbps: int,
        fps: int,
        gop: int,
    ) -> None:
        ctx = stream.codec_context
        self._stream = stream
        self._width = (ctx.width or 640) // 2 * 2
        self._height = (ctx.height or 360) // 2 * 2
        self._encoder = _open_h264_encoder(self._width, self._height, kbps=kbps, fps=fps, gop=gop)
        self._normalizer = H264AccessUnitNormalizer()
        self._clock = _Clock(stream.time_base)
        self._last_ticks = -1
        self.info = SourceInfo(source_codec, True, self._width, self._height)

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        for picture in packet.decode():
            ticks = self._clock.ticks_of(picture.pts, picture.time_base)
            if ticks <= self._last_ticks:
                continue  # a duplicate or out-of-order picture would make time go backwards
            self._last_ticks = ticks
            yield from self._encode(picture, ticks)

    def flush(self) -> Iterator[EncodedFrame]:
        yield from self._emit(self._encoder.encode(None))

    def _encode(self, picture: av.VideoFrame, ticks: int) -> Iterator[EncodedFrame]:
        image = picture.reformat(width=self._width, height=self._height, format="yuv420p")
        image.pts = ticks
        image.time_base = Fraction(1, VIDEO_CLOCK_RATE)
        # Decoders mark pictures I/P/B; passed on, that would force x264's frame types.
        image.pict_type = av.video.frame.PictureType.NONE
        yield from self._emit(self._encoder.encode(image))

    def _emit(self, packets: list[av.Packet[Any]]) -> Iterator[EncodedFrame]:
        for packet in packets:
            normalized = self._normalizer.normalize(split_annexb(bytes(packet)))
            if normalized is not None:
                nal_units, keyframe = normalized
                yield _frame(nal_units, int(packet.pts or 0), keyframe)


#: Audio codecs browsers take as is: FFmpeg's name -> (RTP name, RTP clock rate).
_PASSTHROUGH_AUDIO: Final = {
    "pcm_mulaw": ("PCMU", 8000),
    "pcm_alaw": ("PCMA", 8000),
    "opus": ("opus", 48000),
}
OPUS_CLOCK_RATE: Final = 48000
OPUS_FRAME_SAMPLES: Final = 960  # 20 ms
G711_FRAME_SAMPLES: Final = 160  # 20 ms at 8 kHz


def _make_audio_converter(
    stream: av.audio.stream.AudioStream,
) -> _AudioPassthrough | _AudioTranscoder | None:
    codec = stream.codec_context.name
    if codec in _PASSTHROUGH_AUDIO:
        return _AudioPassthrough(stream)
    try:
        return _AudioTranscoder(stream)
    except (av.FFmpegError, ValueError) as exc:
        log.warning("audio %s can't be transcoded (%s); video only", codec, exc)
        return None


class _AudioPassthrough:
    """G.711 and Opus go to browsers untouched (G.711 cut into 20 ms packets)."""

    transcoded = False

    def __init__(self, stream: av.audio.stream.AudioStream) -> None:
        self.source_codec = stream.codec_context.name
        self.rtp_codec, self.clock_rate = _PASSTHROUGH_AUDIO[self.source_codec]
        self._time_base = stream.time_base or Fraction(1, self.clock_rate)
        self._next: int | None = None

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        data = bytes(packet)
        if not data:
            return
        if packet.pts is not None:
            ticks = math.floor(packet.pts * self._time_base * self.clock_rate)
        else:
            ticks = self._next or 0
        if self.rtp_codec == "opus":
            yield _audio_frame(data, ticks)
            self._next = ticks + OPUS_FRAME_SAMPLES
            return
        for offset in range(0, len(data), G711_FRAME_SAMPLES):  # one byte per sample
            chunk = data[offset : offset + G711_FRAME_SAMPLES]
            yield _audio_frame(chunk, ticks + offset)
        self._next = ticks + len(data)


class _AudioTranscoder:
    """Anything else (AAC…) to 48 kHz stereo Opus in 20 ms frames, once per source."""

    rtp_codec = "opus"
    clock_rate = OPUS_CLOCK_RATE
    transcoded = True

    def __init__(self, stream: av.audio.stream.AudioStream) -> None:
        self.source_codec = stream.codec_context.name
        self._resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=OPUS_CLOCK_RATE, frame_size=OPUS_FRAME_SAMPLES
        )
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate = OPUS_CLOCK_RATE
        encoder.layout = "stereo"
        encoder.format = av.AudioFormat("s16")
        encoder.bit_rate = 64_000
        encoder.time_base = Fraction(1, OPUS_CLOCK_RATE)
        encoder.open()
        self._encoder: Any = encoder
        self._samples = 0

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        for decoded in cast("list[av.AudioFrame]", packet.decode()):
            for frame in self._resampler.resample(decoded):
                frame.pts = self._samples
                frame.time_base = Fraction(1, OPUS_CLOCK_RATE)
                self._samples += frame.samples
                for encoded in self._encoder.encode(frame):
                    yield _audio_frame(bytes(encoded), int(encoded.pts or 0))


def _audio_frame(data: bytes, ticks: int) -> EncodedFrame:
    return EncodedFrame(
        kind="audio", timestamp=ticks, keyframe=True, payloads=(data,), size=len(data)
    )


def _open_h264_encoder(width: int, height: int, *, kbps: int, fps: int, gop: int) -> Any:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width = width
    encoder.height = height
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, VIDEO_CLOCK_RATE)
    encoder.framerate = Fraction(fps, 1)
    encoder.bit_rate = kbps * 1000
    encoder.gop_size = gop
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",  # no lookahead, no B-frames: one frame in, one frame out
        "profile": "baseline",
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
    }
    encoder.open()
    return encoder


class _Clock:
    """Source timestamps to 90 kHz ticks, tolerating packets without pts (some RTSP cameras)."""

    def __init__(self, time_base: Fraction | None) -> None:
        self._time_base = time_base or Fraction(1, VIDEO_CLOCK_RATE)
        self._last: int | None = None

    def ticks(self, packet: av.Packet[Any]) -> int:
        value = packet.pts if packet.pts is not None else packet.dts
        if value is None:
            # FFmpeg's RTSP demuxer leaves the very first packet (a keyframe) without pts.
            ticks = 0 if self._last is None else self._last + VIDEO_CLOCK_RATE // DEFAULT_FPS
        else:
            ticks = self.ticks_of(value, packet.time_base or self._time_base)
        self._last = ticks
        return ticks

    def ticks_of(self, value: int | None, time_base: Fraction | None) -> int:
        if value is None:
            return (self._last or 0) + VIDEO_CLOCK_RATE // DEFAULT_FPS
        return math.floor(value * (time_base or self._time_base) * VIDEO_CLOCK_RATE)


def _frame(nal_units: list[bytes], ticks: int, keyframe: bool) -> EncodedFrame:
    payloads = tuple(H264Encoder._packetize(nal_units))
    return EncodedFrame(
        kind="video",
        timestamp=ticks,
        keyframe=keyframe,
        payloads=payloads,
        size=sum(len(nal) for nal in nal_units),
    )


def _ffmpeg_reason(exc: av.FFmpegError, timed_out: str, spec: SourceSpec) -> str:
    if isinstance(exc, av.ExitError):
        return timed_out  # PyAV's timeout interrupts FFmpeg, which reports an "exit"
    if spec.kind == "rtsp":
        reason = _rtsp_status_reason(exc, spec)
        if reason is not None:
            return reason
    # FFmpeg errors carry the URL as ``filename``: leave it out, credentials and all.
    return redact_text(exc.strerror or type(exc).__name__)


def _rtsp_status_reason(exc: av.FFmpegError, spec: SourceSpec) -> str | None:
    """The camera's RTSP answer, as what it means and what to do (FFmpeg knows these by their
    HTTP names and keeps only the class of a 5xx)."""
    if isinstance(exc, av.error.HTTPUnauthorizedError):
        if urlsplit(spec.location).username is None:
            return "the camera needs credentials (401); put user:password@ in the source URL"
        return "the camera refused the credentials (401); check the user and password in the URL"
    if isinstance(exc, av.error.HTTPForbiddenError):
        return "the camera refused access (403); check that this user may watch this stream"
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "the camera has no stream at this path (404); check the path in the source URL"
    if isinstance(exc, av.error.HTTPServerError):
        return "the camera answered with a server error (5xx); it may be busy or restarting"
    return None


def describe_source(spec: SourceSpec) -> str:
    """The source as it may appear in logs, errors and APIs: credentials removed."""
    if spec.kind == "rtsp":
        return redact_url(spec.location)
    if spec.kind == "pattern":
        query = "&".join(f"{k}={v}" for k, v in spec.options)
        return f"pattern:{spec.location}" + (f"?{query}" if query else "")
    return f"file:{spec.location}"
