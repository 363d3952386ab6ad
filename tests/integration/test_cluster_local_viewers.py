"""Viewers that are not routed offers, on a node that does not own the stream: a WHEP
player, a fallback over the socket, a snapshot. Two real nodes on one real redis-server, the
counting GStreamer camera.

Such a viewer watches the stream on the node it reached (a load balancer picks any). Before
its viewer opens, that node makes the stream's frames available there
(``ClusterNode.serve_locally``): a replica of the owner's stream, or a claim when nobody owns
it. The camera is read once in the cluster whatever the number of nodes that play it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import av
import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from trio_websocket import open_websocket_url

from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.fallback import BinaryKind
from mediastream.server import RunningServer

from support.cluster import (
    CameraSessions,
    camera_qualities,
    camera_stream,
    cluster_of,
    counting_camera,
    open_node_process,
    replay_after_failure,
    start_cluster,
    wait_registered,
)
from support.fallback import FallbackClient
from support.http import HttpResponse, get, request
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import PlayedStream, Viewer, open_viewer
from support.whep import WhepPlayer

NODES = ("node-a", "node-b")
SUB = (320, 180)


def placed_on(node_id: str, nodes: tuple[str, ...] = NODES) -> str:
    """A stream id that placement gives ``node_id`` when ``nodes`` all serve."""
    return stream_ids_placed_on(node_id, nodes, 1, prefix="porch")[0]


@asynccontextmanager
async def open_two_nodes(
    start_server: StartServer,
    redis_server: RedisServer,
    stream_id: str,
    streams_of: Callable[[CameraSessions, str], list[dict[str, Any]]] = camera_stream,
) -> AsyncIterator[tuple[CameraSessions, RunningServer, RunningServer]]:
    """The counting camera, and nodes A and B serving ``stream_id`` from it (its one
    quality, or what ``streams_of`` makes of it), both in Redis."""
    async with counting_camera() as sessions:
        a, b = await start_cluster(
            start_server, redis_server.url, NODES, streams_of(sessions, stream_id)
        )
        yield sessions, a, b


async def play_whep(
    player: WhepPlayer, url: str, nursery: trio.Nursery, frames: int
) -> HttpResponse:
    """The WHEP player's offer to ``url``, answered ``201``; its answer applied, and
    ``frames`` frames decoded. Returns the answer (its ``location`` names the session)."""
    response = await player.offer(url)
    assert response.status == 201, response.body
    await player.accept(response, nursery)
    await player.wait_frames(frames, timeout=30)
    return response


async def watched_on_a(a: RunningServer, viewer: Viewer, stream_id: str) -> None:
    """A WebSocket viewer on A plays the stream: A owns it (placement gives it A)."""
    played = await viewer.play(stream_id, trickle=True)
    await played.wait_frames(5, timeout=30)
    assert cluster_of(a).statistics().owned_streams == (stream_id,)


async def wait_replica_gone(node: RunningServer, stream_id: str, timeout: float = 30) -> None:
    stream = node.services.registry.get(stream_id)
    assert stream is not None
    with trio.fail_after(timeout):
        await stream.changes.wait_until(
            lambda: (
                stream_id not in cluster_of(node).statistics().replicas
                and not stream.source_running
            )
        )


async def test_a_whep_player_on_a_node_that_does_not_own_the_stream_plays_it_from_a_replica(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = placed_on("node-a")
    async with (
        open_two_nodes(start_server, redis_server, stream_id) as (sessions, a, b),
        open_viewer(a.ws_url) as viewer,
        trio.open_nursery() as nursery,
    ):
        await watched_on_a(a, viewer, stream_id)
        player = await WhepPlayer.create()
        try:
            response = await play_whep(player, f"{b.url}/whep/{stream_id}", nursery, 10)

            # B replicates it for its WHEP player: fed by A, the camera read once.
            assert cluster_of(b).statistics().replicas == (stream_id,)
            assert cluster_of(b).statistics().owned_streams == ()
            entries = (await cluster_of(b).replicas([stream_id]))[stream_id]
            assert [(e.node, e.upstream, e.depth) for e in entries] == [("node-b", "node-a", 1)]
            assert sessions.current == 1 and sessions.connects == 1, sessions.history

            deleted = await request(b.url + response.headers["location"], method="DELETE")
            assert deleted.status == 200
        finally:
            await player.close()
        # Its last viewer gone, B's replica ends after the grace, its entry with it.
        await wait_replica_gone(b, stream_id)
        assert (await cluster_of(b).replicas([stream_id]))[stream_id] == []
        # A's viewer plays on; the camera never saw a second session.
        await viewer.streams[stream_id].wait_frames(5, timeout=30)
        assert sessions.connects == 1 and sessions.peak == 1, sessions.history
        nursery.cancel_scope.cancel()


async def test_a_fallback_on_another_node_gets_segments_of_the_quality_it_asked_for(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    stream_id = placed_on("node-a")
    async with (
        open_two_nodes(start_server, redis_server, stream_id, camera_qualities) as (sessions, a, b),
        open_viewer(a.ws_url) as viewer,
        open_websocket_url(b.ws_url) as ws,
        trio.open_nursery() as nursery,
    ):
        await watched_on_a(a, viewer, stream_id)  # on main, the default
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        # What a page on a UDP-blocked network sends, to the node its socket reached.
        await client.send(
            {"type": "fallback", "streamId": stream_id, "payload": {"quality": "sub"}}
        )
        await client.wait_until(lambda: client.fragments(stream_id) >= 10)

        assert client.binary[0][0] is BinaryKind.INIT
        path = tmp_path / "sub.mp4"
        path.write_bytes(client.media(stream_id))
        with av.open(str(path)) as container:
            pictures = list(container.decode(container.streams.video[0]))
        assert len(pictures) >= 10
        assert {(p.width, p.height) for p in pictures} == {SUB}
        assert [m for m in client.messages if m.get("type") == "error"] == []
        # B replicates the stream, sub only (relayed on demand); A reads each quality
        # once: main for its own viewer, sub for B's relay.
        replica = b.services.registry.get(stream_id)
        assert replica is not None
        assert cluster_of(b).statistics().replicas == (stream_id,)
        assert replica.quality("sub").viewers == 1 and replica.quality("main").viewers == 0
        assert not replica.quality("main").running
        assert sessions.current == 2 and sessions.peak == 2, sessions.history
        nursery.cancel_scope.cancel()


async def test_a_snapshot_through_another_node_s_api_is_a_jpeg(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = placed_on("node-a")
    async with (
        open_two_nodes(start_server, redis_server, stream_id) as (sessions, a, b),
        open_viewer(a.ws_url) as viewer,
    ):
        await watched_on_a(a, viewer, stream_id)
        response = await get(f"{b.url}/api/streams/{stream_id}/snapshot.jpg")
        assert response.status == 200, response.body
        assert response.headers["content-type"] == "image/jpeg"
        assert response.body[:3] == b"\xff\xd8\xff"
        assert cluster_of(b).statistics().replicas == (stream_id,)
        assert sessions.connects == 1 and sessions.peak == 1, sessions.history


async def test_a_whep_player_on_a_stream_nobody_owns_makes_its_node_read_the_camera(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = placed_on("node-a")  # placement prefers A; the player is on B
    async with open_two_nodes(start_server, redis_server, stream_id) as (sessions, a, b):
        player = await WhepPlayer.create()
        try:
            async with trio.open_nursery() as nursery:
                await play_whep(player, f"{b.url}/whep/{stream_id}", nursery, 10)
                assert cluster_of(b).statistics().owned_streams == (stream_id,)
                assert cluster_of(b).statistics().replicas == ()
                assert cluster_of(a).statistics().owned_streams == ()
                assert sessions.current == 1 and sessions.connects == 1, sessions.history
                nursery.cancel_scope.cancel()
        finally:
            await player.close()


async def test_redis_down_a_whep_player_on_a_node_that_does_not_read_the_stream_gets_503(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = placed_on("node-a")
    async with (
        open_two_nodes(start_server, redis_server, stream_id) as (sessions, a, b),
        open_viewer(a.ws_url) as viewer,
        open_websocket_url(b.ws_url) as ws,
    ):
        await watched_on_a(a, viewer, stream_id)
        redis_server.stop()

        player = await WhepPlayer.create()
        try:
            response = await player.offer(f"{b.url}/whep/{stream_id}")
        finally:
            await player.close()
        assert response.status == 503, response.body
        refusal = json.loads(response.body)
        assert refusal["code"] == "cluster_unavailable"
        assert f"Redis at 127.0.0.1:{redis_server.port}" in refusal["error"], refusal
        assert b.services.whep.open_sessions == 0
        # The fallback on B's socket: a retryable error naming Redis, the socket open.
        async with trio.open_nursery() as nursery:
            client = FallbackClient(ws)
            nursery.start_soon(client.read)
            await client.send({"type": "fallback", "streamId": stream_id})
            error = await client.wait_error()
            assert (error["code"], error["streamId"]) == ("cluster_unavailable", stream_id)
            assert "Redis" in error["payload"]
            assert client.binary == []
            nursery.cancel_scope.cancel()
        snapshot = await get(f"{b.url}/api/streams/{stream_id}/snapshot.jpg")
        assert snapshot.status == 503
        assert "Redis" in json.loads(snapshot.body)["error"]
        # Nothing else lost: A's viewer plays on, B stays up, no camera session added.
        await viewer.streams[stream_id].wait_frames(5, timeout=30)
        health = await get(f"{b.url}/healthz")
        assert health.status == 200
        assert cluster_of(b).statistics().replicas == ()
        assert sessions.connects == 1, sessions.history


async def test_the_owner_killed_a_whep_player_plays_on_from_the_stream_s_next_owner(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # A (a process of its own) owns it for a socket viewer on C; B replicates it for a WHEP
    # player. A killed: C's viewer re-offers, and B or C claims the stream; B's replica
    # re-attaches to C, or gives way to B's own camera session: either way the WHEP player,
    # whose viewer stays in B's fan-out, plays on with the same peer connection.
    stream_id = placed_on("node-a", ("node-a", "node-b", "node-c"))
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        b, c = await start_cluster(start_server, redis_server.url, ("node-b", "node-c"), streams)
        async with (
            open_node_process(tmp_path, "node-a", redis_server.url, streams) as a,
            open_viewer(c.ws_url) as viewer,
            trio.open_nursery() as nursery,
        ):
            await wait_registered(a)
            played = await viewer.play(stream_id, trickle=True)
            await played.wait_frames(5, timeout=30)
            assert cluster_of(b).statistics().owned_streams == ()
            assert cluster_of(c).statistics().owned_streams == ()
            player = await WhepPlayer.create()
            try:
                await play_whep(player, f"{b.url}/whep/{stream_id}", nursery, 10)
                assert cluster_of(b).statistics().replicas == (stream_id,)
                mark = len(viewer.messages)

                a.process.kill()

                await replay_after_failure(viewer, stream_id, mark)
                owners = cluster_of(b).statistics().owned_streams + (
                    cluster_of(c).statistics().owned_streams
                )
                assert owners == (stream_id,)
                await player.wait_frames(25, timeout=30)
                assert b.services.whep.open_sessions == 1
                assert sessions.connects == 2 and sessions.peak == 1, sessions.history
            finally:
                await player.close()
            nursery.cancel_scope.cancel()


async def test_the_owner_killed_a_replica_serving_only_whep_and_a_fallback_takes_the_stream_over(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # B replicates A's stream for a WHEP player and a fallback only (no socket viewer anywhere
    # to re-offer). A killed: B's replica claims the stream itself and becomes its owner; the
    # WHEP player and the fallback, whose viewers stay in B's fan-out, play on, never told
    # anything, from B's own (the one new) camera session.
    stream_id = placed_on("node-a")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        (b,) = await start_cluster(start_server, redis_server.url, ("node-b",), streams)
        async with (
            open_node_process(tmp_path, "node-a", redis_server.url, streams) as a,
            open_websocket_url(b.ws_url) as ws,
            trio.open_nursery() as nursery,
        ):
            await wait_registered(a)
            async with open_viewer(b.ws_url) as viewer:  # A claims it for this viewer
                await (await viewer.play(stream_id, trickle=True)).wait_frames(3, timeout=30)
                client = FallbackClient(ws)
                nursery.start_soon(client.read)
                await client.send({"type": "fallback", "streamId": stream_id})
                await client.wait_until(lambda: client.fragments(stream_id) >= 5)
            player = await WhepPlayer.create()
            try:
                await play_whep(player, f"{b.url}/whep/{stream_id}", nursery, 5)
                assert cluster_of(b).statistics().replicas == (stream_id,)

                a.process.kill()

                with trio.fail_after(30):
                    await b.services.changes.wait_until(
                        lambda: cluster_of(b).statistics().owned_streams == (stream_id,)
                    )
                fragments = client.fragments(stream_id)
                await player.wait_frames(25, timeout=30)
                await client.wait_until(lambda: client.fragments(stream_id) >= fragments + 10)
                assert [m for m in client.messages if m.get("type") == "error"] == []
                assert b.services.whep.open_sessions == 1
                assert cluster_of(b).statistics().replicas == ()
                assert sessions.connects == 2 and sessions.peak == 1, sessions.history
            finally:
                await player.close()
            nursery.cancel_scope.cancel()


async def new_peer() -> RTCPeerConnection:
    # No STUN: these machines have no internet, and gathering would wait for it.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def test_a_shared_peer_connection_on_another_node_plays_the_stream_from_a_replica(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = placed_on("node-a")
    async with (
        open_two_nodes(start_server, redis_server, stream_id) as (sessions, a, b),
        open_viewer(a.ws_url) as viewer,
        open_viewer(b.ws_url) as on_b,
    ):
        await watched_on_a(a, viewer, stream_id)
        pc = await trio_asyncio.aio_as_trio(new_peer)()
        try:
            transceiver = pc.addTransceiver("video", direction="recvonly")
            offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
            peer_id = "~it-pc1"
            sdp = pc.localDescription.sdp
            streams = {transceiver.mid: stream_id}
            answer = await on_b.request(
                {
                    "type": "offer",
                    "streamId": peer_id,
                    "payload": {"type": "offer", "sdp": sdp, "streams": streams},
                },
                peer_id,
                ("answer",),
            )
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=answer["payload"], type="answer")
            )
            await on_b.send({"type": "applied", "streamId": peer_id, "payload": {}})
            played = PlayedStream(stream_id, pc)
            on_b._nursery.start_soon(on_b._decode, played, transceiver.receiver.track)
            await played.wait_frames(10, timeout=30)
            assert cluster_of(b).statistics().replicas == (stream_id,)
            assert on_b.errors() == []
            assert sessions.connects == 1 and sessions.peak == 1, sessions.history
        finally:
            await trio_asyncio.aio_as_trio(pc.close)()
