"""Soak: a server under churn for half an hour; does anything grow, crash or log errors?

    python benchmarks/soak.py [--minutes 30] [--warmup 5] [--joins-per-second 2]
                              [--workers 2] [--json benchmarks/results/soak.json]

Not part of CI. ``mediastream serve`` runs in its own process with 20 on-demand streams: ten
restream two GStreamer test cameras (``tests/support/rtsp_camera.py``, two mounts each), ten
are small synthetic ``pattern:`` streams encoded by the server. Streams start when their first
viewer arrives and stop 5 s after the last one leaves; popularity is skewed (Zipf), so the
popular streams always have viewers and the rare ones start and stop all the time.

For the whole run:

- **viewers come and go**: ~2 joins a second overall, from load-generator processes (this
  script with ``--worker``). Each holds several WebSockets ("pages") that carry several streams
  each, as pages do. A viewer is a real aiortc peer that negotiates, connects (ICE, DTLS) and
  counts the RTP packets it receives (no decoding, as in ``viewers.py``). It leaves after
  5–40 s by a ``close`` message, or with every other stream of its page when the page closes
  its socket (after 40–150 s);
- **a camera dies** every 2 minutes (SIGKILL, the two in turn) and is restarted on the same
  port 5 s later; the server must reconnect its streams by itself;
- **the management API** edits a stream every 30 s, in turn: rename one (PATCH), stop one and
  start it again 10 s later, add one and delete it 10 s later.

Every minute it samples the server process: RSS (``/proc/PID/status``), open file descriptors
(``/proc/PID/fd``), OS threads, and from ``/api/stats`` Trio tasks, peer connections open and
opened so far (one per session), sockets, sources running; from ``/metrics`` the peer closes
that outlived their session's 5 s wait ("slow closes"). The server's log (level INFO) is
kept and every WARNING, ERROR and traceback in it is classified: caused by what the soak does
on purpose (a killed camera, a stopped stream, a slow load generator) or not.

At the end: a table of the samples, and least-squares slopes over the samples after the
warm-up (the first ``--warmup`` minutes are left out: caches, arenas and pools fill then):
RSS in MB per hour and in **KB per 1,000 sessions**, and fds, threads, tasks and peer
connections per hour. Then the viewers leave, and the idle server is compared with itself
before the load. JSON goes to ``--json``. Exits 1 if the server crashed (or did not shut down
cleanly), 2 if the soak could not be set up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Final

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    SYSTEM_PYTHON,
    _ahead_of_the_load,
    cpu_seconds,
    get_json,
    print_table,
    rss_bytes,
    start_mediastream,
    wait_healthy,
)

#: Two cameras, two mounts each: five RTSP streams per camera.
CAMERA_MOUNTS: Final = (("/h264", "/h264-gop4"), ("/h264-gop1", "/h264"))
RTSP_STREAMS: Final = 10
#: Synthetic streams the server encodes itself: small, so ten of them stay cheap.
PATTERNS: Final = ("testsrc", "testsrc2", "smptebars", "rgbtestsrc", "yuvtestsrc")
PATTERN_OPTIONS: Final = "size=320x180&fps=15&kbps=300&gop=30"
PATTERN_STREAMS: Final = 10
#: Short, so the rarely watched streams start and stop many times an hour.
ON_DEMAND_GRACE: Final = 5.0  # seconds

CAMERA_KILL_EVERY: Final = 120.0  # seconds
CAMERA_DOWNTIME: Final = 5.0  # seconds between the SIGKILL and the restart
EDIT_EVERY: Final = 30.0  # seconds
EDIT_UNDO_AFTER: Final = 10.0  # seconds before a stopped stream restarts, an added one goes
SAMPLE_EVERY: Final = 60.0  # seconds

#: Viewers: how long one watches, how long a page (socket) stays open, how many streams a
#: page carries, and how many pages one load process holds at most.
STAY: Final = (5.0, 40.0)  # seconds
PAGE_LIFETIME: Final = (40.0, 150.0)  # seconds
STREAMS_PER_PAGE: Final = 8
PAGES_PER_WORKER: Final = 12
NEW_PAGE_PROBABILITY: Final = 0.1  # per join, while below PAGES_PER_WORKER
ANSWER_TIMEOUT: Final = 20.0  # seconds
CONNECT_TIMEOUT: Final = 20.0  # seconds (the server's negotiation_timeout)
LEAVE_WAIT: Final = 3.0  # seconds a leaving viewer waits to see the server close its side


# --------------------------------------------------------------------------------------------
# The load generator (``--worker``): pages, each a socket carrying several viewers


@dataclasses.dataclass
class WorkerCounters:
    """What one load process did; ``outcomes`` says how each session ended."""

    pages_opened: int = 0
    pages_failed: int = 0
    offers: int = 0
    answered: int = 0
    connected: int = 0
    with_media: int = 0
    packets: int = 0
    #: a leaving viewer saw the server close its peer connection within LEAVE_WAIT.
    server_closed_peer: int = 0
    outcomes: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from its (key, count) pairs as keys.
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


class _Viewer:
    """One stream watched on one page: the server's messages for it, and a wake-up."""

    def __init__(self, stream_id: str, session_id: str) -> None:
        import trio

        self.stream_id = stream_id
        self.session_id = session_id
        self.answer: str | None = None
        self.error: str | None = None
        self._wake = trio.Event()
        self.packets = 0

    def poke(self) -> None:
        self._wake.set()

    async def wait(self) -> None:
        """Wait for the next poke (a message, a peer state change, the page closing)."""
        import trio

        self._wake = trio.Event()
        await self._wake.wait()


class _Page:
    """One socket, as a browser tab holds it; its viewers run in its nursery."""

    def __init__(self, index: int, ends_at: float) -> None:
        import trio

        self.index = index
        self.ends_at = ends_at
        self.viewers: dict[str, _Viewer] = {}
        self.closing = False
        self.open = False
        self.nursery: trio.Nursery | None = None
        self.ws: Any = None
        self.close_now = trio.Event()
        self.sessions = 0

    def usable_for(self, stream_id: str) -> bool:
        return (
            self.open
            and not self.closing
            and stream_id not in self.viewers
            and len(self.viewers) < STREAMS_PER_PAGE
        )


async def _run_worker(
    ws_url: str, streams: list[tuple[str, float]], rate: float, seconds: float, seed: int
) -> None:
    import trio
    import trio_asyncio

    rng = random.Random(seed)
    counters = WorkerCounters()
    stop = trio.Event()
    pages: list[_Page] = []
    ids, weights = [s for s, _ in streams], [w for _, w in streams]

    async def serve_stdin() -> None:
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while data := await stdin.receive_some():
            buffer += data
            while b"\n" in buffer:
                _, buffer = buffer.split(b"\n", 1)
                print(json.dumps(counters.as_json()), flush=True)
        stop.set()

    async def join_loop(nursery: trio.Nursery) -> None:
        next_join = trio.current_time()
        while not stop.is_set():
            next_join += rng.uniform(0.5, 1.5) / rate
            with trio.move_on_at(next_join):
                await stop.wait()
            if stop.is_set():
                return
            stream_id = rng.choices(ids, weights)[0]
            candidates = [p for p in pages if p.usable_for(stream_id)]
            page = rng.choice(candidates) if candidates else None
            if page is None or (
                len(pages) < PAGES_PER_WORKER and rng.random() < NEW_PAGE_PROBABILITY
            ):
                if len(pages) >= PAGES_PER_WORKER and page is None:
                    counters.outcomes["skipped: every page full"] += 1
                    continue
                page = _Page(len(pages) + counters.pages_opened, 0.0)
                page.ends_at = trio.current_time() + rng.uniform(*PAGE_LIFETIME)
                try:
                    with trio.fail_after(10):
                        await nursery.start(run_page, page)
                except Exception as exc:
                    counters.pages_failed += 1
                    counters.outcomes[f"page failed to open: {type(exc).__name__}"] += 1
                    continue
            page.sessions += 1
            viewer = _Viewer(stream_id, f"w{seed % 100}p{page.index}s{page.sessions}")
            page.viewers[stream_id] = viewer
            assert page.nursery is not None
            page.nursery.start_soon(watch, page, viewer, rng.uniform(*STAY))

    async def run_page(page: _Page, task_status: trio.TaskStatus[None]) -> None:
        from trio_websocket import ConnectionClosed, open_websocket_url

        pages.append(page)
        started = False
        try:
            async with open_websocket_url(ws_url, max_message_size=2**22) as ws:
                page.ws = ws
                welcome = json.loads(await ws.get_message())
                if welcome.get("type") != "welcome":
                    raise RuntimeError(f"expected a welcome, got {welcome}")
                page.open = True
                counters.pages_opened += 1
                async with trio.open_nursery() as viewers:
                    page.nursery = viewers
                    task_status.started()
                    started = True
                    async with trio.open_nursery() as reader_scope:
                        reader_scope.start_soon(read_page, page, ws)
                        with trio.move_on_at(page.ends_at):
                            await page.close_now.wait()
                        page.closing = True
                        with trio.move_on_after(5):
                            await ws.aclose()  # leave by closing the socket: every viewer
                        reader_scope.cancel_scope.cancel()
                    for viewer in list(page.viewers.values()):
                        viewer.poke()
                    # The viewers close their peers; bounded, in case one hangs.
                    viewers.cancel_scope.deadline = trio.current_time() + 2 * LEAVE_WAIT + 10
        except ConnectionClosed:
            counters.outcomes["page: socket closed by the server"] += 1
        except Exception as exc:
            if not started:
                raise  # to the join loop, which counts it
            counters.outcomes[f"page failed: {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            page.open = False
            page.closing = True
            pages.remove(page)

    async def read_page(page: _Page, ws: Any) -> None:
        from trio_websocket import ConnectionClosed

        try:
            while True:
                message = json.loads(await ws.get_message())
                kind, stream_id = message.get("type"), message.get("streamId")
                viewer = page.viewers.get(stream_id) if stream_id else None
                if viewer is not None and message.get("sessionId") not in (
                    None,
                    viewer.session_id,
                ):
                    viewer = None  # a late message of a session that ended
                if kind == "error":
                    counters.errors[str(message.get("code"))] += 1
                    if viewer is not None:
                        viewer.error = str(message.get("code"))
                        viewer.poke()
                elif kind == "answer" and viewer is not None:
                    viewer.answer = message["payload"]
                    viewer.poke()
        except ConnectionClosed:
            if not page.closing:
                counters.outcomes["page: socket closed by the server"] += 1
                page.closing = True
                page.close_now.set()

    async def watch(page: _Page, viewer: _Viewer, stay: float) -> None:
        from aiortc import RTCSessionDescription

        aio = trio_asyncio.aio_as_trio
        pc: Any = None

        async def give_up() -> None:
            """End a session that never got going, as a page does (``disconnect()``)."""
            if not page.closing:
                with contextlib.suppress(Exception):
                    close = {"type": "close", "streamId": viewer.stream_id}
                    await page.ws.send_message(json.dumps(close))

        connected = False
        outcome = "unknown"
        try:
            pc = await aio(_make_pc)()

            @pc.on("connectionstatechange")
            def _changed() -> None:
                viewer.poke()

            transceiver = pc.addTransceiver("video", direction="recvonly")
            _count_packets(transceiver.receiver, viewer)
            await aio(pc.setLocalDescription)(await aio(pc.createOffer)())
            if page.closing:
                outcome = "page closed before the offer"
                return
            offer = {
                "type": "offer",
                "streamId": viewer.stream_id,
                "payload": {"sdp": pc.localDescription.sdp, "sessionId": viewer.session_id},
            }
            await page.ws.send_message(json.dumps(offer))
            counters.offers += 1
            with trio.move_on_after(ANSWER_TIMEOUT):
                while viewer.answer is None and viewer.error is None and not page.closing:
                    await viewer.wait()
            if viewer.error is not None:
                outcome = f"refused: {viewer.error}"
                return
            if viewer.answer is None:
                outcome = "page closed before the answer" if page.closing else "no answer"
                await give_up()
                return
            counters.answered += 1
            await aio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=viewer.answer, type="answer")
            )
            with trio.move_on_after(CONNECT_TIMEOUT):
                while (
                    pc.connectionState not in ("connected", "failed", "closed")
                    and viewer.error is None
                    and not page.closing
                ):
                    await viewer.wait()
            if pc.connectionState != "connected":
                outcome = (
                    f"not connected: {viewer.error}"
                    if viewer.error
                    else "page closed while connecting"
                    if page.closing
                    else f"not connected: {pc.connectionState}"
                )
                if viewer.error is None:
                    await give_up()
                return
            connected = True
            counters.connected += 1
            with trio.move_on_after(stay):
                while (
                    viewer.error is None and not page.closing and pc.connectionState == "connected"
                ):
                    await viewer.wait()
            if viewer.error is not None:
                outcome = f"ended by the server: {viewer.error}"
                return
            if pc.connectionState != "connected":
                outcome = f"peer {pc.connectionState} while watching"
                return
            if page.closing:
                outcome = "left: socket closed"
            else:
                outcome = "left: close message"
                await page.ws.send_message(
                    json.dumps({"type": "close", "streamId": viewer.stream_id})
                )
            # The server closes its peer connection: DTLS close_notify turns ours "closed".
            with trio.move_on_after(LEAVE_WAIT):
                while pc.connectionState == "connected":
                    await viewer.wait()
            if pc.connectionState != "connected":
                counters.server_closed_peer += 1
        except Exception as exc:
            outcome = f"client exception: {type(exc).__name__}: {exc}"[:120]
        finally:
            counters.outcomes[outcome] += 1
            counters.packets += viewer.packets
            if connected and viewer.packets:
                counters.with_media += 1
            if page.viewers.get(viewer.stream_id) is viewer:
                del page.viewers[viewer.stream_id]
            if pc is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await aio(pc.close)()

    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        nursery.start_soon(serve_stdin)
        async with trio.open_nursery() as page_nursery:
            print("READY", flush=True)
            with trio.move_on_after(seconds):
                await join_loop(page_nursery)
            stop.set()
            for page in list(pages):
                page.close_now.set()  # every page closes its socket; its viewers leave
            page_nursery.cancel_scope.deadline = trio.current_time() + 30
        print(json.dumps({"final": counters.as_json()}), flush=True)
        nursery.cancel_scope.cancel()


def _count_packets(receiver: Any, viewer: _Viewer) -> None:
    """Count RTP packets as the ICE connection receives them and drop them there, as
    ``viewers.py`` does: no decryption, no jitter buffer, no decoding. DTLS, STUN and RTCP
    take their usual way."""
    connection: Any = receiver.transport.transport._connection  # aioice's, for this peer
    deliver = connection.data_received

    def count_or_deliver(data: bytes, component: int) -> None:
        if 127 < data[0] < 192 and not 192 <= data[1] <= 223:
            viewer.packets += 1
        else:
            deliver(data, component)

    connection.data_received = count_or_deliver


async def _make_pc() -> Any:
    from aiortc import RTCConfiguration, RTCPeerConnection

    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


# --------------------------------------------------------------------------------------------
# The cameras


class Camera:
    """A GStreamer test camera that can be killed and restarted on the same port, with a
    client of our own keeping each of its mounts playing (as ``common.rtsp_camera`` does:
    many sessions opening a shared mount that is not yet playing can crash GStreamer's RTSP
    server; that would be the test camera's fault, not the server's)."""

    def __init__(self, index: int, mounts: tuple[str, ...], workdir: Path) -> None:
        self.index = index
        self.mounts = mounts
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"camera-{index}.log"
        self.kills: list[dict[str, float]] = []
        self.crashes: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._primers = [
            threading.Thread(target=self._keep_playing, args=(mount,), daemon=True)
            for mount in dict.fromkeys(mounts)
        ]

    def start(self) -> None:
        """Start (or restart) the camera; on the same port once it has one."""
        for _attempt in range(20):
            with self.log.open("ab") as log:
                process = subprocess.Popen(
                    [
                        SYSTEM_PYTHON,
                        str(ROOT / "tests" / "support" / "rtsp_camera.py"),
                        "--port",
                        str(self.port),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            line = _read_line(process, 20).split()
            if line and line[0] == "READY":
                self.port = int(line[1])
                self.process = process
                _ahead_of_the_load(process.pid)
                return
            process.kill()
            process.wait(timeout=10)
            time.sleep(1)  # the port may still be held for a moment after the kill
        raise SystemExit(f"camera {self.index} did not start on port {self.port}")

    def start_priming(self) -> None:
        for primer in self._primers:
            primer.start()

    def kill(self) -> float:
        """SIGKILL, as a camera losing power; returns when it happened (epoch seconds)."""
        assert self.process is not None
        killed_at = time.time()
        self.process.kill()
        self.process.wait(timeout=10)
        self._close_pipes(self.process)
        self.process = None
        return killed_at

    def check(self) -> bool:
        """Whether the camera is running; one that died without being killed is recorded."""
        if self.process is None:
            return False
        code = self.process.poll()
        if code is None:
            return True
        self.crashes.append({"at": time.time(), "exit_code": code})
        self._close_pipes(self.process)
        self.process = None
        return False

    def stop(self) -> None:
        self._stop.set()
        if self.process is not None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self._close_pipes(self.process)
            self.process = None
        for primer in self._primers:
            if primer.is_alive():
                primer.join(timeout=10)

    @staticmethod
    def _close_pipes(process: subprocess.Popen[bytes]) -> None:
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def _keep_playing(self, mount: str) -> None:
        """Read ``mount`` whenever the camera is up, until stopped (retries twice a second)."""
        import av

        while not self._stop.is_set():
            url = f"rtsp://127.0.0.1:{self.port}{mount}"
            try:
                with av.open(
                    url, options={"rtsp_transport": "tcp", "timeout": "3000000"}, timeout=5
                ) as container:
                    for _ in container.demux(video=0):
                        if self._stop.is_set():
                            return
            except (av.FFmpegError, OSError):
                pass
            self._stop.wait(0.5)


# --------------------------------------------------------------------------------------------
# The server, its samples and its log


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    id: str
    source: str
    camera: int | None  # index into the cameras for RTSP streams
    weight: float


def plan_streams(cameras: list[Camera]) -> list[StreamPlan]:
    """Twenty streams, RTSP and pattern interleaved in order of popularity (Zipf weights)."""
    rtsp = []
    for n in range(RTSP_STREAMS):
        camera = cameras[n % len(cameras)]
        mount = camera.mounts[(n // len(cameras)) % len(camera.mounts)]
        rtsp.append((f"cam-{n + 1:02d}", f"rtsp://127.0.0.1:{camera.port}{mount}", camera.index))
    patterns = [
        (f"pat-{n + 1:02d}", f"pattern:{PATTERNS[n % len(PATTERNS)]}?{PATTERN_OPTIONS}", None)
        for n in range(PATTERN_STREAMS)
    ]
    ordered = [s for pair in zip(rtsp, patterns, strict=True) for s in pair]
    return [
        StreamPlan(id=i, source=src, camera=cam, weight=1 / (rank + 1))
        for rank, (i, src, cam) in enumerate(ordered)
    ]


def server_config(streams: list[StreamPlan], data_dir: Path) -> str:
    return (
        f'[server]\ndata_dir = "{data_dir}"\n\n'
        f"[media]\non_demand_grace = {ON_DEMAND_GRACE}\n\n"
        + BENCH_LIMITS
        + "".join(
            f'\n[[streams]]\nid = "{s.id}"\nsource = "{s.source}"\non_demand = true\n'
            for s in streams
        )
    )


def start_server(config_text: str, workdir: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """``mediastream serve`` at INFO, its log to a file; returns (process, URL, log path)."""
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        process, port = start_mediastream(config_text, workdir, log_level="info", output=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=30)
    except SystemExit:
        raise SystemExit(f"the server did not start; see {log_path}") from None
    return process, url, log_path


def server_state(url: str, pid: int) -> dict[str, Any]:
    """One sample of the server process: /proc, then /api/stats (None fields if it did not
    answer within 5 s)."""
    state: dict[str, Any] = {
        "time": time.time(),
        "rss_mb": rss_bytes(pid) / 2**20,
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "os_threads": _proc_status_field(pid, "Threads"),
        "cpu_s": cpu_seconds(pid),
        "load_average": os.getloadavg()[0],
        "fd_kinds": fd_kinds(pid),
    }
    try:
        stats = get_json(url + "/api/stats")
    except (OSError, ValueError) as exc:
        state["stats_error"] = f"{type(exc).__name__}: {exc}"
        stats = None
    state.update(
        {
            "tasks": stats["tasks"] if stats else None,
            "threads": stats["threads"] if stats else None,
            "peers_open": stats["peerConnections"]["open"] if stats else None,
            "sessions_opened": stats["peerConnections"]["opened"] if stats else None,
            "sessions_open": stats["sessions"] if stats else None,
            "sockets_open": stats["sockets"]["open"] if stats else None,
            "sockets_opened": stats["sockets"]["opened"] if stats else None,
            "sources_running": stats["sourcesRunning"] if stats else None,
            "viewers": stats["viewers"] if stats else None,
            "close_overruns": close_overruns(url),
        }
    )
    return state


def close_overruns(url: str) -> int | None:
    """Peer closes that outlived their session's wait so far (``/metrics``), None if the server
    did not say."""
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = re.search(r"^mediastream_peer_close_overruns_total (\S+)$", text, re.M)
    return int(float(found.group(1))) if found else None


def fd_kinds(pid: int) -> dict[str, int]:
    """The process's open file descriptors by kind: UDP and TCP sockets (from
    ``/proc/PID/net``), other sockets, pipes, anonymous inodes (epoll, eventfd), files."""
    protocols: dict[str, str] = {}
    for name in ("udp", "udp6", "tcp", "tcp6", "unix"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]:
                fields = line.split()
                inode = fields[6] if name == "unix" else fields[9]
                protocols[inode] = name.rstrip("6")
    kinds: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                kinds[protocols.get(target[8:-1], "socket")] += 1
            elif target.startswith(("pipe:", "anon_inode:")):
                kinds[
                    target.split(":")[0] + (target.split(":")[1] if "anon" in target else "")
                ] += 1
            else:
                kinds["file"] += 1
    return dict(kinds)


def _proc_status_field(pid: int, name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


def wait_idle(url: str, limit: float) -> float:
    """Wait until no socket, peer connection or source is left; returns the seconds taken."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        with contextlib.suppress(OSError, ValueError):
            stats = get_json(url + "/api/stats")
            if (
                stats["sockets"]["open"] == 0
                and stats["peerConnections"]["open"] == 0
                and stats["sourcesRunning"] == 0
            ):
                return time.monotonic() - started
        time.sleep(0.5)
    return time.monotonic() - started


def api(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One management API call; returns what happened (status, seconds), never raises."""
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        status = f"{type(exc).__name__}: {exc}"
    return {
        "at": time.time(),
        "call": f"{method} {path}",
        "status": status,
        "seconds": round(time.monotonic() - started, 3),
    }


class Edits:
    """The management API's edits, in turn: rename, stop then start, add then delete."""

    EXPECTED: Final = {"PATCH": 200, "POST": (200, 201), "DELETE": 204}

    def __init__(self, url: str, streams: list[StreamPlan], rng: random.Random) -> None:
        self._url = url
        self._ids = [s.id for s in streams]
        self._rng = rng
        self._turn = 0
        self.calls: list[dict[str, Any]] = []
        #: (when, method, path) still to do: the second half of stop/start and add/delete.
        self.pending: list[tuple[float, str, str]] = []

    def next(self) -> None:
        kind = ("rename", "stop", "add")[self._turn % 3]
        self._turn += 1
        undo_at = time.monotonic() + EDIT_UNDO_AFTER
        if kind == "rename":
            stream_id = self._rng.choice(self._ids)
            self._call("PATCH", f"/api/streams/{stream_id}", {"name": f"Soak {self._turn}"})
        elif kind == "stop":
            stream_id = self._rng.choice(self._ids)
            self._call("POST", f"/api/streams/{stream_id}/stop")
            self.pending.append((undo_at, "POST", f"/api/streams/{stream_id}/start"))
        else:
            stream_id = f"extra-{self._turn}"
            source = f"pattern:testsrc?{PATTERN_OPTIONS}"
            self._call("POST", "/api/streams", {"id": stream_id, "source": source})
            # Started through the API: its source runs until it is deleted.
            self._call("POST", f"/api/streams/{stream_id}/start")
            self.pending.append((undo_at, "DELETE", f"/api/streams/{stream_id}"))

    def due(self) -> None:
        now = time.monotonic()
        for item in [p for p in self.pending if p[0] <= now]:
            self.pending.remove(item)
            self._call(item[1], item[2])

    def finish(self) -> None:
        for _, method, path in self.pending:
            self._call(method, path)
        self.pending.clear()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> None:
        result = api(self._url, method, path, body)
        expected = self.EXPECTED[method]
        result["ok"] = result["status"] in (
            expected if isinstance(expected, tuple) else (expected,)
        )
        self.calls.append(result)


_RECORD: Final = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (?P<level>[A-Z]+)\s+(?P<logger>\S+): "
    r"(?P<message>.*)$"
)


def read_log(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The log's records, each with the lines that follow it (a traceback, the task asyncio
    describes); a traceback after an INFO or DEBUG record was not logged with it (Python
    printing a crash) and becomes a record of its own. Also returns the lines that belong
    to no record (a library writing to stderr)."""
    records: list[dict[str, Any]] = []
    stray: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        match = _RECORD.match(line)
        if match:
            stamp = datetime.datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f")
            records.append({**match.groupdict(), "at": stamp.timestamp(), "more": []})
            continue
        starts_traceback = line.startswith(("Traceback", "  + Exception Group Traceback"))
        if starts_traceback and (not records or records[-1]["level"] in ("INFO", "DEBUG")):
            at = records[-1]["at"] if records else 0.0
            records.append(
                {
                    "time": records[-1]["time"] if records else "?",
                    "level": "CRITICAL",
                    "logger": "stderr",
                    "message": "traceback printed outside the log (the process failing)",
                    "at": at,
                    "more": [],
                }
            )
        if records and records[-1]["level"] not in ("INFO", "DEBUG"):
            records[-1]["more"].append(line)
        elif line.strip():
            stray.append(line)
    for record in records:
        record["traceback"] = any(
            line.startswith(("Traceback", "  + Exception Group Traceback"))
            for line in record["more"]
        )
    return records, stray


SOURCES_LOGGER: Final = "mediastream.media.sources"
#: How long after a camera comes back its streams may still report the failure (backoff).
KILL_WINDOW_AFTER: Final = 40.0  # seconds


def classify(
    record: dict[str, Any],
    streams: dict[str, StreamPlan],
    outages: dict[int, list[tuple[float, float]]],
    stops: list[tuple[str, float, float]],
) -> tuple[str, str]:
    """(cause, kind) of a WARNING-or-worse record: cause is ``user`` when the soak caused it
    on purpose (a killed camera, a stopped stream, the open-mode notice of an unsecured test
    server, a load generator too slow to keep up on shared cores), else ``server``."""
    message, at = record["message"], record["at"]
    if record["traceback"] or record["level"] in ("ERROR", "CRITICAL"):
        return "server", f"{record['level']} {record['logger']}: {_shape(message)}"
    if "OPEN MODE" in message:
        return "user", "open-mode notice (test server without [security])"
    if "fell" in message and "frames behind" in message:
        return "user", "slow viewer skipped to a keyframe (load generator on shared cores)"
    stream_id = message.split(" ", 1)[0].rstrip(":")
    plan = streams.get(stream_id)
    if _is_sources_logger(record["logger"]) and plan is not None:
        if plan.camera is not None and any(
            down - 1 <= at <= up + KILL_WINDOW_AFTER for down, up in outages.get(plan.camera, [])
        ):
            return "user", "camera killed: its streams reconnect"
        if any(s == stream_id and a - 1 <= at <= b + 5 for s, a, b in stops):
            return "user", "stream stopped or edited through the API"
    return "server", f"{record['level']} {record['logger']}: {_shape(message)}"


def _is_sources_logger(name: str) -> bool:
    """The sources' logger or one of its children (``media/sources`` may be a package whose
    modules log as ``mediastream.media.sources.reader`` and the like)."""
    return name == SOURCES_LOGGER or name.startswith(SOURCES_LOGGER + ".")


def _shape(message: str) -> str:
    """A message with its variable parts (ids, numbers, addresses) blanked, to group by."""
    message = re.sub(r"(cam|pat|extra)-\d+", r"\1-N", message)
    message = re.sub(r"#[0-9a-f]{8}", "#ID", message)
    message = re.sub(r"\d+(\.\d+)?", "N", message)
    return message[:160]


def slope(xs: list[float], ys: list[float]) -> dict[str, float] | None:
    """Least-squares line through (xs, ys): slope, its standard error, intercept."""
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    a = my - b * mx
    residual = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    error = (residual / (n - 2) / sxx) ** 0.5
    return {"slope": b, "stderr": error, "intercept": a}


def _read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line from a child's stdout, or "" after ``timeout`` seconds or at its end."""
    assert process.stdout is not None
    fd = process.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return ""
        chunk = os.read(fd, 1)
        if not chunk:
            return data.decode(errors="replace")
        data += chunk
    return data.decode(errors="replace")


def ask_worker(process: subprocess.Popen[bytes]) -> dict[str, Any] | None:
    assert process.stdin is not None
    try:
        process.stdin.write(b"stats\n")
        process.stdin.flush()
    except OSError:
        return None
    line = _read_line(process, 10)
    return json.loads(line) if line.strip() else None


def sum_workers(reports: list[dict[str, Any] | None]) -> dict[str, Any]:
    total: dict[str, Any] = {"outcomes": Counter(), "errors": Counter()}
    for report in reports:
        if report is None:
            continue
        for key, value in report.items():
            if isinstance(value, dict):
                total[key].update(value)
            else:
                total[key] = total.get(key, 0) + value
    return {k: dict(v) if isinstance(v, Counter) else v for k, v in total.items()}


def machine() -> dict[str, Any]:
    import aiortc
    import av

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    memory = _proc_meminfo_kb("MemTotal") / 2**20
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(memory, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiortc": aiortc.__version__,
        "av": av.__version__,
        "load_average_at_start": os.getloadavg(),
    }


def _proc_meminfo_kb(name: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------------------------
# The run


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument(
        "--warmup", type=float, default=5, help="minutes left out of the slopes (default 5)"
    )
    parser.add_argument("--joins-per-second", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="load-generator processes")
    parser.add_argument("--sample-every", type=float, default=SAMPLE_EVERY, help="seconds")
    parser.add_argument(
        "--kill-every", type=float, default=CAMERA_KILL_EVERY, help="seconds between camera kills"
    )
    parser.add_argument(
        "--edit-every", type=float, default=EDIT_EVERY, help="seconds between API edits"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--workdir", type=Path, help="where the server's log and data go (default: a new /tmp dir)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", nargs=3, metavar=("WS_URL", "RATE", "SECONDS"), help="internal")
    args = parser.parse_args()
    if args.worker:
        import trio

        ws_url, rate, seconds = args.worker
        streams = json.loads(sys.stdin.readline())
        trio.run(_run_worker, ws_url, streams, float(rate), float(seconds), args.seed)
        return 0
    return soak(args)


def soak(args: argparse.Namespace) -> int:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mediastream-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.minutes:g} min, logs and data in {workdir}", file=sys.stderr)
    rng = random.Random(args.seed)
    cameras = [Camera(i, mounts, workdir) for i, mounts in enumerate(CAMERA_MOUNTS)]
    workers: list[subprocess.Popen[bytes]] = []
    server: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    crashed: dict[str, Any] | None = None
    samples: list[dict[str, Any]] = []
    try:
        for camera in cameras:
            camera.start()
            camera.start_priming()
        streams = plan_streams(cameras)
        server, url, log_path = start_server(server_config(streams, workdir / "data"), workdir)
        pid = server.pid
        time.sleep(3)
        idle_before = server_state(url, pid)
        ws_url = url.replace("http", "ws") + "/ws"
        run_seconds = args.minutes * 60
        weights = json.dumps([(s.id, s.weight) for s in streams]) + "\n"
        for n in range(args.workers):
            with (workdir / f"worker-{n}.log").open("ab") as worker_log:
                worker = subprocess.Popen(
                    [
                        PYTHON,
                        __file__,
                        "--seed",
                        str(args.seed * 100 + n),
                        "--worker",
                        ws_url,
                        str(args.joins_per_second / args.workers),
                        # A worker stops by itself even if this process is gone.
                        str(run_seconds + 60),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=worker_log,
                    bufsize=0,
                )
            workers.append(worker)
            assert worker.stdin is not None
            worker.stdin.write(weights.encode())
            if _read_line(worker, 30).strip() != "READY":
                raise SystemExit(f"load worker {n} did not start (see {workdir})")

        edits = Edits(url, streams, rng)
        outages: dict[int, list[tuple[float, float]]] = {c.index: [] for c in cameras}
        started = time.monotonic()
        end = started + run_seconds
        next_sample, next_kill = started, started + args.kill_every
        next_edit = started + args.edit_every
        victim = 0
        restart: tuple[float, Camera, float] | None = None  # (when, camera, killed at)
        cpu_before, cpu_at = cpu_seconds(pid), time.monotonic()
        while True:
            now = time.monotonic()
            code = server.poll()
            if code is not None:
                crashed = {"at_minute": (now - started) / 60, "exit_code": code}
                print(f"soak: the server exited with {code}", file=sys.stderr)
                break
            if now >= next_sample:
                sample = server_state(url, pid)
                sample["minute"] = round((now - started) / 60, 2)
                sample["cpu_percent"] = (
                    100 * (sample["cpu_s"] - cpu_before) / max(1e-3, now - cpu_at)
                )
                cpu_before, cpu_at = sample["cpu_s"], now
                sample["viewers_report"] = sum_workers([ask_worker(w) for w in workers])
                samples.append(sample)
                _print_sample(sample)
                next_sample += args.sample_every
                if now >= end:
                    break
            if restart is None and now >= next_kill:
                camera = cameras[victim % len(cameras)]
                victim += 1
                if camera.process is not None:
                    killed_at = camera.kill()
                    restart = (now + CAMERA_DOWNTIME, camera, killed_at)
                next_kill += args.kill_every
            if restart is not None and now >= restart[0]:
                _, camera, killed_at = restart
                camera.start()
                camera.kills.append({"killed": killed_at, "restarted": time.time()})
                outages[camera.index].append((killed_at, time.time()))
                restart = None
            for camera in cameras:
                if (restart is None or restart[1] is not camera) and not camera.check():
                    down = time.time()
                    camera.start()  # it died by itself: the test camera's fault; restart it
                    outages[camera.index].append((down, time.time()))
            if now >= next_edit and now < end - EDIT_UNDO_AFTER:
                edits.next()
                next_edit += args.edit_every
            edits.due()
            time.sleep(min(0.2, max(0.0, min(next_sample, next_edit) - time.monotonic())))

        if restart is not None:
            restart[1].start()
            outages[restart[1].index].append((restart[2], time.time()))
        edits.finish()
        finals = _stop_workers(workers)
        workers = []
        idle_after = None
        drain_seconds = None
        if crashed is None:
            drain_seconds = wait_idle(url, 60)
            time.sleep(15)  # Trio's idle worker threads exit after 10 s
            idle_after = server_state(url, pid)
        shutdown = _stop_server(server) if crashed is None else None
        server = None
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(timeout=10)
        if server is not None and server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        for camera in cameras:
            camera.stop()

    records, stray = read_log(log_path)
    stops = [
        (c["call"].split("/")[3], c["at"], c["at"] + EDIT_UNDO_AFTER)
        for c in edits.calls
        if c["call"].startswith(("POST /api/streams/", "PATCH /api/streams/", "DELETE /api/"))
    ]
    log_summary = summarize_log(records, stray, {s.id: s for s in streams}, outages, stops)
    slopes = compute_slopes(samples, args.warmup)
    result.update(
        {
            "streams": [dataclasses.asdict(s) for s in streams],
            "workdir": str(workdir),
            "warmup_minutes": args.warmup,
            "joins_per_second": args.joins_per_second,
            "workers": args.workers,
            "idle_before": idle_before,
            "idle_after": idle_after,
            "drain_seconds": drain_seconds,
            "samples": samples,
            "slopes": slopes,
            "viewers": sum_workers([f.get("final") if f else None for f in finals]),
            "camera_kills": [k for c in cameras for k in c.kills],
            "camera_crashes": [k for c in cameras for k in c.crashes],
            "api_calls": edits.calls,
            "api_calls_failed": [c for c in edits.calls if not c["ok"]],
            "log": log_summary,
            "crashed": crashed,
            "shutdown": shutdown,
        }
    )
    target = {
        "rss_kb_per_1000_sessions_below": 1024,
        "rss_kb_per_1000_sessions": (slopes.get("rss_kb_per_1000_sessions") or {}).get("slope"),
        "crashed": crashed is not None,
        "errors_not_caused_by_user": log_summary["not_user_caused"],
    }
    target["met"] = (
        target["rss_kb_per_1000_sessions"] is not None
        and target["rss_kb_per_1000_sessions"] < 1024
        and not target["crashed"]
        and target["errors_not_caused_by_user"] == 0
    )
    result["target"] = target
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    clean_shutdown = shutdown is not None and shutdown.get("exit_code") == 0
    return 1 if crashed is not None or not clean_shutdown else 0


def _print_sample(sample: dict[str, Any]) -> None:
    viewers = sample["viewers_report"]
    print(
        f"[{sample['minute']:5.1f} min] RSS {sample['rss_mb']:.1f} MB, fds {sample['fds']},"
        f" threads {sample['os_threads']}, tasks {sample['tasks']}, peers {sample['peers_open']},"
        f" sessions opened {sample['sessions_opened']}, CPU {sample['cpu_percent']:.0f} %,"
        f" viewers connected {viewers.get('connected', 0)}/{viewers.get('offers', 0)}",
        file=sys.stderr,
        flush=True,
    )


def _stop_workers(workers: list[subprocess.Popen[bytes]]) -> list[dict[str, Any] | None]:
    """Close each worker's stdin (its viewers leave), then collect its final report."""
    for worker in workers:
        assert worker.stdin is not None
        with contextlib.suppress(OSError):
            worker.stdin.close()
    finals: list[dict[str, Any] | None] = []
    for worker in workers:
        final = None
        deadline = time.monotonic() + 60
        while final is None and time.monotonic() < deadline:
            line = _read_line(worker, max(0.1, deadline - time.monotonic()))
            if not line:
                break
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if "final" in parsed:
                    final = parsed
        finals.append(final)
        try:
            worker.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
    return finals


def _stop_server(server: subprocess.Popen[bytes]) -> dict[str, Any]:
    started = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=10)
        return {"exit_code": None, "seconds": None, "note": "did not stop within 30 s; killed"}
    return {"exit_code": code, "seconds": round(time.monotonic() - started, 2)}


def summarize_log(
    records: list[dict[str, Any]],
    stray: list[str],
    streams: dict[str, StreamPlan],
    outages: dict[int, list[tuple[float, float]]],
    stops: list[tuple[str, float, float]],
) -> dict[str, Any]:
    kinds: Counter[tuple[str, str]] = Counter()
    examples: dict[str, str] = {}
    for record in records:
        if record["level"] not in ("WARNING", "ERROR", "CRITICAL") and not record["traceback"]:
            continue
        cause, kind = classify(record, streams, outages, stops)
        kinds[(cause, kind)] += 1
        if kind not in examples:
            tail = " | ".join(record["more"][-2:])
            examples[kind] = f"{record['time']} {record['level']} {record['message']} {tail}"[:600]
    levels = Counter(r["level"] for r in records)
    return {
        "records": len(records),
        "by_level": dict(levels),
        "tracebacks": sum(1 for r in records if r["traceback"]),
        "sessions_started": sum(1 for r in records if r["message"].endswith("session started")),
        "classified": [
            {"cause": cause, "kind": kind, "count": n, "example": examples[kind]}
            for (cause, kind), n in kinds.most_common()
        ],
        "user_caused": sum(n for (cause, _), n in kinds.items() if cause == "user"),
        "not_user_caused": sum(n for (cause, _), n in kinds.items() if cause != "user"),
        "stray_lines": len(stray),
        "stray_examples": stray[:10],
    }


def compute_slopes(samples: list[dict[str, Any]], warmup: float) -> dict[str, Any]:
    kept = [s for s in samples if s["minute"] >= warmup and s.get("tasks") is not None]
    hours = [s["minute"] / 60 for s in kept]
    slopes: dict[str, Any] = {"samples_used": len(kept), "from_minute": warmup}
    for name, key in (
        ("rss_mb_per_hour", "rss_mb"),
        ("fds_per_hour", "fds"),
        ("os_threads_per_hour", "os_threads"),
        ("tasks_per_hour", "tasks"),
        ("peers_open_per_hour", "peers_open"),
    ):
        slopes[name] = slope(hours, [float(s[key]) for s in kept])
    slopes["rss_kb_per_1000_sessions"] = slope(
        [s["sessions_opened"] / 1000 for s in kept], [s["rss_mb"] * 1024 for s in kept]
    )
    if kept:
        slopes["sessions_per_hour"] = slope(hours, [float(s["sessions_opened"]) for s in kept])
    return slopes


def report(result: dict[str, Any]) -> None:
    samples = result["samples"]
    print(f"\nSoak: {result['args']['minutes']:g} min, {len(result['streams'])} streams")
    print_table(
        [
            "minute",
            "RSS MB",
            "fds",
            "threads",
            "tasks",
            "peers",
            "sockets",
            "sources",
            "sessions",
            "slow closes",
            "CPU %",
            "load",
        ],
        [
            [
                s["minute"],
                s["rss_mb"],
                s["fds"],
                s["os_threads"],
                s["tasks"],
                s["peers_open"],
                s["sockets_open"],
                s["sources_running"],
                s["sessions_opened"],
                s.get("close_overruns"),
                s["cpu_percent"],
                s["load_average"],
            ]
            for s in samples
        ],
    )
    slopes = result["slopes"]
    print(
        f"\nSlopes, least squares over {slopes['samples_used']} samples from minute"
        f" {slopes['from_minute']:g} (the warm-up before it left out):"
    )
    for name, fit in slopes.items():
        if isinstance(fit, dict):
            print(f"  {name:28s} {fit['slope']:+10.2f}  (± {fit['stderr']:.2f})")
    for label, state in (("before", result["idle_before"]), ("after", result["idle_after"])):
        if state:
            print(
                f"idle {label:6s}: RSS {state['rss_mb']:.1f} MB, fds {state['fds']},"
                f" threads {state['os_threads']}, tasks {state['tasks']},"
                f" peers {state['peers_open']}, sockets {state['sockets_open']};"
                f" fds by kind {state['fd_kinds']}"
            )
    viewers = result["viewers"]
    print(f"\nviewers: {json.dumps(viewers, indent=None)}")
    log = result["log"]
    print(
        f"\nserver log: {log['records']} records {log['by_level']}, {log['tracebacks']} tracebacks;"
        f" WARNING or worse caused by the soak on purpose: {log['user_caused']},"
        f" not: {log['not_user_caused']}"
    )
    for entry in log["classified"]:
        print(f"  {entry['count']:6d}  {entry['cause']:6s}  {entry['kind']}")
    print(
        f"camera kills: {len(result['camera_kills'])}, camera crashes (test tool):"
        f" {len(result['camera_crashes'])}; API calls: {len(result['api_calls'])},"
        f" failed: {len(result['api_calls_failed'])}"
    )
    target = result["target"]
    print(
        f"\ntarget: < 1 MB RSS per 1,000 sessions, no crash, no error a user did not cause:"
        f" {'met' if target['met'] else 'MISSED'} ({target})"
    )
    if result["crashed"]:
        print(f"THE SERVER CRASHED: {result['crashed']}")


if __name__ == "__main__":
    sys.exit(main())
