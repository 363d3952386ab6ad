"""A stream's availability is one state machine; stopping or deleting it ends its viewers."""

from __future__ import annotations

import pytest

from mediastream.config import MediaConfig, stream_from_dict
from mediastream.registry import Availability, Stream


def stream() -> Stream:
    return Stream(stream_from_dict({"id": "cam", "source": "pattern:testsrc"}), MediaConfig())


def test_a_new_stream_is_available_or_stopped() -> None:
    assert stream().availability is Availability.AVAILABLE
    stopped = Stream(
        stream_from_dict({"id": "cam", "source": "pattern:testsrc"}), MediaConfig(), enabled=False
    )
    assert stopped.availability is Availability.STOPPED
    assert not stopped.enabled and stopped.unavailable == "the stream is stopped"


def test_start_stop_start_then_idle_goes_back_to_available() -> None:
    cam = stream()
    for state in (Availability.STARTED, Availability.STOPPED, Availability.STARTED):
        cam.change_availability(state)
        assert cam.availability is state
    cam.change_availability(Availability.STARTED)  # started twice: still started
    cam.change_availability(Availability.AVAILABLE)
    assert cam.enabled and cam.unavailable is None


def test_a_deleted_stream_goes_nowhere_and_says_so() -> None:
    cam = stream()
    cam.change_availability(Availability.DELETED)
    assert cam.unavailable == "the stream was deleted"
    with pytest.raises(ValueError, match='Cannot make stream "cam" started: it is deleted'):
        cam.change_availability(Availability.STARTED)


def test_a_stopped_stream_cannot_fall_idle_into_available() -> None:
    cam = stream()
    cam.change_availability(Availability.STOPPED)
    with pytest.raises(ValueError, match="it is stopped"):
        cam.change_availability(Availability.AVAILABLE)


def test_stopping_ends_every_viewer_and_only_while_it_watches() -> None:
    cam = stream()
    ended: list[tuple[str, str, str]] = []
    with cam.open_viewer(end=lambda code, why: ended.append(("first", code, why))):
        with cam.open_viewer(end=lambda code, why: ended.append(("second", code, why))):
            pass  # the second viewer left before the stop
        cam.change_availability(Availability.STOPPED)
    assert ended == [("first", "stream_unavailable", "Unavailable: the stream is stopped")]
    assert cam.viewers == 0
