"""One quality of a stream (``main``, ``sub``…): its source, read on demand, and its fan-out.

A stream has one :class:`QualityFeed` per quality it lists (one, named "main", for a stream
with a plain ``source``). Each feed is a :class:`~mediastream.media.source_contract.SourceSink`
of its own: its source publishes into its fan-out, reports its state and what it carries
(resolution included), and the feed measures the bitrate it really delivers. Viewers are
placed on one feed at a time and moved between feeds by their stream
(:meth:`mediastream.registry.Stream.switch_viewer`); a feed's source runs only while some
viewer (or a switch, or a snapshot, waiting for its keyframe) is on it, with the same
on-demand grace period as a whole stream had before.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

import trio

from .changes import ChangeSignal
from .config import MediaConfig, QualityConfig
from .media.fanout import FanOut, FanOutStatistics
from .media.frames import EncodedFrame
from .media.source_contract import SourceInfo, SourceState, describe_source
from .media.sources import Timelines

log = logging.getLogger(__name__)

#: The shortest stretch of media the bitrate is measured over (seconds): a whole GOP at least,
#: so a keyframe doesn't read as a burst.
BITRATE_WINDOW: Final = 2.0


@dataclass(frozen=True, slots=True)
class QualityStatistics:
    name: str
    source: str  # credentials removed
    state: SourceState
    running: bool
    #: viewers whose video comes from this quality now
    viewers: int
    #: learnt from the stream itself when it was last read; 0 before it was ever read
    width: int
    height: int
    #: video and audio bits per second measured over the last window; 0 before
    bitrate: int
    fanout: FanOutStatistics


class QualityFeed:
    """One quality's source, state and fan-out (the sink its source publishes to).

    Args:
        label: for log lines (the stream id, plus ``/name`` for a stream of several).
        quality: its name and source.
        changes: the stream's change signal, notified with every change of this feed's.
    """

    def __init__(
        self, label: str, quality: QualityConfig, media: MediaConfig, changes: ChangeSignal
    ) -> None:
        self.label = label
        self.quality = quality
        self.fanout = FanOut(
            label, queue_frames=media.viewer_queue_frames, gop_cache_frames=media.gop_cache_frames
        )
        #: kept across source restarts and edits, so viewers' timestamps never jump back.
        self.timelines = Timelines()
        self.changes = ChangeSignal(parent=changes)
        self.viewers = 0
        #: snapshots and viewer switches waiting for this quality's keyframe (they keep its
        #: source running, without being viewers)
        self.probes = 0
        self.state = SourceState.STOPPED
        self.detail: str | None = None
        self.last_error: str | None = None
        self.source_info: SourceInfo | None = None
        self.encoders_opened = 0
        self.source_restarts = 0
        self.running = False
        self.bitrate = 0
        self._window_start: float | None = None
        self._window_bytes = 0

    @property
    def name(self) -> str:
        return self.quality.name

    @property
    def users(self) -> int:
        """Viewers and probes: while it is above 0 the source is wanted."""
        return self.viewers + self.probes

    def statistics(self) -> QualityStatistics:
        info = self.source_info
        return QualityStatistics(
            name=self.name,
            source=describe_source(self.quality.source),
            state=self.state,
            running=self.running,
            viewers=self.viewers,
            width=info.width if info else 0,
            height=info.height if info else 0,
            bitrate=self.bitrate,
            fanout=self.fanout.statistics(),
        )

    def set_running(self, running: bool) -> None:
        self.running = running
        self._window_start = None
        self.changes.notify()

    async def wait_keyframe(self) -> EncodedFrame:
        """The cached keyframe, or the next one published (the source is kept wanted while
        this waits).

        Cancellation: bound it at the call site (``trio.move_on_after``).
        """
        keyframe = self.fanout.cached_keyframe
        if keyframe is not None:
            return keyframe
        arrived = trio.Event()
        probe = self.fanout.subscribe("video")
        probe.set_wakeup(arrived.set)
        self.probes += 1
        self.changes.notify()
        try:
            while True:
                while (frame := probe.get_nowait()) is not None:
                    if frame.keyframe:
                        return frame
                await arrived.wait()
                arrived = trio.Event()
                probe.set_wakeup(arrived.set)
        finally:
            self.fanout.unsubscribe(probe)
            self.probes -= 1
            self.changes.notify()

    # SourceSink
    def publish(self, frame: EncodedFrame) -> None:
        self.fanout.publish(frame)
        self._measure(frame)

    def source_state(self, state: SourceState, detail: str | None = None) -> None:
        if state in (SourceState.RECONNECTING, SourceState.OFFLINE) and detail:
            self.last_error = detail
        if (state, detail) != (self.state, self.detail):
            self.state, self.detail = state, detail
            log.info("%s: %s%s", self.label, state, f" ({detail})" if detail else "")
            self.changes.notify()

    def source_restarted(self) -> None:
        self.source_restarts += 1
        self.fanout.reset()
        self._window_start = None

    def source_opened(self, info: SourceInfo) -> None:
        self.source_info = info
        self.encoders_opened += info.transcoded + info.audio_transcoded
        self.changes.notify()

    def relay_opened(self, info: SourceInfo) -> None:
        """A replica's relay of this quality opened: what the owner's source of it carries
        (no encoder or camera session of this node's own)."""
        self.source_info = info
        self.timelines.open_tracks(
            info.audio_clock_rate if info.audio_codec else 0, info.source_audio_clock_rate
        )
        self.changes.notify()

    def publish_relayed(self, frame: EncodedFrame) -> None:
        """Publish a frame a replica's relay brought (on the owner's timeline): the quality's
        own timeline follows it, so that a camera session of this node's (the replica
        promoted to owner) continues its viewers' timestamps, never going back."""
        timeline = self.timelines.get(frame.kind)
        if timeline is not None:
            timeline.follow(frame.timestamp, trio.current_time())
        self.publish(frame)

    def _measure(self, frame: EncodedFrame) -> None:
        """The bitrate over windows of at least :data:`BITRATE_WINDOW`, closed at keyframes."""
        now = time.monotonic()
        if self._window_start is None:
            if frame.keyframe:
                self._window_start, self._window_bytes = now, frame.size
            return
        elapsed = now - self._window_start
        if frame.keyframe and elapsed >= BITRATE_WINDOW:
            bitrate = round(self._window_bytes * 8 / elapsed)
            changed = self.bitrate == 0
            self.bitrate = bitrate
            self._window_start, self._window_bytes = now, 0
            if changed:
                self.changes.notify()  # the first figure: the choice of qualities may use it
        self._window_bytes += frame.size
