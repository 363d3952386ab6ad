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

from ...errors import SourceError
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


#: What the reader thread hands over: what it found, then frames, and a failure last.
ReaderItem = EncodedFrame | SourceInfo | ReaderFailed
#: Hands one item to the Trio side, blocking while its channel is full.
Deliver = Callable[[ReaderItem], None]
#: What handing a frame to Trio raises once the attempt has been stopped.
_HANDOVER_STOPPED = (trio.Cancelled, trio.RunFinishedError, trio.BrokenResourceError)


class ReaderThread:
    """The handshake between one attempt's reader thread and the Trio task that stops it."""

    def __init__(self, label: str) -> None:
        #: what the thread's log lines start with (the stream, its source without credentials)
        self.label = label
        self.stop = threading.Event()
        self.exited = threading.Event()
        # Whoever takes this first decides: the thread runs, or it never will. An attempt
        # cancelled before its thread was spawned would otherwise wait for an exit that
        # never comes.
        self._claim = threading.Lock()

    def claim_for_thread(self) -> bool:
        return self._claim.acquire(blocking=False)

    async def stop_and_wait(self) -> bool:
        """Stop the thread and wait for it, at most READER_EXIT_WAIT; False if it is still busy."""
        self.stop.set()
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


async def run_reader_thread(
    read: Callable[[Deliver], None],
    send: trio.MemorySendChannel[ReaderItem],
    reader: ReaderThread,
) -> None:
    """Run ``read(deliver)`` in a thread of its own until it returns or ``reader.stop`` is set.

    ``read`` blocks (PyAV) and hands each item over with ``deliver``; a SourceError or
    NeedsTranscoding it raises arrives as a ReaderFailed, the last item.

    Cancellation: abandons the thread (it notices ``reader.stop``, or a failed delivery, and
    exits at its next frame or timeout); ``reader.stop_and_wait`` waits for it.
    """

    def deliver(item: ReaderItem) -> None:
        trio.from_thread.run(send.send, item)

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
                deliver(ReaderFailed(str(exc)))
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
