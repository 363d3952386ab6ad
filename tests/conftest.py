"""Fixtures: a real server on a free port, a real RTSP camera, a real H.264 file."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
import trio_asyncio

sys.path.insert(0, str(Path(__file__).parent))

from mediastream.config import Config
from mediastream.server import RunningServer, serve

from support.redis import RedisServer, running_redis
from support.servers import (
    DEMO_STREAMS,
    Camera,
    StartServer,
    make_config,
    start_camera,
    stop_camera,
    write_h264_file,
)

if TYPE_CHECKING:
    from mediastream.cluster.redis_client import Redis


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def camera() -> Iterator[Camera]:
    """One RTSP camera for the whole session (its mounts are shared, like a real camera's)."""
    running = start_camera()
    yield running
    stop_camera(running)


@pytest.fixture(scope="session")
def h264_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4 s 640x360 25 fps H.264 MP4 (AVCC inside, as MP4s are), keyframe every 25 frames."""
    path = tmp_path_factory.mktemp("media") / "pattern.mp4"
    write_h264_file(path, seconds=4)
    return path


@pytest.fixture
async def aio_loop() -> AsyncIterator[None]:
    """trio-asyncio's loop for the test's own aiortc peers (the server opens its own)."""
    async with trio_asyncio.open_loop():
        yield


@pytest.fixture
async def start_server(nursery: trio.Nursery, aio_loop: None) -> AsyncIterator[StartServer]:
    """Start real servers on free loopback ports; all are shut down after the test."""
    started: list[RunningServer] = []

    async def start(config: Config | None = None) -> RunningServer:
        server: RunningServer = await nursery.start(serve, config or make_config(DEMO_STREAMS))
        started.append(server)
        return server

    yield start
    for server in started:
        server.request_shutdown()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped by PID afterwards."""
    with running_redis() as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    """A coredis client of :func:`redis_server` (imported here only: a single process never
    imports a Redis client, and most tests don't need one)."""
    from mediastream.cluster.redis_client import open_redis

    async with open_redis(redis_server.url) as opened:
        yield opened


@pytest.fixture
def judge_nodes_on_a_fresh_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cluster nodes are judged gone only once Redis has been up for a lease's TTL (so that a
    restart is not read as every node dying); the test's Redis has just started, and a Redis
    restart is not what the tests using this are about. (Here, not in support.cluster, so
    that every cluster test finds it; imported inside, like :func:`client`.)"""
    from mediastream.cluster import liveness

    monkeypatch.setattr(liveness, "STEADY_AFTER", 0.0)
