"""The reader thread's hand-over to Trio: ordered, bounded, stoppable, failures last."""

from __future__ import annotations

import threading

import pytest
import trio

from mediastream.errors import SourceError
from mediastream.media.frames import EncodedFrame
from mediastream.media.sources.reader import (
    Deliver,
    NeedsTranscoding,
    ReaderFailed,
    ReaderItem,
    ReaderThread,
    run_reader_thread,
)

CAPACITY = 4


def frame(number: int) -> EncodedFrame:
    return EncodedFrame("video", number, False, (b"x",), 1)


async def _collect(read: object, reader: ReaderThread) -> list[ReaderItem]:
    send, receive = trio.open_memory_channel[ReaderItem](CAPACITY)
    items: list[ReaderItem] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reader_thread, read, send, reader)
            async with receive:
                async for item in reader.items(receive):
                    items.append(item)
                    await trio.lowlevel.checkpoint()
    return items


async def test_frames_arrive_in_order_and_the_thread_never_runs_more_than_capacity_ahead() -> None:
    reader = ReaderThread("test", CAPACITY)
    received = 0
    ahead: list[int] = []

    def read(deliver: Deliver) -> None:
        for number in range(200):
            ahead.append(number - received)  # delivered but not yet taken by the Trio side
            deliver(frame(number))

    send, receive = trio.open_memory_channel[ReaderItem](CAPACITY)
    numbers = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reader_thread, read, send, reader)
            async with receive:
                async for item in reader.items(receive):
                    assert isinstance(item, EncodedFrame)
                    numbers.append(item.timestamp)
                    received += 1
                    # A slow consumer: several scheduler rounds per frame.
                    for _ in range(3):
                        await trio.lowlevel.checkpoint()
    assert numbers == list(range(200))
    assert max(ahead) <= CAPACITY
    assert reader.full_channel_waits > 0  # the thread did have to wait
    assert reader.exited.is_set()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            SourceError("reading rtsp://cam failed: stalled"),
            ReaderFailed("reading rtsp://cam failed: stalled"),
        ),
        (NeedsTranscoding("the H.264 has B-frames"), ReaderFailed("the H.264 has B-frames", True)),
    ],
)
async def test_a_failure_arrives_last_with_its_message(
    error: Exception, expected: ReaderFailed
) -> None:
    reader = ReaderThread("test", CAPACITY)

    def read(deliver: Deliver) -> None:
        for number in range(10):
            deliver(frame(number))
        raise error

    items = await _collect(read, reader)
    assert items[:-1] == [frame(n) for n in range(10)]
    assert items[-1] == expected


async def test_stopping_releases_a_thread_waiting_for_room_in_the_channel() -> None:
    reader = ReaderThread("test", CAPACITY)
    blocked = threading.Event()

    def read(deliver: Deliver) -> None:
        for number in range(CAPACITY):
            deliver(frame(number))
        blocked.set()
        deliver(frame(CAPACITY))  # no room: waits until stopped
        raise AssertionError("delivered into a full channel")

    send, receive = trio.open_memory_channel[ReaderItem](CAPACITY)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_reader_thread, read, send, reader)
            await trio.to_thread.run_sync(blocked.wait)
            assert await reader.stop_and_wait()
            nursery.cancel_scope.cancel()
        await receive.aclose()
    assert reader.full_channel_waits == 1
