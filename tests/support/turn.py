"""A real TURN server for tests: Debian's coturn on loopback, with a shared secret."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class TurnServer:
    port: int
    secret: str

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}"


def free_udp_port() -> int:
    """A UDP port nobody listens on now (for a TURN server started later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def running_turn_server(
    secret: str = "turn-secret-for-tests", port: int | None = None
) -> Iterator[TurnServer]:
    """coturn on loopback (on ``port``, or a free one) until the block ends."""
    binary = shutil.which("turnserver")
    if binary is None:
        raise RuntimeError("coturn's turnserver is missing (scripts/test.sh installs coturn)")
    port = port if port is not None else free_udp_port()
    with tempfile.TemporaryDirectory() as home:
        process = subprocess.Popen(
            [
                binary,
                "--listening-ip=127.0.0.1",
                f"--listening-port={port}",
                "--relay-ip=127.0.0.1",
                "--min-port=49200",
                "--max-port=49400",
                "--use-auth-secret",
                f"--static-auth-secret={secret}",
                "--realm=mediastream.test",
                "--no-tls",
                "--no-dtls",
                "--no-cli",
                "--allow-loopback-peers",
                "--fingerprint",
                f"--pidfile={home}/turn.pid",
                f"--userdb={home}/turndb",
                "--no-stdout-log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            _wait_listening(process, port)
            yield TurnServer(port=port, secret=secret)
        finally:
            process.terminate()
            process.wait(timeout=10)


def _wait_listening(process: subprocess.Popen[str], port: int) -> None:
    """Until coturn answers a STUN binding request (its readiness), at most 10 s."""
    request = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
    deadline = time.monotonic() + 10
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.settimeout(0.2)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                break
            probe.sendto(request, ("127.0.0.1", port))
            try:
                reply, _ = probe.recvfrom(2048)
            except TimeoutError:
                continue
            if reply[:2] == b"\x01\x01":  # Binding Success Response
                return
    raise RuntimeError(f"coturn did not answer on port {port}")
