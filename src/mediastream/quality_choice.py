"""Which quality a viewer should get: pure logic, no I/O, clock injected.

The page says what it wants (a quality pinned by name, or ``auto``) and where the stream is
shown (its tile's rendered size in device pixels, whether it is visible); the viewer's network
can veto. :func:`choose_quality` decides, :class:`NetworkVeto` keeps the network's part.

Rules (``auto``):

- no tile reported yet: the stream's default quality;
- a tile nobody can see: the smallest quality;
- otherwise the smallest quality that covers the tile (its width and height both at least the
  tile's), walking from the smallest up; a quality never read yet has no known size and is
  taken when the ones below it don't cover (qualities are listed best first, so it is the best
  guess; once read, its size is known and the choice is made again); nothing covers: the best;
- the network veto: a quality whose measured bitrate the viewer's link could not carry is
  passed over for the next smaller one.

A pinned quality is what the page asked for, network or not (the page pinned it on purpose).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .config import AUTO_QUALITY
from .protocol import Tile

#: How long the bandwidth estimate must stay below what the viewer plays before it is moved
#: down (seconds): one low report is noise.
DOWN_AFTER: Final = 2.0
#: How long it must stay above a vetoed bitrate (times :data:`UP_HEADROOM`) before the veto
#: is lifted (seconds).
UP_AFTER: Final = 4.0
UP_HEADROOM: Final = 1.2
#: A receiver's estimate can't rise much above what it receives, so a viewer moved down may
#: never report enough to come back: the veto is lifted on trial after this long (seconds),
#: doubled each time the trial fails soon after, up to :data:`RETRY_MAX`.
RETRY_FIRST: Final = 15.0
RETRY_MAX: Final = 120.0
ESTIMATES_KEPT: Final = 64  # bandwidth reports remembered (about a minute of REMB)


@dataclass(frozen=True, slots=True)
class QualityOption:
    """One quality as the choice sees it; 0 where not known yet (never read)."""

    name: str
    width: int = 0
    height: int = 0
    bitrate: int = 0  # bits per second

    def covers(self, tile: Tile) -> bool:
        return self.width >= tile.width and self.height >= tile.height


@dataclass(frozen=True, slots=True)
class Choice:
    name: str
    #: why: "pinned", "default" (no tile yet), "hidden", "tile", "network"
    reason: str


def choose_quality(
    options: list[QualityOption],
    *,
    requested: str,
    tile: Tile | None,
    default: str,
    veto: NetworkVeto | None = None,
) -> Choice:
    """The quality for one viewer (``options`` best first, never empty).

    Raises:
        KeyError: ``requested`` is neither ``"auto"`` nor one of ``options``.
    """
    names = [option.name for option in options]
    if requested != AUTO_QUALITY:
        if requested not in names:
            raise KeyError(requested)
        return Choice(requested, "pinned")
    if tile is None:
        wanted, reason = names.index(default), "default"
    elif not tile.visible:
        wanted, reason = len(options) - 1, "hidden"
    else:
        wanted, reason = 0, "tile"
        for index in range(len(options) - 1, -1, -1):
            option = options[index]
            if option.width == 0 or option.covers(tile):
                wanted = index
                break
    if veto is not None:
        for index in range(wanted, len(options)):
            if veto.allows(options[index].bitrate) or index == len(options) - 1:
                if index != wanted:
                    return Choice(names[index], "network")
                break
    return Choice(names[wanted], reason)


class NetworkVeto:
    """One viewer's bandwidth estimates (REMB), and the bitrate its link was found unable to
    carry (the *ceiling*: qualities at or above it are vetoed).

    The ceiling is set when the estimate stays below the bitrate of the quality being played
    for :data:`DOWN_AFTER` without rising; it is lifted when the estimate stays above it (with
    headroom) for :data:`UP_AFTER`, or on trial after a retry delay (see :data:`RETRY_FIRST`).

    "Without rising" matters: a receiver's estimate can't be much above what it has been
    receiving, and grows by a few percent a second (REMB's AIMD rate control), so right after
    a move up it is below the new quality's bitrate for a while although the link is fine (in
    Chromium a move to main was vetoed within 2 s, then retried 15 s later). A congested link
    makes the estimate fall (overuse detected); a short one keeps it flat and low.
    """

    def __init__(self) -> None:
        self._estimates: collections.deque[tuple[float, int]] = collections.deque(
            maxlen=ESTIMATES_KEPT
        )
        self.ceiling: int | None = None
        self._ceiling_since = 0.0
        self._retry_delay = RETRY_FIRST
        self._lifted_at: float | None = None

    @property
    def latest(self) -> int | None:
        """The last estimate reported (bits per second), if any."""
        return self._estimates[-1][1] if self._estimates else None

    def add(self, bitrate: int, now: float) -> None:
        """One bandwidth estimate from the viewer (bits per second)."""
        self._estimates.append((now, bitrate))

    def allows(self, bitrate: int) -> bool:
        """Whether a quality of ``bitrate`` (0: not measured yet) may be played."""
        return self.ceiling is None or bitrate == 0 or bitrate < self.ceiling

    def update(self, playing_bitrate: int, now: float) -> bool:
        """Set or lift the ceiling given what is played now; returns whether it changed."""
        if self.ceiling is None:
            if (
                playing_bitrate
                and self._stayed(now, DOWN_AFTER, lambda e: e < playing_bitrate)
                and not self._rose(now, DOWN_AFTER)
            ):
                self.ceiling, self._ceiling_since = playing_bitrate, now
                if self._lifted_at is not None and now - self._lifted_at < 2 * RETRY_FIRST:
                    self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)  # the trial failed
                return True
            return False
        ceiling = self.ceiling
        enough = self._stayed(now, UP_AFTER, lambda e: e >= ceiling * UP_HEADROOM)
        if enough or now - self._ceiling_since >= self._retry_delay:
            if enough:
                self._retry_delay = RETRY_FIRST
            self.ceiling, self._lifted_at = None, now
            return True
        return False

    def next_check(self, now: float) -> float:
        """Seconds until :meth:`update` may change something with no new estimate."""
        if self.ceiling is not None:
            return max(0.1, self._ceiling_since + self._retry_delay - now)
        return math.inf  # only a new estimate can set a ceiling

    def _rose(self, now: float, seconds: float) -> bool:
        """Whether the estimate is higher now than when the last ``seconds`` began."""
        at_start: int | None = None
        for at, estimate in self._estimates:
            if at < now - seconds:
                at_start = estimate
        return at_start is not None and bool(self._estimates) and self._estimates[-1][1] > at_start

    def _stayed(self, now: float, seconds: float, holds: Callable[[int], bool]) -> bool:
        """Whether the estimate held all through the last ``seconds``: the one in force when
        they began (so they are covered) and every one since."""
        in_force: int | None = None
        since: list[int] = []
        for at, estimate in self._estimates:
            if at < now - seconds:
                in_force = estimate
            else:
                since.append(estimate)
        return in_force is not None and holds(in_force) and all(map(holds, since))
