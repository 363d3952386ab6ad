"""Two real nodes and one real redis-server: one socket plays streams owned by either node.

The nodes are MediaStream servers on loopback ports in this test process (each its own
registry, peers, Redis pool and inbox); the client is aiortc with one signaling socket.
Which node owns a stream is decided by placement (rendezvous hashing over the serving
nodes), so the streams are picked by computing the same placement here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio_asyncio

from mediastream.cluster.leases import current_owner, live_nodes
from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.cluster.redis_bus import open_redis_bus
from mediastream.cluster.redis_client import open_redis
from mediastream.server import RunningServer

from support.cluster import (
    cluster_of,
    ingests,
    open_node_process,
    pattern_streams,
    start_cluster,
    start_node,
    wait_peer_failed,
)
from support.http import get
from support.redis import RedisServer
from support.servers import StartServer, free_port
from support.viewer import SignalingFailed, open_viewer

NODES = ("node-a", "node-b")


ON_A = stream_ids_placed_on("node-a", NODES, 2)
ON_B = stream_ids_placed_on("node-b", NODES, 2)


async def start_nodes(start_server: StartServer, redis: RedisServer) -> list[RunningServer]:
    """Nodes A and B, each serving every stream of ``ON_A`` and ``ON_B``, both in Redis."""
    return await start_cluster(start_server, redis.url, NODES, pattern_streams(ON_A + ON_B))


async def test_one_socket_plays_a_stream_of_each_node_and_media_comes_from_its_owner(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    local_stream, remote_stream = ON_A[0], ON_B[0]
    async with open_viewer(a.ws_url) as viewer:
        local = await viewer.play(local_stream, trickle=True)
        remote = await viewer.play(remote_stream, trickle=True)
        await local.wait_frames(5)
        await remote.wait_frames(5)

        # Each stream is owned and read by its placed node only.
        assert cluster_of(a).statistics().owned_streams == (local_stream,)
        assert cluster_of(b).statistics().owned_streams == (remote_stream,)
        assert ingests([a, b], local_stream) == 1
        assert ingests([a, b], remote_stream) == 1
        remote_on_a = a.services.registry.get(remote_stream)
        assert remote_on_a is not None and remote_on_a.statistics().encoders_opened == 0
        # The remote stream's peer connection is B's: the media comes from B's ports, not A's.
        assert a.services.peers.statistics().open_peer_connections == 1
        assert b.services.peers.statistics().open_peer_connections == 1
        assert cluster_of(a).statistics().relayed_sessions == 1
        assert cluster_of(b).statistics().remote_sockets == 1

        # A second offer for the stream A owns is served without a single Redis command.
        before = cluster_of(a).statistics()
        async with open_viewer(a.ws_url) as second:
            again = await second.play(local_stream, trickle=True)
            await again.wait_frames(3)
        after = cluster_of(a).statistics()
        assert after.local_offers == before.local_offers + 1
        assert after.redis_commands == before.redis_commands
        assert ingests([a, b], local_stream) == 1

        # A new offer for the relayed stream replaces its session on B; the old session's
        # close and end, racing it over the bus, name the old offer and leave the new alone.
        replaced_pc = remote.pc
        renewed = await viewer.play(remote_stream, trickle=True)
        await trio_asyncio.aio_as_trio(replaced_pc.close)()
        await renewed.wait_frames(5)
        with trio.fail_after(15):
            while b.services.peers.statistics().open_peer_connections != 1:
                await b.services.changes.wait()
        assert cluster_of(a).statistics().relayed_sessions == 1
        await renewed.wait_frames(10)

        # Closing the relayed stream ends B's session and peer (told over the bus).
        await viewer.stop(remote_stream)
        with trio.fail_after(15):
            while b.services.peers.statistics().open_peer_connections:
                await b.services.changes.wait()
        assert cluster_of(a).statistics().relayed_sessions == 0


async def test_concurrent_opens_through_both_nodes_read_the_stream_once(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    stream_id = ON_B[1]
    async with open_viewer(a.ws_url) as on_a, open_viewer(b.ws_url) as on_b:
        played: dict[str, object] = {}

        async def play(name: str, viewer: object) -> None:
            played[name] = await viewer.play(stream_id, trickle=True)  # type: ignore[attr-defined]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(play, "a", on_a)
            nursery.start_soon(play, "b", on_b)
        for each in played.values():
            await each.wait_frames(5)  # type: ignore[attr-defined]
        assert ingests([a, b], stream_id) == 1
        owners = [n for n in (a, b) if stream_id in cluster_of(n).statistics().owned_streams]
        assert owners == [b]
        assert b.services.peers.statistics().open_peer_connections == 2
        assert a.services.peers.statistics().open_peer_connections == 0


async def test_the_owner_killed_its_tile_is_told_and_plays_again_from_one_new_ingest(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    streams = pattern_streams(ON_A + ON_B)
    a = await start_node(start_server, redis_server.url, "node-a", streams)
    stream_id = ON_B[0]
    async with (
        open_node_process(tmp_path, "node-b", redis_server.url, streams) as b,
        open_viewer(a.ws_url) as viewer,
    ):
        first = await viewer.play(stream_id, trickle=True)
        await first.wait_frames(5)
        assert cluster_of(a).statistics().relayed_sessions == 1
        assert a.services.peers.statistics().open_peer_connections == 0  # B's peer

        mark = len(viewer.messages)
        b.process.kill()  # SIGKILL: no goodbye, its lease and record just stop renewing
        told = await wait_peer_failed(viewer, stream_id, mark)
        assert "send a new offer" in told["payload"]

        again = await viewer.play(stream_id, trickle=True)
        await again.wait_frames(5)
        assert cluster_of(a).statistics().owned_streams == (stream_id,)
        assert ingests([a], stream_id) == 1  # exactly one new camera session, on A


async def test_a_node_is_in_redis_while_it_serves_and_leaves_at_once_when_it_stops(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    async with open_redis(redis_server.url) as client:
        assert [n.node_id for n in await live_nodes(client)] == ["node-a", "node-b"]
        async with open_viewer(b.ws_url) as viewer:
            await (await viewer.play(ON_A[0], trickle=True)).wait_frames(3)
            owner = await current_owner(client, ON_A[0])
            assert owner is not None and owner.node_id == "node-a"
            a.request_shutdown()
            with trio.fail_after(15):
                await a.wait_stopped()
        # Released and unregistered on the way out, not left to expire.
        assert await current_owner(client, ON_A[0]) is None
        assert [n.node_id for n in await live_nodes(client)] == ["node-b"]


async def test_with_redis_down_the_node_serves_healthz_and_an_offer_fails_clearly(
    start_server: StartServer,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    node = await start_node(start_server, nowhere, "node-a", pattern_streams(["cam"]))
    health = await get(f"{node.url}/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    async with open_viewer(node.ws_url) as viewer:
        with pytest.raises(SignalingFailed) as failed:
            await viewer.play("cam", trickle=True)
        assert failed.value.message["code"] == "cluster_unavailable"
        assert "Redis at 127.0.0.1" in failed.value.message["payload"]
        # The socket lives on: it still answers.
        await viewer.request({"type": "ping", "payload": 1}, None, ("pong",))
    stream = node.services.registry.get("cam")
    assert stream is not None and stream.statistics().encoders_opened == 0


async def test_an_owner_that_cannot_renew_stops_its_ingest_and_tells_its_viewers(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, _ = await start_nodes(start_server, redis_server)
    stream_id = ON_A[0]
    stream = a.services.registry.get(stream_id)
    assert stream is not None
    async with open_viewer(a.ws_url) as viewer:
        await (await viewer.play(stream_id, trickle=True)).wait_frames(3)
        assert cluster_of(a).statistics().owned_streams == (stream_id,)
        mark = len(viewer.messages)
        redis_server.freeze()  # SIGSTOP: renewals get no answer until the lease's deadline
        try:
            told = await wait_peer_failed(viewer, stream_id, mark)
            assert "lost the stream" in told["payload"]
            with trio.fail_after(15):
                await stream.changes.wait_until(lambda: not stream.source_running)
            assert cluster_of(a).statistics().owned_streams == ()
        finally:
            redis_server.thaw()


async def test_bad_and_stale_messages_from_another_node_change_nothing(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, _ = await start_nodes(start_server, redis_server)
    stream_id = ON_A[0]
    async with open_viewer(a.ws_url) as viewer, open_redis(redis_server.url) as client:
        played = await viewer.play(stream_id, trickle=True)
        await played.wait_frames(3)
        async with open_redis_bus(client, "node-x") as stranger:
            with trio.fail_after(10):
                reply = await stranger.request(
                    "node-a", "offer", socket="s-1", stream=stream_id, payload={"sdp": 5}
                )
            assert reply.payload["error"] == "invalid_offer"
            assert '"sdp"' in reply.payload["message"]
            before = cluster_of(a).statistics().stale_dropped
            # A candidate and a close from a node with no session there, of an old epoch.
            for kind in ("ice", "close"):
                await stranger.send(
                    "node-a", kind, socket="s-1", stream=stream_id, epoch=1, payload={}
                )
            # Each PUBLISH is delivered before the next is sent, and the inbox is handled in
            # order: once this request is answered, the two messages above were handled.
            with trio.fail_after(10):
                await stranger.request("node-a", "offer", stream=stream_id, payload=None)
            assert cluster_of(a).statistics().stale_dropped == before + 2
        await played.wait_frames(played.frames + 5)  # the node's own viewer plays on
        assert cluster_of(a).statistics().owned_streams == (stream_id,)
