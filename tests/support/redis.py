"""A real Redis for tests: Debian's ``redis-server`` on a free loopback port, nothing on disk.

``running_redis()`` starts it and waits until it logs that it accepts connections and answers
``PING`` (no sleeps: each wait reads the server's own output or socket, under a deadline).
The handle can also restart it empty on the same port (a Redis that lost everything) and
freeze it with SIGSTOP (a Redis that accepts bytes and never answers), for failure tests.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: how long a start or a PING may take before the test fails with the server's output.
START_TIMEOUT = 10.0  # seconds


class RedisFailed(RuntimeError):
    """redis-server did not start; the message carries what it printed."""


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` (the port survives restarts)."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("redis-server is not running")
        return self.process.pid

    def start(self) -> None:
        """Start on ``self.port`` with no persistence and wait until it answers PING."""
        if self.process is not None:
            raise RuntimeError(f"redis-server already runs (pid {self.process.pid})")
        self.process = subprocess.Popen(
            [
                self.binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--loglevel", "notice",
                "--logfile", "",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self._wait_ready(self.process)

    def stop(self) -> None:
        """SIGKILL the server by its PID (thawed first) and reap it. Idempotent."""
        process, self.process = self.process, None
        if process is None:
            return
        if self.frozen:
            os.kill(process.pid, signal.SIGCONT)
            self.frozen = False
        process.kill()
        process.wait(timeout=START_TIMEOUT)
        if process.stdout is not None:
            process.stdout.close()

    def restart_empty(self) -> None:
        """Kill it and start a fresh one on the same port: every key is gone."""
        self.stop()
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered (a hung Redis)."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def ping(self, timeout: float = START_TIMEOUT) -> bool:
        """One PING over a fresh connection; True if PONG came back within ``timeout``."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> None:
        """Read its log until "Ready to accept connections", then PING once; at most 10 s."""
        assert process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        output = b""
        while b"Ready to accept connections" not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select([process.stdout], [], [], remaining)
            if not readable:
                break
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:  # the process exited
                break
            output += chunk
        if b"Ready to accept connections" in output and self.ping():
            return
        self.stop()
        raise RedisFailed(
            f"redis-server on 127.0.0.1:{self.port} did not become ready within "
            f"{START_TIMEOUT:g} s; it printed:\n{output.decode(errors='replace')}"
        )


def free_tcp_port() -> int:
    """A port nothing listens on right now (redis-server needs a concrete port number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started ``RedisServer``; stopped by PID afterwards whatever the test did to it."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisFailed(
            "redis-server is missing (scripts/test.sh installs Debian's redis-server)"
        )
    server = RedisServer(binary, free_tcp_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
