"""Cluster nodes for tests: in-process nodes on one Redis, a node as a ``mediastream serve``
subprocess (to be killed or frozen), a camera that counts its RTSP sessions, and the streams
and viewers the cluster tests share.

    nodes = await start_cluster(start_server, redis_server.url, NODES, pattern_streams(ids))
    async with open_node_process(tmp_path, "node-b", redis_server.url, streams) as b:
        await wait_registered(nodes[0], b)
        b.process.kill()

Every wait reads an event or a log line under a deadline; nothing here sleeps.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from mediastream.cluster.leases import NodeRecord
from mediastream.cluster.placement import rank_nodes
from mediastream.cluster.routing import ClusterNode
from mediastream.server import RunningServer

from support.commands import ENV, MEDIASTREAM
from support.servers import Camera, StartServer, make_config, start_camera, stop_camera
from support.viewer import PlayedStream, Viewer, open_playing_viewers

#: a small, cheap source for nodes whose media is not what a test looks at
PATTERN = "pattern:testsrc?size=160x120&fps=10&kbps=100&gop=10"


def pattern_streams(stream_ids: Iterable[str], *, on_demand: bool = True) -> list[dict[str, Any]]:
    """One :data:`PATTERN` stream per id, as the ``streams`` of a node's configuration."""
    return [{"id": s, "source": PATTERN, "on_demand": on_demand} for s in stream_ids]


def stream_ranked(*order: str) -> str:
    """A stream id ``lobby-<n>`` whose placement ranks the nodes named in ``order`` in that
    order (owner first; with the owner full, a replica is the next one)."""
    records = [NodeRecord(n, f"http://{n}") for n in order]
    index = 0
    while True:
        stream_id = f"lobby-{index}"
        if tuple(r.node_id for r in rank_nodes(stream_id, records)) == order:
            return stream_id
        index += 1


def cluster_of(server: RunningServer) -> ClusterNode:
    """The cluster node of an in-process server started with a ``cluster`` section."""
    cluster = server.services.cluster
    assert cluster is not None
    return cluster


def peers(node: RunningServer) -> int:
    """The peer connections open on ``node``: the viewers it serves itself."""
    return node.services.peers.statistics().open_peer_connections


def ingests(nodes: list[RunningServer], stream_id: str) -> int:
    """Sources of ``stream_id`` opened on all nodes together (each start opens an encoder)."""
    total = 0
    for node in nodes:
        stream = node.services.registry.get(stream_id)
        assert stream is not None
        total += stream.statistics().encoders_opened
    return total


async def start_node(
    start_server: StartServer,
    redis_url: str,
    node_id: str,
    streams: list[dict[str, Any]],
    **cluster: Any,
) -> RunningServer:
    """An in-process node ``node_id`` on ``redis_url`` serving ``streams``; ``cluster`` adds
    keys to its ``[cluster]`` section (``max_viewers_per_node=2``). It returns once the node
    serves, not once it is in Redis: see :func:`wait_registered`."""
    section = {"redis_url": redis_url, "node_id": node_id, **cluster}
    return await start_server(make_config(streams, cluster=section))


async def start_cluster(
    start_server: StartServer,
    redis_url: str,
    node_ids: Iterable[str],
    streams: list[dict[str, Any]],
    **cluster: Any,
) -> list[RunningServer]:
    """In-process nodes: :func:`start_node` for each id in turn, all with the same
    ``streams`` and ``cluster`` keys; returns once every node's record is in Redis."""
    nodes = [
        await start_node(start_server, redis_url, node_id, streams, **cluster)
        for node_id in node_ids
    ]
    await wait_registered(*nodes)
    return nodes


@dataclass
class NodeProcess:
    """A node as a ``mediastream serve`` process (see :func:`open_node_process`); its stderr
    is kept in ``log`` (and drained, so a full pipe never stalls it)."""

    process: trio.Process
    log: bytearray = field(default_factory=bytearray)
    _grew: trio.Event = field(default_factory=trio.Event)

    async def drain(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.log += chunk
            self._grew.set()
            self._grew = trio.Event()

    async def wait_logged(self, text: bytes, timeout: float = 30) -> None:
        """Until ``text`` is in the log; fails at once, with the log, if the process ended."""
        with trio.fail_after(timeout):
            while text not in self.log:
                assert self.process.returncode is None, self.log.decode(errors="replace")
                await self._grew.wait()


def node_config_file(
    path: Path, node_id: str, redis_url: str, streams: list[dict[str, Any]], **cluster: Any
) -> Path:
    """Write a node's TOML configuration to ``path``: loopback, a free port, its data in
    ``path``'s folder, a 1 s on-demand grace; ``cluster`` adds keys to ``[cluster]``."""
    text = f'[server]\nhost = "127.0.0.1"\nport = 0\ndata_dir = "{path.parent / node_id}"\n\n'
    text += "[media]\non_demand_grace = 1\n\n"
    text += f'[cluster]\nredis_url = "{redis_url}"\nnode_id = "{node_id}"\n'
    text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in cluster.items())
    for stream in streams:
        text += "\n[[streams]]\n"
        text += "".join(f"{key} = {json.dumps(value)}\n" for key, value in stream.items())
    path.write_text(text)
    return path


@asynccontextmanager
async def open_node_process(
    tmp_path: Path,
    node_id: str,
    redis_url: str,
    streams: list[dict[str, Any]],
    *,
    ready: bytes = b"MediaStream serving",
    **cluster: Any,
) -> AsyncIterator[NodeProcess]:
    """Node ``node_id`` as a ``mediastream serve`` subprocess (its configuration written by
    :func:`node_config_file` in ``tmp_path``), yielded once it has logged ``ready``.

    Resource handling: afterwards the process is woken (should the test have frozen it with
    SIGSTOP) and SIGKILLed by its PID, if still running, and reaped.
    """
    config = node_config_file(tmp_path / f"{node_id}.toml", node_id, redis_url, streams, **cluster)
    command = [*MEDIASTREAM, "serve", "--config", str(config), "--log-level", "info"]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process, command, stderr=subprocess.PIPE, check=False, env=ENV
            )
        )
        node = NodeProcess(process)
        nursery.start_soon(node.drain)
        try:
            await node.wait_logged(ready)
            yield node
        finally:
            if process.returncode is None:
                os.kill(process.pid, signal.SIGCONT)
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


async def wait_registered(*nodes: RunningServer | NodeProcess) -> None:
    """Until each node's record is in Redis (an in-process node is started once it is; a
    node process logs that it started once it is)."""
    for node in nodes:
        if isinstance(node, NodeProcess):
            await node.wait_logged(b'cluster node "')
        else:
            await cluster_of(node)._started.wait()


@dataclass
class CameraSessions:
    """The camera's connected RTSP clients, from its ``SESSIONS <n>`` lines (see
    :func:`counting_camera`)."""

    camera: Camera
    current: int = 0
    peak: int = 0
    connects: int = 0
    history: list[int] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    async def follow(self) -> None:
        stdout = self.camera.process.stdout
        assert stdout is not None
        while line := await trio.to_thread.run_sync(stdout.readline, abandon_on_cancel=True):
            if not line.startswith("SESSIONS "):
                continue
            count = int(line.split()[1])
            if count > self.current:
                self.connects += count - self.current
            self.current = count
            self.peak = max(self.peak, count)
            self.history.append(count)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(
        self, predicate: Callable[[CameraSessions], bool], timeout: float = 30
    ) -> None:
        with trio.fail_after(timeout):
            while not predicate(self):
                await self._changed.wait()


def camera_stream(sessions: CameraSessions, stream_id: str) -> list[dict[str, Any]]:
    """One on-demand stream ``stream_id`` of the counting camera's ``/h264`` mount, as the
    ``streams`` of a node's configuration."""
    return [{"id": stream_id, "source": sessions.camera.url("/h264"), "on_demand": True}]


def camera_qualities(
    sessions: CameraSessions, stream_id: str, **extra: Any
) -> list[dict[str, Any]]:
    """One on-demand stream ``stream_id`` with two qualities of the counting camera, main
    (``/h264-720``, 1280x720, the default) and sub (``/h264-180``, 320x180); ``extra`` adds
    keys to the stream (``default_quality="sub"``)."""
    return [
        {
            "id": stream_id,
            "qualities": [
                {"name": "main", "source": sessions.camera.url("/h264-720")},
                {"name": "sub", "source": sessions.camera.url("/h264-180")},
            ],
            "on_demand": True,
            **extra,
        }
    ]


@asynccontextmanager
async def counting_camera() -> AsyncIterator[CameraSessions]:
    """A test camera of its own (``--report-sessions``) whose sessions are followed while the
    block runs; stopped afterwards."""
    camera = start_camera(0, "--report-sessions")
    sessions = CameraSessions(camera)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sessions.follow)
            yield sessions
            nursery.cancel_scope.cancel()
    finally:
        stop_camera(camera)


async def wait_peer_failed(
    viewer: Viewer, stream_id: str, mark: int, timeout: float = 30
) -> dict[str, Any]:
    """The ``error`` the viewer's socket gets for ``stream_id`` from message ``mark`` on,
    checked to be ``peer_failed`` (what a page's engine answers with a new offer); returned,
    for its text to be checked."""
    told = await viewer.wait_for(
        lambda m: m.get("streamId") == stream_id and m.get("type") == "error",
        after=mark,
        timeout=timeout,
    )
    assert told["code"] == "peer_failed", told
    return told


async def replay_after_failure(viewer: Viewer, stream_id: str, mark: int) -> None:
    """What the page's engine does: told ``peer_failed``, send a new offer on the same socket
    (again if that offer fails while the stream is taken over); then wait for frames."""
    told = await wait_peer_failed(viewer, stream_id, mark)
    assert "send a new offer" in told["payload"]
    played = await viewer.play(stream_id, trickle=True)
    await played.wait_frames(3, timeout=30)


@asynccontextmanager
async def viewers_of(url: str, stream_id: str, count: int) -> AsyncIterator[list[PlayedStream]]:
    """``count`` viewers, one socket each, each playing ``stream_id`` and capturing its access
    units (one after the other, so the owner's count of its viewers and the replicas' reports
    are current for each offer): :func:`~support.viewer.open_playing_viewers`, yielding what
    each plays."""
    async with open_playing_viewers(url, stream_id, count, capture=True) as viewers:
        yield [viewer.streams[stream_id] for viewer in viewers]


async def replay_each_after_failure(
    stream_id: str, viewers_and_marks: Iterable[tuple[Viewer, int]]
) -> None:
    """:func:`replay_after_failure` for each viewer (told from its mark on), all at once, as
    each page's engine does on its own."""
    async with trio.open_nursery() as nursery:
        for viewer, mark in viewers_and_marks:
            nursery.start_soon(replay_after_failure, viewer, stream_id, mark)
