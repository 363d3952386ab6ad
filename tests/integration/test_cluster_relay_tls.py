"""Mutual TLS on the relay: real nodes, real Redis, the GStreamer camera, aiortc viewers, and
certificates made with the ``openssl`` command line (a cluster CA, its nodes, and a stranger
CA) into the test's folder.

With ``cluster.relay_tls_*`` set, a replica is fed through TLS and its viewers decode; a
client without a certificate, or with one another CA signed, is refused before a byte of a
stream (the owner counts it as ``relay_refused`` and logs why); a node without TLS and a
node with it cannot relay to each other, and the error says so; a relay that never answers
is a broken connection the replica retries, with or without TLS.
"""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import pytest
import trio

from mediastream.cluster import relay as relay_module
from mediastream.cluster.relay import (
    HANDSHAKE_TIMEOUT,
    HELLO,
    RelayError,
    RelayRefused,
    encode_record,
    open_relay,
    relay_key,
)
from mediastream.cluster.relay_tls import STARTTLS_RECORD, load_relay_tls
from mediastream.config import ClusterConfig
from mediastream.server import RunningServer

from support.certs import NodeCertificate, make_ca, make_node_certificate
from support.cluster import (
    CameraSessions,
    camera_stream,
    cluster_of,
    counting_camera,
    peers,
    viewers_of,
)
from support.h264 import frame_num_breaks
from support.redis import RedisServer
from support.servers import StartServer, make_config
from support.viewer import open_viewer

SECRET = "a-cluster-secret-of-this-test"
STREAM = "lobby"


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, NodeCertificate]:
    """node-a and node-b of the cluster's CA; a stranger's certificate of another CA, which
    trusts the cluster's CA (it can read the owner: only its own certificate is foreign)."""
    cluster_ca = make_ca(tmp_path / "ca", "cluster-ca")
    other_ca = make_ca(tmp_path / "other", "other-ca")
    return {
        "node-a": make_node_certificate(tmp_path / "a", "node-a", cluster_ca),
        "node-b": make_node_certificate(tmp_path / "b", "node-b", cluster_ca),
        "stranger": make_node_certificate(
            tmp_path / "stranger", "stranger", other_ca, trusted=cluster_ca
        ),
    }


async def start_node(
    start_server: StartServer,
    redis: RedisServer,
    sessions: CameraSessions,
    node_id: str,
    certificate: NodeCertificate | None,
) -> RunningServer:
    cluster = {
        "redis_url": redis.url,
        "node_id": node_id,
        "max_viewers_per_node": 1,
        "relay_secret": SECRET,
        **(certificate.cluster_keys() if certificate else {}),
    }
    node = await start_server(make_config(camera_stream(sessions, STREAM), cluster=cluster))
    await cluster_of(node)._started.wait()
    return node


def relay_address(node: RunningServer) -> str:
    registration = cluster_of(node).registration
    assert registration is not None and registration.record.relay_address
    return registration.record.relay_address


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = b""
    with trio.fail_after(10):
        while len(received) < size:
            chunk = await stream.receive_some(size - len(received))
            assert chunk, f"the connection closed after {received!r}"
            received += chunk
    return received


async def read_to_the_end(stream: trio.abc.ReceiveStream) -> bytes:
    received = b""
    with trio.fail_after(HANDSHAKE_TIMEOUT + 10):  # the owner refuses within its timeout
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def test_a_replica_fed_over_mutual_tls_serves_viewers_that_decode(
    start_server: StartServer,
    redis_server: RedisServer,
    certificates: dict[str, NodeCertificate],
) -> None:
    async with counting_camera() as sessions:
        nodes = [
            await start_node(start_server, redis_server, sessions, name, certificates[name])
            for name in ("node-a", "node-b")
        ]
        async with viewers_of(nodes[0].ws_url, STREAM, 2) as viewers:
            for played in viewers:
                await played.wait_frames(25, timeout=30)
            owners = [n for n in nodes if cluster_of(n).statistics().owned_streams]
            assert len(owners) == 1
            owner = owners[0]
            replica = next(n for n in nodes if n is not owner)
            # One viewer on the owner (the cap), the other on the replica, fed through TLS:
            # the owner serves a relay connection only after the TLS handshake.
            assert (peers(owner), peers(replica)) == (1, 1)
            assert STREAM in cluster_of(replica).statistics().replicas
            assert cluster_of(owner).statistics().relay_connections == 1
            assert cluster_of(owner).statistics().relay_refused == 0
            assert sessions.connects == 1
            for played in viewers:
                assert frame_num_breaks(played.access_units) == 0


async def test_clients_without_the_cluster_s_certificate_get_nothing_of_the_stream(
    start_server: StartServer,
    redis_server: RedisServer,
    certificates: dict[str, NodeCertificate],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mediastream.cluster.relay")
    async with counting_camera() as sessions:
        owner = await start_node(
            start_server, redis_server, sessions, "node-a", certificates["node-a"]
        )
        async with open_viewer(owner.ws_url) as viewer:
            await (await viewer.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            relay = cluster_of(owner).relay
            assert relay is not None
            host, _, port = relay_address(owner).rpartition(":")
            trusting = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            trusting.check_hostname = False
            trusting.load_verify_locations(certificates["node-a"].ca)
            stranger = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            stranger.check_hostname = False
            stranger.load_verify_locations(certificates["stranger"].ca)
            stranger.load_cert_chain(certificates["stranger"].cert, certificates["stranger"].key)

            cases = [
                (trusting, "did not present a client certificate"),
                (stranger, "presented a certificate the cluster's CA did not sign"),
            ]
            for refused, (context, reason) in enumerate(cases, start=1):
                async with await trio.open_tcp_stream(host, int(port)) as connection:
                    assert (
                        await receive_exactly(connection, len(STARTTLS_RECORD)) == STARTTLS_RECORD
                    )
                    secured = trio.SSLStream(connection, context, https_compatible=True)
                    # TLS 1.3: the client's side of the handshake ends before the owner has
                    # checked its certificate; the refusal is the connection closing.
                    await secured.do_handshake()
                    assert await read_to_the_end(secured) == b""  # not even the challenge
                # Counted and logged before the owner closed the connection.
                assert relay.stats.refused == refused
                assert reason in caplog.text

            # Plain TCP speaking the relay protocol: not TLS, refused before the secret.
            connection = await trio.open_tcp_stream(host, int(port))
            async with connection:
                hello = {"stream": STREAM, "node": "plain", "nonce": "00", "mac": "00" * 32}
                await connection.send_all(encode_record(HELLO, json.dumps(hello).encode()))
                assert await read_to_the_end(connection) == STARTTLS_RECORD
            assert relay.stats.refused == 3
            assert "does not speak TLS" in caplog.text

            # A client that starts no handshake at all: refused once the handshake time is up.
            async with await trio.open_tcp_stream(host, int(port)) as connection:
                assert await read_to_the_end(connection) == STARTTLS_RECORD
            assert relay.stats.refused == 4
            assert f"did not finish TLS in {HANDSHAKE_TIMEOUT:g} s" in caplog.text

            assert relay.stats.connections == 0 and relay.stats.frames_sent == 0
            assert sessions.connects == 1


async def test_a_node_without_tls_is_told_at_once_that_the_relay_expects_tls(
    start_server: StartServer,
    redis_server: RedisServer,
    certificates: dict[str, NodeCertificate],
) -> None:
    key = relay_key(SECRET, redis_server.url)
    async with counting_camera() as sessions:
        owner = await start_node(
            start_server, redis_server, sessions, "node-a", certificates["node-a"]
        )
        async with open_viewer(owner.ws_url) as viewer:
            await (await viewer.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            address = relay_address(owner)
            # A node without TLS, knowing the secret: refused before the secret's handshake,
            # and told why at once (a refusal ends the replica: its viewers re-offer).
            with pytest.raises(RelayRefused) as caught:
                await open_relay(address, key, STREAM, "plain-node")
            assert f"relay {address} expects TLS, and this node has none" in str(caught.value)
            # The same node with the cluster's certificate is served.
            tls = load_relay_tls(ClusterConfig(**certificates["node-b"].cluster_keys()))
            connection, _, info = await open_relay(address, key, STREAM, "node-b", tls=tls)
            async with connection:
                assert (info.codec, info.width, info.height) == ("h264", 640, 360)


async def test_a_node_with_tls_takes_no_frames_from_a_relay_without_it(
    start_server: StartServer,
    redis_server: RedisServer,
    certificates: dict[str, NodeCertificate],
) -> None:
    key = relay_key(SECRET, redis_server.url)
    tls = load_relay_tls(ClusterConfig(**certificates["node-b"].cluster_keys()))
    async with counting_camera() as sessions:
        owner = await start_node(start_server, redis_server, sessions, "node-a", None)
        async with open_viewer(owner.ws_url) as viewer:
            await (await viewer.play(STREAM, trickle=True)).wait_frames(3, timeout=30)
            address = relay_address(owner)
            with pytest.raises(RelayRefused) as caught:
                await open_relay(address, key, STREAM, "node-b", tls=tls)
            assert f"relay {address} does not use TLS, and this node does" in str(caught.value)
            # The same node without TLS is served.
            connection, _, info = await open_relay(address, key, STREAM, "node-b")
            async with connection:
                assert info.codec == "h264"


@pytest.mark.parametrize("with_tls", [False, True])
async def test_a_relay_that_never_answers_is_a_relay_error_the_replica_retries(
    certificates: dict[str, NodeCertificate], monkeypatch: pytest.MonkeyPatch, with_tls: bool
) -> None:
    # Not TooSlowError, which run_relay_source does not catch: the replica would crash
    # instead of reconnecting. The bound shortened: no handshake is meant to succeed here.
    monkeypatch.setattr(relay_module, "HANDSHAKE_TIMEOUT", 0.2)
    tls = load_relay_tls(ClusterConfig(**certificates["node-b"].cluster_keys()))
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener, trio.open_nursery() as nursery:
        connections: list[trio.SocketStream] = []

        async def accept_and_say_nothing() -> None:
            connections.append(await listener.accept())

        nursery.start_soon(accept_and_say_nothing)
        address = f"127.0.0.1:{listener.socket.getsockname()[1]}"
        try:
            with pytest.raises(RelayError) as caught:
                await open_relay(
                    address, b"k" * 32, STREAM, "node-b", tls=tls if with_tls else None
                )
            assert f"relay {address} did not complete the handshake in 0.2 s" in str(caught.value)
        finally:
            for connection in connections:
                await connection.aclose()
