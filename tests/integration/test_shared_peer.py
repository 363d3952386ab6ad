"""A page's shared peer connection, driven by a real aiortc peer over a real socket: one peer
connection on the server for several streams, each decoding; streams refused (unknown, over
the socket's limit) named in their errors while the others play; ``close`` ends it all."""

from __future__ import annotations

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from support.servers import DEMO_STREAMS, StartServer, make_config
from support.viewer import PlayedStream, open_viewer

PEER_ID = "~it-pc1"


async def test_one_server_peer_carries_several_streams_and_names_the_refused_ones(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_streams_per_socket": 2}))
    async with open_viewer(server.ws_url) as viewer:
        pc = await trio_asyncio.aio_as_trio(_peer)()
        try:
            transceivers = [pc.addTransceiver("video", direction="recvonly") for _ in range(4)]
            offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
            # demo-3 is one stream too many for this socket; "missing" does not exist.
            wanted = ["demo-1", "demo-2", "demo-3", "missing"]
            streams = {t.mid: stream for t, stream in zip(transceivers, wanted, strict=True)}
            start = len(viewer.messages)
            await viewer.send(
                {
                    "type": "offer",
                    "streamId": PEER_ID,
                    "payload": {
                        "type": "offer",
                        "sdp": pc.localDescription.sdp,
                        "streams": streams,
                    },
                }
            )
            answer = await viewer.wait_for(
                lambda m: m["type"] == "answer" and m["streamId"] == PEER_ID, after=start
            )
            errors = {}
            for _ in range(2):
                error = await viewer.wait_for(
                    lambda m: m["type"] == "error" and m.get("stream") not in errors, after=start
                )
                errors[error["stream"]] = error["code"]
            assert errors == {"demo-3": "too_many_streams", "missing": "stream_not_found"}
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=answer["payload"], type="answer")
            )
            await viewer.send({"type": "applied", "streamId": PEER_ID, "payload": {}})
            played = [PlayedStream(stream, pc) for stream in ("demo-1", "demo-2")]
            for one, transceiver in zip(played, transceivers, strict=False):
                viewer._nursery.start_soon(viewer._decode, one, transceiver.receiver.track)
            for one in played:
                await one.wait_frames(5, timeout=20)
            statistics = server.services.statistics()
            assert statistics.open_peer_connections == 1
            assert statistics.open_sessions == 2
            # Per-stream states come to the connection's id, naming their stream.
            live = await viewer.wait_for(
                lambda m: m["type"] == "state" and m["payload"].get("stream") == "demo-2"
            )
            assert live["streamId"] == PEER_ID

            await viewer.send({"type": "close", "streamId": PEER_ID})
            with trio.fail_after(10):
                await server.services.changes.wait_until(
                    lambda: (
                        server.services.statistics().open_peer_connections == 0
                        and server.services.statistics().open_sessions == 0
                    )
                )
        finally:
            await trio_asyncio.aio_as_trio(pc.close)()


async def test_a_second_offer_before_the_first_is_applied_is_refused(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS))
    async with open_viewer(server.ws_url) as viewer:
        pc = await trio_asyncio.aio_as_trio(_peer)()
        try:
            transceiver = pc.addTransceiver("video", direction="recvonly")
            offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
            message = {
                "type": "offer",
                "streamId": PEER_ID,
                "payload": {
                    "type": "offer",
                    "sdp": pc.localDescription.sdp,
                    "streams": {transceiver.mid: "demo-1"},
                },
            }
            await viewer.send(message)
            reply = await viewer.request(message, PEER_ID, ("error",))
            assert reply["code"] == "negotiation_in_progress"
            assert "stream" not in reply
        finally:
            await trio_asyncio.aio_as_trio(pc.close)()


async def _peer() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def test_the_next_offer_may_follow_applied_at_once(start_server: StartServer) -> None:
    """A page sends ``applied`` and its next offer back to back: the server takes it."""
    server = await start_server(make_config(DEMO_STREAMS))
    async with open_viewer(server.ws_url) as viewer:
        pc = await trio_asyncio.aio_as_trio(_peer)()
        try:
            first = pc.addTransceiver("video", direction="recvonly")
            offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
            answer = await viewer.request(
                _offer(pc.localDescription.sdp, {first.mid: "demo-1"}), PEER_ID, ("answer",)
            )
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=answer["payload"], type="answer")
            )
            second = pc.addTransceiver("video", direction="recvonly")
            offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
            start = len(viewer.messages)
            streams = {first.mid: "demo-1", second.mid: "demo-2"}
            await viewer.send({"type": "applied", "streamId": PEER_ID, "payload": {}})
            await viewer.send(_offer(pc.localDescription.sdp, streams))
            reply = await viewer.wait_for(
                lambda m: m["streamId"] == PEER_ID and m["type"] in ("answer", "error"),
                after=start,
            )
            assert reply["type"] == "answer", reply
        finally:
            await trio_asyncio.aio_as_trio(pc.close)()


def _offer(sdp: str, streams: dict[str | None, str]) -> dict[str, object]:
    return {
        "type": "offer",
        "streamId": PEER_ID,
        "payload": {"type": "offer", "sdp": sdp, "streams": streams},
    }
