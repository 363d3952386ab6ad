"""Failures of a cluster with real nodes, a real redis-server and the GStreamer RTSP camera.

Node A runs in the test process (its statistics readable); the owner that is killed or frozen
is node B, a ``mediastream serve`` subprocess. The camera counts its connected RTSP clients
(``rtsp_camera.py --report-sessions``), so "exactly one new camera session" and "never two
sessions to one camera" are asserted where a camera would see them. Each stream reads its own
mount, so a count per mount is a count per stream.
"""

from __future__ import annotations

import os
import signal
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

from mediastream.cluster import liveness
from mediastream.cluster.leases import NodeRecord, current_owner, live_nodes
from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.cluster.redis_client import Redis, open_redis
from mediastream.server import RunningServer

from support.cluster import (
    NodeProcess,
    cluster_of,
    counting_camera,
    open_node_process,
    pattern_streams,
    replay_after_failure,
    start_cluster,
    start_node,
    wait_peer_failed,
    wait_registered,
)
from support.http import get
from support.redis import RedisServer
from support.servers import Camera, StartServer
from support.tcp_proxy import TcpProxy
from support.viewer import SignalingFailed, open_viewer

NODES = ("node-a", "node-b")
MOUNTS = ("/h264", "/h264-gop1")


ON_A = stream_ids_placed_on("node-a", NODES, 2)
ON_B = stream_ids_placed_on("node-b", NODES, 2)


def camera_streams(camera: Camera, stream_ids: list[str]) -> list[dict[str, Any]]:
    return [
        {"id": s, "source": camera.url(mount), "on_demand": True}
        for s, mount in zip(stream_ids, MOUNTS, strict=False)
    ]


def node_process(
    tmp_path: Path, node_id: str, redis: RedisServer, streams: list[dict[str, Any]]
) -> AbstractAsyncContextManager[NodeProcess]:
    """Node B as a ``mediastream serve`` process, ready once it logs that it serves."""
    return open_node_process(tmp_path, node_id, redis.url, streams)


async def test_the_owner_killed_every_tile_plays_again_on_its_socket_from_one_new_camera_session(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    async with counting_camera() as camera:
        streams = camera_streams(camera.camera, ON_B)
        a = await start_node(start_server, redis_server.url, "node-a", streams)
        async with node_process(tmp_path, "node-b", redis_server, streams) as b:
            await wait_registered(a, b)
            async with open_viewer(a.ws_url) as first, open_viewer(a.ws_url) as second:
                for viewer in (first, second):
                    for stream_id in ON_B:
                        await (await viewer.play(stream_id, trickle=True)).wait_frames(3)
                # One camera session per stream, on its owner B, however many viewers.
                assert (camera.current, camera.peak) == (2, 2)
                assert cluster_of(a).statistics().relayed_sessions == 4
                assert a.services.peers.statistics().open_peer_connections == 0
                connects = camera.connects
                marks = {id(v): len(v.messages) for v in (first, second)}

                b.process.kill()  # SIGKILL: no goodbye

                async with trio.open_nursery() as nursery:
                    for viewer in (first, second):
                        for stream_id in ON_B:
                            nursery.start_soon(
                                replay_after_failure, viewer, stream_id, marks[id(viewer)]
                            )
                # The same sockets (no reload), every tile played by the survivor A.
                assert first.closed_reason is None and second.closed_reason is None
                assert a.services.peers.statistics().open_peer_connections == 4
                assert cluster_of(a).statistics().owned_streams == tuple(sorted(ON_B))
                # B's process ended: its leases were taken over, not waited out.
                assert cluster_of(a).statistics().takeovers == 2
                # Exactly one new camera session per stream, never two at once.
                assert camera.connects == connects + 2
                assert camera.current == 2 and camera.peak == 2, camera.history


async def test_an_owner_frozen_past_its_lease_stops_reading_and_never_opens_the_camera_again(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    async with counting_camera() as camera:
        stream_id = ON_B[0]
        streams = camera_streams(camera.camera, [stream_id])
        a = await start_node(start_server, redis_server.url, "node-a", streams)
        async with node_process(tmp_path, "node-b", redis_server, streams) as b:
            await wait_registered(a, b)
            async with open_viewer(a.ws_url) as viewer:
                await (await viewer.play(stream_id, trickle=True)).wait_frames(3)
                assert camera.current == 1
                mark = len(viewer.messages)

                os.kill(b.process.pid, signal.SIGSTOP)
                # A frozen process keeps its connections: Redis still lists its liveness
                # connection, so nobody takes its lease over early; its record expires, the
                # tile is told, and its new offer waits out the lease before A claims.
                await replay_after_failure(viewer, stream_id, mark)
                assert cluster_of(a).statistics().owned_streams == (stream_id,)
                assert cluster_of(a).statistics().takeovers == 0

                # B's process is frozen with its camera connection open: it reads nothing, but
                # the camera still counts it (GStreamer's RTSP server, like many cameras, does
                # not expire a session held over TCP). A's session is the only one read.
                assert camera.current == 2

                os.kill(b.process.pid, signal.SIGCONT)
                # Waking, B finds its lease's deadline passed before it acts, and closes its
                # session: it never reads the camera again, never opens it again.
                await b.wait_logged(b"not renewed before its deadline")
                await camera.wait_until(lambda c: c.current == 1)
                assert camera.history == [1, 2, 1] and camera.connects == 2
                await viewer.streams[stream_id].wait_frames(5)
                assert cluster_of(a).statistics().owned_streams == (stream_id,)


async def start_pattern_nodes(
    start_server: StartServer, redis: RedisServer
) -> tuple[RunningServer, RunningServer]:
    a, b = await start_cluster(start_server, redis.url, NODES, pattern_streams(ON_A + ON_B))
    return a, b


async def test_redis_restarted_empty_while_viewers_play_they_play_on_and_nodes_reclaim(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_pattern_nodes(start_server, redis_server)
    local_stream, remote_stream = ON_A[0], ON_B[0]
    async with open_viewer(a.ws_url) as viewer:
        local = await viewer.play(local_stream, trickle=True)
        remote = await viewer.play(remote_stream, trickle=True)
        await local.wait_frames(3)
        await remote.wait_frames(3)
        leases = {
            local_stream: cluster_of(a)._owned[local_stream],
            remote_stream: cluster_of(b)._owned[remote_stream],
        }
        epochs = {s: lease.epoch for s, lease in leases.items()}
        mark = len(viewer.messages)

        redis_server.restart_empty()

        # Each owner claims its stream again (a new epoch) and both nodes are back.
        with trio.fail_after(20):
            for stream_id, lease in leases.items():
                while lease.epoch == epochs[stream_id]:
                    await lease.wait_changed()
        for node in (a, b):
            registration = cluster_of(node).registration
            assert registration is not None
            await registration.wait_renewed()
        async with open_redis(redis_server.url) as client:
            assert [n.node_id for n in await live_nodes(client)] == list(NODES)
            for stream_id, lease in leases.items():
                owner = await current_owner(client, stream_id)
                assert owner is not None and owner.epoch == lease.epoch > epochs[stream_id]
        # The same peer connections play on: frames keep coming, nothing was renegotiated.
        await local.wait_frames(20)
        await remote.wait_frames(20)
        assert viewer.streams[local_stream] is local and viewer.streams[remote_stream] is remote
        assert [m for m in viewer.messages[mark:] if m.get("type") in ("error", "answer")] == []
        assert cluster_of(a).statistics().relayed_sessions == 1


async def test_with_redis_down_owned_streams_play_remote_offers_fail_clearly_and_healthz_answers(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, _ = await start_pattern_nodes(start_server, redis_server)
    local_stream, remote_stream = ON_A[0], ON_B[1]
    async with open_viewer(a.ws_url) as viewer:
        playing = await viewer.play(local_stream, trickle=True)
        await playing.wait_frames(3)

        redis_server.stop()

        health = await get(f"{a.url}/healthz")
        assert (health.status, health.json()) == (200, {"status": "ok"})
        # A stream this node owns is served from memory: a new viewer plays it.
        async with open_viewer(a.ws_url) as newcomer:
            await (await newcomer.play(local_stream, trickle=True)).wait_frames(3)
        await playing.wait_frames(3)
        # One it does not own cannot be placed: a clear error on the same socket.
        with pytest.raises(SignalingFailed) as failed:
            await viewer.play(remote_stream, trickle=True)
        assert failed.value.code == "cluster_unavailable"
        assert f"Redis at 127.0.0.1:{redis_server.port}" in failed.value.message["payload"]
        await viewer.request({"type": "ping", "payload": 1}, None, ("pong",))


async def test_a_live_node_whose_liveness_connection_is_closed_gives_its_streams_up_first(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    """The reconnect race: others take a node's streams over once its liveness connection is
    gone, so a node that finds its connection replaced (here ``CLIENT KILL``) must already
    have stopped. It gives every lease up, then publishes its new connection's id."""
    a, _ = await start_pattern_nodes(start_server, redis_server)
    stream_id = ON_A[0]
    cluster = cluster_of(a)
    assert cluster._liveness is not None and cluster.registration is not None
    old_id = cluster._liveness.client_id
    async with open_viewer(a.ws_url) as viewer, open_redis(redis_server.url) as client:
        await (await viewer.play(stream_id, trickle=True)).wait_frames(3)
        lease = cluster._owned[stream_id]
        mark = len(viewer.messages)

        assert await client.client_kill(identifier=old_id)

        with trio.fail_after(10):
            await lease.lost.wait()
        assert "liveness connection to Redis was closed" in lease.loss_reason
        told = await wait_peer_failed(viewer, stream_id, mark, timeout=10)
        assert "lost the stream" in told["payload"]
        with trio.fail_after(10):  # the new id is written at once, not at the next renewal
            while cluster.registration.record.liveness in (0, old_id):
                await cluster.registration.wait_renewed()
            await cluster.registration.wait_renewed()
        (record,) = [n for n in await live_nodes(client) if n.node_id == "node-a"]
        assert record.liveness == cluster._liveness.client_id != old_id
        assert cluster._liveness.statistics().breaks == 1


ICE_MESSAGE = b'"kind":"ice"'


async def start_owner_behind_a_proxy(
    start_server: StartServer, redis: RedisServer, proxy: TcpProxy
) -> tuple[RunningServer, RunningServer]:
    """Node A with the page's socket, node B (the owner of ``ON_B``) reaching Redis through
    ``proxy``, which can lose the pub/sub messages on their way to B."""
    streams = pattern_streams(ON_A + ON_B)
    a = await start_node(start_server, redis.url, "node-a", streams)
    proxied = f"redis://127.0.0.1:{proxy.port}/0"
    b = await start_node(start_server, proxied, "node-b", streams)
    await wait_registered(a, b)
    return a, b


def bus_of(server: RunningServer) -> Any:
    bus = cluster_of(server)._bus
    assert bus is not None
    return bus


async def test_a_lost_candidate_message_is_sent_again_and_handled_once(
    start_server: StartServer, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    proxy = TcpProxy(redis_server.port)
    await nursery.start(proxy.serve)
    a, _ = await start_owner_behind_a_proxy(start_server, redis_server, proxy)
    proxy.drop_messages(1, containing=ICE_MESSAGE)  # A's first candidate for B is lost
    async with open_viewer(a.ws_url) as viewer:
        played = await viewer.play(ON_B[0], trickle=True)
        await played.wait_frames(5)
        with trio.fail_after(10):
            await proxy.wait_dropped(1)
            while bus_of(a).statistics().retries < 1:
                await trio.lowlevel.checkpoint()  # a retry comes after ACK_TIMEOUT; let it run
        # Sent again once, acknowledged: no session ended, no error on the socket.
        assert (bus_of(a).statistics().retries, bus_of(a).statistics().timeouts) == (1, 0)
        assert viewer.errors() == []
        assert cluster_of(a).statistics().relayed_sessions == 1
        await played.wait_frames(5)


async def test_candidate_messages_lost_past_their_retry_end_the_session_and_a_new_offer_plays(
    start_server: StartServer, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    proxy = TcpProxy(redis_server.port)
    await nursery.start(proxy.serve)
    a, _ = await start_owner_behind_a_proxy(start_server, redis_server, proxy)
    proxy.drop_messages(1000, containing=ICE_MESSAGE)  # every candidate for B is lost
    stream_id = ON_B[0]
    async with open_viewer(a.ws_url) as viewer:
        await viewer.play(stream_id, trickle=True, connect=False)
        failed = await viewer.wait_for(
            lambda m: m.get("streamId") == stream_id and m.get("type") == "error", timeout=30
        )
        # Not a stuck tile: a clear error the page's engine answers with a new offer.
        assert failed["code"] == "relay_failed", failed
        assert 'node "node-b" did not answer ice' in failed["payload"]
        assert "send a new offer" in failed["payload"]
        assert cluster_of(a).statistics().relayed_sessions == 0
        proxy.drop_messages(0)
        again = await viewer.play(stream_id, trickle=True)
        await again.wait_frames(5)
        assert viewer.closed_reason is None


async def test_gone_nodes_and_take_over_judge_and_delete_only_what_they_name(
    client: Redis,
    redis_server: RedisServer,
    judge_nodes_on_a_fresh_redis: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with liveness._open_liveness_client(redis_server.url, "node-a") as live:
        own_id = await live.client_id()  # a named liveness connection Redis lists
        alive = NodeRecord("node-a", "http://a", liveness=own_id)
        dead = NodeRecord("node-b", "http://b", liveness=own_id + 1000)  # no such connection
        unknown = NodeRecord("node-c", "http://c")  # liveness id not published yet
        records = [alive, dead, unknown]
        assert await liveness.gone_nodes(client, records) == {"node-b"}
        gone = await liveness.gone_nodes(client, records, expected=["node-x"])
        assert gone == {"node-b", "node-x"}
        # The same id under another node's name is not that node's connection.
        impostor = NodeRecord("node-d", "http://d", liveness=own_id)
        assert await liveness.gone_nodes(client, [impostor]) == {"node-d"}
        # A Redis up for less than STEADY_AFTER judges nobody (it may just have restarted).
        monkeypatch.setattr(liveness, "STEADY_AFTER", 1e9)
        assert await liveness.gone_nodes(client, records, expected=["node-x"]) == set()

    await client.set("ms:owner:cam-t", "node-b|7")
    await client.set("ms:node:node-b", dead.to_json())
    # Another value (the stream was claimed meanwhile) and another liveness id: untouched.
    assert not await liveness.take_over(client, "cam-t", "node-b|6", "node-b", dead.liveness + 1)
    assert await client.get("ms:owner:cam-t") == "node-b|7"
    assert await client.get("ms:node:node-b") == dead.to_json()
    assert await liveness.take_over(client, "cam-t", "node-b|7", "node-b", dead.liveness)
    assert await client.get("ms:owner:cam-t") is None
    assert await client.get("ms:node:node-b") is None


async def test_a_lost_answer_from_the_owner_is_sent_again_and_the_tile_plays(
    start_server: StartServer, redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    proxy = TcpProxy(redis_server.port)
    await nursery.start(proxy.serve)
    streams = pattern_streams(ON_A + ON_B)
    proxied = f"redis://127.0.0.1:{proxy.port}/0"  # A, the socket's node, behind the proxy
    a = await start_node(start_server, proxied, "node-a", streams)
    b = await start_node(start_server, redis_server.url, "node-b", streams)
    await wait_registered(a, b)
    proxy.drop_messages(1, containing=b'\\"type\\":\\"answer\\"')  # B's answer, for A's socket
    async with open_viewer(a.ws_url) as viewer:
        played = await viewer.play(ON_B[0], trickle=True)  # its answer came: the retry
        await played.wait_frames(5)
        assert proxy.dropped == 1
        assert (bus_of(b).statistics().retries, bus_of(b).statistics().timeouts) == (1, 0)
        assert viewer.errors() == []
