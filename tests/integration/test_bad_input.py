"""Bad input gets a clear error for its stream; the socket and its other streams carry on."""

from __future__ import annotations

import json
import os

import trio_asyncio
from aiortc import RTCPeerConnection, RTCRtpSender

from support.servers import StartServer
from support.viewer import Viewer, open_viewer

SDP_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


async def error_for(viewer: Viewer, message: object, stream_id: str | None) -> dict[str, object]:
    reply = await viewer.request(
        message if isinstance(message, str) else json.dumps(message), stream_id, ("error",)
    )
    assert isinstance(reply["payload"], str) and reply["payload"]
    return reply


async def vp8_only_offer() -> str:
    async def make() -> str:
        pc = RTCPeerConnection()
        transceiver = pc.addTransceiver("video", direction="recvonly")
        vp8 = [c for c in RTCRtpSender.getCapabilities("video").codecs if c.mimeType == "video/VP8"]
        transceiver.setCodecPreferences(vp8)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return str(sdp)

    return await trio_asyncio.aio_as_trio(make)()


async def test_every_bad_input_is_answered_and_the_playing_stream_never_notices(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        playing = await viewer.play("demo-1")
        await playing.wait_frames(5)

        reply = await error_for(viewer, "{not json", None)
        assert reply["code"] == "invalid_json"
        assert (await error_for(viewer, "[1, 2]", None))["code"] == "invalid_message"
        reply = await error_for(viewer, {"type": "subscribe", "streamId": "demo-1"}, "demo-1")
        assert reply["code"] == "unknown_type" and "subscribe" in str(reply["payload"])
        reply = await error_for(
            viewer, {"type": "offer", "streamId": "nope", "payload": {"sdp": SDP_HEAD}}, "nope"
        )
        assert (reply["code"], reply["payload"]) == ("stream_not_found", "Stream not found")
        reply = await error_for(
            viewer,
            {"type": "offer", "streamId": "demo-2", "payload": {"sdp": SDP_HEAD + "m=garbage\r\n"}},
            "demo-2",
        )
        assert reply["code"] == "invalid_sdp" and "Invalid SDP" in str(reply["payload"])
        reply = await error_for(
            viewer,
            {"type": "offer", "streamId": "demo-2", "payload": {"sdp": await vp8_only_offer()}},
            "demo-2",
        )
        assert reply["code"] == "unsupported_codec" and "H.264" in str(reply["payload"])
        reply = await error_for(
            viewer,
            {
                "type": "ice",
                "streamId": "demo-3",
                "payload": {"candidate": "candidate:1 1 udp 1 10.0.0.1 9 typ host", "sdpMid": "0"},
            },
            "demo-3",
        )
        assert reply["code"] == "no_session"
        reply = await error_for(
            viewer,
            {
                "type": "ice",
                "streamId": "demo-1",
                "payload": {"candidate": "candidate:nonsense", "sdpMid": "0"},
            },
            "demo-1",
        )
        assert reply["code"] == "invalid_candidate"
        reply = await error_for(viewer, "x" * (65 * 1024), None)
        assert reply["code"] == "message_too_large"
        start = len(viewer.messages)
        await viewer.ws.send_message(os.urandom(300))
        reply = await viewer.wait_for(lambda m: m["type"] == "error", after=start)
        assert reply["code"] == "invalid_json"

        # The socket still answers, and the first stream kept playing throughout.
        pong = await viewer.request({"type": "ping", "payload": {"n": 1}}, None, ("pong",))
        assert pong["payload"] == {"n": 1}
        await playing.wait_frames(20)
        # A stream that failed to negotiate can still be played on the same socket.
        retried = await viewer.play("demo-2")
        await retried.wait_frames(5)
        assert server.services.statistics().sessions_per_socket == (2,)


async def test_a_second_offer_while_the_first_is_being_answered_is_refused(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        offer = await _offer_text("demo-1")
        start = len(viewer.messages)
        await viewer.send(offer)
        await viewer.send(offer)
        error = await viewer.wait_for(lambda m: m["type"] == "error", after=start)
        assert error["code"] == "negotiation_in_progress" and error["streamId"] == "demo-1"
        answer = await viewer.wait_for(lambda m: m["type"] == "answer", after=start)
        assert answer["streamId"] == "demo-1"


async def test_closing_a_stream_twice_or_one_never_opened_is_harmless(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        playing = await viewer.play("demo-1")
        await playing.wait_frames(3)
        for _ in range(2):
            await viewer.send({"type": "close", "streamId": "demo-2"})
        pong = await viewer.request({"type": "ping"}, None, ("pong",))
        assert pong["type"] == "pong"
        assert not [m for m in viewer.messages if m["type"] == "error"]
        await playing.wait_frames(10)


async def test_an_oversized_message_far_beyond_the_limit_closes_the_socket(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        await viewer.send("x" * (300 * 1024))
        code, _ = await viewer.wait_closed()
        assert code == 1009  # "message too big"
    await server.services.changes.wait_until(lambda: server.services.statistics().open_sockets == 0)


async def _offer_text(stream_id: str) -> str:
    async def make() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return str(sdp)

    sdp = await trio_asyncio.aio_as_trio(make)()
    return json.dumps({"type": "offer", "streamId": stream_id, "payload": {"sdp": sdp}})
