"""Shared pieces of the benchmark scripts: processes, CPU accounting, free ports, tables."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SYSTEM_PYTHON = "/usr/bin/python3"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Debian's Chromium and the flags these machines need, as in tests/support/browser.py (not
# imported from there: that module installs trio-asyncio's loop policy, which breaks
# Playwright's synchronous API used here).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

#: Every load generator connects from one address, far faster than pages do.
BENCH_LIMITS = """[limits]
max_sockets_per_client = 100000
max_offers_per_second = 100000.0
max_messages_per_second = 100000.0
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@contextmanager
def rtsp_camera(prime: str | None = None) -> Iterator[int]:
    """The GStreamer test camera of the test suite; yields its port.

    ``prime``: a mount to keep playing from the start, through one client of our own. Many
    sessions opening a shared mount that is not yet playing can crash GStreamer's RTSP server
    (``gst_rtsp_media_get_rates: assertion failed``); once it plays, they join it safely.
    """
    process = subprocess.Popen(
        [SYSTEM_PYTHON, str(ROOT / "tests" / "support" / "rtsp_camera.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdin is not None
    line = process.stdout.readline().split()
    if not line or line[0] != "READY":
        raise SystemExit("the RTSP test camera did not start (see README: test set-up)")
    port = int(line[1])
    stop, playing = threading.Event(), threading.Event()
    primer = None
    if prime is not None:
        primer = threading.Thread(
            target=_keep_playing, args=(port, prime, playing, stop), daemon=True
        )
        primer.start()
        if not playing.wait(timeout=20):
            raise SystemExit(f"the RTSP test camera did not play {prime}")
    _ahead_of_the_load(process.pid)
    try:
        yield port
    finally:
        stop.set()
        if primer is not None:
            primer.join(timeout=10)
        process.stdin.close()
        process.wait(timeout=10)
        process.stdout.close()


def _ahead_of_the_load(pid: int) -> None:
    """A real camera does not share the server's CPU: ahead of the load generators here, so
    that a saturated machine slows the viewers, not the frames every figure depends on."""
    # Every thread: Linux priorities are per thread, and encoders run in their own.
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(PermissionError, ProcessLookupError):
            os.setpriority(os.PRIO_PROCESS, int(task.name), -10)


def _keep_playing(port: int, mount: str, playing: threading.Event, stop: threading.Event) -> None:
    import av

    url = f"rtsp://127.0.0.1:{port}{mount}"
    with av.open(url, options={"rtsp_transport": "tcp", "timeout": "5000000"}) as container:
        for _ in container.demux(video=0):  # read, or the shared pipeline would back up
            playing.set()
            if stop.is_set():
                return


def start_mediastream(
    config_text: str,
    workdir: Path,
    *,
    log_level: str,
    output: Any = None,
    cpus: str | None = None,
    environment: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``mediastream serve`` on a free loopback port with ``config_text`` written to
    ``workdir``; returns (process, port) once the process runs (see :func:`wait_healthy`).
    ``cpus``: pin it to these (``taskset -c``); ``environment``: added to the server's."""
    port = free_port()
    config = workdir / "bench.toml"
    config.write_text(config_text)
    process = subprocess.Popen(
        [
            *(["taskset", "-c", cpus] if cpus else []),
            PYTHON,
            "-m",
            "mediastream",
            "serve",
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            log_level,
        ],
        cwd=ROOT,
        env={**os.environ, **(environment or {})},
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )
    return process, port


def wait_healthy(url: str, process: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Wait until ``/healthz`` answers; exit the script if the server died or never did."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise SystemExit("the server did not start") from None
            time.sleep(0.1)


@contextmanager
def mediastream_server(
    config_text: str,
    tmp: Path,
    *,
    cpus: str | None = None,
    environment: dict[str, str] | None = None,
) -> Iterator[tuple[str, int]]:
    """``mediastream serve`` in its own process; yields (base URL, pid)."""
    log_level = os.environ.get("BENCH_LOG_LEVEL", "warning")
    process, port = start_mediastream(
        config_text, tmp, log_level=log_level, cpus=cpus, environment=environment
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout=20)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)


def join_together(processes: list[subprocess.Popen[str]], what: str) -> None:
    """Let ``viewers.py`` processes join together: wait until each has its viewers ready to
    join (OFFERS), tell all to go, and wait until each has every viewer connected (READY)."""
    for process in processes:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "OFFERS":
            raise SystemExit(f"viewers did not get ready to join ({what})")
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "READY":
            raise SystemExit(f"viewers did not connect ({what})")


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers, *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.rjust(width) for value, width in zip(row, widths, strict=True)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
