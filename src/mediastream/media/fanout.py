"""Fan-out: one source's frames to many viewers, each with its own bounded queue.

Pure, synchronous logic with no I/O and no event loop: the source calls :meth:`FanOut.publish`,
which *offers* each frame to every viewer's :class:`Subscriber`. The subscriber belongs to the
viewer's session and answers what became of the frame (:class:`Delivery`): sent at once through
its transport, queued, or dropped. One policy covers every path a frame can take:

- a live viewer whose transport is ready (nothing of earlier frames is still waiting in its
  socket buffer) gets the frame synchronously, inside ``publish``;
- otherwise the frame is queued and the viewer's drainer is woken: a viewer catching up on the
  cached GOP, a viewer still connecting, and a viewer whose socket is full (EAGAIN) all wait in
  the same bounded queue, and the drainer sends it when the transport is ready again;
- a full queue is emptied and the viewer skips to the next keyframe.

Policies (from what CCTV viewers run into with other servers):

- **Late joiners start at once.** The frames since the last keyframe (the current GOP) are
  kept; a new subscriber's queue starts with them, original timestamps and all, so the
  browser paints the keyframe at once and fast-forwards to the live edge. Snapshot and
  registration happen in one synchronous step, so no frame can fall in between.
- **Moving between qualities.** A viewer moved to another fan-out of its stream (another
  quality, :meth:`FanOut.adopt`) keeps its transport, its drainer and its RTP stream: its queue
  restarts with the new fan-out's cached GOP (keyframe first, never a P-frame without its
  keyframe), and its :class:`ContinuousTimestamps` carry its RTP timestamps on smoothly.
- **A slow viewer never stalls the others.** When a queue is full, that viewer's queue is
  emptied and it skips to the next keyframe: H.264 can't lose single frames without
  corrupting the picture until the next keyframe anyway. Drops are counted, and logged at a
  limited rate.
"""

from __future__ import annotations

import collections
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

from .frames import EncodedFrame

log = logging.getLogger(__name__)

DROP_LOG_INTERVAL: Final = 10.0  # seconds between two drop warnings of one viewer
CATCH_UP_BURST_BYTES: Final = 128 * 1024  # what a catching-up viewer may get back to back


class Delivery(enum.Enum):
    """What became of one frame offered to one viewer."""

    SENT = "sent"  # handed to the viewer's transport at once
    QUEUED = "queued"  # in the viewer's bounded queue, for its drainer
    DROPPED = "dropped"  # lost to a viewer that was playing: it skips to the next keyframe
    #: not needed by a viewer that has not started yet (it starts at a keyframe): not a loss
    SKIPPED = "skipped"


class Transport(Protocol):
    """Where a viewer's frames go out (its RTP sender)."""

    def ready(self) -> bool:
        """Whether a frame can go out now without waiting in a buffer.

        Raises:
            ConnectionError: the transport is gone.
        """
        ...

    def send(self, frame: EncodedFrame) -> None:
        """Send one frame now.

        Raises:
            ConnectionError: the transport is gone.
        """
        ...


class ContinuousTimestamps:
    """One viewer's timestamps of one track, continuous across moves between qualities.

    Each quality has a timeline of its own; a viewer keeps one RTP stream, whose timestamps
    must keep increasing at the pace of real time. After :meth:`rebase`, the new timeline is
    shifted so that its ``anchor`` (the newest frame of it already published, where the viewer
    joins it) lands where the last frame sent left off plus the wall time since. The frames
    of the new quality's cached GOP before the anchor keep their spacing, or go 1 tick apart
    where they would fall before the last frame sent: they arrive late for their timestamps,
    so the decoder shows them at once and is at the live edge with the anchor.

    Args:
        clock: seconds, monotonic (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        #: the track's RTP clock rate (Hz); its sender sets it from the negotiated codec
        self.clock_rate = 90_000
        self._clock = clock
        self._offset = 0
        self._last: int | None = None
        self._last_wall = 0.0
        self._rebasing = False
        self._anchor: int | None = None
        self._rebased_at = 0.0

    def rebase(self, anchor: int | None) -> None:
        """Frames placed from now on come from another timeline.

        Args:
            anchor: the new timeline's timestamp that continues the old one (the newest frame
                the viewer is handed at once); None: the next frame placed.
        """
        if self._last is None:
            return  # nothing placed yet: the new timeline starts as it is
        self._rebasing = True
        self._anchor = anchor
        self._rebased_at = self._clock()

    def place(self, timestamp: int) -> int:
        """The viewer's timestamp for a frame of the current timeline (never one placed
        before, never going back)."""
        now = self._clock()
        if self._rebasing:
            assert self._last is not None
            self._rebasing = False
            anchor, at = (
                (self._anchor, self._rebased_at) if self._anchor is not None else (timestamp, now)
            )
            gap = max(1, round((at - self._last_wall) * self.clock_rate))
            self._offset = self._last + gap - anchor
        placed = timestamp + self._offset
        if self._last is not None and placed <= self._last:
            placed = self._last + 1
        self._last = placed
        self._last_wall = now
        return placed


@dataclass(frozen=True, slots=True)
class SubscriberStatistics:
    queued_frames: int
    delivered_frames: int
    #: frames lost after the viewer started playing (a slow link or a full socket)
    dropped_frames: int
    #: frames passed over before the viewer started (joining mid-GOP, connecting): no loss
    skipped_frames: int
    waiting_for_keyframe: bool


@dataclass(frozen=True, slots=True)
class FanOutStatistics:
    subscribers: int
    published_frames: int
    published_bytes: int
    gop_frames: int
    dropped_frames: int
    skipped_frames: int
    #: RTP packets and payload bytes handed to viewers' senders, all viewers together.
    sent_packets: int
    sent_bytes: int


class Subscriber:
    """One viewer's frames of one kind: its transport, its bounded queue, its policy.

    Opened by :meth:`FanOut.subscribe` for a viewer's session and closed with it.

    Resource handling: call :meth:`FanOut.unsubscribe` (the stream's ``open_viewer`` context
    does) when the viewer leaves, or the fan-out keeps offering it frames.
    """

    def __init__(
        self,
        label: str,
        max_frames: int,
        *,
        keyframe_gated: bool,
        fanout: FanOut | None = None,
        kind: str = "video",
    ) -> None:
        self.label = label
        self.kind = kind
        #: this viewer's timestamps of this track, across moves between fan-outs
        self.timestamps = ContinuousTimestamps()
        self._fanout = fanout
        self._max_frames = max_frames
        self._keyframe_gated = keyframe_gated
        self._frames: collections.deque[EncodedFrame] = collections.deque()
        self._waiting_for_keyframe = keyframe_gated
        self._wakeup: Callable[[], None] | None = None
        self._transport: Transport | None = None
        self._closed = False
        #: whether a frame has gone out: losses before that are skips, not drops
        self._started = False
        self._delivered = 0
        self._dropped = 0
        self._skipped = 0
        self._last_drop_log = -DROP_LOG_INTERVAL

    def set_wakeup(self, wakeup: Callable[[], None] | None) -> None:
        """Install the drainer's callback, run (synchronously, inside ``publish``) when a frame
        is queued."""
        self._wakeup = wakeup

    def set_transport(self, transport: Transport | None) -> None:
        """Send frames through ``transport`` synchronously in ``publish`` while the queue is
        empty and the transport is ready (a live viewer). If it raises, it is dropped, the
        frame is queued instead and the drainer is woken."""
        self._transport = transport

    def get_nowait(self) -> EncodedFrame | None:
        """The next queued frame, for the drainer to send; ``None`` when the queue is empty."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        self._count_delivered(frame)
        return frame

    @property
    def queued_frames(self) -> int:
        return len(self._frames)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def dropped_frames(self) -> int:
        return self._dropped

    def statistics(self) -> SubscriberStatistics:
        return SubscriberStatistics(
            queued_frames=len(self._frames),
            delivered_frames=self._delivered,
            dropped_frames=self._dropped,
            skipped_frames=self._skipped,
            waiting_for_keyframe=self._waiting_for_keyframe,
        )

    def offer(self, frame: EncodedFrame) -> Delivery:
        """Take one published frame: send it now, queue it, or drop it (see the module doc)."""
        if self._closed:
            return Delivery.SKIPPED
        if self._waiting_for_keyframe:
            if not frame.keyframe:
                return self._lose(1)
            self._waiting_for_keyframe = False
        elif self._transport is not None and not self._frames:
            try:
                if self._transport.ready():
                    self._transport.send(frame)
                    self._count_delivered(frame)
                    return Delivery.SENT
                # The socket is full: the frame waits in the queue like any backlog.
            except Exception as exc:
                log.info("%s: direct sending stopped (%s); queueing", self.label, exc)
                self._transport = None
        elif self._keyframe_gated and frame.keyframe and self._frames:
            # A whole GOP behind (still connecting, or a slow link): the viewer can start from
            # this keyframe, so the older frames are not worth sending.
            self._lose(len(self._frames))
            self._frames.clear()
        elif len(self._frames) >= self._max_frames:
            lost = len(self._frames)
            self._frames.clear()
            if self._keyframe_gated and not frame.keyframe:
                self._waiting_for_keyframe = True
                self._lose(lost)
                return self._lose(1)
            self._lose(lost)
        self._frames.append(frame)
        if self._wakeup is not None:
            self._wakeup()
        return Delivery.QUEUED

    def _start_with(self, frames: list[EncodedFrame]) -> None:
        if frames and (frames[0].keyframe or not self._keyframe_gated):
            self._frames.extend(frames[-self._max_frames :])
            self._waiting_for_keyframe = False

    def _move_to(self, fanout: FanOut, frames: list[EncodedFrame]) -> None:
        """Feed from ``fanout`` from now on, starting with its cached ``frames``."""
        self._fanout = fanout
        self._frames.clear()  # the old quality's backlog: no use to the new one's decoder
        self._waiting_for_keyframe = self._keyframe_gated
        self._start_with(frames)
        self.timestamps.rebase(self._frames[-1].timestamp if self._frames else None)
        if self._frames and self._wakeup is not None:
            self._wakeup()  # the drainer sends the new GOP (the direct path waits for it)

    def _count_delivered(self, frame: EncodedFrame) -> None:
        self._started = True
        self._delivered += 1
        if self._fanout is not None:
            self._fanout._count_sent(frame)

    def _lose(self, frames: int) -> Delivery:
        """Count ``frames`` this viewer will never get: drops once it played, skips before."""
        if not self._started:
            self._skipped += frames
            if self._fanout is not None:
                self._fanout._skipped += frames
            return Delivery.SKIPPED
        self._dropped += frames
        if self._fanout is not None:
            self._fanout._dropped += frames
        self._log_drop(frames)
        return Delivery.DROPPED

    def _close(self) -> None:
        self._closed = True
        self._frames.clear()
        if self._wakeup is not None:
            self._wakeup()

    def _log_drop(self, dropped: int) -> None:
        now = time.monotonic()
        if now - self._last_drop_log >= DROP_LOG_INTERVAL:
            self._last_drop_log = now
            log.warning(
                "%s: viewer fell %d frames behind; skipping to the next keyframe "
                "(%d frames dropped so far)",
                self.label,
                dropped,
                self._dropped,
            )


class CatchUpPacer:
    """Spaces out the frames a viewer catches up on, so a replayed GOP is not one burst.

    A late joiner's queue starts with the cached GOP; sending it all at once can overflow
    the receiver's socket buffer on a big GOP (a lost packet older than the sender's
    retransmission history corrupts the picture until the next keyframe). A token bucket:
    backlog goes out at ``rate`` bytes per second, at most ``burst`` bytes back to back; live
    frames are never held back.

    It has no timer: a viewer whose budget is spent resumes when the next frame is published
    (every 40 ms at 25 fps), with the budget refilled for the time that passed. On a busy
    server a short asyncio sleep was seen to take seconds; a pacer that slept per frame
    trailed the camera for good and its viewer never reached the live edge.
    """

    def __init__(self, rate: float, burst: int = CATCH_UP_BURST_BYTES) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = self._burst
        self._last: float | None = None

    def ready(self, now: float) -> bool:
        """Whether more backlog may go out now."""
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        return self._tokens > 0

    def spend(self, size: int) -> None:
        """Count ``size`` bytes of backlog sent (the last frame may overdraw the budget)."""
        self._tokens -= size


class FanOut:
    """Distributes one stream's frames to its subscribers.

    Args:
        stream_id: for log lines.
        queue_frames: each subscriber's queue bound (frames).
        gop_cache_frames: the longest GOP kept for late joiners; longer ones aren't cached
            and a late joiner then waits for the next keyframe.
    """

    def __init__(self, stream_id: str, *, queue_frames: int, gop_cache_frames: int) -> None:
        self.stream_id = stream_id
        self._queue_frames = queue_frames
        self._gop_cache_frames = gop_cache_frames
        self._gop: list[EncodedFrame] = []
        self._gop_overflowed = False
        #: subscribers by the kind of frames they take ("video", "audio", "source_audio").
        self._subscribers: dict[str, set[Subscriber]] = {
            "video": set(),
            "audio": set(),
            "source_audio": set(),
        }
        self._published_frames = 0
        self._published_bytes = 0
        self._dropped = 0
        self._skipped = 0
        self._sent_packets = 0
        self._sent_bytes = 0
        self._next_label = 0

    def subscribe(self, kind: str = "video") -> Subscriber:
        """A new subscriber, primed with the current GOP so it can start decoding at once."""
        self._next_label += 1
        subscriber = Subscriber(
            f"{self.stream_id} viewer {self._next_label}",
            self._queue_frames,
            keyframe_gated=kind == "video",
            fanout=self,
            kind=kind,
        )
        subscriber._start_with([frame for frame in self._gop if frame.kind == kind])
        self._subscribers[kind].add(subscriber)
        return subscriber

    def adopt(self, subscriber: Subscriber) -> None:
        """Move ``subscriber`` here from the fan-out it was on (another quality of its stream).

        Its queue restarts with this fan-out's cached GOP from its keyframe (or, with none
        cached, it waits for the next keyframe); its transport, drainer and counters stay, and
        its timestamps go on from where they were (:class:`ContinuousTimestamps`). Synchronous:
        no frame of either fan-out can fall in between.
        """
        old = subscriber._fanout
        if old is not None and old is not self:
            old._subscribers[subscriber.kind].discard(subscriber)
        subscriber._move_to(self, [frame for frame in self._gop if frame.kind == subscriber.kind])
        self._subscribers[subscriber.kind].add(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        """Stop feeding ``subscriber``; idempotent."""
        for subscribers in self._subscribers.values():
            subscribers.discard(subscriber)
        subscriber._close()

    def publish(self, frame: EncodedFrame) -> None:
        """Give ``frame`` to every subscriber and remember it for late joiners."""
        if frame.kind != "source_audio":  # a second copy of the sound, not counted twice
            self._published_frames += 1
            self._published_bytes += frame.size
        if frame.kind == "video":
            self._remember(frame)  # audio is not replayed: a burst of old sound helps nobody
        for subscriber in list(self._subscribers[frame.kind]):
            subscriber.offer(frame)

    def reset(self) -> None:
        """Forget the cached GOP (the source restarted; its next keyframe starts afresh)."""
        self._gop = []
        self._gop_overflowed = False

    @property
    def cached_keyframe(self) -> EncodedFrame | None:
        """The keyframe late joiners start from, if one is cached."""
        return self._gop[0] if self._gop and self._gop[0].keyframe else None

    def statistics(self) -> FanOutStatistics:
        return FanOutStatistics(
            subscribers=self.subscriber_count,
            published_frames=self._published_frames,
            published_bytes=self._published_bytes,
            gop_frames=len(self._gop),
            dropped_frames=self._dropped,
            skipped_frames=self._skipped,
            sent_packets=self._sent_packets,
            sent_bytes=self._sent_bytes,
        )

    def _count_sent(self, frame: EncodedFrame) -> None:
        self._sent_packets += len(frame.payloads)
        self._sent_bytes += sum(len(payload) for payload in frame.payloads)

    @property
    def subscriber_count(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscribers.values())

    def _remember(self, frame: EncodedFrame) -> None:
        if frame.keyframe:
            self._gop = [frame]
            self._gop_overflowed = False
        elif self._gop and not self._gop_overflowed:
            if len(self._gop) >= self._gop_cache_frames:
                # Too long to replay: late joiners wait for the next keyframe instead.
                self._gop = []
                self._gop_overflowed = True
            else:
                self._gop.append(frame)
