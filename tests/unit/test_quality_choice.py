"""Which quality a viewer gets: its page's request, its tile, its network."""

from __future__ import annotations

import pytest

from mediastream.protocol import Tile
from mediastream.quality_choice import (
    DOWN_AFTER,
    RETRY_FIRST,
    UP_AFTER,
    NetworkVeto,
    QualityOption,
    choose_quality,
)

MAIN = QualityOption("main", 1920, 1080, 4_000_000)
MID = QualityOption("mid", 1280, 720, 1_500_000)
SUB = QualityOption("sub", 640, 360, 500_000)
OPTIONS = [MAIN, MID, SUB]


def choose(tile: Tile | None, requested: str = "auto", veto: NetworkVeto | None = None) -> str:
    choice = choose_quality(OPTIONS, requested=requested, tile=tile, default="mid", veto=veto)
    return f"{choice.name} ({choice.reason})"


@pytest.mark.parametrize(
    ("tile", "expected"),
    [
        (None, "mid (default)"),
        (Tile(320, 180), "sub (tile)"),
        (Tile(640, 360), "sub (tile)"),
        (Tile(641, 360), "mid (tile)"),
        (Tile(1280, 300), "mid (tile)"),
        (Tile(1920, 1080), "main (tile)"),
        (Tile(3840, 2160), "main (tile)"),  # nothing covers it: the best there is
        (Tile(3840, 2160, visible=False), "sub (hidden)"),
    ],
)
def test_auto_takes_the_smallest_quality_covering_the_tile(
    tile: Tile | None, expected: str
) -> None:
    assert choose(tile) == expected


def test_a_pinned_quality_is_kept_whatever_the_tile_and_network() -> None:
    veto = NetworkVeto()
    veto.ceiling = 1
    assert choose(Tile(100, 100), requested="main", veto=veto) == "main (pinned)"
    with pytest.raises(KeyError):
        choose(None, requested="hd")


def test_a_quality_never_read_is_taken_when_the_smaller_ones_do_not_cover() -> None:
    options = [QualityOption("main"), QualityOption("sub", 640, 360, 500_000)]
    pick = choose_quality(options, requested="auto", tile=Tile(1280, 720), default="main")
    assert pick.name == "main"
    pick = choose_quality(options, requested="auto", tile=Tile(320, 180), default="main")
    assert pick.name == "sub"
    # Both unknown: the smallest listed, until it is read and its size is known.
    unknown = [QualityOption("main"), QualityOption("sub")]
    assert choose_quality(unknown, requested="auto", tile=Tile(1, 1), default="main").name == "sub"


def reports(veto: NetworkVeto, bitrate: int, start: float, end: float) -> None:
    at = start
    while at <= end:
        veto.add(bitrate, at)
        at += 0.5


def test_an_estimate_that_stays_low_vetoes_the_quality_played_and_a_high_one_lifts_it() -> None:
    veto = NetworkVeto()
    reports(veto, 10_000_000, 0, 3)
    assert not veto.update(MAIN.bitrate, 3)
    reports(veto, 2_000_000, 3.5, 3.5 + DOWN_AFTER / 2)
    assert not veto.update(MAIN.bitrate, 3.5 + DOWN_AFTER / 2)  # not for long enough yet
    now = 3.5 + DOWN_AFTER + 0.5
    reports(veto, 2_000_000, 3.5 + DOWN_AFTER / 2 + 0.5, now)
    assert veto.update(MAIN.bitrate, now)
    assert veto.ceiling == MAIN.bitrate
    assert choose(Tile(1920, 1080), veto=veto) == "mid (network)"
    # Back up once the estimate stayed above the ceiling (with headroom) long enough.
    later = now + UP_AFTER + 1
    reports(veto, 6_000_000, now + 0.5, later)
    assert veto.update(MID.bitrate, later)
    assert veto.ceiling is None
    assert choose(Tile(1920, 1080), veto=veto) == "main (tile)"


def test_the_veto_is_lifted_on_trial_when_no_estimate_can_show_more() -> None:
    veto = NetworkVeto()
    reports(veto, 1_000_000, 0, DOWN_AFTER + 1)
    assert veto.update(MAIN.bitrate, DOWN_AFTER + 1)
    assert veto.next_check(DOWN_AFTER + 1) == pytest.approx(RETRY_FIRST)
    assert not veto.update(MID.bitrate, DOWN_AFTER + 2)
    assert veto.update(MID.bitrate, DOWN_AFTER + 1 + RETRY_FIRST)
    assert veto.ceiling is None


def test_an_estimate_still_rising_after_a_move_up_is_no_veto() -> None:
    # Moved up from MID: the receiver's estimate climbs a few percent a second from what it
    # received, below MAIN's bitrate for a while, on a link that is fine.
    veto = NetworkVeto()
    for step in range(10):
        veto.add(int(1_500_000 * 1.08**step), step * 0.5)
    assert not veto.update(MAIN.bitrate, 4.5)
    assert veto.ceiling is None
    # Falling (the link is congested): vetoed.
    for step in range(10, 16):
        veto.add(1_500_000 - step * 10_000, step * 0.5)
    assert veto.update(MAIN.bitrate, 7.5)


def test_no_estimate_no_veto() -> None:
    veto = NetworkVeto()
    assert not veto.update(MAIN.bitrate, 100)
    assert choose(Tile(1920, 1080), veto=veto) == "main (tile)"
    assert veto.allows(MAIN.bitrate)
