"""Rate limits for what one client may send: pure logic, the caller supplies the time."""

from __future__ import annotations


class TokenBucket:
    """Allows ``rate`` events per second on average and bursts of up to ``burst``.

    Args:
        rate: tokens added per second.
        burst: the bucket's size (and how full it starts).
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._updated = now

    def try_take(self, now: float) -> bool:
        """Take one token if there is one; False means: over the limit."""
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
