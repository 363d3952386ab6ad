"""Running a source: one attempt after another, with backoff, published on one timeline.

Task tree of one running source (inside its stream's supervisor, see ``registry.py``)::

    run_source                 retries with backoff; owns the timeline and the state
    └── one attempt            nursery
        ├── reader thread      reader.py + demux.py: open, demux, (transcode), packetize
        │                      -> bounded channel
        └── publisher          paces files and patterns in real time, rebases timestamps,
                               hands each frame to the sink (the stream's fan-out)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import secrets
from typing import Final

import trio

from ...config import MediaConfig, StreamConfig
from ..source_contract import SourceInfo, SourceSink, SourceState, describe_source
from .demux import read_source
from .reader import NeedsTranscoding, ReaderFailed, ReaderItem, ReaderThread, run_reader_thread
from .timeline import Timelines

log = logging.getLogger(__name__)

READER_CHANNEL_FRAMES: Final = 4  # frames read ahead of the publisher; small keeps pacing honest
MAX_LAG: Final = 1.0  # seconds a paced source may fall behind before it re-anchors its clock


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
            went_live = access_denied = False
            started = trio.current_time()
            try:
                went_live = await _run_attempt(config, media, sink, timelines, label, transcode)
                if spec.kind != "rtsp" and went_live:
                    failures = 0
                    continue  # a file or pattern ended: loop it, seamlessly
                reason = "the source ended the stream" if went_live else "the source had no frames"
            except NeedsTranscoding as exc:
                log.info("%s: %s; transcoding it to H.264 once for all viewers", label, exc)
                transcode = True
                continue
            except _AttemptFailed as exc:
                went_live, reason, access_denied = exc.went_live, exc.reason, exc.access_denied
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
            if access_denied:
                delay = max(delay, media.access_denied_retry_delay)
            state = SourceState.RECONNECTING if ever_live and failures <= 3 else SourceState.OFFLINE
            log.warning("%s: %s; retrying in %.1f s", label, reason, delay)
            sink.source_state(state, f"{reason}; retrying in {delay:.0f} s")
            sink.source_restarted()
            await trio.sleep(delay)
    finally:
        sink.source_state(SourceState.STOPPED)


class _AttemptFailed(Exception):
    def __init__(self, reason: str, went_live: bool, *, access_denied: bool = False) -> None:
        self.reason = reason
        self.went_live = went_live
        self.access_denied = access_denied


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
        NeedsTranscoding: its H.264 has to be transcoded (by the next attempt).
    """
    paced = config.source.kind != "rtsp"
    send, receive = trio.open_memory_channel[ReaderItem](READER_CHANNEL_FRAMES)
    reader = ReaderThread(label, READER_CHANNEL_FRAMES)
    read = functools.partial(
        read_source,
        config,
        media,
        transcode=transcode,
        reader=reader,
        rtsp_memory=timelines.rtsp_transport,
    )
    went_live = False
    failure: ReaderFailed | None = None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reader_thread, read, send, reader)
            anchors: dict[str, tuple[float, int]] = {}
            async with receive:
                async for item in reader.items(receive):
                    if isinstance(item, ReaderFailed):
                        failure = item
                        break
                    if isinstance(item, SourceInfo):
                        log.info("%s: opened, %s", label, _describe_info(item))
                        timelines.open_tracks(
                            item.audio_clock_rate if item.audio_codec else 0,
                            item.source_audio_clock_rate,
                        )
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
        if reader.full_channel_waits and not paced:
            # A live source read faster than it was published: FFmpeg's buffers took the rest.
            log.info(
                "%s: the reader waited %d times for the publisher to catch up",
                label,
                reader.full_channel_waits,
            )
    # Raised out here: inside the nursery they would arrive wrapped in exception groups.
    if failure is not None and failure.needs_transcoding:
        raise NeedsTranscoding(failure.reason)
    if failure is not None:
        raise _AttemptFailed(failure.reason, went_live, access_denied=failure.access_denied)
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
