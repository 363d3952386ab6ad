"""Streams over one socket, end to end: real server, real socket, real aiortc peers, real
RTSP camera. Frames are decoded by the viewer, not just counted as bytes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from mediastream.config import default_config
from mediastream.server import RunningServer

from support.h264 import file_slices, rtsp_slices, slices_of
from support.http import get, request
from support.servers import DEMO_STREAMS, Camera, StartServer, lasting_tasks, make_config
from support.viewer import open_viewer


def camera_streams(camera: Camera) -> list[dict[str, object]]:
    return [
        {"id": "cam-a", "source": camera.url("/h264")},
        {"id": "cam-b", "source": camera.url("/h264-gop4")},
        {"id": "cam-c", "source": camera.url("/h264-pcmu")},
    ]


async def wait_until(server: RunningServer, condition, timeout: float = 15) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        await server.services.changes.wait_until(condition)


async def test_three_rtsp_streams_over_one_socket_all_decode(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config(camera_streams(camera)))
    async with open_viewer(server.ws_url) as viewer:
        played = [await viewer.play(stream_id) for stream_id in ("cam-a", "cam-b", "cam-c")]
        for stream in played:
            await stream.wait_frames(10)
            assert stream.sizes == {(640, 360)}
        stats = server.services.statistics()
        assert stats.open_sockets == 1
        assert stats.sessions_per_socket == (3,)
        assert stats.open_peer_connections == 3


async def test_rtsp_over_udp_when_configured(start_server: StartServer, camera: Camera) -> None:
    config = make_config([{"id": "cam", "source": camera.url("/h264"), "rtsp_transport": "udp"}])
    server = await start_server(config)
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam")
        await played.wait_frames(25)
        assert played.sizes == {(640, 360)}


async def test_the_built_in_demo_streams_play_over_one_socket(start_server: StartServer) -> None:
    server = await start_server(dataclasses.replace(default_config(), server=make_config().server))
    async with open_viewer(server.ws_url) as viewer:
        played = [await viewer.play(f"demo-{n}") for n in (1, 2, 3)]
        for stream in played:
            await stream.wait_frames(10)
            assert stream.sizes == {(640, 360)}
        listed = (await get(server.url + "/api/streams")).json()["streams"]
    assert [(s["id"], s["state"], s["viewers"]) for s in listed] == [
        ("demo-1", "live", 1),
        ("demo-2", "live", 1),
        ("demo-3", "live", 1),
    ]
    assert all(s["encodersOpened"] == 1 for s in listed)  # once per source, not per viewer


async def test_file_stream_plays_and_its_h264_arrives_byte_for_byte(
    start_server: StartServer, h264_mp4: Path
) -> None:
    server = await start_server(make_config([{"id": "clip", "source": f"file:{h264_mp4}"}]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("clip", capture=True)
        await played.wait_frames(30)
    received = slices_of(played.access_units)
    assert len(received) >= 30
    # Every slice the viewer decoded is one of the file's own slices: nothing was re-encoded.
    assert set(received) <= file_slices(str(h264_mp4))
    assert server.services.registry.get("clip").statistics().encoders_opened == 0  # type: ignore[union-attr]


async def test_rtsp_h264_is_forwarded_without_reencoding(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url("/h264")}]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam", capture=True)
        await played.wait_frames(5)
        start = len(played.access_units)
        # A second, independent RTSP client of the same (shared) camera, at the same time.
        direct = await trio.to_thread.run_sync(rtsp_slices, camera.url("/h264"), 3.0)
        received = slices_of(played.access_units[start:])
    assert len(received) >= 25
    common = set(received) & direct
    # Both saw the camera's very bytes; a transcoded stream would share none.
    assert len(common) >= 0.8 * len(set(received))
    stream = server.services.registry.get("cam")
    assert stream is not None and stream.statistics().encoders_opened == 0
    assert stream.statistics().codec == "h264"


async def test_ending_one_stream_leaves_the_others_flowing(start_server: StartServer) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        played = {sid: await viewer.play(sid) for sid in ("demo-1", "demo-2", "demo-3")}
        for stream in played.values():
            await stream.wait_frames(3)
        await viewer.stop("demo-2")
        await wait_until(server, lambda: server.services.statistics().open_peer_connections == 2)
        assert server.services.statistics().sessions_per_socket == (2,)
        await played["demo-1"].wait_frames(20)
        await played["demo-3"].wait_frames(20)


async def test_closing_the_socket_leaves_nothing_running(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, media={"on_demand_grace": 0.2}))
    await wait_until(server, lambda: server.services.statistics().open_sockets == 0)
    tasks_before = lasting_tasks()
    async with open_viewer(server.ws_url) as viewer:
        for sid in ("demo-1", "demo-2", "demo-3"):
            await (await viewer.play(sid)).wait_frames(3)
        busy = server.services.statistics()
        assert (busy.open_peer_connections, busy.sources_running, busy.viewers) == (3, 3, 3)
    await wait_until(
        server,
        lambda: (
            (s := server.services.statistics()).open_sockets == 0
            and s.open_peer_connections == 0
            and s.sources_running == 0
        ),
    )
    after = server.services.statistics()
    assert (after.open_sessions, after.viewers) == (0, 0)
    assert lasting_tasks() == tasks_before
    for stream in server.services.registry:
        assert stream.fanout.subscriber_count == 0


async def test_legacy_offer_with_stream_id_only_in_the_payload(start_server: StartServer) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1", legacy=True)
        await played.wait_frames(5)
        answer = next(m for m in viewer.messages if m["type"] == "answer")
        assert answer["streamId"] == "demo-1"
        assert answer["payload"].startswith("v=0")


async def test_trickled_browser_candidates_are_applied(start_server: StartServer) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1", trickle=True)
        await played.wait_frames(5)
        assert not [m for m in viewer.messages if m["type"] == "error"]


async def test_a_browser_offering_only_mdns_candidates_still_connects(
    start_server: StartServer,
) -> None:
    # Chrome hides its addresses behind mDNS names, then signals end-of-candidates. The server
    # skips those names and must still connect through the browser's own checks.
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1", trickle=True, mdns_only=True)
        await played.wait_frames(5)
        (connection,) = server.services.hub._connections
        # Connected on the server's side too, not merely sending before ICE gives up.
        await wait_until(server, lambda: connection.sessions["demo-1"].phase.value == "connected")
        assert [m for m in viewer.messages if m["type"] == "error"] == []


async def test_a_new_offer_for_a_playing_stream_replaces_its_session(
    start_server: StartServer,
) -> None:
    server = await start_server()
    async with open_viewer(server.ws_url) as viewer:
        first = await viewer.play("demo-1", session_id="one")
        await first.wait_frames(3)
        second = await viewer.play("demo-1", session_id="two")
        await second.wait_frames(10)
        await wait_until(server, lambda: server.services.statistics().open_peer_connections == 1)
        answers = [m for m in viewer.messages if m["type"] == "answer"]
        assert [m.get("sessionId") for m in answers] == ["one", "two"]


async def test_on_demand_stream_starts_on_first_offer_and_stops_after_the_grace_period(
    start_server: StartServer,
) -> None:
    grace = 1.0
    server = await start_server(make_config(DEMO_STREAMS, media={"on_demand_grace": grace}))
    stream = server.services.registry.get("demo-1")
    assert stream is not None
    assert not stream.source_running and stream.state == "stopped"
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1")
        await played.wait_frames(3)
        assert stream.source_running and stream.state == "live"
        states = [m["payload"]["state"] for m in viewer.messages if m["type"] == "state"]
        assert states[-1] == "live"
        await viewer.stop("demo-1")
        await wait_until(server, lambda: stream.viewers == 0)
        left = trio.current_time()
        assert stream.source_running  # still within the grace period
        await wait_until(server, lambda: not stream.source_running)
        assert trio.current_time() - left >= grace * 0.9
        assert stream.state == "stopped"


async def test_a_viewer_returning_within_the_grace_period_keeps_the_source(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, media={"on_demand_grace": 30}))
    stream = server.services.registry.get("demo-1")
    assert stream is not None
    async with open_viewer(server.ws_url) as viewer:
        await (await viewer.play("demo-1")).wait_frames(3)
        published = stream.fanout.statistics().published_frames
        await viewer.stop("demo-1")
        await wait_until(server, lambda: stream.viewers == 0)
        played = await viewer.play("demo-1")
        await played.wait_frames(3)
    # The same source run went on: its frame count never restarted.
    assert stream.fanout.statistics().published_frames > published


async def test_always_on_stream_runs_from_server_start(start_server: StartServer) -> None:
    streams = [dict(DEMO_STREAMS[0], on_demand=False)]
    server = await start_server(make_config(streams))
    stream = server.services.registry.get("demo-1")
    assert stream is not None
    await wait_until(server, lambda: stream.state == "live")
    assert stream.viewers == 0 and stream.source_running


async def test_a_wall_of_fifty_cameras_all_run_and_the_api_and_shutdown_still_work(
    start_server: StartServer,
) -> None:
    # More cameras than Trio's 40 shared worker threads: each reader must hold a thread of its
    # own, or the 41st camera never starts and every store write behind it waits for ever.
    tiny = "pattern:testsrc?size=64x64&fps=5&kbps=20&gop=5"
    streams = [{"id": f"cam-{n:02d}", "source": tiny, "on_demand": False} for n in range(50)]
    server = await start_server(make_config(streams))
    registry = server.services.registry
    await wait_until(
        server, lambda: all(s.state == "live" for s in registry.statistics()), timeout=60
    )
    stopped = await request(server.url + "/api/streams/cam-49/stop", method="POST")
    assert stopped.status == 200 and stopped.json()["enabled"] is False

    server.request_shutdown()
    with trio.fail_after(20):
        await server.wait_stopped()
    assert server.services.statistics().sources_running == 0


@pytest.mark.parametrize(("mount", "codec"), [("/mjpeg", "mjpeg"), ("/h265", "hevc")])
async def test_a_camera_codec_browsers_cant_take_is_transcoded_once_for_all_its_viewers(
    start_server: StartServer, camera: Camera, mount: str, codec: str
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url(mount)}]))
    async with open_viewer(server.ws_url) as first, open_viewer(server.ws_url) as second:
        streams = [await first.play("cam"), await second.play("cam")]
        for played in streams:
            await played.wait_frames(10)
            assert played.sizes == {(640, 360)}
    stats = server.services.registry.get("cam").statistics()  # type: ignore[union-attr]
    assert stats.encoders_opened == 1
    assert stats.codec == f"h264 (encoded once from {codec})"


async def test_h264_with_b_frames_is_transcoded_once_for_all_its_viewers(
    start_server: StartServer, camera: Camera
) -> None:
    # Browsers show only the keyframes of passed-through H.264 with B-frames.
    server = await start_server(make_config([{"id": "bf", "source": camera.url("/h264-bframes")}]))
    async with open_viewer(server.ws_url) as first, open_viewer(server.ws_url) as second:
        streams = [await first.play("bf"), await second.play("bf")]
        for played in streams:
            await played.wait_frames(25)  # every frame, not one keyframe in 2 s
    stats = server.services.registry.get("bf").statistics()  # type: ignore[union-attr]
    assert stats.encoders_opened == 1
    assert stats.codec == "h264 (encoded once from h264 with B-frames)"


async def test_a_camera_that_never_answers_goes_offline_without_blocking_anything(
    start_server: StartServer,
) -> None:
    # A "camera" that accepts the connection and then says nothing at all.
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, lambda stream: _hold(stream, accepted), listeners)
        config = make_config(
            [{"id": "dead", "source": f"rtsp://127.0.0.1:{port}/x"}, DEMO_STREAMS[0]],
            media={
                "open_timeout": 1,
                "read_timeout": 1,
                "retry_initial_delay": 0.5,
                "retry_max_delay": 1,
            },
        )
        server = await start_server(config)
        async with open_viewer(server.ws_url) as viewer:
            playing = await viewer.play("demo-1")
            await viewer.play("dead")  # answered at once; media follows when the camera does
            offline = await viewer.wait_for(
                lambda m: (
                    m["type"] == "state"
                    and m["streamId"] == "dead"
                    and m["payload"]["state"] == "offline"
                )
            )
            assert "retrying" in offline["payload"]["detail"]
            await playing.wait_frames(25)
        stream = server.services.registry.get("dead")
        assert stream is not None and stream.statistics().last_error
        nursery.cancel_scope.cancel()
    assert accepted  # the server did try the camera


async def _hold(stream: trio.SocketStream, accepted: list[trio.SocketStream]) -> None:
    accepted.append(stream)
    async with stream:
        await trio.sleep_forever()


async def test_camera_audio_g711_and_opus_pass_through_and_aac_becomes_opus_once(
    start_server: StartServer, camera: Camera
) -> None:
    config = make_config(
        [
            {"id": "pcmu", "source": camera.url("/h264-pcmu")},
            {"id": "opus", "source": camera.url("/h264-opus")},
            {"id": "aac", "source": camera.url("/h264-aac")},
        ]
    )
    server = await start_server(config)
    async with open_viewer(server.ws_url) as one, open_viewer(server.ws_url) as two:
        played = {sid: await one.play(sid, audio=True) for sid in ("pcmu", "opus", "aac")}
        again = await two.play("aac", audio=True)
        video_only = await two.play("pcmu")  # a page that asks for video only
        for stream in [*played.values(), again]:
            await stream.wait_frames(10)
            await stream.wait_audio_frames(100)  # two seconds of sound (20 ms frames)
            # Video keeps its own pace beside the sound: 25 pictures for 50 sound frames a second.
            assert stream.frames >= 0.3 * stream.audio_frames
        await video_only.wait_frames(10)
    assert {sid: p.audio_codec for sid, p in played.items()} == {
        "pcmu": "PCMU",
        "opus": "opus",
        "aac": "opus",
    }
    assert video_only.audio_codec is None and video_only.audio_frames == 0
    registry = server.services.registry
    stats = {sid: registry.get(sid).statistics() for sid in ("pcmu", "opus", "aac")}  # type: ignore[union-attr]
    assert stats["pcmu"].codec == "h264, PCMU"
    assert stats["opus"].codec == "h264, opus"
    assert stats["aac"].codec == "h264, opus (encoded once from aac)"
    assert (stats["pcmu"].encoders_opened, stats["aac"].encoders_opened) == (0, 1)


async def test_a_video_only_camera_answers_a_page_asking_for_audio_with_video(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url("/h264")}]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam", audio=True)
        await played.wait_frames(10)
    assert played.audio_codec is None
