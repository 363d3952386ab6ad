"""Handing memory the server has freed back to the system (glibc's ``malloc_trim``).

Why: a server whose viewers come and go frees most of what each session allocated, but glibc's
malloc keeps freed memory in its arenas for reuse and returns to the system only what lies at
the top of a heap. aiortc's peer connections are reclaimed by the cycle collector, and what
they held outside pymalloc (OpenSSL and libsrtp state, large buffers) is freed in scattered
places, so the kept free memory, and with it the RSS, grew with every thousand sessions though
nothing leaked (docs/benchmarks.md, "Soak"). ``malloc_trim(0)`` gives back every whole free page
inside every arena (glibc ≥ 2.8). It runs in a worker thread (ctypes releases the GIL; a trim
takes milliseconds with a large heap) every :data:`TRIM_INTERVAL` seconds.

Where the C library is not glibc (musl, macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

log = logging.getLogger(__name__)

TRIM_INTERVAL: Final = 30.0  # seconds between two trims
SUMMARY_EVERY: Final = 20  # trims per INFO summary (every 10 minutes at the default interval)

MallocTrim = Callable[[int], int]


def load_malloc_trim() -> MallocTrim | None:
    """glibc's ``malloc_trim``, or None where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def resident_bytes() -> int:
    """This process's resident set size (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@dataclass(frozen=True, slots=True)
class TrimSummary:
    trims: int
    mean_seconds: float
    max_seconds: float
    released_bytes: int


class TrimTally:
    """Adds up trims (duration, bytes given back) into one summary per ``every`` trims."""

    def __init__(self, every: int) -> None:
        self._every = every
        self._reset()

    def _reset(self) -> None:
        self._trims = 0
        self._seconds = 0.0
        self._max_seconds = 0.0
        self._released = 0

    def add(self, seconds: float, released_bytes: int) -> TrimSummary | None:
        """One more trim; returns the summary when ``every`` trims have been added."""
        self._trims += 1
        self._seconds += seconds
        self._max_seconds = max(self._max_seconds, seconds)
        self._released += max(released_bytes, 0)
        if self._trims < self._every:
            return None
        summary = TrimSummary(
            self._trims, self._seconds / self._trims, self._max_seconds, self._released
        )
        self._reset()
        return summary


def trim_once(trim: MallocTrim) -> tuple[float, int]:
    """Trim the heap; returns (seconds taken, bytes of RSS given back). Blocking."""
    before = resident_bytes()
    started = time.perf_counter()
    trim(0)
    seconds = time.perf_counter() - started
    return seconds, before - resident_bytes()


async def trim_periodically(
    interval: float = TRIM_INTERVAL,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Give freed heap memory back to the system every ``interval`` seconds, until cancelled
    (returns at once where there is no ``malloc_trim``)."""
    trim = load_malloc_trim()
    task_status.started()
    if trim is None:
        log.info("not trimming the heap: the C library is not glibc")
        return
    tally = TrimTally(SUMMARY_EVERY)
    while True:
        await trio.sleep(interval)
        seconds, released = await trio.to_thread.run_sync(trim_once, trim)
        log.debug("malloc_trim: %.1f ms, %.1f MB given back", seconds * 1e3, released / 2**20)
        summary = tally.add(seconds, released)
        if summary is not None:
            log.info(
                "malloc_trim: %d trims, %.1f ms on average (at most %.1f ms), %.1f MB given back",
                summary.trims,
                summary.mean_seconds * 1e3,
                summary.max_seconds * 1e3,
                summary.released_bytes / 2**20,
            )
