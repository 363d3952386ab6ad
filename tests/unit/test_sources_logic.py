"""The pure parts of running a source: backoff, the continuous timeline, redaction."""

from __future__ import annotations

import pytest

from mediastream.config import SourceSpec
from mediastream.media.sources import _Timeline, backoff_delay, describe_source
from mediastream.redact import redact_text, redact_url


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap_with_bounded_jitter() -> None:
    for failures, base in [(1, 1), (2, 2), (3, 4), (4, 8), (5, 16), (6, 30), (20, 30)]:
        for _ in range(50):
            delay = backoff_delay(failures, 1.0, 30.0)
            assert base <= delay <= min(base * 1.2, 30.0)


def test_no_failures_no_delay() -> None:
    assert backoff_delay(0, 1.0, 30.0) == 0


def test_backoff_jitter_actually_varies() -> None:
    assert len({backoff_delay(3, 1.0, 30.0) for _ in range(20)}) > 1


def test_timeline_is_continuous_across_a_live_source_restart() -> None:
    timeline = _Timeline()
    assert timeline.place(1000, now=0.0, paced=False) == 0
    assert timeline.place(4600, now=0.04, paced=False) == 3600
    timeline.new_attempt()
    # The camera came back 2 s later, its clock restarted from zero.
    restarted = timeline.place(0, now=2.04, paced=False)
    assert restarted == 3600 + 2 * 90_000
    assert timeline.place(3600, now=2.08, paced=False) == restarted + 3600


def test_timeline_of_a_looping_file_continues_one_frame_later() -> None:
    timeline = _Timeline()
    timeline.place(0, now=0, paced=True)
    timeline.place(3600, now=0.04, paced=True)
    timeline.new_attempt()
    assert timeline.place(0, now=0.5, paced=True) == 7200


def test_timeline_never_goes_backwards() -> None:
    timeline = _Timeline()
    timeline.place(9000, now=0, paced=False)
    assert timeline.place(100, now=0.01, paced=False) == 1


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("rtsp://admin:hunter2@10.0.0.5:554/s1", "rtsp://***@10.0.0.5:554/s1"),
        ("rtsp://admin@10.0.0.5/s1", "rtsp://***@10.0.0.5/s1"),
        (
            "rtsp://10.0.0.5/cam?channel=1&user=admin&password=hunter2",
            "rtsp://10.0.0.5/cam?channel=1&user=***&password=***",
        ),
        ("rtsp://10.0.0.5/plain", "rtsp://10.0.0.5/plain"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_removes_userinfo_of_urls_inside_messages() -> None:
    text = "Server returned 401 for 'rtsp://admin:hunter2@cam/x' and http://u:p@h/"
    assert redact_text(text) == "Server returned 401 for 'rtsp://***@cam/x' and http://***@h/"


def test_describe_source_hides_credentials() -> None:
    spec = SourceSpec(kind="rtsp", location="rtsp://admin:hunter2@cam/x")
    assert "hunter2" not in describe_source(spec)
