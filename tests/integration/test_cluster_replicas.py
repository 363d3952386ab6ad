"""Replicas: three real nodes, one real redis-server, the GStreamer camera, aiortc viewers.

With ``max_viewers_per_node = 2`` a popular camera's viewers spread over the nodes: the owner
serves two, the next ones are served by replicas fed with the owner's encoded frames over
the relay. The camera counts its RTSP clients (``rtsp_camera.py --report-sessions``): it is
read once whatever the number of viewers. The viewers capture the access units they receive,
and each one's H.264 ``frame_num`` sequence is checked: a P-frame whose predecessor never
arrived (a frame lost in the relay, a resume that did not wait for a keyframe) breaks it.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from mediastream.cluster.relay import (
    ERROR,
    FRAME,
    HELLO,
    MAGIC_CHALLENGE,
    RecordReader,
    RelayRefused,
    encode_record,
    open_relay,
    relay_key,
)
from mediastream.media.frames import NAL_IDR, nal_type, split_annexb
from mediastream.server import RunningServer

from support.cluster import (
    CameraSessions,
    NodeProcess,
    camera_stream,
    cluster_of,
    counting_camera,
    open_node_process,
    peers,
    replay_each_after_failure,
    start_cluster,
    stream_ranked,
    viewers_of,
)
from support.h264 import frame_num_breaks
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import open_playing_viewers, open_viewer

NODES = ("node-a", "node-b", "node-c")
STREAM = "lobby"
CAP = 2


async def start_nodes(
    start_server: StartServer, redis: RedisServer, sessions: CameraSessions
) -> list[RunningServer]:
    """The three nodes, ``CAP`` viewers each, serving ``STREAM`` from the counting camera."""
    streams = camera_stream(sessions, STREAM)
    return await start_cluster(start_server, redis.url, NODES, streams, max_viewers_per_node=CAP)


async def test_viewers_beyond_the_cap_are_served_by_replicas_and_the_camera_is_read_once(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    async with counting_camera() as sessions:
        nodes = await start_nodes(start_server, redis_server, sessions)
        a = nodes[0]
        async with viewers_of(a.ws_url, STREAM, 5) as viewers:
            for played in viewers:
                await played.wait_frames(10, timeout=30)
            assert sessions.connects == 1 and sessions.peak == 1, sessions.history
            serving = [n for n in nodes if peers(n)]
            assert len(serving) >= 2, [peers(n) for n in nodes]
            assert sum(peers(n) for n in nodes) == 5
            owners = [n for n in nodes if cluster_of(n).statistics().owned_streams]
            assert len(owners) == 1
            owner = owners[0]
            assert peers(owner) == CAP
            replicas = [n for n in nodes if STREAM in cluster_of(n).statistics().replicas]
            assert replicas and owner not in replicas
            assert cluster_of(owner).statistics().relay_connections == len(replicas)

            # The relay cut: every replica reconnects and resumes at the next keyframe.
            before = {id(n): cluster_of(n).statistics().relay_reconnects for n in replicas}
            assert cluster_of(owner).relay is not None
            assert cluster_of(owner).relay.disconnect(STREAM) == len(replicas)
            with trio.fail_after(30):
                for node in replicas:
                    while cluster_of(node).statistics().relay_reconnects == before[id(node)]:
                        await node.services.changes.wait()
            for played in viewers:
                await played.wait_frames(30, timeout=30)
            assert sessions.connects == 1, sessions.history
            for node in replicas:
                # The owner resent its GOP from the keyframe already published: left out.
                assert cluster_of(node).statistics().relay_resume_skipped_frames >= 1
            for played in viewers:
                assert played.access_units
                assert frame_num_breaks(played.access_units) == 0
            # The check sees a P-frame lost: one taken out of a viewer's frames breaks it.
            units = viewers[-1].access_units
            lost = next(
                index
                for index in range(1, len(units) - 1)
                if not any(nal_type(n) == NAL_IDR for n in split_annexb(units[index]))
                and not any(nal_type(n) == NAL_IDR for n in split_annexb(units[index + 1]))
            )
            assert frame_num_breaks(units[:lost] + units[lost + 1 :]) == 1


async def test_the_relay_refuses_a_client_without_the_secret(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    async with counting_camera() as sessions:
        nodes = await start_nodes(start_server, redis_server, sessions)
        async with open_viewer(nodes[0].ws_url) as viewer:
            await (await viewer.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            owner = next(n for n in nodes if cluster_of(n).statistics().owned_streams)
            assert owner.services.cluster is not None and owner.services.cluster.registration
            address = owner.services.cluster.registration.record.relay_address
            host, _, port = address.rpartition(":")

            # A guessed MAC: refused, and not one frame comes.
            connection = await trio.open_tcp_stream(host, int(port))
            async with connection:
                reader = RecordReader(connection, "owner")
                kind, nonce = await reader.read()
                assert kind == MAGIC_CHALLENGE and len(nonce) == 32
                hello = {"stream": STREAM, "node": "intruder", "nonce": "00", "mac": "00" * 32}
                await connection.send_all(encode_record(HELLO, json.dumps(hello).encode()))
                kind, body = await reader.read()
                assert (kind, body) == (ERROR, b"authentication failed")
                assert kind != FRAME

            # The right protocol with another secret: refused too.
            wrong = relay_key("another-cluster-secret", "")
            try:
                await open_relay(address, wrong, STREAM, "intruder")
            except RelayRefused as exc:
                assert "authentication failed" in str(exc)
            else:
                raise AssertionError("a client with another secret was served")
            assert cluster_of(owner).statistics().relay_refused == 2
            assert cluster_of(owner).statistics().relay_connections == 0
            assert sessions.connects == 1


def node_c_process(
    tmp_path: Path, redis: RedisServer, streams: list[dict[str, object]]
) -> AbstractAsyncContextManager[NodeProcess]:
    """Node C as a ``mediastream serve`` process (so that it can be killed), replicas on."""
    return open_node_process(
        tmp_path,
        "node-c",
        redis.url,
        streams,
        ready=b'cluster node "node-c"',
        max_viewers_per_node=CAP,
    )


async def in_process_nodes(
    start_server: StartServer, redis: RedisServer, streams: list[dict[str, object]]
) -> tuple[RunningServer, RunningServer]:
    """Nodes A and B, ``CAP`` viewers each (C is a process: :func:`node_c_process`)."""
    a, b = await start_cluster(
        start_server, redis.url, NODES[:2], streams, max_viewers_per_node=CAP
    )
    return a, b


async def test_a_replica_killed_its_viewers_play_again_from_another_node(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # A owns it; with A full, C is the first replica and B the next.
    stream_id = stream_ranked("node-a", "node-c", "node-b")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        a, b = await in_process_nodes(start_server, redis_server, streams)
        async with (
            node_c_process(tmp_path, redis_server, streams) as c,
            open_playing_viewers(a.ws_url, stream_id, 5) as viewers,
        ):
            # A serves two itself, C two (replica), B the fifth (C reported itself full).
            assert (peers(a), peers(b)) == (CAP, 1)
            assert cluster_of(a).statistics().relay_connections == 2
            marks = [len(v.messages) for v in viewers]

            c.process.kill()  # SIGKILL: the replica's peers and relay connection just stop

            await replay_each_after_failure(stream_id, zip(viewers[2:4], marks[2:4], strict=True))
            # Played again, on the same sockets, by the surviving replica B.
            assert (peers(a), peers(b)) == (CAP, 3)
            for viewer in viewers:
                assert viewer.closed_reason is None
                await viewer.streams[stream_id].wait_frames(5, timeout=30)
            # The others were never told anything: they played on.
            for index in (0, 1, 4):
                assert viewers[index].errors(after=marks[index]) == []
            assert sessions.connects == 1, sessions.history


async def test_the_owner_killed_a_new_owner_reads_the_camera_once_and_replicas_re_attach(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    # C owns it; A (the sockets' node) and B replicate it. C killed: A, the replica placement
    # ranks first, claims it and becomes its owner without ending its viewers' sessions (A
    # now reads the camera on the same fan-out); B's replica re-attaches to A. Only C's own
    # viewers re-offer.
    stream_id = stream_ranked("node-c", "node-a", "node-b")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        a, b = await in_process_nodes(start_server, redis_server, streams)
        async with (
            node_c_process(tmp_path, redis_server, streams) as c,
            open_playing_viewers(a.ws_url, stream_id, 5, capture=True) as viewers,
        ):
            assert (peers(a), peers(b)) == (CAP, 1)  # and two on C, the owner
            assert stream_id in cluster_of(a).statistics().replicas
            assert stream_id in cluster_of(b).statistics().replicas
            assert sessions.connects == 1
            marks = [len(v.messages) for v in viewers]
            kept = [viewers[i].streams[stream_id] for i in (2, 3, 4)]  # A's two, B's one
            pcs = [played.pc for played in kept]

            c.process.kill()

            await replay_each_after_failure(stream_id, zip(viewers[:2], marks[:2], strict=True))
            assert cluster_of(a).statistics().owned_streams == (stream_id,)
            # A's viewers (its replica promoted) and B's (its replica followed the stream to
            # A) were never told to re-offer, and play on with the new owner's frames.
            for index, played, pc in zip((2, 3, 4), kept, pcs, strict=True):
                await played.wait_frames(25, timeout=30)
                assert viewers[index].streams[stream_id] is played and played.pc is pc
                assert viewers[index].errors(after=marks[index]) == []
                assert frame_num_breaks(played.access_units) == 0
            assert stream_id in cluster_of(b).statistics().replicas
            assert cluster_of(a).statistics().relay_connections >= 1
            assert peers(a) + peers(b) == 5
            # Exactly one new camera session, never two at once.
            assert sessions.connects == 2 and sessions.peak == 1, sessions.history


async def test_without_a_viewer_cap_the_owner_serves_everyone_though_the_relay_listens(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, STREAM)
        nodes = await start_cluster(start_server, redis_server.url, NODES[:2], streams)
        for node in nodes:
            # Always on in a cluster (WHEP, fallbacks and snapshots on any node use it).
            assert cluster_of(node).relay is not None
            registration = cluster_of(node).registration
            assert registration is not None and registration.record.relay_address
        async with viewers_of(nodes[0].ws_url, STREAM, CAP + 1):
            owners = [n for n in nodes if cluster_of(n).statistics().owned_streams]
            assert len(owners) == 1 and peers(owners[0]) == CAP + 1
            assert all(cluster_of(n).statistics().replicas == () for n in nodes)


async def test_the_owner_drained_its_replicas_re_attach_to_the_stream_s_next_owner(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # C owns it; A (the sockets' node) replicates it, then B. C drains: B, the replica
    # placement ranks first, claims it (its replica promoted: its viewer plays on); A's
    # replica follows the stream to B.
    stream_id = stream_ranked("node-c", "node-b", "node-a")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        a, b, c = await start_cluster(
            start_server, redis_server.url, NODES, streams, max_viewers_per_node=CAP
        )
        async with open_playing_viewers(a.ws_url, stream_id, 5, capture=True) as viewers:
            assert (peers(a), peers(b), peers(c)) == (CAP, 1, CAP)
            marks = [len(v.messages) for v in viewers]

            c.request_shutdown()  # a drain: the stream handed over, then C stops
            with trio.fail_after(30):
                await c.wait_stopped()

            replays = [(viewers[i], marks[i]) for i in (0, 1)]  # C's two
            await replay_each_after_failure(stream_id, replays)
            assert cluster_of(b).statistics().owned_streams == (stream_id,)
            for index in (2, 3, 4):  # A's viewers and B's: never told to re-offer, playing on
                played = viewers[index].streams[stream_id]
                await played.wait_frames(25, timeout=30)
                assert viewers[index].errors(after=marks[index]) == []
                assert frame_num_breaks(played.access_units) == 0
            assert stream_id in cluster_of(a).statistics().replicas
            assert peers(a) + peers(b) == 5
            assert sessions.connects == 2 and sessions.peak == 1, sessions.history
