"""Replicas registered in Redis, chained, and placed by load: three real nodes, one real
redis-server, the GStreamer camera counting its RTSP sessions, aiortc viewers.

With ``max_viewers_per_node = 1`` and ``max_relays_per_node = 1`` the owner A serves one
viewer and feeds one replica B; the third viewer goes to C, fed by B (depth 2). Each replica
keeps its entry in ``ms:replicas:{stream}`` (upstream, depth, viewers), which the owner reads
to place the next viewer. B is a ``mediastream serve`` process so that it can be killed: its
viewer re-offers and plays, C re-attaches to the owner and its viewer plays on, on the same
peer connection, with no P-frame before a keyframe; B's entry expires by itself, and C's is
deleted when C's replica ends. With ``max_load_per_node`` the owner counts as full by load,
and a loaded node is not chosen as a replica.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from mediastream.cluster.leases import live_nodes
from mediastream.cluster.redis_client import open_redis
from mediastream.cluster.replica_registry import ReplicaEntry, replicas_key
from mediastream.server import RunningServer

from support.cluster import (
    NodeProcess,
    camera_stream,
    cluster_of,
    counting_camera,
    open_node_process,
    peers,
    replay_after_failure,
    replay_each_after_failure,
    start_cluster,
    stream_ranked,
    wait_registered,
)
from support.h264 import frame_num_breaks
from support.http import get, scrape
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import open_playing_viewers, open_viewer

CHAIN = {"max_viewers_per_node": 1, "max_relays_per_node": 1}


@asynccontextmanager
async def open_chain(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    streams: list[dict[str, Any]],
    killable: str,
) -> AsyncIterator[tuple[RunningServer, RunningServer, NodeProcess]]:
    """Nodes A, B and C with the ``CHAIN`` limits, serving ``streams``: ``killable`` a
    ``mediastream serve`` process, the other two in this process (in node order). Yields the
    two, then the process, once all three are in Redis."""
    in_process = [n for n in ("node-a", "node-b", "node-c") if n != killable]
    first, second = await start_cluster(
        start_server, redis_server.url, in_process, streams, **CHAIN
    )
    async with open_node_process(tmp_path, killable, redis_server.url, streams, **CHAIN) as process:
        await wait_registered(process)
        yield first, second, process


async def entries_of(node: RunningServer, stream_id: str) -> dict[str, ReplicaEntry]:
    """The stream's live registry entries, by node (read through ``node``'s Redis pool)."""
    return {e.node: e for e in (await cluster_of(node).replicas([stream_id])).get(stream_id, [])}


async def wait_entries(
    node: RunningServer, stream_id: str, expected: dict[str, tuple[str, int, int]]
) -> None:
    """Until the registry says exactly ``{node: (upstream, depth, viewers)}`` (entries are
    written a moment after what they say changes: polled, under a deadline)."""
    seen: dict[str, tuple[str, int, int]] = {}
    with trio.move_on_after(30):
        while True:
            entries = await entries_of(node, stream_id)
            seen = {n: (e.upstream, e.depth, e.viewers) for n, e in entries.items()}
            if seen == expected:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"registry of {stream_id!r}: {seen}, expected {expected}")


async def poll(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Until ``condition()`` (Redis or a node's state, read every 0.1 s), under a deadline."""
    with trio.move_on_after(30):
        while True:
            if await condition():
                return
            await trio.sleep(0.1)
    raise AssertionError(f"not within 30 s: {what}")


async def test_replicas_chain_register_in_redis_and_a_killed_middle_replica_is_bypassed(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # A owns it; with A full, B is the first replica, C the next (fed by B: A feeds one).
    stream_id = stream_ranked("node-a", "node-b", "node-c")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        async with (
            open_chain(start_server, redis_server, tmp_path, streams, "node-b") as (a, c, b),
            open_playing_viewers(a.ws_url, stream_id, 3, capture=True) as viewers,
        ):
            # (b) One viewer each; C fed by B, B by A; the camera read once.
            assert (peers(a), peers(c)) == (1, 1)
            await wait_entries(
                a, stream_id, {"node-b": ("node-a", 1, 1), "node-c": ("node-b", 2, 1)}
            )
            assert cluster_of(a).statistics().owned_streams == (stream_id,)
            assert cluster_of(a).statistics().relay_connections == 1  # B only
            assert cluster_of(c)._replicas[stream_id].upstream == "node-b"
            assert sessions.connects == 1 and sessions.peak == 1, sessions.history
            for viewer in viewers:
                played = viewer.streams[stream_id]
                await played.wait_frames(15, timeout=30)
                assert frame_num_breaks(played.access_units) == 0

            # The API shows the tree (any node reads the same registry).
            listed = (await get(c.url + f"/api/streams/{stream_id}")).json()
            assert listed["owner"]["node"] == "node-a"
            assert [
                (r["node"], r["upstream"], r["depth"], r["viewers"]) for r in listed["replicas"]
            ] == [
                ("node-b", "node-a", 1, 1),
                ("node-c", "node-b", 2, 1),
            ]
            view = (await get(a.url + "/api/cluster")).json()
            assert {n["id"]: n["replicates"] for n in view["nodes"]} == {
                "node-a": [],
                "node-b": [stream_id],
                "node-c": [stream_id],
            }

            for node, replicates in ((a, 0), (c, 1)):
                series = await scrape(node.url)
                key = ("mediastream_cluster_stream_replicated", (("stream", stream_id),))
                assert series[key] == replicates

            # (c) B killed: its viewer re-offers and plays; C re-attaches to the owner and its
            # viewer plays on, never told anything.
            marks = [len(v.messages) for v in viewers]
            on_c = viewers[2].streams[stream_id]
            pc, frames_before, timestamps_before = on_c.pc, on_c.frames, len(on_c.frame_timestamps)
            b.process.kill()

            await replay_after_failure(viewers[1], stream_id, marks[1])
            replica_c = cluster_of(c)._replicas[stream_id]

            async def c_fed_by_the_owner() -> bool:
                return replica_c.upstream == "node-a"

            await poll(c_fed_by_the_owner, "C re-attached to the owner")
            await on_c.wait_frames(frames_before + 30, timeout=30)
            assert viewers[2].streams[stream_id] is on_c and on_c.pc is pc
            assert viewers[2].errors(after=marks[2]) == []
            assert viewers[0].errors(after=marks[0]) == []
            assert frame_num_breaks(on_c.access_units) == 0
            timestamps = on_c.frame_timestamps[timestamps_before - 1 :]
            assert all(t0 < t1 for t0, t1 in itertools.pairwise(timestamps))
            assert cluster_of(a).statistics().relay_connections == 1  # C now
            assert sessions.connects == 1, sessions.history

            # (a) B's entry expired by itself (nobody deleted it); C's says what C is now.
            async def b_expired() -> bool:
                return "node-b" not in await entries_of(a, stream_id)

            await poll(b_expired, "B's entry expired")
            entries = await entries_of(a, stream_id)
            assert (entries["node-c"].upstream, entries["node-c"].depth) == ("node-a", 1)
            assert peers(a) + peers(c) == 3

            # (a) The replica ends once its viewers left (after the grace): its entry is
            # deleted at once, not left to expire.
            for viewer in viewers[1:]:
                await viewer.stop(stream_id)
            with trio.fail_after(30):
                while stream_id in cluster_of(c).statistics().replicas:
                    await c.services.changes.wait()
            async with open_redis(redis_server.url) as redis:
                assert not await redis.hexists(replicas_key(stream_id), "node-c")
            assert await entries_of(a, stream_id) == {}


async def test_a_loaded_owner_counts_as_full_and_a_loaded_node_is_not_made_a_replica(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # (d) No viewer cap: the load limit alone turns replicas on. A and B run in this process
    # (one load: this process's CPU, kept high by a hashing thread); C is a process of its
    # own, idle. Placement ranks A, B, C: the second viewer goes to C, not to B.
    stream_id = stream_ranked("node-a", "node-b", "node-c")
    limit = {"max_load_per_node": 0.3}
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        a, b = await start_cluster(
            start_server, redis_server.url, ("node-a", "node-b"), streams, **limit
        )
        async with (
            open_node_process(tmp_path, "node-c", redis_server.url, streams, **limit) as c,
            open_viewer(a.ws_url) as first,
            open_viewer(a.ws_url) as second,
        ):
            await wait_registered(c)
            await (await first.play(stream_id, trickle=True)).wait_frames(5, timeout=30)
            assert cluster_of(a).statistics().owned_streams == (stream_id,)
            assert cluster_of(a).relay is not None  # replicas on without max_viewers_per_node

            stop = threading.Event()

            def burn() -> None:  # hashing releases the GIL: CPU used, the event loop free
                block = bytes(1 << 20)
                while not stop.is_set():
                    hashlib.sha256(block).digest()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(trio.to_thread.run_sync, burn))
                try:
                    with trio.fail_after(30):  # each node publishes its load every 2 s
                        while True:
                            loads = {n.node_id: n.load for n in await cluster_of(a).nodes()}
                            if loads["node-a"] >= 0.3 and loads["node-b"] >= 0.3 > loads["node-c"]:
                                break
                            await trio.sleep(0.2)
                    await (await second.play(stream_id, trickle=True)).wait_frames(5, timeout=30)
                    assert (peers(a), peers(b)) == (1, 0)  # C serves the second viewer
                    entries = await entries_of(a, stream_id)
                    assert list(entries) == ["node-c"] and entries["node-c"].upstream == "node-a"
                    assert cluster_of(a).statistics().relay_connections == 1
                finally:
                    stop.set()
            assert sessions.connects == 1, sessions.history
            async with open_redis(redis_server.url) as redis:
                assert {n.node_id for n in await live_nodes(redis)} == {
                    "node-a",
                    "node-b",
                    "node-c",
                }


async def test_the_owner_killed_its_replica_takes_the_stream_and_the_replica_below_follows(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # A (a process) owns it; the sockets are on B, the first replica (fed by A); C the second
    # (fed by B). A killed: B, the shallowest replica, claims the stream and becomes its owner
    # with its viewer's session kept (only A's viewer re-offers); C's upstream is the owner
    # now: C re-attaches to it, and its viewer plays on, never told anything.
    stream_id = stream_ranked("node-a", "node-b", "node-c")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        async with (
            open_chain(start_server, redis_server, tmp_path, streams, "node-a") as (b, c, a),
            open_playing_viewers(b.ws_url, stream_id, 3, capture=True) as viewers,
        ):
            await wait_entries(
                b, stream_id, {"node-b": ("node-a", 1, 1), "node-c": ("node-b", 2, 1)}
            )
            assert (peers(b), peers(c)) == (1, 1)
            marks = [len(v.messages) for v in viewers]
            kept = [viewers[i].streams[stream_id] for i in (1, 2)]  # B's and C's
            before = [(p.pc, p.frames, len(p.frame_timestamps)) for p in kept]

            a.process.kill()

            await replay_each_after_failure(stream_id, [(viewers[0], marks[0])])
            assert cluster_of(b).statistics().owned_streams == (stream_id,)

            async def c_fed_by_the_owner_b() -> bool:
                entry = (await entries_of(b, stream_id)).get("node-c")
                return entry is not None and (entry.upstream, entry.depth) == ("node-b", 1)

            await poll(c_fed_by_the_owner_b, "C re-attached to B, the owner")
            for index, played, (pc, frames_before, timestamps_before) in zip(
                (1, 2), kept, before, strict=True
            ):
                await played.wait_frames(frames_before + 30, timeout=30)
                assert viewers[index].streams[stream_id] is played and played.pc is pc
                assert viewers[index].errors(after=marks[index]) == []
                assert frame_num_breaks(played.access_units) == 0
                timestamps = played.frame_timestamps[timestamps_before - 1 :]
                assert all(t0 < t1 for t0, t1 in itertools.pairwise(timestamps))
            assert peers(b) + peers(c) == 3
            # Exactly one new camera session, never two at once.
            assert sessions.connects == 2 and sessions.peak == 1, sessions.history
