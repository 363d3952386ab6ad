"""Access tokens, TLS, origins, limits and secrets, against the real server."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import ssl
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import jwt
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from trio_websocket import ConnectionClosed

from mediastream.auth import Authenticator
from mediastream.config import SecurityConfig

from support.http import get
from support.servers import DEMO_STREAMS, Camera, StartServer, make_config
from support.viewer import SignalingFailed, open_viewer

SECRET = "test-secret-" + "x" * 32


def token(streams: list[str], ttl: float = 600, *, admin: bool = False) -> str:
    return Authenticator(SecurityConfig(jwt_secret=SECRET)).issue(streams, ttl, admin=admin)


def secured(**sections: object):  # type: ignore[no-untyped-def]
    return make_config(DEMO_STREAMS, security={"jwt_secret": SECRET}, **sections)


async def upgrade_status(ws_url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status a WebSocket upgrade gets (101 when accepted)."""
    parts = urlsplit(ws_url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        + "\r\n"
    )
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(parts.hostname or "", parts.port or 80)
        async with stream:
            await stream.send_all(request.encode())
            head = b""
            while b"\r\n" not in head:
                chunk = await stream.receive_some(4096)
                assert chunk, "connection closed without a status"
                head += chunk
    return int(head.split(b" ", 2)[1])


# --- tokens -----------------------------------------------------------------------------------


async def test_a_token_plays_its_streams_and_is_refused_the_others_on_the_same_socket(
    start_server: StartServer,
) -> None:
    server = await start_server(secured())
    async with open_viewer(f"{server.ws_url}?token={token(['demo-1', 'demo-3'])}") as viewer:
        playing = await viewer.play("demo-1")
        with pytest.raises(SignalingFailed) as refused:
            await viewer.play("demo-2")
        assert refused.value.code == "forbidden"
        # A stream that doesn't exist is refused the same way: nothing leaks about it.
        with pytest.raises(SignalingFailed) as unknown:
            await viewer.play("secret-cam")
        assert unknown.value.code == "forbidden"
        await playing.wait_frames(10)
        granted_too = await viewer.play("demo-3")
        await granted_too.wait_frames(5)


async def test_glob_patterns_in_tokens(start_server: StartServer) -> None:
    server = await start_server(secured())
    async with open_viewer(f"{server.ws_url}?token={token(['demo-[12]'])}") as viewer:
        await (await viewer.play("demo-2")).wait_frames(3)
        with pytest.raises(SignalingFailed, match="forbidden"):
            await viewer.play("demo-3")


async def test_no_token_expired_token_and_tampered_token_are_refused_at_the_upgrade(
    start_server: StartServer,
) -> None:
    server = await start_server(secured())
    assert await upgrade_status(server.ws_url) == 401
    assert await upgrade_status(f"{server.ws_url}?token={token(['*'], ttl=-60)}") == 401
    header, _claims, signature = token(["demo-1"]).split(".")
    forged = jwt.utils.base64url_encode(json.dumps({"streams": ["*"], "exp": 2**31}).encode())
    assert (
        await upgrade_status(f"{server.ws_url}?token={header}.{forged.decode()}.{signature}") == 401
    )
    other_key = jwt.encode({"streams": ["*"], "exp": 2**31}, "another-secret-" + "y" * 32)
    assert await upgrade_status(f"{server.ws_url}?token={other_key}") == 401
    no_expiry = jwt.encode({"streams": ["*"]}, SECRET)
    assert await upgrade_status(f"{server.ws_url}?token={no_expiry}") == 401
    # The server still serves a valid token afterwards.
    async with open_viewer(f"{server.ws_url}?token={token(['demo-1'])}") as viewer:
        await (await viewer.play("demo-1")).wait_frames(3)


async def test_a_token_that_expires_stops_new_offers_but_not_playing_streams(
    start_server: StartServer,
) -> None:
    server = await start_server(secured())
    short = token(["*"], ttl=2)
    expires_at = jwt.decode(short, options={"verify_signature": False})["exp"]
    async with open_viewer(f"{server.ws_url}?token={short}") as viewer:
        playing = await viewer.play("demo-1")
        await playing.wait_frames(3)
        # Wait for the token's expiry (plus the server's clock leeway): a wall-clock fact.
        await trio.sleep(max(0.0, expires_at + 5.2 - time.time()))
        with pytest.raises(SignalingFailed) as expired:
            await viewer.play("demo-2")
        assert expired.value.code == "token_expired"
        await playing.wait_frames(10)  # what was playing goes on
        # A fresh token on the same socket lets the page carry on.
        reply = await viewer.request(
            {"type": "auth", "payload": {"token": token(["*"])}}, None, ("auth", "error")
        )
        assert reply["type"] == "auth" and reply["payload"]["ok"] is True
        await (await viewer.play("demo-2")).wait_frames(3)
        bad = await viewer.request(
            {"type": "auth", "payload": {"token": "nope"}}, None, ("auth", "error")
        )
        assert bad["code"] == "unauthorized"


async def test_the_api_lists_only_what_a_token_grants_and_stats_need_admin(
    start_server: StartServer,
) -> None:
    server = await start_server(secured())
    assert (await get(server.url + "/api/streams")).status == 401
    viewer_token = token(["demo-2"])
    listed = await get(
        server.url + "/api/streams", headers={"Authorization": f"Bearer {viewer_token}"}
    )
    assert [s["id"] for s in listed.json()["streams"]] == ["demo-2"]
    by_query = await get(f"{server.url}/api/streams?token={viewer_token}")
    assert [s["id"] for s in by_query.json()["streams"]] == ["demo-2"]
    hidden = await get(f"{server.url}/api/streams/demo-1?token={viewer_token}")
    assert hidden.status == 404
    stats = await get(f"{server.url}/api/stats?token={viewer_token}")
    assert (stats.status, stats.json()["code"]) == (403, "forbidden")
    admin = await get(f"{server.url}/api/stats?token={token(['*'], admin=True)}")
    assert admin.status == 200 and "sockets" in admin.json()
    assert (await get(server.url + "/healthz")).status == 200  # liveness stays public


async def test_open_mode_says_so_loudly_at_start(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="mediastream"):
        await start_server()
    assert any("OPEN MODE" in r.getMessage() for r in caplog.records)


async def test_the_token_command_issues_tokens_the_server_accepts(
    start_server: StartServer, tmp_path: Path
) -> None:
    config_file = tmp_path / "secured.toml"
    config_file.write_text(f'[security]\njwt_secret = "{SECRET}"\n')
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "mediastream",
            "token",
            "--config",
            str(config_file),
            "--streams",
            "demo-*",
            "--ttl",
            "5m",
            "--admin",
        ],
        capture_stdout=True,
    )
    issued = result.stdout.decode().strip()
    claims = jwt.decode(issued, SECRET, algorithms=["HS256"])
    assert claims["streams"] == ["demo-*"] and claims["admin"] is True
    assert 290 <= claims["exp"] - claims["iat"] <= 300
    server = await start_server(secured())
    async with open_viewer(f"{server.ws_url}?token={issued}") as viewer:
        await (await viewer.play("demo-1")).wait_frames(3)


# --- TLS --------------------------------------------------------------------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = directory / "cert.pem", directory / "key.pem"
    certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


async def test_tls_serves_https_and_wss_and_plays(
    start_server: StartServer, tmp_path: Path
) -> None:
    certfile, keyfile = self_signed(tmp_path)
    config = make_config(DEMO_STREAMS, server={"certfile": str(certfile), "keyfile": str(keyfile)})
    server = await start_server(config)
    assert server.url.startswith("https://") and server.ws_url.startswith("wss://")
    trust = ssl.create_default_context(cafile=str(certfile))
    health = await get(server.url + "/healthz", ssl_context=trust)
    assert health.json() == {"status": "ok"}
    async with open_viewer(server.ws_url, ssl_context=trust) as viewer:
        await (await viewer.play("demo-1")).wait_frames(5)
    # A client that doesn't trust the certificate gets nowhere.
    with pytest.raises(trio.BrokenResourceError) as untrusted:
        await get(server.url + "/healthz", ssl_context=ssl.create_default_context())
    assert isinstance(untrusted.value.__cause__, ssl.SSLCertVerificationError)


# --- origins ----------------------------------------------------------------------------------


async def test_cross_origin_sockets_are_refused_and_same_origin_ones_accepted(
    start_server: StartServer,
) -> None:
    server = await start_server(
        make_config(DEMO_STREAMS, security={"allowed_origins": ["https://wall.example.com"]})
    )
    assert await upgrade_status(server.ws_url, {"Origin": "https://evil.example.net"}) == 403
    for origin in (server.url, "https://wall.example.com"):
        async with open_viewer(server.ws_url, headers=[(b"Origin", origin.encode())]) as viewer:
            await (await viewer.play("demo-1")).wait_frames(3)


# --- limits -----------------------------------------------------------------------------------


async def test_streams_per_socket_limit_is_an_error_and_the_socket_lives(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_streams_per_socket": 2}))
    async with open_viewer(server.ws_url) as viewer:
        first = await viewer.play("demo-1")
        await viewer.play("demo-2")
        with pytest.raises(SignalingFailed) as refused:
            await viewer.play("demo-3")
        assert refused.value.code == "too_many_streams"
        await first.wait_frames(10)


async def test_sockets_per_client_limit_refuses_the_extra_socket(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_sockets_per_client": 2}))
    async with open_viewer(server.ws_url), open_viewer(server.ws_url):
        assert await upgrade_status(server.ws_url) == 429
    async with open_viewer(server.ws_url) as viewer:  # freed again once they closed
        await (await viewer.play("demo-1")).wait_frames(3)


async def test_too_many_offers_a_second_are_refused_one_by_one(start_server: StartServer) -> None:
    server = await start_server(
        make_config(DEMO_STREAMS, limits={"max_offers_per_second": 1})  # bursts of 2
    )
    async with open_viewer(server.ws_url) as viewer:
        sdp_offer = {"type": "offer", "payload": {"sdp": "v=0\r\n"}}
        replies = []
        for stream_id in ("nope-1", "nope-2", "nope-3", "nope-4"):
            reply = await viewer.request(
                {**sdp_offer, "streamId": stream_id}, stream_id, ("error",)
            )
            replies.append(reply["code"])
        assert replies[:2] == ["stream_not_found"] * 2
        assert "rate_limited" in replies[2:]
        pong = await viewer.request({"type": "ping"}, None, ("pong",))
        assert pong["type"] == "pong"


async def test_a_message_flood_closes_the_socket_with_a_policy_code(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_messages_per_second": 20}))
    async with open_viewer(server.ws_url) as flooder, open_viewer(server.ws_url) as bystander:
        playing = await bystander.play("demo-1")
        with contextlib.suppress(ConnectionClosed):  # the server hangs up mid-flood
            for _ in range(200):
                await flooder.send({"type": "ping"})
        code, _ = await flooder.wait_closed()
        assert code == 1008
        await playing.wait_frames(10)


async def test_an_oversized_sdp_is_refused(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_sdp_bytes": 1000}))
    async with open_viewer(server.ws_url) as viewer:
        with pytest.raises(SignalingFailed) as refused:
            await viewer.play("demo-1")  # aiortc's offers are ~1.5 kB
        assert refused.value.code == "invalid_sdp" and "1000" in str(refused.value)


async def test_a_negotiation_that_never_completes_times_out(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, webrtc={"negotiation_timeout": 1}))
    async with open_viewer(server.ws_url) as viewer:
        # A peer that never connects: it doesn't apply the answer, so it never checks.
        played = await viewer.play("demo-1", trickle=True, mdns_only=True, connect=False)
        error = await viewer.wait_for(lambda m: m["type"] == "error", timeout=10)
        assert error["code"] == "negotiation_timeout" and error["streamId"] == "demo-1"
        assert played.pc is not None
        pong = await viewer.request({"type": "ping"}, None, ("pong",))
        assert pong["type"] == "pong"
    await server.services.changes.wait_until(
        lambda: server.services.statistics().open_peer_connections == 0
    )


# --- secrets ----------------------------------------------------------------------------------


async def test_camera_credentials_never_appear_anywhere(
    start_server: StartServer,
    camera: Camera,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    config = make_config(
        [
            {"id": "cam", "source": camera.url("/h264", credentials="admin:hunter2")},
            {"id": "dead", "source": "rtsp://admin:hunter2@127.0.0.1:9/x?password=hunter2"},
        ],
        media={"open_timeout": 1, "retry_initial_delay": 0.2, "retry_max_delay": 1},
    )
    seen: list[str] = []
    with caplog.at_level(logging.DEBUG):
        server = await start_server(config)
        async with open_viewer(server.ws_url) as viewer:
            await (await viewer.play("cam")).wait_frames(10)
            await viewer.play("dead")
            await viewer.wait_for(
                lambda m: m["type"] == "state" and m["payload"]["state"] == "offline"
            )
            seen += [json.dumps(m) for m in viewer.messages]
        for path in ("/api/streams", "/api/streams/cam", "/api/streams/dead"):
            seen.append((await get(server.url + path)).body.decode())
        page = await get(server.url + "/static/dashboard.html")
        seen.append(page.body.decode())
    seen += [record.getMessage() for record in caplog.records]
    captured = capfd.readouterr()
    seen += [captured.out, captured.err]
    everything = "\n".join(seen)
    assert "rtsp://***@127.0.0.1" in everything  # the sources are shown, redacted
    assert "hunter2" not in everything
    assert "admin" not in everything.replace("admin token", "")
