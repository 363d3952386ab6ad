"""Fan-out policies: late joiners start from the cached GOP; slow viewers skip to keyframes."""

from __future__ import annotations

from mediastream.media.fanout import Delivery, FanOut, Subscriber
from mediastream.media.frames import EncodedFrame


def frame(timestamp: int, keyframe: bool = False) -> EncodedFrame:
    return EncodedFrame("video", timestamp, keyframe, (b"x",), 1)


def drain(subscriber) -> list[int]:  # type: ignore[no-untyped-def]
    out = []
    while (item := subscriber.get_nowait()) is not None:
        out.append(item.timestamp)
    return out


def test_late_joiner_starts_with_the_gop_since_the_last_keyframe() -> None:
    fanout = FanOut("cam", queue_frames=100, gop_cache_frames=100)
    for ts, key in [(0, True), (1, False), (2, True), (3, False), (4, False)]:
        fanout.publish(frame(ts, key))
    late = fanout.subscribe()
    assert drain(late) == [2, 3, 4]
    fanout.publish(frame(5))
    assert drain(late) == [5]


def test_subscriber_before_any_keyframe_waits_for_one() -> None:
    fanout = FanOut("cam", queue_frames=100, gop_cache_frames=100)
    early = fanout.subscribe()
    fanout.publish(frame(0))
    fanout.publish(frame(1))
    assert drain(early) == []
    fanout.publish(frame(2, True))
    assert drain(early) == [2]
    # It had not started: the frames before its first keyframe are skipped, not lost.
    assert (early.dropped_frames, early.statistics().skipped_frames) == (0, 2)


def test_gop_longer_than_the_cache_is_not_replayed() -> None:
    fanout = FanOut("cam", queue_frames=100, gop_cache_frames=3)
    for ts in range(5):
        fanout.publish(frame(ts, ts == 0))
    late = fanout.subscribe()
    assert drain(late) == []
    fanout.publish(frame(5, True))
    assert drain(late) == [5]


def test_a_full_queue_skips_to_the_next_keyframe_and_counts_the_drop() -> None:
    fanout = FanOut("cam", queue_frames=3, gop_cache_frames=100)
    slow = fanout.subscribe()
    fast = fanout.subscribe()
    fanout.publish(frame(0, True))
    assert drain(slow) == [0]  # it played, then stopped reading
    for ts in range(1, 6):
        fanout.publish(frame(ts))
        drain(fast)
    # After 3 frames it dropped its queue and waits for a keyframe.
    assert drain(slow) == []
    assert slow.statistics().waiting_for_keyframe
    fanout.publish(frame(6, True))
    fanout.publish(frame(7))
    assert drain(slow) == [6, 7]
    assert slow.dropped_frames == 5  # 1-3 flushed, 4 overflowed, 5 while waiting
    assert fast.dropped_frames == 0
    assert fanout.statistics().dropped_frames == 5


def test_overflow_on_a_keyframe_restarts_from_that_keyframe() -> None:
    fanout = FanOut("cam", queue_frames=2, gop_cache_frames=100)
    sub = fanout.subscribe()
    fanout.publish(frame(0, True))
    fanout.publish(frame(1))
    fanout.publish(frame(2, True))
    assert drain(sub) == [2]
    assert not sub.statistics().waiting_for_keyframe


def test_wakeup_runs_once_per_frame_queued() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    sub = fanout.subscribe()
    woken = []
    sub.set_wakeup(lambda: woken.append(1))
    fanout.publish(frame(0))  # waiting for a keyframe: not queued, no wakeup
    fanout.publish(frame(1, True))
    fanout.publish(frame(2))
    assert len(woken) == 2


def test_unsubscribed_viewer_gets_nothing_more_and_is_closed() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    sub = fanout.subscribe()
    fanout.publish(frame(0, True))
    fanout.unsubscribe(sub)
    fanout.publish(frame(1))
    assert sub.closed and drain(sub) == []
    assert fanout.subscriber_count == 0
    fanout.unsubscribe(sub)  # idempotent


def test_reset_forgets_the_gop() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    fanout.publish(frame(0, True))
    fanout.reset()
    assert drain(fanout.subscribe()) == []


def test_statistics_count_published_frames_and_bytes() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    fanout.publish(frame(0, True))
    fanout.publish(frame(1))
    stats = fanout.statistics()
    assert (stats.published_frames, stats.published_bytes, stats.gop_frames) == (2, 2, 2)


def test_video_and_audio_subscribers_each_get_only_their_kind() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    video = fanout.subscribe("video")
    audio = fanout.subscribe("audio")
    fanout.publish(frame(0, True))
    fanout.publish(EncodedFrame("audio", 160, True, (b"a",), 1))
    fanout.publish(frame(1))
    assert drain(video) == [0, 1]
    assert drain(audio) == [160]
    assert fanout.subscriber_count == 2


def test_catch_up_goes_out_in_bursts_refilled_at_the_rate() -> None:
    from mediastream.media.fanout import CatchUpPacer

    pacer = CatchUpPacer(rate=1000, burst=500)  # bytes per second, bytes back to back
    assert pacer.ready(10.0)
    pacer.spend(300)
    assert pacer.ready(10.0)
    pacer.spend(300)  # the last frame of a burst may overdraw it...
    assert not pacer.ready(10.0)
    assert not pacer.ready(10.1)  # ...which the time that passes pays back first
    assert pacer.ready(10.2)


def test_time_that_passed_refills_the_budget_but_never_beyond_the_burst() -> None:
    from mediastream.media.fanout import CatchUpPacer

    pacer = CatchUpPacer(rate=1000, burst=300)
    assert pacer.ready(10.0)
    pacer.spend(300)
    assert not pacer.ready(10.0)
    # A wake-up that came late (a busy server) brings what the time earned, at most a burst.
    assert pacer.ready(99.0)
    pacer.spend(299)
    assert pacer.ready(99.0)
    pacer.spend(1)
    assert not pacer.ready(99.0)


def test_a_viewer_a_whole_gop_behind_skips_to_the_new_keyframe() -> None:
    fanout = FanOut("cam", queue_frames=100, gop_cache_frames=100)
    behind = fanout.subscribe()  # never read, as a viewer still connecting
    for ts in range(6):
        fanout.publish(frame(ts, ts in (0, 3)))
    assert drain(behind) == [3, 4, 5]
    # Joining is not losing: the frames a connecting viewer never needed are skips.
    assert (behind.dropped_frames, behind.statistics().skipped_frames) == (0, 3)
    assert not behind.statistics().waiting_for_keyframe
    for ts in range(6, 9):
        fanout.publish(frame(ts, ts == 8))  # it played, then fell a whole GOP behind
    assert drain(behind) == [8]
    assert (behind.dropped_frames, fanout.statistics().dropped_frames) == (2, 2)


class FakeTransport:
    """A viewer's sender whose socket is full while ``blocked``."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.blocked = False
        self.gone = False

    def ready(self) -> bool:
        if self.gone:
            raise ConnectionError("gone")
        return not self.blocked

    def send(self, frame: EncodedFrame) -> None:
        self.sent.append(frame.timestamp)


def live_viewer(fanout: FanOut) -> tuple[Subscriber, FakeTransport, list[int]]:
    viewer = fanout.subscribe()
    transport = FakeTransport()
    woken: list[int] = []
    viewer.set_wakeup(lambda: woken.append(1))
    fanout.publish(frame(0, True))
    assert drain(viewer) == [0]
    viewer.set_transport(transport)
    woken.clear()
    return viewer, transport, woken


def test_a_live_viewer_gets_each_frame_synchronously_through_its_transport() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    viewer, transport, woken = live_viewer(fanout)
    assert viewer.offer(frame(1)) is Delivery.SENT
    fanout.publish(frame(2))
    assert transport.sent == [1, 2] and viewer.queued_frames == 0 and not woken


def test_a_full_socket_queues_frames_for_the_drainer_then_drops_to_a_keyframe() -> None:
    fanout = FanOut("cam", queue_frames=3, gop_cache_frames=100)
    viewer, transport, woken = live_viewer(fanout)
    transport.blocked = True  # the socket returned EAGAIN: nothing more goes out for now
    assert [viewer.offer(frame(ts)) for ts in (1, 2, 3)] == [Delivery.QUEUED] * 3
    assert len(woken) == 3 and transport.sent == []  # the drainer is woken for each
    # Still blocked and the queue is full: the same policy as a slow catch-up.
    assert viewer.offer(frame(4)) is Delivery.DROPPED
    assert viewer.offer(frame(5)) is Delivery.DROPPED
    assert viewer.statistics().waiting_for_keyframe and viewer.dropped_frames == 5
    transport.blocked = False
    assert viewer.offer(frame(6, True)) is Delivery.QUEUED  # the drainer sends it
    assert drain(viewer) == [6]
    assert viewer.offer(frame(7)) is Delivery.SENT


def test_a_transport_that_fails_is_dropped_and_frames_queue_again() -> None:
    fanout = FanOut("cam", queue_frames=10, gop_cache_frames=10)
    viewer, transport, _ = live_viewer(fanout)
    transport.gone = True
    assert viewer.offer(frame(1)) is Delivery.QUEUED
    transport.gone = False
    assert viewer.offer(frame(2)) is Delivery.QUEUED  # no transport until the drainer says so
    assert transport.sent == [] and drain(viewer) == [1, 2]


def test_a_subscriber_moved_to_another_fanout_starts_at_its_cached_keyframe() -> None:
    main = FanOut("cam/main", queue_frames=100, gop_cache_frames=100)
    sub = FanOut("cam/sub", queue_frames=100, gop_cache_frames=100)
    sub.publish(frame(0, True))
    viewer = sub.subscribe()
    woken = []
    viewer.set_wakeup(lambda: woken.append(1))
    sub.publish(frame(1))
    assert drain(viewer) == [0, 1]
    sub.publish(frame(2))  # left in its queue: the old quality's backlog is dropped
    for ts, key in [(100, False), (101, True), (102, False)]:
        main.publish(frame(ts, key))
    main.adopt(viewer)
    assert woken  # its drainer is told to send the new GOP
    assert drain(viewer) == [101, 102]  # keyframe first: never a P-frame without it
    sub.publish(frame(3))
    main.publish(frame(103))
    assert drain(viewer) == [103]
    assert (sub.subscriber_count, main.subscriber_count) == (0, 1)


def test_a_subscriber_moved_to_a_fanout_with_no_keyframe_waits_for_one() -> None:
    main = FanOut("cam/main", queue_frames=100, gop_cache_frames=100)
    sub = FanOut("cam/sub", queue_frames=100, gop_cache_frames=100)
    sub.publish(frame(0, True))
    viewer = sub.subscribe()
    drain(viewer)
    main.adopt(viewer)
    main.publish(frame(50))
    assert drain(viewer) == []
    main.publish(frame(51, True))
    assert drain(viewer) == [51]


def test_timestamps_stay_continuous_across_a_move() -> None:
    from mediastream.media.fanout import ContinuousTimestamps

    now = [10.0]
    timestamps = ContinuousTimestamps(clock=lambda: now[0])
    placed = [timestamps.place(ts) for ts in (0, 3600, 7200)]
    assert placed == [0, 3600, 7200]
    now[0] += 0.5  # the switch comes 0.5 s after the last frame sent
    # The new quality's cached GOP: keyframe at 900_000, newest frame at 903_600.
    timestamps.rebase(903_600)
    gop = [timestamps.place(ts) for ts in (900_000, 901_800, 903_600)]
    assert gop == [48_600, 50_400, 52_200]  # the newest lands 0.5 s on, the GOP before it
    now[0] += 0.04
    assert timestamps.place(907_200) == 52_200 + 3600  # live: real time again
    # A GOP longer than the pause: what would fall before the last frame sent is squeezed.
    now[0] += 0.04
    timestamps.rebase(2_000_000)
    assert [timestamps.place(ts) for ts in (1_000_000, 2_000_000)] == [55_801, 55_800 + 3600]
