"""The streams, and the supervisor that runs each one's sources while they are wanted.

Task tree (inside the app's lifetime nursery)::

    StreamRegistry.run               nursery
    └── Stream.supervise × N     one cancel scope each: deleting or editing a stream
        │                            cancels exactly its supervisor
        └── supervise quality × Q    one per quality (``feeds.py``; one, "main", for a plain
            │                        ``source``)
            └── run_source           while wanted; cancelled after its last viewer + grace

Whether a stream may be watched is one explicit state, :class:`Availability`, changed only
through :meth:`Stream.change_availability` along the transitions drawn there. A quality is
*wanted* (its source runs) when the stream is available and the quality has viewers (or a
switch or snapshot waiting for its keyframe), or it is the default quality of an always-on
stream or of one started through the API (until idle for the grace period). Each viewer is
on one quality at a time and moves between them on the same track
(:meth:`Stream.switch_viewer`). A viewer is counted from the
moment its session subscribes (:meth:`Stream.open_viewer`), so a stopped stream starts on its
first offer, before the answer is even sent. Stopping or deleting a stream ends its viewers'
sessions by cancelling them (each viewer hands :meth:`Stream.open_viewer` how to end it).

Streams can be added, edited, stopped, started and deleted while the server runs (the
management API). Viewers of an edited stream stay connected: the stream keeps its fan-out and
its timeline, only the source behind it changes.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from .changes import ChangeSignal
from .config import IMPLICIT_QUALITY, Config, MediaConfig, StreamConfig, stream_from_dict
from .errors import ConfigError, ErrorCode
from .feeds import QualityFeed, QualityStatistics
from .media.fanout import FanOut, FanOutStatistics, Subscriber
from .media.frames import EncodedFrame
from .media.snapshot import jpeg_from_keyframe
from .media.source_contract import SourceInfo, SourceState, describe_source
from .media.sources import Timelines, run_source
from .store import StoredStream

log = logging.getLogger(__name__)


class Availability(enum.Enum):
    """Whether a stream may be watched, and why its source runs.

    ::

        AVAILABLE ──start──> STARTED ──idle for the grace period──> AVAILABLE
            │                  │  ▲
           stop               stop └──start── STOPPED <──stop── (any but DELETED)
            ▼                  ▼
         STOPPED ──────────────┘           any ──delete──> DELETED (final)
    """

    #: may be watched; the source runs while wanted (always-on, or viewers)
    AVAILABLE = "available"
    #: may be watched, and started through the API: runs even without viewers until idle for
    #: the grace period (on-demand streams), then back to AVAILABLE
    STARTED = "started"
    #: stopped through the API: no viewers, no source
    STOPPED = "stopped"
    #: removed; its viewers' sessions ended
    DELETED = "deleted"

    @property
    def watchable(self) -> bool:
        return self in (Availability.AVAILABLE, Availability.STARTED)


_TRANSITIONS: Final = {
    Availability.AVAILABLE: {Availability.STARTED, Availability.STOPPED, Availability.DELETED},
    Availability.STARTED: {
        Availability.AVAILABLE,
        Availability.STARTED,
        Availability.STOPPED,
        Availability.DELETED,
    },
    Availability.STOPPED: {Availability.STARTED, Availability.STOPPED, Availability.DELETED},
    Availability.DELETED: set(),
}
_UNAVAILABLE_BECAUSE: Final = {
    Availability.STOPPED: "the stream is stopped",
    Availability.DELETED: "the stream was deleted",
}

#: Ends one viewer's session: the error its client is told (code, message) and why it ends
#: (handed to :meth:`Stream.open_viewer`). A session already ending tells its client nothing.
EndViewer = Callable[[ErrorCode, str], None]


class IngestGate(Protocol):
    """Whether this process may read a stream's source (a cluster: only the stream's owner).

    Without a gate (one process) every stream may be read. With one, the supervisor starts a
    source only while :meth:`may_ingest` holds, and hands the source's scope to
    :meth:`guard_ingest`, which cancels it the moment the right to read is lost. The gate
    notifies the stream's ``changes`` when :meth:`may_ingest` turns true. On a replica (a
    node serving a stream owned elsewhere), :meth:`relay_source` gives each quality's source
    to run instead of the camera: the owner's frames of that quality over the relay.
    """

    def may_ingest(self, stream_id: str) -> bool: ...

    def guard_ingest(self, stream_id: str, scope: trio.CancelScope) -> None: ...

    def relay_source(self, stream: Stream, quality: str) -> SourceRunner | None:
        """What to run instead of the source of the stream's ``quality`` (a replica: the
        owner's frames of that quality over the relay); None: the quality's own source."""
        ...

    async def serve_locally(self, stream: Stream) -> None:
        """Make the stream's frames available in this process before a viewer that is not a
        routed offer (a WHEP session, a fallback, a snapshot) opens its viewer here: a cluster
        node that neither owns nor replicates it claims it (nobody owns it) or becomes a
        replica of it (another node owns it). Nothing when it already may ingest it.

        Raises:
            SignalingError: ``cluster_unavailable`` (Redis), or ``relay_failed`` (the
                stream could not be claimed nor replicated here), naming why; both may be
                retried.
        """
        ...


#: a source to run for a stream (started with ``nursery.start``; publishes to the stream).
SourceRunner = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    id: str
    name: str
    source: str  # credentials removed (the default quality's)
    state: SourceState
    detail: str | None
    last_error: str | None
    on_demand: bool
    enabled: bool
    #: "config" (the configuration file) or "api" (added or edited through the API).
    origin: str
    audio: bool
    rtsp_transport: str
    #: what the camera was last opened with ("tcp", "udp"); None before it opened, or not RTSP
    rtsp_transport_in_use: str | None
    viewers: int
    codec: str
    source_running: bool
    #: encoders this stream has opened (H.264 or Opus, one per source start when it transcodes;
    #: never one per viewer).
    encoders_opened: int
    #: times the source was reopened after failing or ending (camera reconnects).
    source_restarts: int
    #: the default quality's fan-out
    fanout: FanOutStatistics
    default_quality: str = IMPLICIT_QUALITY
    #: every quality, best first (one, "main", for a stream with a plain source)
    qualities: tuple[QualityStatistics, ...] = ()


#: Source states from the most to the least alive: a stream shows its most alive quality's.
_STATE_RANK: Final = {
    SourceState.LIVE: 0,
    SourceState.STARTING: 1,
    SourceState.RECONNECTING: 2,
    SourceState.OFFLINE: 3,
    SourceState.STOPPED: 4,
}


class Stream:
    """One configured stream: its qualities (each a source and a fan-out), its viewers.

    Each quality's :class:`~mediastream.feeds.QualityFeed` is the sink its source publishes
    to; sessions take a viewer on one quality (:meth:`open_viewer`) and move it between them
    (:meth:`switch_viewer`). Properties that speak of "the source" (``fanout``,
    ``source_info``) are the default quality's.
    """

    def __init__(
        self,
        config: StreamConfig,
        media: MediaConfig,
        changes: ChangeSignal | None = None,
        *,
        origin: str = "config",
        enabled: bool = True,
        gate: IngestGate | None = None,
    ) -> None:
        self.config = config
        self._media = media
        self._gate = gate
        self.origin = origin
        self._availability = Availability.AVAILABLE if enabled else Availability.STOPPED
        self._viewer_endings: dict[int, EndViewer] = {}
        self.changes = ChangeSignal(parent=changes)
        self._feeds: dict[str, QualityFeed] = {}
        #: the feed each open viewer's subscriber (video or audio) takes its frames from
        self._placement: dict[Subscriber, QualityFeed] = {}
        self._viewers = 0
        self._snapshot: tuple[EncodedFrame, bytes] | None = None
        self._set_feeds(config)

    def reconfigure(self, config: StreamConfig) -> None:
        """Take an edited definition (the registry then restarts the supervisor)."""
        self.config = config
        self._set_feeds(config)
        self._notify()

    def _set_feeds(self, config: StreamConfig) -> None:
        """One feed per quality of ``config``; feeds of names kept stay (fan-out, timeline and
        viewers), viewers of a quality that is gone move to the default one."""
        several = len(config.quality_list) > 1
        feeds: dict[str, QualityFeed] = {}
        for quality in config.quality_list:
            feed = self._feeds.get(quality.name)
            if feed is None:
                label = f"{config.id}/{quality.name}" if several else config.id
                feed = QualityFeed(label, quality, self._media, self.changes)
            feed.quality = quality
            feeds[quality.name] = feed
        gone = [feed for name, feed in self._feeds.items() if name not in feeds]
        self._feeds = feeds
        default = feeds[config.default_quality_name]
        for subscriber, feed in list(self._placement.items()):
            if feed in gone:
                self._move(subscriber, default)

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def qualities(self) -> list[QualityFeed]:
        """The stream's qualities, best first."""
        return list(self._feeds.values())

    def quality(self, name: str | None = None) -> QualityFeed:
        """The quality named ``name`` (None: the default one).

        Raises:
            KeyError: the stream has no such quality.
        """
        return self._feeds[name or self.config.default_quality_name]

    @property
    def fanout(self) -> FanOut:
        """The default quality's fan-out."""
        return self.quality().fanout

    @property
    def timelines(self) -> Timelines:
        return self.quality().timelines

    @property
    def availability(self) -> Availability:
        return self._availability

    @property
    def enabled(self) -> bool:
        """Whether it may be watched (not stopped, not deleted)."""
        return self._availability.watchable

    @property
    def unavailable(self) -> str | None:
        """Why sessions can't watch it right now; None when they can."""
        return _UNAVAILABLE_BECAUSE.get(self._availability)

    def change_availability(self, to: Availability) -> None:
        """Move to ``to``; a stopped or deleted stream ends every viewer's session.

        Raises:
            ValueError: the transition is not one of :class:`Availability`'s, saying which.
        """
        if to not in _TRANSITIONS[self._availability]:
            raise ValueError(
                f'Cannot make stream "{self.id}" {to.value}: it is {self._availability.value}'
            )
        self._availability = to
        if not to.watchable:
            reason = _UNAVAILABLE_BECAUSE[to]
            self.end_viewers(ErrorCode.STREAM_UNAVAILABLE, f"Unavailable: {reason}")
        self._notify()

    def end_viewers(self, code: ErrorCode, message: str) -> None:
        """End the session of every viewer of the stream here (each told ``code`` and
        ``message``, unless it was ending already): the stream was stopped or deleted, or this
        node can no longer read it (a cluster: its lease lost, its replica's relay gone)."""
        for end in list(self._viewer_endings.values()):
            end(code, message)

    async def serve_locally(self) -> None:
        """Make the stream's frames available here before a viewer opens (see
        :meth:`IngestGate.serve_locally`); nothing to do in a single process.

        Raises:
            SignalingError: ``cluster_unavailable`` or ``relay_failed`` (retryable).
        """
        if self._gate is not None:
            await self._gate.serve_locally(self)

    def _leading_feed(self) -> QualityFeed:
        """The quality whose state the stream shows: the most alive (the default on a tie)."""
        default = self.quality()
        return min(self._feeds.values(), key=lambda f: (_STATE_RANK[f.state], f is not default))

    @property
    def state(self) -> SourceState:
        return self._leading_feed().state

    @property
    def detail(self) -> str | None:
        return self._leading_feed().detail

    @property
    def viewers(self) -> int:
        return self._viewers

    @contextmanager
    def open_audio(self, kind: str = "audio", quality: str | None = None) -> Iterator[Subscriber]:
        """A queue of this stream's audio, for a viewer who also takes audio.

        Args:
            kind: "audio" (what WebRTC sends), or "source_audio" (the camera's own AAC, for
                the socket fallback).
            quality: the quality it starts on (None: the default); it moves with the viewer's
                video (:meth:`switch_viewer`).
        """
        feed = self.quality(quality)
        subscriber = feed.fanout.subscribe(kind)
        self._placement[subscriber] = feed
        try:
            yield subscriber
        finally:
            placed = self._placement.pop(subscriber, None)
            if placed is not None:
                placed.fanout.unsubscribe(subscriber)

    @property
    def source_info(self) -> SourceInfo | None:
        """What the default quality's source carried when it last opened (None: never)."""
        return self.quality().source_info

    async def wait_source_info(self, quality: str | None = None) -> SourceInfo:
        """Wait until the quality's source has opened at least once."""
        while (info := self.quality(quality).source_info) is None:
            await self.wait_changed()
        return info

    @contextmanager
    def open_viewer(
        self, end: EndViewer | None = None, quality: str | None = None
    ) -> Iterator[Subscriber]:
        """Count a viewer and give it a queue of this stream's video for as long as it stays.

        Args:
            end: called (with the reason) if the stream is stopped or deleted meanwhile.
            quality: the quality it starts on (None: the default one).

        Raises:
            KeyError: no such quality.
        """
        feed = self.quality(quality)
        subscriber = feed.fanout.subscribe("video")
        self._placement[subscriber] = feed
        feed.viewers += 1
        if end is not None:
            self._viewer_endings[id(subscriber)] = end
        self._viewers += 1
        self._notify()
        try:
            yield subscriber
        finally:
            self._viewer_endings.pop(id(subscriber), None)
            placed = self._placement.pop(subscriber, None)
            if placed is not None:
                placed.fanout.unsubscribe(subscriber)
                placed.viewers -= 1
            self._viewers -= 1
            self._notify()

    def quality_of(self, subscriber: Subscriber) -> str | None:
        """The quality a viewer's subscriber takes its frames from now (None: not open)."""
        feed = self._placement.get(subscriber)
        return feed.name if feed is not None else None

    async def switch_viewer(self, video: Subscriber, audio: Subscriber | None, to: str) -> None:
        """Move a viewer (its video, and its audio if any) to quality ``to``, on the same track.

        Make before break: the viewer keeps the quality it is on until ``to`` has a keyframe
        (its source is started for it if it is not running), then it moves in one synchronous
        step and starts with that keyframe and the frames since (see :meth:`FanOut.adopt`).

        Raises:
            KeyError: no such quality.

        Cancellation: the viewer stays where it was; bound the wait at the call site.
        """
        target = self.quality(to)
        if self._placement.get(video) is target:
            return
        await target.wait_keyframe()
        if video not in self._placement or self._feeds.get(to) is not target:
            return  # the viewer left, or the stream was edited, meanwhile
        self._move(video, target)
        if audio is not None and audio in self._placement:
            self._move(audio, target)
        self._notify()

    def _move(self, subscriber: Subscriber, target: QualityFeed) -> None:
        current = self._placement[subscriber]
        if current is target:
            return
        if subscriber.kind == "video":
            current.viewers -= 1
            target.viewers += 1
        target.fanout.adopt(subscriber)
        self._placement[subscriber] = target
        current.changes.notify()
        target.changes.notify()

    async def wait_changed(self) -> None:
        """Wait until the state, the viewer count or whether a source runs changes."""
        await self.changes.wait()

    @property
    def source_running(self) -> bool:
        """Whether any of its qualities' sources runs."""
        return any(feed.running for feed in self._feeds.values())

    def statistics(self) -> StreamStatistics:
        leading = self._leading_feed()
        default = self.quality()
        feeds = self._feeds.values()
        return StreamStatistics(
            id=self.id,
            name=self.config.display_name,
            source=describe_source(self.config.source),
            state=leading.state,
            detail=leading.detail,
            last_error=leading.last_error or default.last_error,
            on_demand=self.config.on_demand,
            enabled=self.enabled,
            origin=self.origin,
            audio=self.config.audio,
            rtsp_transport=self.config.rtsp_transport,
            rtsp_transport_in_use=info.rtsp_transport if (info := default.source_info) else None,
            viewers=self._viewers,
            codec=self._codec(),
            source_running=self.source_running,
            encoders_opened=sum(feed.encoders_opened for feed in feeds),
            source_restarts=sum(feed.source_restarts for feed in feeds),
            fanout=default.fanout.statistics(),
            default_quality=default.name,
            qualities=tuple(feed.statistics() for feed in feeds),
        )

    def _codec(self) -> str:
        info = self.source_info
        if info is None or not info.transcoded:
            video = "h264"
        else:
            video = f"h264 (encoded once from {info.codec})"
        if info is None or not info.audio_codec:
            return video
        if info.audio_transcoded:
            return f"{video}, {info.audio_codec} (encoded once from {info.audio_source_codec})"
        return f"{video}, {info.audio_codec}"

    def _notify(self) -> None:
        self.changes.notify()

    @property
    def always_on(self) -> bool:
        """Read with no viewer: enabled, and not on demand or started through the API."""
        return self.enabled and (
            not self.config.on_demand or self._availability is Availability.STARTED
        )

    def _always_on(self, feed: QualityFeed) -> bool:
        """Whether ``feed`` runs without viewers: the default quality of an always-on stream
        (:attr:`always_on`)."""
        return feed is self.quality() and self.always_on

    def _wanted(self, feed: QualityFeed) -> bool:
        return (
            self.enabled
            and self._feeds.get(feed.name) is feed
            and (self._always_on(feed) or feed.users > 0)
            and (self._gate is None or self._gate.may_ingest(self.id))
        )

    async def snapshot(self, *, start_source: bool) -> bytes:
        """A JPEG of the default quality's current keyframe.

        Args:
            start_source: when nothing is cached, start the source (if on-demand and stopped)
                and wait for its first keyframe; otherwise give up at once.

        Raises:
            LookupError: no keyframe to show.
            SnapshotError: the keyframe did not decode.

        Cancellation: bound the wait for a keyframe at the call site (``trio.move_on_after``).
        """
        feed = self.quality()
        keyframe = feed.fanout.cached_keyframe
        if keyframe is None:
            if not start_source or not self.enabled:
                raise LookupError("no picture cached")
            keyframe = await feed.wait_keyframe()
        cached = self._snapshot
        if cached is not None and cached[0] is keyframe:
            return cached[1]
        jpeg, _, _ = await trio.to_thread.run_sync(jpeg_from_keyframe, keyframe)
        self._snapshot = (keyframe, jpeg)
        return jpeg

    async def _wait_until_unwanted(self, feed: QualityFeed, grace: float) -> None:
        """Return when ``feed``'s source should stop: disabled, gone from the stream, or idle
        for ``grace`` seconds."""

        def kept() -> bool:
            return self.enabled and self._feeds.get(feed.name) is feed

        while True:
            while kept() and (self._always_on(feed) or feed.users > 0):
                await self.wait_changed()
            if not kept():
                return
            with trio.move_on_after(grace):
                while kept() and feed.users == 0 and not self._always_on(feed):
                    await self.wait_changed()
                continue  # a viewer came back (or the stream was disabled) within the grace
            if self._availability is Availability.STARTED and feed is self.quality():
                self.change_availability(Availability.AVAILABLE)
            return

    async def supervise(
        self,
        media: MediaConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run each quality's source whenever it is wanted, until cancelled."""
        async with trio.open_nursery() as nursery:
            for feed in self._feeds.values():
                nursery.start_soon(
                    self._supervise_feed, feed, media, name=f"supervise {feed.label}"
                )
            task_status.started()

    async def _supervise_feed(self, feed: QualityFeed, media: MediaConfig) -> None:
        source_config = dataclasses.replace(self.config, source=feed.quality.source)
        while True:
            await self.changes.wait_until(functools.partial(self._wanted, feed))
            if feed.viewers:
                log.info("%s: first viewer, starting the source", feed.label)
            feed.set_running(True)
            try:
                async with trio.open_nursery() as nursery:
                    runner: SourceRunner = functools.partial(
                        run_source, source_config, media, feed, timelines=feed.timelines
                    )
                    if self._gate is not None:
                        self._gate.guard_ingest(self.id, nursery.cancel_scope)
                        relay = self._gate.relay_source(self, feed.name)
                        if relay is not None:
                            # A replica: the owner relays this quality's frames (its camera
                            # session is the owner's, never this node's).
                            runner = relay
                    await nursery.start(runner)
                    await self._wait_until_unwanted(feed, media.on_demand_grace)
                    if self.enabled and self._feeds.get(feed.name) is feed:
                        log.info(
                            "%s: no viewers for %.0f s, stopping the source",
                            feed.label,
                            media.on_demand_grace,
                        )
                    nursery.cancel_scope.cancel()
            finally:
                # Only now is the source (and its reader thread) really gone.
                feed.set_running(False)
            feed.fanout.reset()
            if self._feeds.get(feed.name) is not feed:
                return  # the quality was removed by an edit


class StreamRegistry:
    """All streams, by id, each with its supervisor.

    Changes (:meth:`add`, :meth:`replace`, :meth:`remove`, :meth:`set_enabled`) take effect at
    once and need :meth:`run` to be running.
    """

    def __init__(
        self,
        config: Config,
        changes: ChangeSignal | None = None,
        *,
        gate: IngestGate | None = None,
    ) -> None:
        self._media = config.media
        self._changes = changes
        self._gate = gate
        self._streams: dict[str, Stream] = {}
        self._supervisors: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self._nursery: trio.Nursery | None = None
        for stream_config in config.streams:
            self._streams[stream_config.id] = self._new_stream(stream_config, "config", True)

    def apply_stored(self, records: list[StoredStream]) -> None:
        """Apply the management API's saved changes to the configured streams (at start-up).

        A saved definition that no longer loads (a file source that is gone) is skipped
        with an error in the log, rather than keeping the server from starting.
        """
        for record in records:
            if record.deleted:
                self._streams.pop(record.id, None)
                continue
            if record.definition is not None:
                try:
                    config = stream_from_dict(record.definition)
                except ConfigError as exc:
                    log.error("%s: saved definition ignored: %s", record.id, exc)
                    continue
                self._streams[record.id] = self._new_stream(config, "api", record.enabled)
            elif record.id in self._streams and not record.enabled:
                self._streams[record.id].change_availability(Availability.STOPPED)

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def __len__(self) -> int:
        return len(self._streams)

    def statistics(self) -> list[StreamStatistics]:
        return [stream.statistics() for stream in self._streams.values()]

    def add(self, config: StreamConfig, *, origin: str = "api", enabled: bool = True) -> Stream:
        """A new stream, supervised at once. The id must be new."""
        if config.id in self._streams:
            raise KeyError(config.id)
        stream = self._new_stream(config, origin, enabled)
        self._streams[config.id] = stream
        self._supervise(stream)
        self._notify()
        return stream

    def replace(self, config: StreamConfig, *, origin: str = "api") -> Stream:
        """Change a stream's definition; its viewers stay, its source restarts."""
        stream = self._streams[config.id]
        stream.reconfigure(config)
        stream.origin = origin
        self._restart(stream)
        log.info("%s: definition changed, source restarted", stream.id)
        return stream

    def remove(self, stream_id: str) -> None:
        """Delete a stream: its viewers' sessions end, its source stops."""
        stream = self._streams.pop(stream_id)
        stream.change_availability(Availability.DELETED)
        scope, _ = self._supervisors.pop(stream_id)
        scope.cancel()
        log.info("%s: deleted", stream_id)
        self._notify()

    def set_enabled(self, stream_id: str, enabled: bool) -> Stream:
        """Start (enable, and run now even without viewers) or stop (end viewers) a stream."""
        stream = self._streams[stream_id]
        stream.change_availability(Availability.STARTED if enabled else Availability.STOPPED)
        log.info("%s: %s", stream_id, "started" if enabled else "stopped")
        return stream

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise every stream until cancelled; ready once always-on sources are starting."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for stream in list(self._streams.values()):
                self._supervise(stream)
            task_status.started()
            await trio.sleep_forever()

    def _new_stream(self, config: StreamConfig, origin: str, enabled: bool) -> Stream:
        return Stream(
            config, self._media, self._changes, origin=origin, enabled=enabled, gate=self._gate
        )

    def _supervise(self, stream: Stream, after: trio.Event | None = None) -> None:
        if self._nursery is None:
            return  # started by run()
        scope, done = trio.CancelScope(), trio.Event()
        self._supervisors[stream.id] = (scope, done)

        async def supervised() -> None:
            try:
                with scope:
                    if after is not None:
                        await after.wait()  # the previous supervisor has released the source
                    await stream.supervise(self._media)
            finally:
                done.set()

        self._nursery.start_soon(supervised, name=f"supervise {stream.id}")

    def _restart(self, stream: Stream) -> None:
        old = self._supervisors.pop(stream.id, None)
        if old is not None:
            old[0].cancel()
        self._supervise(stream, after=old[1] if old is not None else None)
        stream.changes.notify()

    def _notify(self) -> None:
        if self._changes is not None:
            self._changes.notify()
