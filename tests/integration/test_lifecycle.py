"""Starting and stopping: graceful shutdown in-process, and the real command in a process."""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from support.http import get
from support.servers import StartServer, free_port
from support.viewer import open_viewer

MEDIASTREAM = [sys.executable, "-m", "mediastream"]


async def test_shutdown_closes_sockets_with_1001_and_every_peer(start_server: StartServer) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        for stream_id in ("demo-1", "demo-2"):
            await (await viewer.play(stream_id)).wait_frames(3)
        server.request_shutdown()
        code, reason = await viewer.wait_closed()
        assert (code, reason) == (1001, "server shutting down")
        with trio.fail_after(10):
            await server.wait_stopped()
    stats = server.services.statistics()
    assert (stats.open_sockets, stats.open_peer_connections, stats.sources_running) == (0, 0, 0)


async def run_command(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    with trio.fail_after(timeout):
        result = await trio.run_process(
            [*MEDIASTREAM, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, "PYTHONWARNINGS": "error"},
        )
    return subprocess.CompletedProcess(
        result.args, result.returncode, result.stdout.decode(), result.stderr.decode()
    )


async def test_the_command_serves_the_demo_and_stops_cleanly_on_sigterm() -> None:
    port = free_port()
    async with trio.open_nursery() as nursery:
        command = [*MEDIASTREAM, "serve", "--host", "127.0.0.1", "--port", str(port)]
        process: trio.Process = await nursery.start(
            functools.partial(trio.run_process, command, stderr=subprocess.PIPE, check=False)
        )
        assert process.stderr is not None
        log = b""
        with trio.fail_after(20):
            while b"MediaStream serving" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, log
                log += chunk
        streams = (await get(f"http://127.0.0.1:{port}/api/streams")).json()["streams"]
        assert [s["id"] for s in streams] == ["demo-1", "demo-2", "demo-3"]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            while chunk := await process.stderr.receive_some():
                log += chunk
            await process.wait()
    text = log.decode()
    assert process.returncode == 0, text
    assert "serving the built-in demo streams" in text
    assert "SIGTERM received, shutting down" in text
    assert "Traceback" not in text


async def test_a_bad_config_file_stops_the_command_naming_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[[streams]]\nid = "cam"\nsource = "rtsp://h/x"\non_demmand = true\n')
    result = await run_command("serve", "--config", str(config))
    assert result.returncode == 2
    assert str(config) in result.stderr
    assert "streams[0].on_demmand" in result.stderr
    assert "Traceback" not in result.stderr


async def test_a_port_in_use_is_reported_plainly() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_command("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert re.search(rf"cannot serve on 127\.0\.0\.1:{port}: .*in use", result.stderr)
    assert "Traceback" not in result.stderr


async def test_version_and_help() -> None:
    version = await run_command("--version")
    assert version.returncode == 0 and version.stdout.startswith("mediastream ")
    usage = await run_command("serve", "--help")
    for option in ("--config", "--host", "--port", "--log-level"):
        assert option in usage.stdout


async def test_json_logs_are_one_object_per_line_and_the_default_level_has_no_debug_noise() -> None:
    port = free_port()
    command = [*MEDIASTREAM, "serve", "--host", "127.0.0.1", "--port", str(port),
               "--log-format", "json"]  # fmt: skip
    log = b""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(trio.run_process, command, stderr=subprocess.PIPE, check=False)
        )
        assert process.stderr is not None
        with trio.fail_after(20):
            while b"MediaStream serving" not in log:
                chunk = await process.stderr.receive_some()
                assert chunk, log
                log += chunk
        assert (await get(f"http://127.0.0.1:{port}/healthz")).status == 200
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            while chunk := await process.stderr.receive_some():
                log += chunk
    records = [json.loads(line) for line in log.decode().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= records[0].keys()
    assert any("MediaStream serving" in r["message"] for r in records)
    assert {r["level"] for r in records} <= {"info", "warning"}
