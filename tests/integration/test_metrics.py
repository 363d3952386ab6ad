"""/metrics, scraped while streams play: the figures move as they should."""

from __future__ import annotations

import pytest

from support.http import get, scrape
from support.servers import DEMO_STREAMS, StartServer, make_config
from support.viewer import SignalingFailed, open_viewer


async def test_metrics_follow_sockets_streams_and_traffic(start_server: StartServer) -> None:
    server = await start_server()
    idle = await scrape(server.url)
    assert idle[("mediastream_sockets_open", ())] == 0
    assert idle[("mediastream_stream_viewers", (("stream", "demo-1"),))] == 0
    assert idle[("mediastream_stream_state", (("state", "stopped"), ("stream", "demo-1")))] == 1

    async with open_viewer(server.ws_url) as viewer:
        first = await viewer.play("demo-1")
        second = await viewer.play("demo-2")
        with pytest.raises(SignalingFailed):
            await viewer.play("nope")
        await first.wait_frames(10)
        await second.wait_frames(10)
        busy = await scrape(server.url)
        await first.wait_frames(25)
        later = await scrape(server.url)

    assert busy[("mediastream_sockets_open", ())] == 1
    assert busy[("mediastream_sessions_open", ())] == 2
    assert busy[("mediastream_peer_connections_open", ())] == 2
    assert busy[("mediastream_streams_per_socket_bucket", (("le", "2"),))] == 1
    assert busy[("mediastream_streams_per_socket_bucket", (("le", "1"),))] == 0
    assert busy[("mediastream_stream_viewers", (("stream", "demo-1"),))] == 1
    assert busy[("mediastream_stream_state", (("state", "live"), ("stream", "demo-1")))] == 1
    assert busy[("mediastream_stream_source_running", (("stream", "demo-3"),))] == 0
    assert busy[("mediastream_signaling_messages_total", (("type", "offer"),))] == 3
    assert busy[("mediastream_signaling_errors_total", (("code", "stream_not_found"),))] == 1
    assert busy[("mediastream_offer_answer_seconds_count", ())] == 2
    assert busy[("mediastream_first_frame_seconds_count", ())] == 2
    for name in (
        "mediastream_stream_frames_read_total",
        "mediastream_stream_bytes_read_total",
        "mediastream_stream_packets_sent_total",
        "mediastream_stream_bytes_sent_total",
    ):
        key = (name, (("stream", "demo-1"),))
        assert later[key] > busy[key] > 0, name
    assert later[("mediastream_stream_frames_dropped_total", (("stream", "demo-1"),))] == 0
    assert later[("mediastream_stream_encoders_opened_total", (("stream", "demo-1"),))] == 1


async def test_metrics_need_an_admin_token_when_tokens_are_on(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": "m" * 40}))
    assert (await get(server.url + "/metrics")).status == 401
