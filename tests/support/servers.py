"""Test helpers shared by the suites: configurations, the RTSP camera, a test H.264 file."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import socket
import subprocess
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import trio

from mediastream.config import Config, config_from_dict
from mediastream.registry import Stream
from mediastream.server import RunningServer
from mediastream.statistics import task_names

TESTS = Path(__file__).parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: the GStreamer bindings live there

StartServer = Callable[..., Awaitable[RunningServer]]


@dataclasses.dataclass
class Camera:
    """A running GStreamer RTSP camera (see ``support/rtsp_camera.py`` for its mounts)."""

    port: int
    process: subprocess.Popen[str]

    def url(self, mount: str = "/h264", credentials: str = "") -> str:
        auth = f"{credentials}@" if credentials else ""
        return f"rtsp://{auth}127.0.0.1:{self.port}{mount}"

    def sessions(self, mount: str) -> int:
        """RTSP sessions playing ``mount`` now (blocking: call it in a thread)."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"SESSIONS {mount}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline().split()
        assert line[:2] == ["SESSIONS", mount], line
        return int(line[2])


class CameraFailed(RuntimeError):
    """The test camera could not start; the message says why and what to install."""


def start_camera(port: int = 0, *options: str) -> Camera:
    """Start the test camera and wait for its ``READY`` line.

    ``options`` go to ``rtsp_camera.py`` (``"--protocols", "udp"``, ``"--digest", "u:p"``).

    Raises:
        CameraFailed: at once, with the camera's own ``FAILED`` line (a missing GStreamer
            element and its Debian package, missing bindings, a port in use).
    """
    command = [SYSTEM_PYTHON, str(TESTS / "support" / "rtsp_camera.py"), "--port", str(port)]
    try:
        process = subprocess.Popen(
            [*command, *options], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    except FileNotFoundError:
        raise CameraFailed(
            f"the RTSP test camera needs Debian's {SYSTEM_PYTHON} with python3-gi "
            "(scripts/test.sh installs everything it needs)"
        ) from None
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    if not line.startswith("READY "):
        process.kill()
        process.wait()
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()
        why = line.removeprefix("FAILED ") or f"it exited with status {process.returncode}"
        raise CameraFailed(f"the RTSP test camera did not start: {why}")
    return Camera(port=int(line.split()[1]), process=process)


@contextlib.asynccontextmanager
async def mount_playing(camera: Camera, mount: str) -> AsyncIterator[None]:
    """Keep ``mount`` playing through one client of our own while the block runs.

    Many sessions opening a shared mount that is not playing yet can stall or crash
    GStreamer's RTSP server (benchmarks/common.py's ``rtsp_camera`` primes for the same
    reason); once it plays, they join it safely.
    """
    playing, stop = threading.Event(), threading.Event()

    def keep_playing() -> None:
        url = camera.url(mount)
        with av.open(url, options={"rtsp_transport": "tcp", "timeout": "5000000"}) as container:
            for _ in container.demux(video=0):  # read, or the shared pipeline would back up
                playing.set()
                if stop.is_set():
                    return

    thread = threading.Thread(target=keep_playing, name=f"playing {mount}", daemon=True)
    thread.start()
    try:
        if not await trio.to_thread.run_sync(playing.wait, 20):
            raise CameraFailed(f"the test camera did not play {mount}")
        yield
    finally:
        stop.set()
        await trio.to_thread.run_sync(thread.join, 10)


def stop_camera(camera: Camera) -> None:
    assert camera.process.stdin is not None and camera.process.stdout is not None
    camera.process.stdin.close()
    try:
        camera.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        camera.process.kill()
        camera.process.wait()
    camera.process.stdout.close()


def write_h264_file(path: Path, *, seconds: int, width: int = 640, height: int = 360) -> None:
    with av.open(str(path), "w") as output:
        stream = output.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "tune": "zerolatency", "g": "25"}
        with av.open(f"testsrc2=size={width}x{height}:rate=25", format="lavfi") as pattern:
            for index, frame in enumerate(pattern.decode(video=0)):
                if index >= seconds * 25:
                    break
                frame.pts, frame.time_base = index, Fraction(1, 25)
                frame.pict_type = av.video.frame.PictureType.NONE
                output.mux(stream.encode(frame.reformat(format="yuv420p")))
        output.mux(stream.encode(None))


def make_config(streams: list[dict[str, Any]] | None = None, **sections: Any) -> Config:
    """A test configuration: loopback, a free port, short timeouts, the given streams."""
    data: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "graceful_timeout": 3,
            # Each server its own: API changes persist there, and must not leak between tests.
            "data_dir": tempfile.mkdtemp(prefix="mediastream-test-"),
        },
        "media": {"on_demand_grace": 1},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    if streams is not None:
        data["streams"] = streams
    return config_from_dict(data)


DEMO_STREAMS = [
    {"id": f"demo-{n}", "source": f"pattern:{p}?size=320x180&fps=25&kbps=300&gop=50"}
    for n, p in ((1, "testsrc2"), (2, "testsrc"), (3, "cellauto"))
]

#: FFmpeg test patterns, so that neighbouring tiles look different
PATTERNS = ["testsrc2", "testsrc", "smptebars", "cellauto", "rgbtestsrc", "life"]


def pattern_cameras(count: int, options: str) -> list[dict[str, Any]]:
    """Streams ``cam-01`` to ``cam-<count>``, each a pattern of :data:`PATTERNS` in turn with
    ``options`` (``"size=320x180&fps=15&kbps=150&gop=30"``)."""
    return [
        {"id": f"cam-{n:02d}", "source": f"pattern:{PATTERNS[n % len(PATTERNS)]}?{options}"}
        for n in range(1, count + 1)
    ]


def free_port() -> int:
    """A loopback port nothing listens on now, for a server that must come back on the same
    port (port 0 everywhere else)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RestartableServer:
    """A server that a test stops and starts again on the same port with the same
    configuration: what a page meets when the server restarts (its socket drops, and it must
    reconnect to the same address by itself). Start it with :meth:`start`."""

    def __init__(self, start_server: StartServer, config: Config) -> None:
        self._start_server = start_server
        self._config = config
        self.url = f"http://127.0.0.1:{config.server.port}"
        self.started: list[RunningServer] = []

    @classmethod
    async def start(
        cls, start_server: StartServer, streams: list[dict[str, Any]]
    ) -> RestartableServer:
        """A server of ``streams`` on a free port, started."""
        server = cls(start_server, make_config(streams, server={"port": free_port()}))
        server.started.append(await start_server(server._config))
        return server

    @property
    def current(self) -> RunningServer:
        """The server running now (the last one started)."""
        return self.started[-1]

    async def restart(self) -> None:
        """Shut the current server down, wait until it has stopped, start the next one."""
        self.current.request_shutdown()
        await self.current.wait_stopped()
        self.started.append(await self._start_server(self._config))


def lasting_tasks() -> collections.Counter[str]:
    """The Trio tasks of this run by name, less the momentary ones: a running source's reader
    thread hands each frame over in a short-lived task, and Hypercorn's task for a closed
    connection ends a moment after our socket count drops (sockets are counted separately)."""
    names = collections.Counter(task_names())
    del names["trio.MemorySendChannel.send"]
    del names["hypercorn.trio.task_group._handle"]
    return names


async def wait_published(
    stream: Stream, condition: Callable[[], bool], timeout: float = 20
) -> None:
    """Wait until ``condition()`` holds, checking it as each frame of ``stream`` is published."""
    published = trio.Event()
    with trio.fail_after(timeout), stream.open_viewer() as probe:
        while not condition():
            probe.set_wakeup(published.set)
            await published.wait()
            published = trio.Event()
            while probe.get_nowait() is not None:
                pass
