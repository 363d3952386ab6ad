"""Replicas carry every quality, each on demand: two real nodes, one real redis-server, the
GStreamer camera with a main (1280x720) and a sub (320x180) mount, aiortc viewers that decode.

With ``max_viewers_per_node = 1`` the owner serves the first viewer and a replica the second.
A replica's quality runs only while it has viewers there, fed by a relay connection of its
own to the owner, where it is a viewer of that quality (so the owner reads it, once for the
whole cluster). The camera counts its RTSP clients (``rtsp_camera.py --report-sessions``).
"""

from __future__ import annotations

import itertools
import socket
from typing import Any

import pytest
import trio
import trio_asyncio

from mediastream.cluster import relay as relay_module
from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.cluster.relay import RelayRefused, open_relay
from mediastream.media.source_contract import SourceState
from mediastream.registry import Stream
from mediastream.server import RunningServer

from support.cluster import (
    camera_qualities,
    cluster_of,
    counting_camera,
    peers,
    start_cluster,
    stream_ranked,
)
from support.h264 import frame_num_breaks
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import PlayedStream, Viewer, open_viewer

MAIN = (1280, 720)
SUB = (320, 180)
NODES = ("node-a", "node-b")


def stream_owned_by_a() -> str:
    """A stream id that placement gives node A (so node B is its replica)."""
    return stream_ids_placed_on("node-a", NODES, 1, prefix="lobby")[0]


async def start_nodes(
    start_server: StartServer, redis: RedisServer, streams: list[dict[str, Any]], *nodes: str
) -> list[RunningServer]:
    """Nodes with room for one viewer of a stream each (the next ones go to a replica)."""
    return await start_cluster(start_server, redis.url, nodes, streams, max_viewers_per_node=1)


def stream_of(node: RunningServer, stream_id: str) -> Stream:
    stream = node.services.registry.get(stream_id)
    assert stream is not None
    return stream


async def ask_quality(viewer: Viewer, stream_id: str, quality: str) -> dict[str, Any]:
    """Pin ``quality``; wait until the serving session says it plays."""
    start = len(viewer.messages)
    await viewer.send({"type": "quality", "streamId": stream_id, "payload": {"quality": quality}})
    return await viewer.wait_for(
        lambda m: m.get("type") == "quality" and m["payload"]["quality"] == quality,
        after=start,
        timeout=30,
    )


async def rtp_of(played: PlayedStream) -> tuple[int, int]:
    """The SSRCs the viewer's video receiver heard lately, and the packets it found lost
    (a sequence number that jumps counts as packets lost)."""
    receiver = next(r for r in played.pc.getReceivers() if r.track.kind == "video")
    sources = receiver.getSynchronizationSources()
    report = await trio_asyncio.aio_as_trio(receiver.getStats)()
    lost = sum(s.packetsLost for s in report.values() if s.type == "inbound-rtp")
    return len(sources), lost


async def test_a_replica_relays_each_quality_on_demand_and_switches_on_the_same_track(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = stream_owned_by_a()
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id)
        a, b = await start_nodes(start_server, redis_server, streams, *NODES)
        owner, replica = stream_of(a, stream_id), stream_of(b, stream_id)
        relay = cluster_of(a).relay
        assert relay is not None

        async with open_viewer(a.ws_url) as first, open_viewer(a.ws_url) as second:
            # Viewer 1: the owner's one viewer, on the default quality (main).
            on_owner = await first.play(stream_id, trickle=True)
            await on_owner.wait_size(MAIN)
            assert cluster_of(a).statistics().owned_streams == (stream_id,)

            # Viewer 2 asks for sub: the owner is full, B serves it as a replica, and B's
            # sub is a relay connection of its own; B's main is not relayed (no viewer).
            played = await second.play(stream_id, trickle=True, capture=True, quality="sub")
            await played.wait_size(SUB)
            assert (peers(a), peers(b)) == (1, 1)
            assert cluster_of(b).statistics().replicas == (stream_id,)
            assert replica.quality("sub").running and replica.quality("sub").viewers == 1
            assert not replica.quality("main").running
            info = replica.quality("sub").source_info  # the owner's SourceInfo of sub
            assert info is not None and (info.width, info.height) == SUB
            assert replica.quality("main").source_info is None
            assert relay.connections(stream_id) == 1
            # The owner reads sub for the replica: one camera session per quality in use.
            assert owner.quality("sub").running and owner.quality("sub").viewers == 1
            await sessions.wait_until(lambda s: s.current == 2)
            assert sessions.connects == 2, sessions.history

            # Pinned to main through the socket's node: B's session switches on the same
            # track once B's main relay (a second connection) has the owner's keyframe.
            told = await ask_quality(second, stream_id, "main")
            assert told["payload"]["reason"] == "pinned"
            switched_at = await played.wait_size(MAIN)
            assert set(played.frame_sizes[switched_at:]) == {MAIN}
            assert (await rtp_of(played))[0] == 1  # sub's packets and main's: one SSRC
            assert replica.quality("main").viewers == 1 and replica.quality("sub").viewers == 0
            sizes = {q["name"]: (q["width"], q["height"]) for q in told["payload"]["qualities"]}
            assert sizes == {"main": MAIN, "sub": SUB}
            # main was already read for viewer 1: no camera session more.
            assert sessions.connects == 2, sessions.history

            # Nobody on B watches sub any more: after the grace its relay ends, then the
            # owner's sub source (its last viewer was that relay), and the camera sees it go.
            with trio.fail_after(30):
                await replica.changes.wait_until(lambda: not replica.quality("sub").running)
                await owner.changes.wait_until(lambda: owner.quality("sub").viewers == 0)
                await owner.changes.wait_until(lambda: not owner.quality("sub").running)
            await sessions.wait_until(lambda s: s.current == 1)
            assert relay.connections(stream_id) == 1  # B's main
            assert replica.quality("main").running

            await played.wait_frames(25, timeout=30)
            assert set(played.frame_sizes[switched_at:]) == {MAIN}
            # One offer, one answer: both qualities came over one peer connection.
            assert [m["type"] for m in second.sent].count("offer") == 1
            assert [m["type"] for m in second.messages].count("answer") == 1
            # One RTP stream: one SSRC, sequence numbers with no jump, timestamps onward,
            # and never a P-frame without its keyframe (the switch started at main's).
            ssrcs, lost = await rtp_of(played)
            assert (ssrcs, lost) == (1, 0)
            timestamps = played.frame_timestamps
            assert all(y > x for x, y in itertools.pairwise(timestamps)), "timestamps went back"
            assert frame_num_breaks(played.access_units) == 0
            assert second.errors() == []

            await on_owner.wait_frames(10, timeout=30)
            assert set(on_owner.frame_sizes) == {MAIN}
            assert sessions.connects == 2 and sessions.peak == 2, sessions.history


async def test_the_relay_serves_the_quality_a_replica_names_and_the_default_when_none(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = stream_owned_by_a()
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id, default_quality="sub")
        [a] = await start_nodes(start_server, redis_server, streams, "node-a")
        node = cluster_of(a)
        owner = stream_of(a, stream_id)
        async with open_viewer(a.ws_url) as viewer:
            await (await viewer.play(stream_id, trickle=True)).wait_size(SUB)
            assert node.registration is not None
            address = node.registration.record.relay_address
            key = node._relay_key

            # A HELLO without a quality (an older replica's): the default one, sub.
            connection, _, info = await open_relay(address, key, stream_id, "node-x")
            async with connection:
                assert (info.width, info.height) == SUB
                assert owner.quality("sub").viewers == 2 and owner.quality("main").viewers == 0

            # main named: the owner starts main's source for it and describes main.
            connection, _, info = await open_relay(address, key, stream_id, "node-x", "main")
            async with connection:
                assert (info.width, info.height) == MAIN
                assert owner.quality("main").viewers == 1
            await sessions.wait_until(lambda s: s.connects == 2)

            # A quality the stream does not have: refused, naming the stream, it and the node.
            try:
                await open_relay(address, key, stream_id, "node-x", "hd")
            except RelayRefused as exc:
                message = str(exc)
            else:
                raise AssertionError("a relay of an unknown quality was served")
            assert stream_id in message and '"hd"' in message and '"node-a"' in message
            assert "main, sub" in message
            assert node.statistics().relay_refused == 1


async def test_a_relay_cut_each_quality_resumes_at_its_own_keyframe(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = stream_owned_by_a()
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id)
        a, b = await start_nodes(start_server, redis_server, streams, *NODES)
        replica = stream_of(b, stream_id)
        relay = cluster_of(a).relay
        assert relay is not None
        async with (
            open_viewer(a.ws_url) as first,
            open_viewer(a.ws_url) as second,
            open_viewer(a.ws_url) as third,
        ):
            await (await first.play(stream_id, trickle=True)).wait_size(MAIN)
            # Two viewers on the replica, one per quality: two relay connections from B.
            on_sub = await second.play(stream_id, trickle=True, capture=True, quality="sub")
            await on_sub.wait_size(SUB)
            on_main = await third.play(stream_id, trickle=True, capture=True, quality="main")
            await on_main.wait_size(MAIN)
            assert (peers(a), peers(b)) == (1, 2)
            assert replica.quality("main").viewers == replica.quality("sub").viewers == 1
            assert relay.connections(stream_id) == 2
            before = cluster_of(b).statistics()

            assert relay.disconnect(stream_id) == 2
            with trio.fail_after(30):
                while cluster_of(b).statistics().relay_reconnects < before.relay_reconnects + 2:
                    await b.services.changes.wait()
            for played in (on_sub, on_main):
                await played.wait_frames(30, timeout=30)
            after = cluster_of(b).statistics()
            # Each quality's owner resent its GOP from a keyframe its connection had already
            # published: left out, by each connection's own account of what it published.
            assert after.relay_resume_skipped_frames >= before.relay_resume_skipped_frames + 2
            for played, size in ((on_sub, SUB), (on_main, MAIN)):
                assert set(played.frame_sizes) == {size}
                assert frame_num_breaks(played.access_units) == 0
                timestamps = played.frame_timestamps
                assert all(y > x for x, y in itertools.pairwise(timestamps))
            assert sessions.connects == 2 and sessions.peak == 2, sessions.history


def closed_port() -> int:
    """A loopback port nobody listens on (a camera that is down)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_quality_the_owner_cannot_open_leaves_the_replica_s_other_viewers_playing(
    start_server: StartServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner refuses a relay whose source has not opened within INFO_TIMEOUT (20 s).
    monkeypatch.setattr(relay_module, "INFO_TIMEOUT", 1.0)
    stream_id = stream_owned_by_a()
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id)
        streams[0]["qualities"][1]["source"] = f"rtsp://127.0.0.1:{closed_port()}/sub"
        a, b = await start_nodes(start_server, redis_server, streams, *NODES)
        replica = stream_of(b, stream_id)
        async with open_viewer(a.ws_url) as first, open_viewer(a.ws_url) as second:
            await (await first.play(stream_id, trickle=True)).wait_size(MAIN)
            played = await second.play(stream_id, trickle=True)
            await played.wait_size(MAIN)
            assert cluster_of(b).statistics().replicas == (stream_id,)
            mark = len(second.messages)

            await second.send(
                {"type": "quality", "streamId": stream_id, "payload": {"quality": "sub"}}
            )
            # B's sub relay is told the owner's source did not open, and tries again.
            sub = replica.quality("sub")
            with trio.fail_after(30):
                await replica.changes.wait_until(
                    lambda: (
                        sub.state is SourceState.RECONNECTING
                        and "has not opened the source of quality" in (sub.detail or "")
                    )
                )
            assert '"sub"' in (sub.detail or "") and '"node-a"' in (sub.detail or "")
            # The replica lives on, its viewer plays main meanwhile and is told nothing bad.
            await played.wait_frames(25, timeout=30)
            assert set(played.frame_sizes) == {MAIN}
            assert cluster_of(b).statistics().replicas == (stream_id,)
            assert second.errors(after=mark) == []
            assert sessions.connects == 1, sessions.history


async def test_auto_on_a_replica_follows_the_tile(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    stream_id = stream_owned_by_a()
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id)
        a, b = await start_nodes(start_server, redis_server, streams, *NODES)
        replica = stream_of(b, stream_id)
        async with open_viewer(a.ws_url) as first, open_viewer(b.ws_url) as second:
            await (await first.play(stream_id, trickle=True)).wait_size(MAIN)
            # A grid tile on B's own socket: B serves it as a replica, on sub.
            tile = {"width": 300, "height": 170, "visible": True}
            played = await second.play(stream_id, trickle=True, quality="auto", tile=tile)
            await played.wait_size(SUB)
            assert cluster_of(b).statistics().replicas == (stream_id,)
            assert not replica.quality("main").running

            start = len(second.messages)
            big = {"tile": {"width": 1280, "height": 720}}
            await second.send({"type": "quality", "streamId": stream_id, "payload": big})
            told = await second.wait_for(
                lambda m: m.get("type") == "quality" and m["payload"]["quality"] == "main",
                after=start,
                timeout=30,
            )
            assert told["payload"]["reason"] == "tile"
            await played.wait_size(MAIN)
            assert replica.quality("main").running
            assert [m["type"] for m in second.sent].count("offer") == 1
            assert sessions.connects == 2, sessions.history


async def test_a_quality_asked_for_at_depth_two_is_relayed_on_each_hop(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    # A owns it and feeds one replica (max_relays_per_node 1): B, whose viewer plays main.
    # The third viewer asks for sub and goes to C, fed by B (depth 2). C's sub connection is a
    # viewer of B's sub, which opens B's own sub connection to A: sub crosses both hops.
    stream_id = stream_ranked("node-a", "node-b", "node-c")
    async with counting_camera() as sessions:
        streams = camera_qualities(sessions, stream_id)
        a, b, c = await start_cluster(
            start_server,
            redis_server.url,
            ("node-a", "node-b", "node-c"),
            streams,
            max_viewers_per_node=1,
            max_relays_per_node=1,
        )
        on_b, on_c = stream_of(b, stream_id), stream_of(c, stream_id)
        relay_a, relay_b = cluster_of(a).relay, cluster_of(b).relay
        assert relay_a is not None and relay_b is not None
        async with (
            open_viewer(a.ws_url) as first,
            open_viewer(a.ws_url) as second,
            open_viewer(a.ws_url) as third,
        ):
            await (await first.play(stream_id, trickle=True)).wait_size(MAIN)
            await (await second.play(stream_id, trickle=True)).wait_size(MAIN, timeout=30)
            played = await third.play(stream_id, trickle=True, capture=True, quality="sub")
            await played.wait_size(SUB, timeout=30)
            assert (peers(a), peers(b), peers(c)) == (1, 1, 1)
            replica_c = cluster_of(c)._replicas[stream_id]
            assert (replica_c.upstream, replica_c.depth) == ("node-b", 2)

            # C relays sub alone, from B; B relays main for its viewer and sub for C alone.
            assert on_c.quality("sub").running and not on_c.quality("main").running
            info = on_c.quality("sub").source_info  # the owner's SourceInfo of sub, via B
            assert info is not None and (info.width, info.height) == SUB
            assert on_b.quality("main").viewers == 1 and on_b.quality("sub").viewers == 1
            assert on_b.quality("sub").running
            assert relay_b.connections(stream_id) == 1
            # A feeds one replica (B) on two connections, one per quality.
            assert relay_a.connections(stream_id) == 2 and relay_a.replicas_fed(stream_id) == 1

            await played.wait_frames(25, timeout=30)
            assert set(played.frame_sizes) == {SUB}
            assert frame_num_breaks(played.access_units) == 0
            assert third.errors() == []
            # One camera session per quality in use, for the whole chain.
            assert sessions.connects == 2 and sessions.peak == 2, sessions.history
