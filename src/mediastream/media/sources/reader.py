"""The reader thread: PyAV's blocking reads in a thread of their own, handed to Trio.

One attempt to read a source runs one thread; this module is the handshake between that
thread and the Trio task that starts and stops it. What the thread reads (PyAV) is in
``demux.py``; this module knows nothing of PyAV.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable
from typing import Final

import trio

from ...errors import SourceAccessDenied, SourceError
from ..frames import EncodedFrame
from ..source_contract import SourceInfo

READER_EXIT_WAIT: Final = 2.0  # seconds a stopping source waits for its reader thread


class NeedsTranscoding(Exception):
    """The source's H.264 can't be passed through as is (it has B-frames).

    Raised in the reader thread by the video converter; the attempt ends and the next one
    transcodes.
    """


@dataclasses.dataclass(frozen=True, slots=True)
class ReaderFailed:
    """The reader thread's last word: why it stopped reading."""

    reason: str
    needs_transcoding: bool = False
    access_denied: bool = False  # the camera refused the credentials or access (401/403)


#: What the reader thread hands over: what it found, then frames, and a failure last.
ReaderItem = EncodedFrame | SourceInfo | ReaderFailed
#: Hands one item to the Trio side, blocking while its channel is full.
Deliver = Callable[[ReaderItem], None]


class _HandoverStopped(Exception):
    """Raised in the reader thread by ``deliver`` once the attempt has been stopped."""


#: What handing a frame to Trio raises once the attempt has been stopped (RunFinishedError:
#: the whole Trio run is over).
_HANDOVER_STOPPED = (_HandoverStopped, trio.RunFinishedError)
#: Seconds a reader thread waiting for room in the channel sleeps between looks at ``stop``
#: (a stop also wakes it at once; this only bounds a missed wake-up).
_FULL_CHANNEL_RECHECK: Final = 0.5


class ReaderThread:
    """The handshake between one attempt's reader thread and the Trio task that stops it.

    Frames cross with one ``run_sync_soon`` callback each (no Trio task per frame, which cost
    a fifth of an idle server's CPU): the thread first takes one of ``capacity`` slots,
    blocking while all are taken, and the Trio side gives a slot back as it takes each item
    out of the channel (:meth:`items`). So at most ``capacity`` items are ever queued or in
    the channel, the channel's ``send_nowait`` never finds it full, and a Trio side slower
    than the source holds the thread back as a blocking send did (counted in
    ``full_channel_waits``).
    """

    def __init__(self, label: str, capacity: int) -> None:
        #: what the thread's log lines start with (the stream, its source without credentials)
        self.label = label
        self.capacity = capacity
        self.stop = threading.Event()
        self.exited = threading.Event()
        #: times the thread found the channel full and waited for the Trio side
        self.full_channel_waits = 0
        self._slots = threading.Semaphore(capacity)
        # Whoever takes this first decides: the thread runs, or it never will. An attempt
        # cancelled before its thread was spawned would otherwise wait for an exit that
        # never comes.
        self._claim = threading.Lock()

    def claim_for_thread(self) -> bool:
        return self._claim.acquire(blocking=False)

    def take_slot(self) -> None:
        """In the thread: wait for room in the channel; raises _HandoverStopped once stopped."""
        if not self._slots.acquire(blocking=False):
            self.full_channel_waits += 1
            while not self._slots.acquire(timeout=_FULL_CHANNEL_RECHECK):
                if self.stop.is_set():
                    raise _HandoverStopped
        if self.stop.is_set():
            raise _HandoverStopped

    def items(self, receive: trio.MemoryReceiveChannel[ReaderItem]) -> _ReaderItems:
        """The items the thread delivered, in order, each giving its slot back."""
        return _ReaderItems(receive, self._slots)

    async def stop_and_wait(self) -> bool:
        """Stop the thread and wait for it, at most READER_EXIT_WAIT; False if it is still busy."""
        self.stop.set()
        self._slots.release()  # wakes a thread waiting for room in the channel
        if self._claim.acquire(blocking=False):
            return True  # the thread never started, and now never will
        # Shielded, because this runs while the attempt is being cancelled, and bounded by the
        # wait's own timeout in the thread. A limiter of its own: the waits of many stopping
        # sources must not use up the threads Trio shares with everything else.
        with trio.CancelScope(shield=True):
            exited: bool = await trio.to_thread.run_sync(
                self.exited.wait, READER_EXIT_WAIT, limiter=trio.CapacityLimiter(1)
            )
        return exited


class _ReaderItems:
    def __init__(
        self, receive: trio.MemoryReceiveChannel[ReaderItem], slots: threading.Semaphore
    ) -> None:
        self._receive = receive
        self._slots = slots

    def __aiter__(self) -> _ReaderItems:
        return self

    async def __anext__(self) -> ReaderItem:
        try:
            item = await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
        self._slots.release()
        return item


async def run_reader_thread(
    read: Callable[[Deliver], None],
    send: trio.MemorySendChannel[ReaderItem],
    reader: ReaderThread,
) -> None:
    """Run ``read(deliver)`` in a thread of its own until it returns or ``reader.stop`` is set.

    ``read`` blocks (PyAV) and hands each item over with ``deliver``; a SourceError or
    NeedsTranscoding it raises arrives as a ReaderFailed, the last item. The receiving side
    reads them with ``reader.items(receive)``; ``send``'s buffer must hold ``reader.capacity``.

    Cancellation: abandons the thread (it notices ``reader.stop`` at its next frame or
    timeout and exits); ``reader.stop_and_wait`` waits for it.
    """
    trio_token = trio.lowlevel.current_trio_token()

    def put(item: ReaderItem) -> None:
        # In Trio's thread. Never full (see ReaderThread); closed once the attempt is over,
        # and then the item is of no use to anyone. Raising here would crash the Trio run.
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            send.send_nowait(item)

    def deliver(item: ReaderItem) -> None:
        reader.take_slot()
        trio_token.run_sync_soon(put, item)

    def in_thread() -> None:
        if not reader.claim_for_thread():
            return  # the attempt was stopped before this thread got going
        try:
            read(deliver)
        except NeedsTranscoding as exc:
            with contextlib.suppress(*_HANDOVER_STOPPED):
                deliver(ReaderFailed(str(exc), needs_transcoding=True))
        except SourceError as exc:
            with contextlib.suppress(*_HANDOVER_STOPPED):
                denied = isinstance(exc, SourceAccessDenied)
                deliver(ReaderFailed(str(exc), access_denied=denied))
        except _HANDOVER_STOPPED:
            pass  # the attempt was stopped while a frame was being handed over
        finally:
            reader.exited.set()

    async with send:
        # abandon_on_cancel: a thread stuck in FFmpeg I/O must not hold up cancellation.
        # A limiter of its own: a reader holds its thread for as long as the source runs, and
        # Trio's default limiter (40 threads, shared with the store and snapshots) would cap
        # the number of cameras and starve everything else.
        await trio.to_thread.run_sync(
            in_thread, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)
        )
