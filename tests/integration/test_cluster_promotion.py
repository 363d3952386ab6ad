"""The owner killed, a replica becomes the owner and keeps its viewers: three real nodes (the
owner a ``mediastream serve`` process, SIGKILLed), one real redis-server, the GStreamer camera
counting its RTSP sessions, aiortc viewers.

With ``max_viewers_per_node = 1`` the owner A serves the first viewer and the two others go to
replicas C and B: both fed by A, or (``max_relays_per_node = 1``) B fed by C, at depth 2.
Every socket is on C, so the first viewer's session is relayed to A and the third's to B. A
killed: the best-placed replica (the shallowest, then placement's ranking: B, or C when B is at
depth 2)
claims the stream and becomes its owner: its viewers' sessions stay (the same peer connections,
a pause, then the camera's frames from its first keyframe, timestamps going on), the other
replica re-attaches to it, A's viewer re-offers and plays, and the camera gets exactly one new
session, never two at once.

A frozen (SIGSTOP) instead: its lease is waited out, not taken over, then the same; woken, A
finds its lease lost and never reads the camera again nor feeds a replica.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from mediastream.cluster.leases import NodeRecord, current_owner
from mediastream.cluster.placement import rank_nodes
from mediastream.cluster.redis_client import Redis
from mediastream.server import RunningServer

from support.cluster import (
    camera_stream,
    cluster_of,
    counting_camera,
    open_node_process,
    peers,
    replay_after_failure,
    start_cluster,
    stream_ranked,
    wait_registered,
)
from support.h264 import frame_num_breaks
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import PlayedStream, Viewer, open_playing_viewers

NODES = ("node-a", "node-b", "node-c")


def stream_viewers(node: RunningServer, stream_id: str) -> int:
    stream = node.services.registry.get(stream_id)
    assert stream is not None
    return stream.viewers


async def seconds_to_next_frame(
    played: PlayedStream, since: float, took: dict[str, float], node_id: str
) -> None:
    """Record in ``took[node_id]`` the seconds from ``since`` until ``played`` decodes one
    more frame."""
    await played.wait_frames(1, timeout=30)
    took[node_id] = trio.current_time() - since


@dataclass
class KeptViewers:
    """The replicas' viewers as they were before the owner went, to show that they keep
    playing on the same peer connections."""

    #: replica node id -> the viewer it serves
    on: dict[str, Viewer]
    played: dict[str, PlayedStream]
    pcs: dict[str, Any]
    timestamps_before: dict[str, int]
    #: per viewer (all of them, in order): how many messages it had
    marks: list[int]
    viewers: list[Viewer]

    @classmethod
    def of(cls, viewers: list[Viewer], served: dict[str, int], stream_id: str) -> KeptViewers:
        """``served``: replica node id -> the index of its viewer in ``viewers``."""
        on = {node_id: viewers[index] for node_id, index in served.items()}
        played = {node_id: viewer.streams[stream_id] for node_id, viewer in on.items()}
        return cls(
            on,
            played,
            {node_id: p.pc for node_id, p in played.items()},
            {node_id: len(p.frame_timestamps) for node_id, p in played.items()},
            [len(v.messages) for v in viewers],
            viewers,
        )

    async def seconds_to_decoding(self, since: float) -> dict[str, float]:
        """Per replica node: the seconds from ``since`` until its viewer decodes a frame."""
        took: dict[str, float] = {}
        async with trio.open_nursery() as nursery:
            for node_id, played in self.played.items():
                nursery.start_soon(seconds_to_next_frame, played, since, took, node_id)
        return took

    async def played_on(self, stream_id: str) -> None:
        """Each decodes 30 more frames on the same peer connection, with no error, no
        P-frame without its keyframe and timestamps only going forward."""
        for node_id, played in self.played.items():
            await played.wait_frames(30, timeout=30)
            viewer = self.on[node_id]
            assert viewer.streams[stream_id] is played and played.pc is self.pcs[node_id]
            assert viewer.errors(after=self.marks[self.viewers.index(viewer)]) == []
            assert frame_num_breaks(played.access_units) == 0  # no P-frame without its IDR
            timestamps = played.frame_timestamps[self.timestamps_before[node_id] - 1 :]
            assert all(t0 < t1 for t0, t1 in itertools.pairwise(timestamps))


async def wait_owner(node: RunningServer, stream_id: str, *, timeout: float) -> None:
    """Until ``node`` owns ``stream_id`` and nothing else."""
    with trio.fail_after(timeout):
        await node.services.changes.wait_until(
            lambda: cluster_of(node).statistics().owned_streams == (stream_id,)
        )


async def wait_fed_by(replica_node: RunningServer, upstream: str, stream_id: str) -> None:
    """Until ``replica_node``'s replica of ``stream_id`` is fed by ``upstream`` as its owner."""

    def fed() -> bool:
        replica = cluster_of(replica_node)._replicas.get(stream_id)
        return replica is not None and (replica.upstream, replica.depth) == (upstream, 1)

    with trio.fail_after(30):
        await replica_node.services.changes.wait_until(fed)


@pytest.mark.parametrize("chained", [False, True], ids=["both-fed-by-the-owner", "chained"])
async def test_the_owner_killed_the_best_placed_replica_owns_the_stream_and_keeps_its_viewers(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
    caplog: pytest.LogCaptureFixture,
    chained: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="mediastream.cluster.routing")
    limits = {"max_viewers_per_node": 1} | ({"max_relays_per_node": 1} if chained else {})
    stream_id = stream_ranked(*NODES)
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        b, c = await start_cluster(start_server, redis_server.url, NODES[1:], streams, **limits)
        nodes = {"node-b": b, "node-c": c}
        async with open_node_process(tmp_path, "node-a", redis_server.url, streams, **limits) as a:
            await wait_registered(a)
            # One after the other: each offer sees the ones before.
            async with open_playing_viewers(c.ws_url, stream_id, 3, capture=True) as viewers:
                replicas = {
                    node_id: cluster_of(node)._replicas[stream_id]
                    for node_id, node in nodes.items()
                }
                assert all(not r.ended for r in replicas.values())
                assert {r.owner for r in replicas.values()} == {"node-a"}
                assert sorted(r.depth for r in replicas.values()) == ([1, 2] if chained else [1, 1])
                # The one to take the stream over: the shallowest, then placement's first.
                ranking = [
                    r.node_id for r in rank_nodes(stream_id, [NodeRecord(n, "") for n in NODES])
                ]
                heir_id = min(replicas, key=lambda n: (replicas[n].depth, ranking.index(n)))
                other_id = next(n for n in replicas if n != heir_id)
                heir, other = nodes[heir_id], nodes[other_id]
                # The first viewer is A's (relayed from C's socket); the owner, full, sends the
                # second to C (the socket's node, preferred) and the third to B (relayed there).
                assert (peers(b), peers(c)) == (1, 1)
                kept = KeptViewers.of(viewers, {"node-c": 1, "node-b": 2}, stream_id)
                assert sessions.connects == 1 and sessions.peak == 1, sessions.history

                killed_at = trio.current_time()
                a.process.kill()  # SIGKILL: no goodbye, its relay connections just stop

                await wait_owner(heir, stream_id, timeout=30)
                # Decoding again: the first frame after the new owner's claim (A sent nothing since
                # it died), on the promoted replica and on the one that re-attached.
                took = await kept.seconds_to_decoding(since=killed_at)
                print(
                    f"\npromotion ({'chained' if chained else 'both fed by the owner'}): from the "
                    f"owner's SIGKILL to decoding again: {took[heir_id]:.2f} s on the promoted "
                    f'replica "{heir_id}", {took[other_id]:.2f} s on "{other_id}"'
                )
                await replay_after_failure(viewers[0], stream_id, kept.marks[0])  # A's viewer
                await wait_fed_by(other, heir_id, stream_id)
                await kept.played_on(stream_id)
                assert stream_id not in cluster_of(heir).statistics().replicas
                assert cluster_of(other).statistics().owned_streams == ()
                promoted = f'stream "{stream_id}": owner node "node-a" gone; this replica takes'
                assert promoted in caplog.text
                # Exactly one new camera session, never two at once.
                assert sessions.connects == 2 and sessions.peak == 1, sessions.history

                # A session the heir served as a replica for another node's socket still takes
                # that socket's messages (they name the old owner's epoch): its close ends it.
                stale = cluster_of(heir).statistics().stale_dropped
                count = stream_viewers(heir, stream_id)
                await kept.on[heir_id].stop(stream_id)
                with trio.fail_after(30):
                    await heir.services.changes.wait_until(
                        lambda: stream_viewers(heir, stream_id) < count
                    )
                assert cluster_of(heir).statistics().stale_dropped == stale


async def test_the_owner_frozen_past_its_lease_a_replica_owns_the_stream_and_the_woken_owner_stops(
    start_server: StartServer,
    redis_server: RedisServer,
    client: Redis,
    tmp_path: Path,
    judge_nodes_on_a_fresh_redis: None,
) -> None:
    """The owner A frozen (SIGSTOP): it keeps its liveness connection, so it is not gone and
    nobody takes its lease over early; its lease expires, a replica claims the stream and keeps
    its viewers, the other re-attaches. A woken finds its lease lost: it never reads the camera
    again nor feeds a replica, and the stream keeps one owner."""
    limits = {"max_viewers_per_node": 1}
    stream_id = stream_ranked(*NODES)
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, stream_id)
        b, c = await start_cluster(start_server, redis_server.url, NODES[1:], streams, **limits)
        nodes = {"node-b": b, "node-c": c}
        async with open_node_process(tmp_path, "node-a", redis_server.url, streams, **limits) as a:
            await wait_registered(a)
            # One after the other: each offer sees the ones before.
            async with open_playing_viewers(c.ws_url, stream_id, 3, capture=True) as viewers:
                replicas = {
                    node_id: cluster_of(node)._replicas[stream_id]
                    for node_id, node in nodes.items()
                }
                assert {(r.owner, r.depth) for r in replicas.values()} == {("node-a", 1)}
                ranking = [
                    r.node_id for r in rank_nodes(stream_id, [NodeRecord(n, "") for n in NODES])
                ]
                heir_id = min(replicas, key=ranking.index)
                other_id = next(n for n in replicas if n != heir_id)
                heir, other = nodes[heir_id], nodes[other_id]
                kept = KeptViewers.of(viewers, {"node-c": 1, "node-b": 2}, stream_id)
                assert sessions.connects == 1 and sessions.peak == 1, sessions.history
                relayed_by_a = a.log.count(b'": serving ')
                assert relayed_by_a >= 2  # A fed both replicas

                # The lease's remaining time, read before the freeze: a renewal in between only
                # moves the expiry later, so this is a lower bound of when anyone may claim.
                lease_left = await client.pttl(f"ms:owner:{stream_id}") / 1000
                frozen_at = trio.current_time()
                os.kill(a.process.pid, signal.SIGSTOP)
                earliest_claim = frozen_at + lease_left

                await wait_owner(heir, stream_id, timeout=40)
                # A frozen process keeps its liveness connection: it was never judged gone, its
                # lease was waited out, not taken over.
                assert trio.current_time() >= earliest_claim
                assert cluster_of(heir).statistics().takeovers == 0
                assert cluster_of(other).statistics().takeovers == 0
                took = await kept.seconds_to_decoding(since=frozen_at)
                print(
                    f"\npromotion (owner frozen, {lease_left:.1f} s of lease left): from the "
                    f"owner's SIGSTOP to decoding again: {took[heir_id]:.2f} s on the promoted "
                    f'replica "{heir_id}", {took[other_id]:.2f} s on "{other_id}"'
                )
                await replay_after_failure(viewers[0], stream_id, kept.marks[0])  # A's viewer
                await wait_fed_by(other, heir_id, stream_id)
                # A's camera session stays open while it is frozen (the camera does not reap it);
                # only the heir's is read.
                assert sessions.current == 2 and sessions.connects == 2, sessions.history

                os.kill(a.process.pid, signal.SIGCONT)
                # Woken, A finds its lease's deadline passed and closes its camera session.
                await a.wait_logged(b"not renewed before its deadline")
                await sessions.wait_until(lambda s: s.current == 1)
                await kept.played_on(stream_id)
                # A never read the camera again, nor fed a replica; the stream has one owner.
                assert sessions.history == [1, 2, 1] and sessions.connects == 2, sessions.history
                assert a.log.count(b'": serving ') == relayed_by_a, a.log.decode(errors="replace")
                owner = await current_owner(client, stream_id)
                assert owner is not None and owner.node_id == heir_id
                assert cluster_of(heir).statistics().owned_streams == (stream_id,)
                assert cluster_of(other).statistics().owned_streams == ()
                assert a.process.returncode is None
