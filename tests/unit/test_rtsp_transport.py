"""Which RTSP transport a camera is asked for, and what its refusals and statuses are called.

FFmpeg is replaced by a fake ``av.open`` that raises what the real one raised against the
GStreamer test camera (see tests/integration/test_rtsp_cameras.py for the real thing).
"""

from __future__ import annotations

import errno
import threading
from typing import Any

import av
import pytest

from mediastream.config import MediaConfig, SourceSpec, config_from_dict
from mediastream.errors import SourceError
from mediastream.media.sources import rtsp
from mediastream.media.sources.demux import ffmpeg_reason
from mediastream.media.sources.rtsp import (
    RtspTransportMemory,
    open_rtsp,
    rtsp_refusal_reason,
    rtsp_transport_order,
)

URL = "rtsp://admin:hunter2@10.0.0.5:554/live"


def refused() -> av.FFmpegError:
    """What PyAV raises when the camera answers SETUP with 461 Unsupported transport."""
    try:
        av.error.err_check(-errno.EPROTONOSUPPORT, URL)
    except av.FFmpegError as exc:
        return exc
    raise AssertionError("err_check did not raise")


class FakeCamera:
    """Takes only the ``accepts`` transports; records what it was asked for.

    ``busy`` times it answers 5xx instead (after refusing a transport, as GStreamer's RTSP
    server does while it tears the refused session down); ``other_error`` always.
    """

    def __init__(
        self, *accepts: str, busy: int = 0, other_error: av.FFmpegError | None = None
    ) -> None:
        self.accepts = accepts
        self.busy = busy
        self.other_error = other_error
        self.asked: list[str] = []

    def open(self, url: str, mode: str, *, options: dict[str, str], timeout: Any) -> object:
        transport = options["rtsp_transport"]
        self.asked.append(transport)
        if transport not in self.accepts:
            raise refused()
        if self.busy:
            self.busy -= 1
            raise av.error.HTTPServerError(-1, "Server returned 5XX Server Error reply", url)
        if self.other_error is not None:
            raise self.other_error
        return f"container over {transport}"


def stream(transport: str = "auto", url: str = URL) -> Any:
    data = {"streams": [{"id": "cam", "source": url, "rtsp_transport": transport}]}
    return config_from_dict(data).streams[0]


def open_with(
    camera: FakeCamera, monkeypatch: pytest.MonkeyPatch, config: Any, memory: RtspTransportMemory
) -> tuple[object, str]:
    monkeypatch.setattr(rtsp.av, "open", camera.open)
    label = "cam (rtsp://***@10.0.0.5:554/live)"
    return open_rtsp(  # type: ignore[return-value]
        config, MediaConfig(), memory, stop=threading.Event(), label=label
    )


def test_auto_asks_for_tcp_first_then_udp_and_a_forced_transport_alone() -> None:
    assert rtsp_transport_order("auto", None) == ("tcp", "udp")
    assert rtsp_transport_order("auto", "udp") == ("udp", "tcp")
    assert rtsp_transport_order("tcp", "udp") == ("tcp",)
    assert rtsp_transport_order("udp", None) == ("udp",)


def test_auto_falls_back_to_udp_when_tcp_is_refused_and_asks_for_udp_first_afterwards(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    camera, memory = FakeCamera("udp"), RtspTransportMemory()
    with caplog.at_level("INFO", logger="mediastream"):
        assert open_with(camera, monkeypatch, stream(), memory) == ("container over udp", "udp")
        assert open_with(camera, monkeypatch, stream(), memory) == ("container over udp", "udp")
    assert camera.asked == ["tcp", "udp", "udp"]  # the reconnect is not refused again
    notes = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert notes == [
        "cam (rtsp://***@10.0.0.5:554/live): the camera refused RTSP over TCP "
        "(461 Unsupported transport); asking for RTSP over UDP instead, and first from now on"
    ]


def test_auto_keeps_to_tcp_when_tcp_works(monkeypatch: pytest.MonkeyPatch) -> None:
    camera, memory = FakeCamera("tcp", "udp"), RtspTransportMemory()
    for _ in range(2):
        assert open_with(camera, monkeypatch, stream(), memory)[1] == "tcp"
    assert camera.asked == ["tcp", "tcp"]


def test_a_camera_busy_right_after_a_refusal_is_asked_once_more(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    camera = FakeCamera("udp", busy=1)
    assert open_with(camera, monkeypatch, stream(), RtspTransportMemory())[1] == "udp"
    assert camera.asked == ["tcp", "udp", "udp"]


def test_a_camera_busy_without_a_refusal_is_left_to_the_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    camera = FakeCamera("tcp", busy=1)
    with pytest.raises(av.error.HTTPServerError):
        open_with(camera, monkeypatch, stream(), RtspTransportMemory())
    assert camera.asked == ["tcp"]


def test_the_fallback_is_remembered_even_when_it_fails_for_another_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    not_found = av.error.HTTPNotFoundError(-1, "Server returned 404 Not Found", URL)
    memory = RtspTransportMemory()
    with pytest.raises(av.error.HTTPNotFoundError):
        open_with(FakeCamera("udp", other_error=not_found), monkeypatch, stream(), memory)
    camera = FakeCamera("udp")
    assert open_with(camera, monkeypatch, stream(), memory)[1] == "udp"
    assert camera.asked == ["udp"]


def test_what_was_learned_belongs_to_one_camera_url(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = RtspTransportMemory()
    open_with(FakeCamera("udp"), monkeypatch, stream(), memory)
    camera = FakeCamera("tcp")
    other = stream(url="rtsp://10.0.0.6/live")
    assert open_with(camera, monkeypatch, other, memory)[1] == "tcp"
    assert camera.asked == ["tcp"]


@pytest.mark.parametrize(
    ("setting", "accepts", "expected"),
    [
        (
            "tcp",
            ("udp",),
            "the camera refused RTSP over TCP (461 Unsupported transport); "
            'set rtsp_transport = "udp" (or "auto")',
        ),
        (
            "udp",
            ("tcp",),
            "the camera refused RTSP over UDP (461 Unsupported transport); "
            'set rtsp_transport = "tcp" (or "auto")',
        ),
        ("auto", (), "the camera refused RTSP over TCP and UDP (461 Unsupported transport)"),
    ],
)
def test_a_refusal_names_the_transport_and_the_fix(
    monkeypatch: pytest.MonkeyPatch, setting: str, accepts: tuple[str, ...], expected: str
) -> None:
    camera = FakeCamera(*accepts)
    with pytest.raises(SourceError) as caught:
        open_with(camera, monkeypatch, stream(setting), RtspTransportMemory())
    assert str(caught.value) == f"cannot open rtsp://***@10.0.0.5:554/live: {expected}"
    assert camera.asked == ([setting] if setting != "auto" else ["tcp", "udp"])


def test_refusal_reason_for_one_transport() -> None:
    assert rtsp_refusal_reason(["udp"], "auto") == (
        "the camera refused RTSP over UDP (461 Unsupported transport)"
    )


@pytest.mark.parametrize(
    ("error", "url", "expected"),
    [
        (
            av.error.HTTPUnauthorizedError,
            URL,
            "the camera refused the credentials (401); check the user and password in the URL",
        ),
        (
            av.error.HTTPUnauthorizedError,
            "rtsp://10.0.0.5/live",
            "the camera needs credentials (401); put user:password@ in the source URL",
        ),
        (av.error.HTTPForbiddenError, URL, "the camera refused access (403)"),
        (av.error.HTTPNotFoundError, URL, "the camera has no stream at this path (404)"),
        (av.error.HTTPServerError, URL, "the camera answered with a server error (5xx)"),
    ],
)
def test_camera_statuses_say_what_they_mean(
    error: type[av.FFmpegError], url: str, expected: str
) -> None:
    exc = error(-1, "Server returned something", url)
    reason = ffmpeg_reason(exc, "timed out", SourceSpec(kind="rtsp", location=url))
    assert reason.startswith(expected)
    assert "hunter2" not in reason and "admin" not in reason
