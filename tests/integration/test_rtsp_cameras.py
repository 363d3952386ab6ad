"""RTSP cameras as they really behave: one transport only, digest authentication, and a test
camera that says what a fresh machine lacks. Real server, real GStreamer camera, real viewer
that decodes."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator

import pytest
import trio

from mediastream.registry import Stream
from mediastream.server import RunningServer

from support.http import get
from support.servers import (
    Camera,
    CameraFailed,
    StartServer,
    free_port,
    make_config,
    start_camera,
    stop_camera,
)
from support.viewer import open_viewer

pytestmark = pytest.mark.rtsp

FAST_RETRY = {
    "open_timeout": 5,
    "read_timeout": 2,
    "retry_initial_delay": 0.2,
    "retry_max_delay": 1,
}
USER, PASSWORD = "camuser", "Corr3ct-Horse"
WRONG_PASSWORD = "Wr0ng-Battery"
REFUSAL_NOTE = "refused RTSP over TCP (461 Unsupported transport); asking for RTSP over UDP"


@pytest.fixture(scope="module")
def udp_only_camera() -> Iterator[Camera]:
    camera = start_camera(0, "--protocols", "udp")
    yield camera
    stop_camera(camera)


@pytest.fixture(scope="module")
def tcp_only_camera() -> Iterator[Camera]:
    camera = start_camera(0, "--protocols", "tcp")
    yield camera
    stop_camera(camera)


@pytest.fixture(scope="module")
def digest_camera() -> Iterator[Camera]:
    camera = start_camera(0, "--digest", f"{USER}:{PASSWORD}")
    yield camera
    stop_camera(camera)


async def wait_until(server: RunningServer, condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        await server.services.changes.wait_until(condition)


def stream_of(server: RunningServer, stream_id: str = "cam") -> Stream:
    stream = server.services.registry.get(stream_id)
    assert stream is not None
    return stream


class RetryLog(logging.Handler):
    """Collects a source's "retrying in N s" warnings and wakes the test at the n-th one.

    They are logged by the source's Trio task right before it sleeps for N s, so the time
    between two of them can never be shorter than the first one's N.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._arrived = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        # Called in the Trio thread: the source logs from its task, not from its reader thread.
        if "retrying in" in record.getMessage():
            self.records.append(record)
            self._arrived.set()

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while len(self.records) < count:
                await self._arrived.wait()
                self._arrived = trio.Event()


@pytest.fixture
def retry_log() -> Iterator[RetryLog]:
    handler = RetryLog()
    logger = logging.getLogger("mediastream.media.sources")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


# --- a fresh machine --------------------------------------------------------------------------


def test_a_camera_that_lacks_a_gstreamer_element_fails_at_once_naming_it() -> None:
    # The same check that names timeoverlay -> gstreamer1.0-x on a machine without it; an
    # element no machine has stands in for a missing one.
    with pytest.raises(CameraFailed) as caught:
        start_camera(0, "--require", "nosuchelement")
    assert str(caught.value) == (
        "the RTSP test camera did not start: missing GStreamer element(s): "
        "nosuchelement (Debian package unknown)"
    )


# --- one transport only -----------------------------------------------------------------------


async def test_auto_plays_a_camera_that_takes_only_udp_and_reconnects_over_udp_first(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    camera = await trio.to_thread.run_sync(start_camera, port, "--protocols", "udp")
    try:
        config = make_config([{"id": "cam", "source": camera.url("/h264")}], media=FAST_RETRY)
        with caplog.at_level(logging.INFO, logger="mediastream"):
            server = await start_server(config)
            stream = stream_of(server)
            async with open_viewer(server.ws_url) as viewer:
                played = await viewer.play("cam")
                await played.wait_frames(10)
                info = stream.source_info
                assert info is not None and info.rtsp_transport == "udp"

                await trio.to_thread.run_sync(stop_camera, camera)
                await wait_until(server, lambda: stream.state in ("reconnecting", "offline"))
                camera = await trio.to_thread.run_sync(start_camera, port, "--protocols", "udp")
                await wait_until(server, lambda: stream.state == "live")
                await played.wait_frames(10)
        listed = (await get(server.url + "/api/streams/cam")).json()
        assert listed["rtspTransport"] == "auto"
        assert listed["rtspTransportInUse"] == "udp"  # what "auto" settled on
    finally:
        await trio.to_thread.run_sync(stop_camera, camera)
    notes = [r.getMessage() for r in caplog.records if REFUSAL_NOTE in r.getMessage()]
    assert len(notes) == 1, notes  # the reconnect asked for UDP first: no second refusal
    opened = [r.getMessage() for r in caplog.records if ": opened, " in r.getMessage()]
    assert len(opened) == 2 and all(m.endswith("; RTSP over UDP") for m in opened), opened


async def test_auto_plays_a_camera_that_takes_only_tcp_without_trying_udp(
    start_server: StartServer, tcp_only_camera: Camera, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config([{"id": "cam", "source": tcp_only_camera.url("/h264")}])
    with caplog.at_level(logging.INFO, logger="mediastream"):
        server = await start_server(config)
        async with open_viewer(server.ws_url) as viewer:
            await (await viewer.play("cam")).wait_frames(10)
        listed = (await get(server.url + "/api/streams/cam")).json()
    info = stream_of(server).source_info
    assert info is not None and info.rtsp_transport == "tcp"
    assert listed["rtspTransportInUse"] == "tcp"
    assert not [r for r in caplog.records if "refused" in r.getMessage()]


async def test_a_forced_tcp_refused_by_the_camera_says_so_and_what_to_set(
    start_server: StartServer, udp_only_camera: Camera
) -> None:
    config = make_config(
        [{"id": "cam", "source": udp_only_camera.url("/h264"), "rtsp_transport": "tcp"}],
        media=FAST_RETRY,
    )
    server = await start_server(config)
    async with open_viewer(server.ws_url) as viewer:
        await viewer.play("cam")  # answered: the page learns why from the stream's state
        state = await viewer.wait_for(
            lambda m: m["type"] == "state" and "refused" in m["payload"].get("detail", "")
        )
    assert state["payload"]["detail"].startswith(
        f"cannot open {udp_only_camera.url('/h264')}: the camera refused RTSP over TCP "
        '(461 Unsupported transport); set rtsp_transport = "udp" (or "auto"); retrying in'
    )
    assert stream_of(server).source_info is None


async def test_a_forced_udp_refused_by_the_camera_says_so_and_what_to_set(
    start_server: StartServer, tcp_only_camera: Camera
) -> None:
    config = make_config(
        [
            {
                "id": "cam",
                "source": tcp_only_camera.url("/h264"),
                "rtsp_transport": "udp",
                "on_demand": False,
            }
        ],
        media=FAST_RETRY,
    )
    server = await start_server(config)
    stream = stream_of(server)
    await wait_until(server, lambda: "refused" in (stream.statistics().last_error or ""))
    assert (
        'the camera refused RTSP over UDP (461 Unsupported transport); set rtsp_transport = "tcp"'
        in (stream.statistics().last_error or "")
    )


# --- authentication ---------------------------------------------------------------------------


async def test_a_camera_with_digest_authentication_plays_with_the_right_credentials(
    start_server: StartServer, digest_camera: Camera
) -> None:
    source = digest_camera.url("/h264", credentials=f"{USER}:{PASSWORD}")
    server = await start_server(make_config([{"id": "cam", "source": source}]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam")
        await played.wait_frames(10)
        assert played.sizes == {(640, 360)}
    listed = (await get(server.url + "/api/streams/cam")).body.decode()
    assert PASSWORD not in listed and f"{USER}:" not in listed


async def test_wrong_credentials_are_a_stream_error_retried_with_backoff_never_shown(
    start_server: StartServer,
    digest_camera: Camera,
    retry_log: RetryLog,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    source = digest_camera.url("/h264", credentials=f"{USER}:{WRONG_PASSWORD}")
    # A refused login waits at least access_denied_retry_delay (300 s by default: cameras lock
    # accounts), here 0.6 s, above the first two delays of the ordinary backoff.
    media = FAST_RETRY | {"access_denied_retry_delay": 0.6}
    config = make_config([{"id": "cam", "source": source, "on_demand": False}], media=media)
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        server = await start_server(config)
        async with open_viewer(server.ws_url) as viewer:
            await viewer.play("cam")
            state = await viewer.wait_for(
                lambda m: m["type"] == "state" and "(401)" in m["payload"].get("detail", "")
            )
            await retry_log.wait_for(5)
            seen += [json.dumps(m) for m in viewer.messages]
        for path in ("/api/streams", "/api/streams/cam"):
            seen.append((await get(server.url + path)).body.decode())
    assert "the camera refused the credentials (401)" in state["payload"]["detail"]
    assert "the camera refused the credentials (401)" in (
        stream_of(server).statistics().last_error or ""
    )

    # Spaced by the backoff, not a hot loop: each retry waited at least the delay it announced
    # (which doubles from 0.2 s up to the 1 s cap, and is never under the 0.6 s floor).
    records = retry_log.records[:5]
    delays = [float(re.findall(r"retrying in ([0-9.]+) s", r.getMessage())[-1]) for r in records]
    assert all(d >= least for d, least in zip(delays, [0.6, 0.6, 0.8, 1.0, 1.0], strict=True)), (
        delays
    )
    for earlier, later, delay in zip(records, records[1:], delays, strict=False):
        assert later.created - earlier.created >= delay - 0.05  # the log rounds to 0.1 s
    assert all("(401)" in r.getMessage() for r in records)

    seen += [record.getMessage() for record in caplog.records]
    captured = capfd.readouterr()
    seen += [captured.out, captured.err]
    everything = "\n".join(seen)
    assert f"rtsp://***@127.0.0.1:{digest_camera.port}/h264" in everything
    assert WRONG_PASSWORD not in everything
    assert f"{USER}:" not in everything
