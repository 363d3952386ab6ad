"""Fan-out policies: late joiners start from the cached GOP; slow viewers skip to keyframes."""

from __future__ import annotations

from mediastream.media.fanout import FanOut
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
    assert early.dropped_frames == 2


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
    for ts in range(1, 6):
        fanout.publish(frame(ts))
        drain(fast)
    # slow never read: after 3 frames it dropped its queue and waits for a keyframe.
    assert drain(slow) == []
    assert slow.statistics().waiting_for_keyframe
    fanout.publish(frame(6, True))
    fanout.publish(frame(7))
    assert drain(slow) == [6, 7]
    assert slow.dropped_frames == 6  # 0-2 flushed, 3 overflowed, 4-5 skipped
    assert fast.dropped_frames == 0


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
    assert behind.dropped_frames == 3
    assert not behind.statistics().waiting_for_keyframe
