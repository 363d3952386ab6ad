"""Replicas: three real nodes, one real redis-server, the GStreamer camera, aiortc viewers.

With ``max_viewers_per_node = 2`` a popular camera's viewers spread over the nodes: the owner
serves two, the next ones are served by replicas fed with the owner's encoded frames over
the relay. The camera counts its RTSP clients (``rtsp_camera.py --report-sessions``): it is
read once whatever the number of viewers. The viewers capture the access units they receive,
and each one's H.264 ``frame_num`` sequence is checked: a P-frame whose predecessor never
arrived (a frame lost in the relay, a resume that did not wait for a keyframe) breaks it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio
from test_cluster_failover import CameraSessions, counting_camera

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
from mediastream.cluster.routing import ClusterNode
from mediastream.media.frames import NAL_IDR, NAL_SLICE, NAL_SPS, _BitReader, nal_type, split_annexb
from mediastream.server import RunningServer

from support.redis import RedisServer
from support.servers import StartServer, make_config
from support.viewer import PlayedStream, open_viewer

NODES = ("node-a", "node-b", "node-c")
STREAM = "lobby"
CAP = 2
HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def cluster_of(server: RunningServer) -> ClusterNode:
    cluster = server.services.cluster
    assert cluster is not None
    return cluster


async def start_nodes(
    start_server: StartServer, redis: RedisServer, sessions: CameraSessions
) -> list[RunningServer]:
    streams = [{"id": STREAM, "source": sessions.camera.url("/h264"), "on_demand": True}]
    nodes = []
    for node_id in NODES:
        cluster = {"redis_url": redis.url, "node_id": node_id, "max_viewers_per_node": CAP}
        nodes.append(await start_server(make_config(streams, cluster=cluster)))
    for node in nodes:
        await cluster_of(node)._started.wait()
    return nodes


def peers(node: RunningServer) -> int:
    return node.services.peers.statistics().open_peer_connections


def frame_num_breaks(access_units: list[bytes]) -> int:
    """P-frames whose frame_num does not follow the previous frame's (x264 makes every
    frame a reference frame, so frame_num goes up by one from each IDR)."""
    log2_max = None
    previous = None
    breaks = 0
    for unit in access_units:
        nal_units = split_annexb(unit)
        for nal in nal_units:
            if nal_type(nal) == NAL_SPS:
                reader = _BitReader(nal[4:].replace(b"\x00\x00\x03", b"\x00\x00"))
                reader.unsigned_exp_golomb()  # seq_parameter_set_id
                if nal[1] in HIGH_PROFILES:
                    if reader.unsigned_exp_golomb() == 3:  # chroma_format_idc
                        reader.bit()  # separate_colour_plane_flag
                    reader.unsigned_exp_golomb()  # bit_depth_luma_minus8
                    reader.unsigned_exp_golomb()  # bit_depth_chroma_minus8
                    reader.bit()  # qpprime_y_zero_transform_bypass_flag
                    assert not reader.bit(), "scaling matrices are not read here"
                log2_max = reader.unsigned_exp_golomb() + 4
        slice_nal = next((n for n in nal_units if nal_type(n) in (NAL_SLICE, NAL_IDR)), None)
        if slice_nal is None or log2_max is None:
            continue
        reader = _BitReader(slice_nal[1:32].replace(b"\x00\x00\x03", b"\x00\x00"))
        reader.unsigned_exp_golomb()  # first_mb_in_slice
        reader.unsigned_exp_golomb()  # slice_type
        reader.unsigned_exp_golomb()  # pic_parameter_set_id
        frame_num = reader.bits(log2_max)
        follows = previous is None or frame_num == (previous + 1) % (1 << log2_max)
        if nal_type(slice_nal) == NAL_SLICE and not follows:
            breaks += 1
        previous = frame_num
    return breaks


@asynccontextmanager
async def viewers_of(url: str, count: int) -> AsyncIterator[list[PlayedStream]]:
    """``count`` viewers, one socket each, each playing the stream (one after the other, so
    the owner's count of its viewers and the replicas' reports are current for each offer)."""
    async with contextlib.AsyncExitStack() as stack:
        played = []
        for _ in range(count):
            viewer = await stack.enter_async_context(open_viewer(url))
            played.append(await viewer.play(STREAM, trickle=True, capture=True))
            await played[-1].wait_frames(5, timeout=30)
        yield played


async def test_viewers_beyond_the_cap_are_served_by_replicas_and_the_camera_is_read_once(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    async with counting_camera() as sessions:
        nodes = await start_nodes(start_server, redis_server, sessions)
        a = nodes[0]
        async with viewers_of(a.ws_url, 5) as viewers:
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
            for played in viewers:
                assert played.access_units
                assert frame_num_breaks(played.access_units) == 0


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
