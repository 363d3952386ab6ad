"""Always-on streams in a cluster: read with no viewer, by exactly one node, the one placement
chooses; taken over by another node when their owner leaves. Two real nodes, one real
redis-server; nothing watches the streams until the end."""

from __future__ import annotations

import trio

from mediastream.cluster.leases import current_owner, live_nodes
from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.cluster.redis_client import open_redis
from mediastream.registry import Stream
from mediastream.server import RunningServer

from support.cluster import cluster_of, ingests, pattern_streams, start_cluster
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import open_viewer

NODES = ("node-a", "node-b")
ON_A = stream_ids_placed_on("node-a", NODES, 2)
ON_B = stream_ids_placed_on("node-b", NODES, 2)
ALWAYS_ON = ON_A + ON_B


async def start_always_on_nodes(
    start_server: StartServer, redis: RedisServer
) -> list[RunningServer]:
    streams = pattern_streams(ALWAYS_ON, on_demand=False)
    return await start_cluster(start_server, redis.url, NODES, streams)


def stream_on(node: RunningServer, stream_id: str) -> Stream:
    stream = node.services.registry.get(stream_id)
    assert stream is not None
    return stream


async def wait_read(node: RunningServer, stream_id: str) -> None:
    """Until ``node`` reads the stream (its source opened its encoder)."""
    stream = stream_on(node, stream_id)
    await stream.changes.wait_until(
        lambda: stream.source_running and stream.statistics().encoders_opened > 0
    )


async def test_always_on_streams_are_read_by_their_placed_node_only_with_no_viewer(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_always_on_nodes(start_server, redis_server)
    with trio.fail_after(20):
        for node, placed in ((a, ON_A), (b, ON_B)):
            for stream_id in placed:
                await wait_read(node, stream_id)
        # Node A started first and claimed every stream; those placement gives to B, unwatched,
        # were handed to it: each is read by one node, its placed one.
        for stream_id in ON_B:
            stream = stream_on(a, stream_id)
            await stream.changes.wait_until(lambda s=stream: not s.source_running)
    assert sorted(cluster_of(a).statistics().owned_streams) == sorted(ON_A)
    assert sorted(cluster_of(b).statistics().owned_streams) == sorted(ON_B)
    for stream_id in ON_A:
        assert ingests([a, b], stream_id) == 1, stream_id  # the camera is read once
    for stream_id in ON_B:  # once by A until it handed the stream over, then once by B
        assert stream_on(b, stream_id).statistics().encoders_opened == 1, stream_id
    async with open_redis(redis_server.url) as client:
        for node_id, placed in (("node-a", ON_A), ("node-b", ON_B)):
            for stream_id in placed:
                owner = await current_owner(client, stream_id)
                assert owner is not None and owner.node_id == node_id
        # Each node publishes its load (the share of a core it uses) for placement.
        loads = {n.node_id: n.load for n in await live_nodes(client)}
        assert set(loads) == set(NODES) and all(0 <= load < 4 for load in loads.values())
    # A viewer on either node plays them, from their owner.
    async with open_viewer(a.ws_url) as viewer:
        played = await viewer.play(ON_B[0], trickle=True)
        await played.wait_frames(3)
    assert stream_on(b, ON_B[0]).statistics().encoders_opened == 1  # no new ingest for it
    assert not stream_on(a, ON_B[0]).source_running


async def test_the_always_on_streams_of_a_node_that_leaves_are_read_by_another(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_always_on_nodes(start_server, redis_server)
    with trio.fail_after(20):
        for stream_id in ON_A:
            await wait_read(a, stream_id)
    a.request_shutdown()
    with trio.fail_after(30):
        await a.wait_stopped()
        # Nobody watches them, yet B starts reading them: always-on.
        for stream_id in ON_A:
            await wait_read(b, stream_id)
    assert sorted(cluster_of(b).statistics().owned_streams) == sorted(ALWAYS_ON)
    for stream_id in ON_A:
        assert stream_on(b, stream_id).statistics().encoders_opened == 1
