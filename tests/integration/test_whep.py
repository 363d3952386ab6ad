"""WHEP (``/whep/<streamId>``) over plain HTTP, with a real aiortc player that decodes frames."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

import trio

from mediastream.auth import Authenticator
from mediastream.config import SecurityConfig
from mediastream.server import RunningServer

from support.http import HttpResponse, get, request, scrape
from support.servers import DEMO_STREAMS, StartServer, make_config
from support.turn import running_turn_server
from support.viewer import open_viewer
from support.whep import WhepPlayer

SECRET = "whep-test-secret-" + "x" * 32
TRICKLE = {"Content-Type": "application/trickle-ice-sdpfrag"}


def token(streams: list[str], *, admin: bool = False) -> str:
    return Authenticator(SecurityConfig(jwt_secret=SECRET)).issue(streams, 600, admin=admin)


async def open_peers(server: RunningServer) -> int:
    stats = (await get(server.url + "/api/stats")).json()
    return int(stats["peerConnections"]["open"])


async def delete(server: RunningServer, location: str, **headers: str) -> HttpResponse:
    return await request(server.url + location, method="DELETE", headers=headers)


async def test_whep_offer_gets_201_with_the_answer_and_the_player_decodes_video(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        assert response.headers["content-type"] == "application/sdp"
        assert re.fullmatch(r"/whep/demo-1/[\w-]{16,}", response.headers["location"])
        assert re.fullmatch(r'"[0-9a-f]+"', response.headers["etag"])
        answer = response.body.decode()
        assert answer.startswith("v=0") and "H264" in answer
        await player.accept(response, nursery)
        await player.wait_frames(10)
        stream = (await get(server.url + "/api/streams/demo-1")).json()
        assert stream["viewers"] == 1  # a viewer like any other
    finally:
        await player.close()


async def test_trickled_candidates_are_taken_and_restarts_and_strangers_refused(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    player.strip_candidates()
    assert player.candidates and "a=candidate" not in player.sdp
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        resource = server.url + response.headers["location"]
        patched = await request(
            resource, method="PATCH", headers=TRICKLE, body=player.trickle_fragment().encode()
        )
        assert patched.status == 204, patched.body
        await player.accept(response, nursery)
        await player.wait_frames(10)

        etag = {"If-Match": response.headers["etag"], **TRICKLE}
        again = await request(resource, method="PATCH", headers=etag, body=b"a=end-of-candidates")
        assert again.status == 204, again.body
        stale = {"If-Match": '"not-this-one"', **TRICKLE}
        refused = await request(resource, method="PATCH", headers=stale, body=b"")
        assert refused.status == 412
        restart = player.trickle_fragment().replace("a=ice-ufrag:", "a=ice-ufrag:new")
        restarted = await request(
            resource, method="PATCH", headers={"If-Match": "*", **TRICKLE}, body=restart.encode()
        )
        assert restarted.status == 422
        assert "ICE restarts are not supported" in restarted.json()["error"]
        garbage = await request(resource, method="PATCH", headers=TRICKLE, body=b"a=candidate:1")
        assert garbage.status == 400 and "not an ICE candidate" in garbage.json()["error"]
        wrong_type = await request(
            resource, method="PATCH", headers={"Content-Type": "text/plain"}, body=b"x"
        )
        assert wrong_type.status == 415
        unknown = await request(
            server.url + "/whep/demo-1/no-such-session",
            method="PATCH",
            headers=TRICKLE,
            body=player.trickle_fragment().encode(),
        )
        assert unknown.status == 404
        # None of that disturbed the session.
        await player.wait_frames(5)
    finally:
        await player.close()


async def test_delete_ends_the_session_and_its_peer_while_sockets_play_on(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    try:
        async with open_viewer(server.ws_url) as viewer:
            watched = await viewer.play("demo-2")
            response = await player.offer(server.url + "/whep/demo-1")
            assert response.status == 201, response.body
            await player.accept(response, nursery)
            await player.wait_frames(5)
            assert await open_peers(server) == 2

            deleted = await delete(server, response.headers["location"])
            assert deleted.status == 200
            # The DELETE answers once the session's peer connection is closed.
            assert await open_peers(server) == 1
            assert server.services.whep.open_sessions == 0
            assert (await delete(server, response.headers["location"])).status == 404
            await watched.wait_frames(10)  # the socket's stream never noticed
    finally:
        await player.close()


async def test_bad_offers_unknown_streams_and_wrong_types_are_refused_with_reasons(
    start_server: StartServer,
) -> None:
    server = await start_server()
    endpoint = server.url + "/whep/demo-1"
    sdp = {"Content-Type": "application/sdp"}

    not_sdp = await request(endpoint, method="POST", headers=sdp, body=b"hello")
    assert not_sdp.status == 400
    assert not_sdp.json()["code"] == "invalid_sdp" and "v=0" in not_sdp.json()["error"]
    broken = await request(endpoint, method="POST", headers=sdp, body=b"v=0\r\nm=nonsense\r\n")
    assert broken.status == 400
    assert broken.json()["code"] == "invalid_sdp", broken.body
    assert "SDP" in broken.json()["error"]
    binary = await request(endpoint, method="POST", headers=sdp, body=b"v=0\xff\xfe")
    assert binary.status == 400 and "UTF-8" in binary.json()["error"]
    huge = await request(endpoint, method="POST", headers=sdp, body=b"v=0\r\n" + b"a" * 49_200)
    assert huge.status == 413 and "larger than 49152 bytes" in huge.json()["error"]

    player = await WhepPlayer.create()
    try:
        unknown = await player.offer(server.url + "/whep/no-such-stream")
        assert unknown.status == 404 and unknown.json()["code"] == "stream_not_found"
        wrong_type = await request(
            endpoint, method="POST", headers={"Content-Type": "application/json"}, body=b"{}"
        )
        assert wrong_type.status == 415 and wrong_type.headers["accept-post"] == "application/sdp"
    finally:
        await player.close()
    assert (await delete(server, "/whep/demo-1/no-such-session")).status == 404
    assert server.services.whep.open_sessions == 0
    assert await open_peers(server) == 0


async def test_preflight_names_the_methods_and_exposes_the_headers_to_allowed_origins(
    start_server: StartServer,
) -> None:
    page = "http://player.example"
    server = await start_server(make_config(DEMO_STREAMS, security={"allowed_origins": [page]}))
    preflight = {
        "Origin": page,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    endpoint = await request(server.url + "/whep/demo-1", method="OPTIONS", headers=preflight)
    assert endpoint.status == 204
    assert endpoint.headers["accept-post"] == "application/sdp"
    assert endpoint.headers["access-control-allow-origin"] == page
    assert "POST" in endpoint.headers["access-control-allow-methods"]
    assert "Authorization" in endpoint.headers["access-control-allow-headers"]
    exposed = endpoint.headers["access-control-expose-headers"]
    assert {"Location", "Link", "ETag"} <= set(exposed.replace(" ", "").split(","))
    session = await request(server.url + "/whep/demo-1/x", method="OPTIONS", headers=preflight)
    assert session.headers["accept-patch"] == "application/trickle-ice-sdpfrag"
    assert "DELETE" in session.headers["access-control-allow-methods"]
    stranger = await request(
        server.url + "/whep/demo-1", method="OPTIONS", headers={**preflight, "Origin": "http://x"}
    )
    assert "access-control-allow-origin" not in stranger.headers


async def test_tokens_and_grants_are_those_of_the_socket(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": SECRET}))
    endpoint = server.url + "/whep/demo-1"
    player = await WhepPlayer.create()
    try:
        missing = await player.offer(endpoint)
        assert missing.status == 401 and missing.headers["www-authenticate"].startswith("Bearer")
        invalid = await player.offer(endpoint, token="not-a-token")
        assert (
            invalid.status == 401 and 'error="invalid_token"' in invalid.headers["www-authenticate"]
        )
        other_stream = await player.offer(endpoint, token=token(["demo-2"]))
        assert other_stream.status == 403 and other_stream.json()["code"] == "forbidden"

        granted = token(["demo-*"])
        response = await player.offer(endpoint, token=granted)
        assert response.status == 201, response.body
        location = response.headers["location"]
        await player.accept(response, nursery)
        await player.wait_frames(5)
        assert (await delete(server, location)).status == 401
        assert (await delete(server, location, Authorization=f"Bearer {token(['x'])}")).status == (
            403
        )
        assert (await delete(server, location, Authorization=f"Bearer {granted}")).status == 200
    finally:
        await player.close()


async def test_ice_servers_are_link_headers_with_fresh_turn_credentials(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    with running_turn_server() as turn:
        ice = [{"urls": [turn.url], "secret": turn.secret}, {"urls": ["stun:127.0.0.1:9"]}]
        server = await start_server(make_config(DEMO_STREAMS, webrtc={"ice_servers": ice}))
        player = await WhepPlayer.create()
        try:
            response = await player.offer(server.url + "/whep/demo-1")
            assert response.status == 201, response.body
            # One Link value per server URL, in one header.
            links = re.findall(r"<([^>]+)>; rel=\"ice-server\"([^,]*)", response.headers["link"])
            by_url = dict(links)
            assert set(by_url) == {turn.url, "stun:127.0.0.1:9"}
            username = re.search(r'username="([^"]+)"', by_url[turn.url])
            credential = re.search(r'credential="([^"]+)"', by_url[turn.url])
            assert username and credential and 'credential-type="password"' in by_url[turn.url]
            expected = hmac.new(turn.secret.encode(), username.group(1).encode(), hashlib.sha1)
            assert credential.group(1) == base64.b64encode(expected.digest()).decode()
            assert "username" not in by_url["stun:127.0.0.1:9"]
        finally:
            await player.close()


async def test_stopping_the_stream_ends_its_whep_sessions(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        await player.accept(response, nursery)
        await player.wait_frames(5)
        stopped = await request(server.url + "/api/streams/demo-1/stop", method="POST")
        assert stopped.status == 200
        whep = server.services.whep
        with trio.fail_after(10):
            await server.services.changes.wait_until(lambda: whep.open_sessions == 0)
        patched = await request(
            server.url + response.headers["location"],
            method="PATCH",
            headers=TRICKLE,
            body=b"a=end-of-candidates\r\n",
        )
        assert patched.status == 404
        # Ended on its own: the player may still delete it, once.
        assert (await delete(server, response.headers["location"])).status == 200
        assert (await delete(server, response.headers["location"])).status == 404
        assert await open_peers(server) == 0
    finally:
        await player.close()


async def test_a_player_that_never_connects_is_ended_by_the_negotiation_timeout(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, webrtc={"negotiation_timeout": 1}))
    player = await WhepPlayer.create()
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        whep = server.services.whep
        assert whep.open_sessions == 1
        # The answer is never applied: the session gives up on its own.
        with trio.fail_after(10):
            await server.services.changes.wait_until(lambda: whep.open_sessions == 0)
        assert await open_peers(server) == 0
    finally:
        await player.close()


async def test_sessions_per_address_and_offer_rate_are_limited(start_server: StartServer) -> None:
    one_session = await start_server(
        make_config(DEMO_STREAMS, limits={"max_streams_per_socket": 1})
    )
    # Half an offer a second: a burst of one, then the next token is 2 s away.
    slow_offers = await start_server(
        make_config(DEMO_STREAMS, limits={"max_offers_per_second": 0.5})
    )
    players = [await WhepPlayer.create() for _ in range(4)]
    try:
        first = await players[0].offer(one_session.url + "/whep/demo-1")
        assert first.status == 201, first.body
        second = await players[1].offer(one_session.url + "/whep/demo-2")
        assert second.status == 429 and second.json()["code"] == "too_many_streams"
        assert (await delete(one_session, first.headers["location"])).status == 200

        allowed = await players[2].offer(slow_offers.url + "/whep/demo-1")
        assert allowed.status == 201, allowed.body
        over = await players[3].offer(slow_offers.url + "/whep/demo-2")
        assert over.status == 429 and over.json()["code"] == "rate_limited"
    finally:
        for player in players:
            await player.close()


async def test_shutdown_ends_whep_sessions_and_closes_their_peers(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        await player.accept(response, nursery)
        await player.wait_frames(3)
        server.request_shutdown()
        with trio.fail_after(10):
            await server.wait_stopped()
        stats = server.services.statistics()
        assert (stats.open_peer_connections, stats.sources_running) == (0, 0)
        assert server.services.whep.open_sessions == 0
    finally:
        await player.close()


async def test_whep_sessions_are_measured_like_the_sockets(
    start_server: StartServer, nursery: trio.Nursery
) -> None:
    server = await start_server()
    player = await WhepPlayer.create()
    try:
        response = await player.offer(server.url + "/whep/demo-1")
        assert response.status == 201, response.body
        await player.accept(response, nursery)
        await player.wait_frames(5)
        samples = await scrape(server.url)
        assert samples[("mediastream_offer_answer_seconds_count", ())] == 1
        assert samples[("mediastream_first_frame_seconds_count", ())] == 1
        assert samples[("mediastream_sessions_open", ())] == 1
        assert (await get(server.url + "/api/stats")).json()["sessions"] == 1
        bad = await request(
            server.url + "/whep/demo-2",
            method="POST",
            headers={"Content-Type": "application/sdp"},
            body=b"v=0\r\nm=nonsense\r\n",
        )
        assert bad.status == 400
        samples = await scrape(server.url)
        assert samples[("mediastream_signaling_errors_total", (("code", "invalid_sdp"),))] == 1
    finally:
        await player.close()
