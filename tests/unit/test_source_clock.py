"""Source timestamps to RTP ticks in integers, exactly as the Fraction arithmetic did."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from mediastream.media.sources.timeline import scale_timestamp

TIME_BASES = [
    Fraction(1, 90_000),  # RTSP video
    Fraction(1, 1000),  # FLV, Matroska
    Fraction(1, 12_800),  # MP4 at 25 fps
    Fraction(1001, 30_000),  # NTSC frame durations
    Fraction(1, 48_000),  # Opus
    Fraction(1, 8000),  # G.711
    Fraction(1, 44_100),
    Fraction(3, 7),  # nothing divides anything
]
CLOCK_RATES = [90_000, 48_000, 8000]
VALUES = [
    0,
    1,
    -1,  # FFmpeg's pre-roll
    -1001,
    3599,
    2**31 - 1,
    2**32,  # an RTP timestamp's wrap
    2**33 - 1,  # MPEG-TS's 33-bit wrap
    2**33,
    2**63 - 1,  # AV_NOPTS_VALUE's neighbour: still exact, Python ints don't overflow
    -(2**63),
    *range(-50, 50, 7),
    *range(10**9, 10**9 + 100, 13),
]


@pytest.mark.parametrize("time_base", TIME_BASES, ids=str)
@pytest.mark.parametrize("clock_rate", CLOCK_RATES)
def test_integer_scaling_equals_the_fraction_arithmetic(
    time_base: Fraction, clock_rate: int
) -> None:
    for value in VALUES:
        expected = math.floor(value * time_base * clock_rate)
        assert scale_timestamp(value, time_base, clock_rate) == expected, value


def test_a_restarted_source_keeps_the_same_ticks() -> None:
    # A camera reconnects and starts counting from zero again: same ticks as the first time.
    time_base = Fraction(1, 12_800)
    first = [scale_timestamp(pts, time_base, 90_000) for pts in range(0, 12_800, 512)]
    again = [scale_timestamp(pts, time_base, 90_000) for pts in range(0, 12_800, 512)]
    assert first == again == [math.floor(p * time_base * 90_000) for p in range(0, 12_800, 512)]
