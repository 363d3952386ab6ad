"""A replica node that cannot take the owner's relay: two real nodes, real Redis, the
GStreamer camera, aiortc viewers.

Node B is misconfigured: another ``relay_secret`` than the owner's, or TLS where the owner has
none. With ``max_viewers_per_node = 1`` the owner A sends its second viewer to B; B's relay is
refused, B tells A (and warns, and counts it), its viewer is told ``peer_failed`` and
re-offers, as a page does — and A, which now leaves B out of the stream's placement for a
cool-down, serves it itself, over its cap: the viewer plays, the camera is read once, and the
viewers after it are not sent to B either.

And a relay B cannot reach at all (A's advertised relay address refuses connections, as a
firewall or a wrong address would): B's replica gives up after ``REPLICA_REACH_WAIT``, its
viewer re-offers, and A, which saw B never connect within ``REPLICA_CONNECT_WAIT``, serves it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import trio

from mediastream.cluster import routing
from mediastream.cluster.placement import COOLDOWN_FIRST, stream_ids_placed_on
from mediastream.server import RunningServer

from support.certs import make_ca, make_node_certificate
from support.cluster import (
    CameraSessions,
    camera_stream,
    cluster_of,
    counting_camera,
    peers,
    replay_after_failure,
    start_cluster,
    start_node,
    wait_registered,
)
from support.http import scrape
from support.redis import RedisServer
from support.servers import StartServer
from support.viewer import SignalingFailed, Viewer, open_viewer

NODES = ("node-a", "node-b")
#: owned by node-a (placement ranks it first), so node-b is the only replica it can choose
STREAM = stream_ids_placed_on("node-a", NODES, 1, prefix="hall")[0]
SECRET = "the-cluster-s-relay-secret"


async def start_misconfigured_pair(
    start_server: StartServer,
    redis: RedisServer,
    sessions: CameraSessions,
    tmp_path: Path,
    mismatch: str,
) -> tuple[RunningServer, RunningServer]:
    """Node A with the cluster's secret and no TLS; node B with another secret, or with TLS."""
    streams = camera_stream(sessions, STREAM)
    keys = {"max_viewers_per_node": 1, "relay_secret": SECRET}
    a = await start_node(start_server, redis.url, "node-a", streams, **keys)
    if mismatch == "secret":
        b_keys = {**keys, "relay_secret": "another-cluster-s-secret"}
    else:
        ca = make_ca(tmp_path / "ca", "cluster-ca")
        b_keys = {**keys, **make_node_certificate(tmp_path / "b", "node-b", ca).cluster_keys()}
    b = await start_node(start_server, redis.url, "node-b", streams, **b_keys)
    await wait_registered(a, b)
    return a, b


async def play_though_told_to_re_offer(viewer: Viewer) -> None:
    """Play ``STREAM`` on a replica that cannot be fed: the viewer is told ``peer_failed`` (in
    place of its answer, or after it) and offers again, as a page does
    (:func:`~support.cluster.replay_after_failure`), and plays."""
    mark = len(viewer.messages)
    try:
        await viewer.play(STREAM, trickle=True)
    except SignalingFailed as failed:
        assert failed.code == "peer_failed", failed.message
    await replay_after_failure(viewer, STREAM, mark)


@pytest.mark.parametrize("mismatch", ["secret", "tls"])
async def test_a_viewer_placed_on_a_node_that_cannot_take_the_relay_plays_from_the_owner(
    start_server: StartServer,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    mismatch: str,
) -> None:
    caplog.set_level(logging.INFO, logger="mediastream.cluster")
    async with counting_camera() as sessions:
        a, b = await start_misconfigured_pair(
            start_server, redis_server, sessions, tmp_path, mismatch
        )
        async with (
            open_viewer(a.ws_url) as first,
            open_viewer(a.ws_url) as second,
            open_viewer(a.ws_url) as third,
        ):
            await (await first.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            assert cluster_of(a).statistics().owned_streams == (STREAM,)

            # The owner is full: the second viewer goes to B, whose relay is refused. B tells
            # the owner, and its viewer is told to re-offer (maybe before B's answer).
            await play_though_told_to_re_offer(second)

            # It plays, served by the owner over its cap; B serves nothing, replicates nothing.
            assert (peers(a), peers(b)) == (2, 0)
            assert STREAM not in cluster_of(b).statistics().replicas
            at_a, at_b = cluster_of(a).statistics(), cluster_of(b).statistics()
            assert at_b.replica_offers == 1 and at_b.relay_upstream_refused >= 1
            assert at_a.replica_cooldowns == 1
            if mismatch == "secret":
                assert at_a.relay_refused >= 1  # the owner's side saw the secret fail
            assert f'replica node "node-b" of "{STREAM}" could not take the relay' in caplog.text
            assert f"not placing viewers there for {COOLDOWN_FIRST:g} s" in caplog.text
            warned = [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and 'node "node-a" refused to relay it' in r.message
            ]
            assert len(warned) == 1, warned
            cause = "authentication failed" if mismatch == "secret" else "does not use TLS"
            assert cause in warned[0]

            # During the cool-down the next viewer is not sent to B: the owner serves it.
            await (await third.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            assert (peers(a), peers(b)) == (3, 0)
            assert cluster_of(b).statistics().replica_offers == 1
            assert sessions.connects == 1, sessions.history

            # The refusals are in /metrics on both sides.
            at_a_metrics, at_b_metrics = await scrape(a.url), await scrape(b.url)
            assert at_b_metrics[("mediastream_cluster_frame_relay_upstream_refused_total", ())] >= 1
            assert at_a_metrics[("mediastream_cluster_replica_cooldowns", ())] == 1
            assert ("mediastream_cluster_frame_relay_refused_total", ()) in at_a_metrics


async def test_a_viewer_placed_on_a_node_that_never_reaches_the_relay_plays_from_the_owner(
    start_server: StartServer,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shortened (the order is what matters: the owner gives up on B before B gives up).
    monkeypatch.setattr(routing, "REPLICA_CONNECT_WAIT", 2.0)
    monkeypatch.setattr(routing, "REPLICA_REACH_WAIT", 4.0)
    caplog.set_level(logging.INFO, logger="mediastream.cluster")
    async with counting_camera() as sessions:
        streams = camera_stream(sessions, STREAM)
        a, b = await start_cluster(
            start_server, redis_server.url, NODES, streams, max_viewers_per_node=1
        )
        # A advertises a relay address nobody listens on: every connection B makes is refused.
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        closed_port = listener.socket.getsockname()[1]
        await listener.aclose()
        registration = cluster_of(a).registration
        assert registration is not None
        registration.update(
            dataclasses.replace(registration.record, relay_address=f"127.0.0.1:{closed_port}")
        )
        await registration.wait_renewed()

        async with open_viewer(a.ws_url) as first, open_viewer(a.ws_url) as second:
            await (await first.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            await play_though_told_to_re_offer(second)

            assert (peers(a), peers(b)) == (2, 0)
            assert cluster_of(b).statistics().replica_offers == 1
            assert cluster_of(b).statistics().relay_upstream_refused == 0  # never answered
            assert cluster_of(a).statistics().replica_cooldowns == 1
            assert (
                f'replica node "node-b" of "{STREAM}" did not connect within 2 s; '
                f"not placing viewers there for {COOLDOWN_FIRST:g} s"
            ) in caplog.text
            assert "no upstream accepted this node within 4 s" in caplog.text
            assert sessions.connects == 1, sessions.history
