"""The heap trimmer: its tally, and that glibc's malloc_trim really gives freed memory back."""

from __future__ import annotations

import ctypes

import pytest

from mediastream.memory import TrimTally, load_malloc_trim, resident_bytes, trim_once


def test_the_tally_summarizes_every_n_trims_then_starts_afresh() -> None:
    tally = TrimTally(every=3)
    assert tally.add(0.002, 10) is None
    assert tally.add(0.004, -5) is None  # RSS grew meanwhile: nothing given back, not less
    summary = tally.add(0.003, 20)
    assert summary is not None
    assert (summary.trims, summary.released_bytes) == (3, 30)
    assert summary.mean_seconds == pytest.approx(0.003)
    assert summary.max_seconds == pytest.approx(0.004)
    assert tally.add(0.001, 1) is None  # a new round


def test_malloc_trim_gives_back_freed_memory_below_the_top_of_the_heap() -> None:
    trim = load_malloc_trim()
    if trim is None:
        pytest.skip("the C library is not glibc")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    # 64 MB in 4 KB blocks (under the mmap threshold: they come from the heap), touched so
    # they are resident, then one block above them that stays: malloc itself can't shrink
    # the heap past it, so the freed blocks stay resident until trimmed.
    blocks = [libc.malloc(4096) for _ in range(16_384)]
    for block in blocks:
        ctypes.memset(block, 1, 4096)
    pin = libc.malloc(4096)
    try:
        for block in blocks:
            libc.free(block)
        kept = resident_bytes()
        _, released = trim_once(trim)
        assert released > 32 * 2**20, (kept, released)
    finally:
        libc.free(pin)
