"""The pure parts of running a source: backoff, the continuous timeline, redaction."""

from __future__ import annotations

import pytest
import trio

from mediastream.config import SourceSpec, config_from_dict
from mediastream.media.sources import (
    READER_EXIT_WAIT,
    SourceState,
    backoff_delay,
    describe_source,
    run_source,
)
from mediastream.media.sources.timeline import Timeline
from mediastream.redact import redact_text, redact_url


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap_with_bounded_jitter() -> None:
    for failures, base in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (20, 30)]:
        for _ in range(50):
            delay = backoff_delay(failures, 1.0, 30.0)
            assert base <= delay <= min(base * 1.2, 30.0)


def test_no_failures_no_delay() -> None:
    assert backoff_delay(0, 1.0, 30.0) == 0


def test_backoff_jitter_actually_varies() -> None:
    assert len({backoff_delay(3, 1.0, 30.0) for _ in range(20)}) > 1


def test_timeline_is_continuous_across_a_live_source_restart() -> None:
    timeline = Timeline()
    assert timeline.place(1000, now=0.0, paced=False) == 0
    assert timeline.place(4600, now=0.04, paced=False) == 3600
    timeline.new_attempt()
    # The camera came back 2 s later, its clock restarted from zero.
    restarted = timeline.place(0, now=2.04, paced=False)
    assert restarted == 3600 + 2 * 90_000
    assert timeline.place(3600, now=2.08, paced=False) == restarted + 3600


def test_timeline_of_a_looping_file_continues_one_frame_later() -> None:
    timeline = Timeline()
    timeline.place(0, now=0, paced=True)
    timeline.place(3600, now=0.04, paced=True)
    timeline.new_attempt()
    assert timeline.place(0, now=0.5, paced=True) == 7200


def test_a_timeline_that_followed_relayed_frames_continues_after_them() -> None:
    # A replica published the owner's frames (up to 900 000); promoted to owner, it reads
    # the camera itself 1.5 s later: its first frame follows, as after a reconnect.
    timeline = Timeline()
    timeline.follow(896_400, now=10.0)
    timeline.follow(900_000, now=10.04)
    timeline.follow(3600, now=10.05)  # an older frame (another quality's rebase): ignored
    timeline.new_attempt()
    assert timeline.place(0, now=11.54, paced=False) == 900_000 + 135_000


def test_timeline_never_goes_backwards() -> None:
    timeline = Timeline()
    timeline.place(9000, now=0, paced=False)
    assert timeline.place(100, now=0.01, paced=False) == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/s1", "rtsp://***@10.0.0.5:554/s1"),
        ("rtsp://admin@10.0.0.5/s1", "rtsp://***@10.0.0.5/s1"),
        (
            "rtsp://10.0.0.5/cam?channel=1&user=admin&password=hunter2",
            "rtsp://10.0.0.5/cam?channel=1&user=***&password=***",
        ),
        ("rtsp://10.0.0.5/plain", "rtsp://10.0.0.5/plain"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_removes_userinfo_of_urls_inside_messages() -> None:
    text = "Server returned 401 for 'rtsp://admin:hunter2@cam/x' and http://u:p@h/"
    assert redact_text(text) == "Server returned 401 for 'rtsp://***@cam/x' and http://***@h/"


def test_describe_source_hides_credentials() -> None:
    spec = SourceSpec(kind="rtsp", location="rtsp://admin:hunter2@cam/x")
    assert "hunter2" not in describe_source(spec)


class _NullSink:
    def __init__(self) -> None:
        self.states: list[SourceState] = []
        self.published = trio.Event()

    def publish(self, frame: object) -> None:
        self.published.set()

    def source_state(self, state: SourceState, detail: str | None = None) -> None:
        self.states.append(state)

    def source_restarted(self) -> None:
        pass

    def source_opened(self, info: object) -> None:
        pass


async def test_a_source_stopped_before_its_reader_thread_started_stops_at_once() -> None:
    # Cancelled right after starting: the reader thread is never spawned, so stopping must
    # not wait for that thread to say it has exited.
    config = config_from_dict({"streams": [{"id": "s", "source": "pattern:testsrc"}]})
    sink = _NullSink()
    with trio.fail_after(READER_EXIT_WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_source, config.streams[0], config.media, sink)
            nursery.cancel_scope.cancel()
    assert sink.states == [SourceState.STARTING, SourceState.STOPPED]


async def test_a_source_runs_and_stops_while_trios_shared_worker_threads_are_all_busy() -> None:
    # The store and snapshots share Trio's default thread limiter; a camera must not need it.
    shared_threads = trio.to_thread.current_default_thread_limiter()
    shared_threads.total_tokens = 1
    config = config_from_dict({"streams": [{"id": "s", "source": "pattern:testsrc"}]})
    sink = _NullSink()
    async with shared_threads:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(run_source, config.streams[0], config.media, sink)
                await sink.published.wait()
                nursery.cancel_scope.cancel()
    assert sink.states == [SourceState.STARTING, SourceState.LIVE, SourceState.STOPPED]
