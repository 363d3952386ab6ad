"""The streams, and the supervisor that runs each one's source while it is wanted.

Task tree (inside the app's lifetime nursery)::

    StreamRegistry.run               nursery
    └── Stream.supervise × N     one cancel scope each: deleting or editing a stream
        │                            cancels exactly its supervisor
        └── run_source               while wanted; cancelled after the last viewer + grace period

Whether a stream may be watched is one explicit state, :class:`Availability`, changed only
through :meth:`Stream.change_availability` along the transitions drawn there. A stream is
*wanted* (its source runs) when it is available and always-on, or has viewers, or was started
through the API (until it has been idle for the grace period). A viewer is counted from the
moment its session subscribes (:meth:`Stream.open_viewer`), so a stopped stream starts on its
first offer, before the answer is even sent. Stopping or deleting a stream ends its viewers'
sessions by cancelling them (each viewer hands :meth:`Stream.open_viewer` how to end it).

Streams can be added, edited, stopped, started and deleted while the server runs (the
management API). Viewers of an edited stream stay connected: the stream keeps its fan-out and
its timeline, only the source behind it changes.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Protocol

import trio

from .changes import ChangeSignal
from .config import Config, MediaConfig, StreamConfig, stream_from_dict
from .errors import ConfigError
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

#: Ends one viewer's session, saying why (handed to :meth:`Stream.open_viewer`).
EndViewer = Callable[[str], None]


class IngestGate(Protocol):
    """Whether this process may read a stream's source (a cluster: only the stream's owner).

    Without a gate (one process) every stream may be read. With one, the supervisor starts a
    source only while :meth:`may_ingest` holds, and hands the source's scope to
    :meth:`guard_ingest`, which cancels it the moment the right to read is lost. The gate
    notifies the stream's ``changes`` when :meth:`may_ingest` turns true. On a replica (a
    node serving a stream owned elsewhere), :meth:`relay_source` gives the source to run
    instead of the camera: the owner's frames over the relay.
    """

    def may_ingest(self, stream_id: str) -> bool: ...

    def guard_ingest(self, stream_id: str, scope: trio.CancelScope) -> None: ...

    def relay_source(self, stream: Stream) -> SourceRunner | None:
        """What to run instead of the stream's own source (a replica: the owner's frames over
        the relay); None: the stream's source."""
        ...


#: a source to run for a stream (started with ``nursery.start``; publishes to the stream).
SourceRunner = Callable[..., Awaitable[None]]


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    id: str
    name: str
    source: str  # credentials removed
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
    fanout: FanOutStatistics


class Stream:
    """One configured stream: its fan-out, its source's state and its viewers.

    It is the sink its source publishes to, and what sessions subscribe to.
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
        self._gate = gate
        self.origin = origin
        self._availability = Availability.AVAILABLE if enabled else Availability.STOPPED
        self._viewer_endings: dict[int, EndViewer] = {}
        #: kept across source restarts and edits, so viewers' timestamps never jump back.
        self.timelines = Timelines()
        self.fanout = FanOut(
            config.id,
            queue_frames=media.viewer_queue_frames,
            gop_cache_frames=media.gop_cache_frames,
        )
        self._state = SourceState.STOPPED
        self._detail: str | None = None
        self._last_error: str | None = None
        self._viewers = 0
        self._source_running = False
        self._source_info: SourceInfo | None = None
        self._encoders_opened = 0
        self._source_restarts = 0
        self._probes = 0  # snapshot requests keeping the source up, not counted as viewers
        self._snapshot: tuple[EncodedFrame, bytes] | None = None
        self.changes = ChangeSignal(parent=changes)

    @property
    def id(self) -> str:
        return self.config.id

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
            for end in list(self._viewer_endings.values()):
                end(_UNAVAILABLE_BECAUSE[to])
        self._notify()

    @property
    def state(self) -> SourceState:
        return self._state

    @property
    def detail(self) -> str | None:
        return self._detail

    @property
    def viewers(self) -> int:
        return self._viewers

    @contextmanager
    def open_audio(self, kind: str = "audio") -> Iterator[Subscriber]:
        """A queue of this stream's audio, for a viewer who also takes audio (``source_audio``:
        the camera's own AAC, for the socket fallback)."""
        subscriber = self.fanout.subscribe(kind)
        try:
            yield subscriber
        finally:
            self.fanout.unsubscribe(subscriber)

    @property
    def source_info(self) -> SourceInfo | None:
        """What the source was found to carry when it last opened (None: never opened yet)."""
        return self._source_info

    async def wait_source_info(self) -> SourceInfo:
        """Wait until the source has opened at least once."""
        while self._source_info is None:
            await self.wait_changed()
        return self._source_info

    @contextmanager
    def open_viewer(self, end: EndViewer | None = None) -> Iterator[Subscriber]:
        """Count a viewer and give it a queue of this stream's video for as long as it stays.

        Args:
            end: called (with the reason) if the stream is stopped or deleted meanwhile.
        """
        subscriber = self.fanout.subscribe("video")
        if end is not None:
            self._viewer_endings[id(subscriber)] = end
        self._viewers += 1
        self._notify()
        try:
            yield subscriber
        finally:
            self._viewer_endings.pop(id(subscriber), None)
            self.fanout.unsubscribe(subscriber)
            self._viewers -= 1
            self._notify()

    async def wait_changed(self) -> None:
        """Wait until the state, the viewer count or whether the source runs changes."""
        await self.changes.wait()

    @property
    def source_running(self) -> bool:
        return self._source_running

    def _set_source_running(self, running: bool) -> None:
        self._source_running = running
        self._notify()

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            id=self.id,
            name=self.config.display_name,
            source=describe_source(self.config.source),
            state=self._state,
            detail=self._detail,
            last_error=self._last_error,
            on_demand=self.config.on_demand,
            enabled=self.enabled,
            origin=self.origin,
            audio=self.config.audio,
            rtsp_transport=self.config.rtsp_transport,
            rtsp_transport_in_use=info.rtsp_transport if (info := self._source_info) else None,
            viewers=self._viewers,
            codec=self._codec(),
            source_running=self._source_running,
            encoders_opened=self._encoders_opened,
            source_restarts=self._source_restarts,
            fanout=self.fanout.statistics(),
        )

    # SourceSink
    def publish(self, frame: EncodedFrame) -> None:
        self.fanout.publish(frame)

    def source_state(self, state: SourceState, detail: str | None = None) -> None:
        if state in (SourceState.RECONNECTING, SourceState.OFFLINE) and detail:
            self._last_error = detail
        if (state, detail) != (self._state, self._detail):
            self._state, self._detail = state, detail
            log.info("%s: %s%s", self.id, state, f" ({detail})" if detail else "")
            self._notify()

    def source_restarted(self) -> None:
        self._source_restarts += 1
        self.fanout.reset()

    def source_opened(self, info: SourceInfo) -> None:
        self._source_info = info
        self._encoders_opened += info.transcoded + info.audio_transcoded
        self._notify()

    def relay_opened(self, info: SourceInfo) -> None:
        """A replica's relay from the owner opened: what the owner's source carries (no
        encoder or camera session of this node's own)."""
        self._source_info = info
        self._notify()

    def _codec(self) -> str:
        info = self._source_info
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

    def _wanted(self) -> bool:
        return (self.always_on or (self.enabled and self._viewers + self._probes > 0)) and (
            self._gate is None or self._gate.may_ingest(self.id)
        )

    async def snapshot(self, *, start_source: bool) -> bytes:
        """A JPEG of the current keyframe.

        Args:
            start_source: when nothing is cached, start the source (if on-demand and stopped)
                and wait for its first keyframe; otherwise give up at once.

        Raises:
            LookupError: no keyframe to show.
            SnapshotError: the keyframe did not decode.

        Cancellation: bound the wait for a keyframe at the call site (``trio.move_on_after``).
        """
        keyframe = self.fanout.cached_keyframe
        if keyframe is None:
            if not start_source or not self.enabled:
                raise LookupError("no picture cached")
            keyframe = await self._wait_keyframe()
        cached = self._snapshot
        if cached is not None and cached[0] is keyframe:
            return cached[1]
        jpeg, _, _ = await trio.to_thread.run_sync(jpeg_from_keyframe, keyframe)
        self._snapshot = (keyframe, jpeg)
        return jpeg

    async def _wait_keyframe(self) -> EncodedFrame:
        arrived = trio.Event()
        probe = self.fanout.subscribe("video")
        probe.set_wakeup(arrived.set)
        self._probes += 1
        self._notify()
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
            self._probes -= 1
            self._notify()

    async def _wait_until_unwanted(self, grace: float) -> None:
        """Return when the source should stop: disabled, or idle for ``grace`` seconds."""
        while True:
            while self.enabled and (not self.config.on_demand or self._viewers + self._probes > 0):
                await self.wait_changed()
            if not self.enabled:
                return
            with trio.move_on_after(grace):
                while self.enabled and self._viewers + self._probes == 0:
                    await self.wait_changed()
                continue  # a viewer came back (or the stream was disabled) within the grace
            if self._availability is Availability.STARTED:
                self.change_availability(Availability.AVAILABLE)
            return

    async def supervise(
        self,
        media: MediaConfig,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run this stream's source whenever it is wanted, until cancelled."""
        task_status.started()
        while True:
            await self.changes.wait_until(self._wanted)
            if self.config.on_demand and self.viewers:
                log.info("%s: first viewer, starting the source", self.id)
            self._set_source_running(True)
            try:
                async with trio.open_nursery() as nursery:
                    runner: SourceRunner = functools.partial(
                        run_source, self.config, media, self, timelines=self.timelines
                    )
                    if self._gate is not None:
                        self._gate.guard_ingest(self.id, nursery.cancel_scope)
                        runner = self._gate.relay_source(self) or runner
                    await nursery.start(runner)
                    await self._wait_until_unwanted(media.on_demand_grace)
                    if self.enabled:
                        log.info(
                            "%s: no viewers for %.0f s, stopping the source",
                            self.id,
                            media.on_demand_grace,
                        )
                    nursery.cancel_scope.cancel()
            finally:
                # Only now is the source (and its reader thread) really gone.
                self._set_source_running(False)
            self.fanout.reset()


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
        stream.config = config
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
