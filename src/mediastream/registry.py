"""The configured streams, and the supervisor that runs each one's source on demand.

Task tree (inside the app's lifetime nursery)::

    StreamRegistry.run               nursery
    └── supervise(stream) × N        waits for viewers (on-demand) or runs at once (always-on)
        └── run_source               while wanted; cancelled after the last viewer + grace period

A viewer is counted from the moment its session subscribes (:meth:`Stream.open_viewer`) until
it leaves, so a stopped stream starts on its first offer, before the answer is even sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import trio

from .changes import ChangeSignal
from .config import Config, MediaConfig, StreamConfig
from .media.fanout import FanOut, FanOutStatistics, Subscriber
from .media.frames import EncodedFrame
from .media.sources import SourceInfo, SourceState, describe_source, run_source

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    id: str
    name: str
    source: str  # credentials removed
    state: SourceState
    detail: str | None
    last_error: str | None
    on_demand: bool
    viewers: int
    codec: str
    source_running: bool
    #: encoders this stream has opened (H.264 or Opus, one per source start when it transcodes;
    #: never one per viewer).
    encoders_opened: int
    fanout: FanOutStatistics


class Stream:
    """One configured stream: its fan-out, its source's state and its viewers.

    It is the sink its source publishes to, and what sessions subscribe to.
    """

    def __init__(
        self, config: StreamConfig, media: MediaConfig, changes: ChangeSignal | None = None
    ) -> None:
        self.config = config
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
        self.changes = ChangeSignal(parent=changes)

    @property
    def id(self) -> str:
        return self.config.id

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
    def open_audio(self) -> Iterator[Subscriber]:
        """A queue of this stream's audio, for a viewer who also takes audio."""
        subscriber = self.fanout.subscribe("audio")
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
    def open_viewer(self) -> Iterator[Subscriber]:
        """Count a viewer and give it a queue of this stream's video for as long as it stays."""
        subscriber = self.fanout.subscribe("video")
        self._viewers += 1
        self._notify()
        try:
            yield subscriber
        finally:
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
            viewers=self._viewers,
            codec=self._codec(),
            source_running=self._source_running,
            encoders_opened=self._encoders_opened,
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
        self.fanout.reset()

    def source_opened(self, info: SourceInfo) -> None:
        self._source_info = info
        self._encoders_opened += info.transcoded + info.audio_transcoded
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

    async def _wait_for_viewers(self) -> None:
        while self._viewers == 0:
            await self.wait_changed()

    async def _wait_until_idle(self, grace: float) -> None:
        """Return once nobody has watched for ``grace`` seconds in a row."""
        while True:
            while self._viewers > 0:
                await self.wait_changed()
            with trio.move_on_after(grace):
                while self._viewers == 0:
                    await self.wait_changed()
                continue  # a viewer came back within the grace period
            return


async def supervise(
    stream: Stream,
    media: MediaConfig,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``stream``'s source whenever it is wanted, until cancelled."""
    task_status.started()
    while True:
        if stream.config.on_demand:
            await stream._wait_for_viewers()
            log.info("%s: first viewer, starting the source", stream.id)
        stream._set_source_running(True)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(run_source, stream.config, media, stream)
                if not stream.config.on_demand:
                    await trio.sleep_forever()
                await stream._wait_until_idle(media.on_demand_grace)
                log.info(
                    "%s: no viewers for %.0f s, stopping the source",
                    stream.id,
                    media.on_demand_grace,
                )
                nursery.cancel_scope.cancel()
        finally:
            # Only now is the source (and its reader thread) really gone.
            stream._set_source_running(False)
        stream.fanout.reset()


class StreamRegistry:
    """All configured streams, by id, with their supervisors."""

    def __init__(self, config: Config, changes: ChangeSignal | None = None) -> None:
        self._media = config.media
        self._streams = {s.id: Stream(s, config.media, changes) for s in config.streams}

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def __iter__(self) -> Iterator[Stream]:
        return iter(self._streams.values())

    def __len__(self) -> int:
        return len(self._streams)

    def statistics(self) -> list[StreamStatistics]:
        return [stream.statistics() for stream in self._streams.values()]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise every stream until cancelled; ready once always-on sources are starting."""
        async with trio.open_nursery() as nursery:
            for stream in self._streams.values():
                await nursery.start(supervise, stream, self._media)
            task_status.started()
            await trio.sleep_forever()
