"""Slow peer closes are reported once per interval, with how many were folded in."""

from __future__ import annotations

from mediastream.webrtc.bridge import OverrunReport, OverrunSummary


def test_the_first_slow_close_is_reported_and_a_burst_folds_into_the_next_report() -> None:
    report = OverrunReport(interval=60)
    assert report.add("cam#a", now=100) == OverrunSummary("cam#a", others=0, seconds=0)
    assert [report.add(f"cam#{n}", now=100 + n) for n in range(1, 6)] == [None] * 5
    assert report.add("cam#late", now=160) == OverrunSummary("cam#late", others=5, seconds=60)
    # A quiet interval later: reported at once again, nothing folded in.
    assert report.add("cam#z", now=400) == OverrunSummary("cam#z", others=0, seconds=240)
