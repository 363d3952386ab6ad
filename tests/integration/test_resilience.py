"""Cameras that drop, restart, stall or are down at start; late joiners; slow viewers."""

from __future__ import annotations

import os
import signal

import trio
from aiortc.codecs.h264 import H264PayloadDescriptor

from mediastream.server import RunningServer

from support.http import get
from support.servers import (
    DEMO_STREAMS,
    Camera,
    StartServer,
    free_port,
    lasting_tasks,
    make_config,
    start_camera,
    stop_camera,
    wait_published,
)
from support.viewer import open_viewer

FAST_RETRY = {
    "open_timeout": 2,
    "read_timeout": 1,
    "retry_initial_delay": 0.2,
    "retry_max_delay": 1,
}


async def wait_until(server: RunningServer, condition, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        await server.services.changes.wait_until(condition)


async def test_a_camera_that_restarts_resumes_for_its_viewer_without_renegotiation(
    start_server: StartServer,
) -> None:
    port = free_port()
    camera = await trio.to_thread.run_sync(start_camera, port)
    try:
        config = make_config(
            [{"id": "cam", "source": camera.url("/h264")}, DEMO_STREAMS[0]], media=FAST_RETRY
        )
        server = await start_server(config)
        stream = server.services.registry.get("cam")
        assert stream is not None
        async with open_viewer(server.ws_url) as viewer:
            cam = await viewer.play("cam")
            demo = await viewer.play("demo-1")
            await cam.wait_frames(10)
            await demo.wait_frames(10)

            await trio.to_thread.run_sync(stop_camera, camera)
            await wait_until(server, lambda: stream.state in ("reconnecting", "offline"))
            # The other stream on the same socket plays on throughout the outage.
            await demo.wait_frames(25)
            states = [
                m["payload"]["state"]
                for m in viewer.messages
                if m["type"] == "state" and m["streamId"] == "cam"
            ]
            assert states[-1] in ("reconnecting", "offline")

            camera = await trio.to_thread.run_sync(start_camera, port)
            await wait_until(server, lambda: stream.state == "live")
            await cam.wait_frames(25)
            assert not cam.ended
        offers = sum(1 for m in viewer.messages if m["type"] == "answer" and m["streamId"] == "cam")
        assert offers == 1  # the same session and peer connection all along
        assert stream.statistics().last_error
    finally:
        await trio.to_thread.run_sync(stop_camera, camera)


async def test_a_stream_whose_camera_is_down_at_start_goes_live_when_it_appears(
    start_server: StartServer,
) -> None:
    port = free_port()
    config = make_config(
        [{"id": "cam", "source": f"rtsp://127.0.0.1:{port}/h264", "on_demand": False}],
        media=FAST_RETRY,
    )
    server = await start_server(config)
    stream = server.services.registry.get("cam")
    assert stream is not None
    await wait_until(server, lambda: stream.state == "offline")
    assert "retrying" in (stream.detail or "")
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam")  # answered even though the camera is down
        camera = await trio.to_thread.run_sync(start_camera, port)
        try:
            await wait_until(server, lambda: stream.state == "live")
            await played.wait_frames(10)
        finally:
            await trio.to_thread.run_sync(stop_camera, camera)


async def test_a_late_joiner_starts_from_the_cached_keyframe(
    start_server: StartServer, camera: Camera
) -> None:
    # A 4 s GOP: without the cache a late joiner would wait up to 4 s for a keyframe.
    config = make_config([{"id": "cam", "source": camera.url("/h264-gop4"), "on_demand": False}])
    server = await start_server(config)
    stream = server.services.registry.get("cam")
    assert stream is not None
    # Join well into a GOP: at least a second of frames after the cached keyframe.
    await wait_published(stream, lambda: stream.fanout.statistics().gop_frames >= 25)
    cached_keyframe = stream.fanout._gop[0]
    assert cached_keyframe.keyframe
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam", capture=True)
        await played.wait_frames(5)
    expected = b"".join(H264PayloadDescriptor.parse(p)[1] for p in cached_keyframe.payloads)
    # The very first picture the viewer decoded is the keyframe that was cached before it
    # joined: byte for byte, as aiortc's depacketizer rebuilt it.
    assert played.access_units[0] == expected


async def test_frames_a_joiner_never_got_are_skips_in_the_api_not_drops(
    start_server: StartServer,
) -> None:
    # One demo stream: a 50-frame GOP, so a keyframe is published within any 50 frames.
    server = await start_server(make_config(DEMO_STREAMS[:1], media={"viewer_queue_frames": 20}))
    async with open_viewer(server.ws_url) as steady, open_viewer(server.ws_url) as joiner:
        watched = await steady.play("demo-1")
        await watched.wait_frames(10)
        # A joiner that never connects: it subscribed with the offer, and gets no frame.
        await joiner.play("demo-1", connect=False)
        # 60 frames published after it joined, a keyframe among them: the frames queued for
        # it (the cached GOP, then live ones) are passed over for that keyframe.
        await watched.wait_frames(60)
        sessions = [s for c in server.services.hub._connections for s in c.sessions.values()]
        queues = [session.subscriber_statistics() for session in sessions]
        assert all(queue is not None for queue in queues)
        late = [q for q in queues if q is not None and q.delivered_frames == 0]
        playing = [q for q in queues if q is not None and q.delivered_frames > 0]
        assert len(late) == 1 and len(playing) == 1
        assert late[0].skipped_frames > 0 and late[0].dropped_frames == 0
        listed = (await get(server.url + "/api/streams/demo-1")).json()
    assert listed["framesSkipped"] >= late[0].skipped_frames
    assert listed["framesDropped"] == 0 == playing[0].dropped_frames
    assert listed["rtspTransportInUse"] is None  # a test pattern, not an RTSP camera


async def test_a_viewer_that_stops_reading_drops_alone(start_server: StartServer) -> None:
    config = make_config(DEMO_STREAMS, media={"viewer_queue_frames": 20})
    server = await start_server(config)
    stream = server.services.registry.get("demo-1")
    assert stream is not None
    async with open_viewer(server.ws_url) as viewer:
        steady = await viewer.play("demo-1")
        await steady.wait_frames(5)
        # A second viewer of the same stream that takes one frame, then never reads again.
        with stream.open_viewer() as stalled:
            assert stalled.get_nowait() is not None  # from the cached GOP: it has started
            await steady.wait_frames(75)  # three seconds at 25 fps
            assert stalled.dropped_frames >= 50
        (session,) = [s for c in server.services.hub._connections for s in c.sessions.values()]
        steady_queue = session.subscriber_statistics()
        assert steady_queue is not None and steady_queue.dropped_frames == 0
    assert stream.fanout.statistics().dropped_frames >= 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_500_viewer_cycles_leave_nothing_behind(start_server: StartServer) -> None:
    config = make_config(
        [dict(DEMO_STREAMS[0], on_demand=False), DEMO_STREAMS[1]],
        media={"on_demand_grace": 0},
        # Far more offers a second than a page sends: this test churns on purpose.
        limits={"max_offers_per_second": 1000, "max_messages_per_second": 10000},
    )
    server = await start_server(config)
    services = server.services

    def quiet() -> bool:
        s = services.statistics()
        return s.open_sockets == 0 and s.open_peer_connections == 0 and s.sources_running == 1

    async def cycles(count: int) -> None:
        async with open_viewer(server.ws_url) as viewer:
            for index in range(count):
                # Mostly the always-on stream; every 25th cycle starts and stops a source too.
                stream_id = "demo-2" if index % 25 == 0 else "demo-1"
                played = await viewer.play(stream_id)
                if index % 50 == 0:
                    await played.wait_frames(2)
                await viewer.stop(stream_id)
        await wait_until(server, quiet)

    await cycles(5)  # warm up the lazily grown pools (trio's thread cache, aiortc's executor)
    baseline = (services.statistics(), open_fds())
    tasks_before = lasting_tasks()
    await cycles(500)
    after = (services.statistics(), open_fds())
    assert after[0].peer_connections_opened - baseline[0].peer_connections_opened == 500
    assert after[0].open_peer_connections == 0 and after[0].open_sessions == 0
    leaked = lasting_tasks() - tasks_before
    assert not leaked, leaked
    assert after[0].threads <= baseline[0].threads + 2  # idle pool threads retire on a timer
    assert after[1] <= baseline[1] + 2


async def test_a_camera_that_stalls_is_reopened_and_resumes(start_server: StartServer) -> None:
    # A stalled camera keeps its TCP connection open and sends nothing: SIGSTOP does exactly that.
    port = free_port()
    camera = await trio.to_thread.run_sync(start_camera, port)
    try:
        config = make_config([{"id": "cam", "source": camera.url("/h264")}], media=FAST_RETRY)
        server = await start_server(config)
        stream = server.services.registry.get("cam")
        assert stream is not None
        async with open_viewer(server.ws_url) as viewer:
            played = await viewer.play("cam")
            await played.wait_frames(10)
            camera.process.send_signal(signal.SIGSTOP)
            try:
                await wait_until(server, lambda: stream.state in ("reconnecting", "offline"))
            finally:
                camera.process.send_signal(signal.SIGCONT)
            await wait_until(server, lambda: stream.state == "live")
            await played.wait_frames(25)
        assert "no data for 1 s (stalled)" in (stream.statistics().last_error or "")
    finally:
        await trio.to_thread.run_sync(stop_camera, camera)
