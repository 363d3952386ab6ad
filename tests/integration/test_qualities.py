"""Per-tile quality, end to end: one stream of two qualities from a real GStreamer RTSP camera
(main 1280x720, sub 320x180), real aiortc viewers that decode, a real server.

A quality is read only while some viewer watches it; a viewer moves between qualities on
the same track, with no new offer, and its decoder takes the new resolution from the new SPS.
"""

from __future__ import annotations

import itertools
import json
import logging
from typing import Any

import pytest
import trio

from mediastream.registry import Stream
from mediastream.server import RunningServer

from support.http import HttpResponse, get, request, scrape
from support.redis import RedisServer
from support.servers import Camera, StartServer, make_config
from support.viewer import PlayedStream, Viewer, open_viewer

MAIN = (1280, 720)
SUB = (320, 180)


def two_qualities(camera: Camera, **extra: object) -> list[dict[str, object]]:
    return [
        {
            "id": "gate",
            "qualities": [
                {"name": "main", "source": camera.url("/h264-720")},
                {"name": "sub", "source": camera.url("/h264-180")},
            ],
            **extra,
        }
    ]


def gate(server: RunningServer) -> Stream:
    stream = server.services.registry.get("gate")
    assert stream is not None
    return stream


async def start_gate(
    start_server: StartServer, camera: Camera, **extra: object
) -> tuple[RunningServer, Stream]:
    """A server whose one stream, "gate", has the camera's two qualities; ``extra`` goes to
    the stream's configuration (``default_quality="sub"``)."""
    server = await start_server(make_config(two_qualities(camera, **extra)))
    return server, gate(server)


async def play_tile(viewer: Viewer, width: int, height: int) -> PlayedStream:
    """Play "gate" in ``auto`` quality for a visible tile of ``width`` x ``height``."""
    tile = {"width": width, "height": height, "visible": True}
    return await viewer.play("gate", quality="auto", tile=tile)


async def send_json(server: RunningServer, method: str, path: str, body: object) -> HttpResponse:
    return await request(
        server.url + path,
        method=method,
        headers={"Content-Type": "application/json"},
        body=json.dumps(body).encode(),
    )


async def camera_sessions_drop_to_zero(camera: Camera, mount: str, timeout: float = 10) -> None:
    """Wait until the camera serves ``mount`` to nobody. The camera is another process with no
    event to wait on: it is asked again every 100 ms, within ``timeout``."""
    with trio.fail_after(timeout):
        while True:
            if await trio.to_thread.run_sync(camera.sessions, mount) == 0:
                return
            await trio.sleep(0.1)


async def test_only_the_quality_watched_is_read_and_the_api_shows_each(
    start_server: StartServer, camera: Camera
) -> None:
    server, stream = await start_gate(start_server, camera, default_quality="sub")
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("gate")
        await played.wait_frames(10)
        assert played.sizes == {SUB}
        assert await trio.to_thread.run_sync(camera.sessions, "/h264-720") == 0
        assert await trio.to_thread.run_sync(camera.sessions, "/h264-180") == 1
        with trio.fail_after(10):  # the bitrate is measured over whole GOPs (2 s here)
            await stream.changes.wait_until(lambda: stream.quality("sub").bitrate > 0)
        listed = (await get(server.url + "/api/streams/gate")).json()
        metrics = await scrape(server.url)
    assert listed["defaultQuality"] == "sub"
    assert listed["viewers"] == 1 and listed["running"] is True
    main, sub = listed["qualities"]
    assert (main["name"], main["running"], main["viewers"], main["width"]) == ("main", False, 0, 0)
    assert (sub["name"], sub["running"], sub["viewers"]) == ("sub", True, 1)
    assert (sub["width"], sub["height"]) == SUB
    assert 50_000 < sub["bitrate"] < 2_000_000
    assert "***" in main["source"] or "h264-720" in main["source"]
    assert metrics[("mediastream_quality_viewers", (("quality", "sub"), ("stream", "gate")))] == 1
    assert metrics[("mediastream_quality_viewers", (("quality", "main"), ("stream", "gate")))] == 0
    assert (
        metrics[("mediastream_quality_source_running", (("quality", "main"), ("stream", "gate")))]
        == 0
    )
    # The last viewer gone, the quality's source stops after the grace period (1 s here).
    with trio.fail_after(10):
        await stream.changes.wait_until(lambda: not stream.source_running)
    await camera_sessions_drop_to_zero(camera, "/h264-180")


async def test_a_single_source_stream_has_one_quality_named_main(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url("/h264-180")}]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("cam")
        await played.wait_frames(5)
        listed = (await get(server.url + "/api/streams/cam")).json()
    assert listed["defaultQuality"] == "main"
    assert [(q["name"], q["viewers"], q["width"]) for q in listed["qualities"]] == [
        ("main", 1, 320)
    ]


async def test_qualities_are_added_and_validated_through_the_api(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([]))
    body = {"id": "gate", "qualities": [{"name": "main", "source": camera.url("/h264-720")}]}
    bad = await send_json(server, "POST", "/api/streams", {**body, "defaultQuality": "sub"})
    assert bad.status == 400
    assert bad.json()["field"] == "default_quality"
    created = await send_json(server, "POST", "/api/streams", body)
    assert created.status == 201
    assert [q["name"] for q in created.json()["qualities"]] == ["main"]
    patched = await send_json(
        server,
        "PATCH",
        "/api/streams/gate",
        {"qualities": two_qualities(camera)[0]["qualities"], "defaultQuality": "sub"},
    )
    assert patched.status == 200
    assert patched.json()["defaultQuality"] == "sub"
    assert [q["name"] for q in patched.json()["qualities"]] == ["main", "sub"]


def quality_messages(viewer: Viewer) -> list[dict[str, Any]]:
    return [m for m in viewer.messages if m.get("type") == "quality"]


async def wait_playing(viewer: Viewer, quality: str, after: int) -> dict[str, Any]:
    """The first ``quality`` message from index ``after`` on that says ``quality`` plays."""
    return await viewer.wait_for(
        lambda m: m.get("type") == "quality" and m["payload"]["quality"] == quality,
        after=after,
        timeout=20,
    )


async def ask_quality(viewer: Viewer, payload: dict[str, Any], playing: str) -> dict[str, Any]:
    """Send a ``quality`` message; wait for the server to say ``playing`` plays."""
    start = len(viewer.messages)
    await viewer.send({"type": "quality", "streamId": "gate", "payload": payload})
    return await wait_playing(viewer, playing, start)


def decode_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("aiortc.codecs")]


async def test_a_pinned_quality_plays_on_the_same_track_with_no_new_offer(
    start_server: StartServer, camera: Camera, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiortc")
    server, stream = await start_gate(start_server, camera, default_quality="sub")
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("gate")
        await played.wait_size(SUB)
        first = await viewer.wait_for(lambda m: m.get("type") == "quality")
        assert first["payload"]["quality"] == "sub" and first["payload"]["requested"] == "auto"

        told = await ask_quality(viewer, {"quality": "main"}, "main")
        assert told["payload"]["reason"] == "pinned"
        switched_at = await played.wait_size(MAIN)
        # The new quality starts with a keyframe: every frame after the switch is main's.
        assert set(played.frame_sizes[switched_at:]) == {MAIN}
        assert stream.quality("main").viewers == 1 and stream.quality("sub").viewers == 0

        await ask_quality(viewer, {"quality": "sub"}, "sub")
        back_at = await played.wait_size(SUB)
        await played.wait_frames(10)
        assert set(played.frame_sizes[back_at:]) == {SUB}

        # One offer, one answer: the switches happened on the same RTP stream.
        assert [m["type"] for m in viewer.sent].count("offer") == 1
        assert [m["type"] for m in viewer.messages].count("answer") == 1
        timestamps = played.frame_timestamps
        assert all(b > a for a, b in itertools.pairwise(timestamps)), "timestamps went back"
        # Smooth: no jump of more than a second at either switch.
        assert max(b - a for a, b in itertools.pairwise(timestamps)) < 90_000
        assert decode_errors(caplog) == []

        # main has no viewer: its source stops after the grace period, the camera sees it go.
        with trio.fail_after(10):
            await stream.changes.wait_until(lambda: not stream.quality("main").running)
        await camera_sessions_drop_to_zero(camera, "/h264-720")
        assert stream.quality("sub").running


async def test_auto_gives_the_smallest_quality_covering_the_tile(
    start_server: StartServer, camera: Camera
) -> None:
    server, stream = await start_gate(start_server, camera)  # default: main
    async with open_viewer(server.ws_url) as viewer:
        # A grid tile: the offer says so, and the viewer starts on sub (main is never read).
        played = await play_tile(viewer, 300, 170)
        await played.wait_size(SUB)
        assert not stream.quality("main").running

        told = await ask_quality(viewer, {"tile": {"width": 1280, "height": 720}}, "main")
        assert told["payload"]["reason"] == "tile"
        await played.wait_size(MAIN)
        sizes = {q["name"]: (q["width"], q["height"]) for q in told["payload"]["qualities"]}
        assert sizes["sub"] == SUB

        # Still bigger than sub, smaller than main: main covers it.
        await ask_quality(viewer, {"tile": {"width": 640, "height": 360}}, "main")
        # Off screen: the smallest.
        told = await ask_quality(
            viewer, {"tile": {"width": 1280, "height": 720, "visible": False}}, "sub"
        )
        assert told["payload"]["reason"] == "hidden"
        await played.wait_size(SUB)
        assert [m["type"] for m in viewer.sent].count("offer") == 1


async def test_a_tile_put_back_before_main_could_play_stays_on_sub(
    start_server: StartServer, camera: Camera
) -> None:
    server, stream = await start_gate(start_server, camera)
    async with open_viewer(server.ws_url) as viewer:
        played = await play_tile(viewer, 300, 170)
        await played.wait_size(SUB)
        start = len(viewer.messages)
        big = {"tile": {"width": 1280, "height": 720}}
        small = {"tile": {"width": 300, "height": 170}}
        # Enlarged, then put back while main's source is still opening (it takes ~1 s).
        await viewer.send({"type": "quality", "streamId": "gate", "payload": big})
        with trio.fail_after(10):
            await stream.changes.wait_until(lambda: stream.quality("main").running)
        await viewer.send({"type": "quality", "streamId": "gate", "payload": small})
        told = await viewer.wait_for(
            lambda m: m.get("type") == "quality" and m["payload"]["reason"] == "tile",
            after=start,
        )
        assert told["payload"]["quality"] == "sub"
        await played.wait_frames(25)
        assert set(played.frame_sizes[-25:]) == {SUB}
        assert all(m["payload"]["quality"] == "sub" for m in quality_messages(viewer)[1:])


async def test_a_bad_quality_request_gets_an_error_and_changes_nothing(
    start_server: StartServer, camera: Camera
) -> None:
    server, _ = await start_gate(start_server, camera, default_quality="sub")
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("gate")
        await played.wait_size(SUB)
        for payload, code in (
            ({"quality": "hd"}, "unknown_quality"),
            ({"tile": {"width": -1, "height": 10}}, "invalid_message"),
            ({}, "invalid_message"),
        ):
            reply = await viewer.request(
                {"type": "quality", "streamId": "gate", "payload": payload}, "gate", ("error",)
            )
            assert reply["code"] == code
        unknown = await viewer.request(
            {"type": "quality", "streamId": "gate", "payload": {"quality": "hd"}},
            "gate",
            ("error",),
        )
        assert "main, sub" in unknown["payload"]
        await played.wait_frames(10)
        assert played.sizes == {SUB}


async def test_a_fallback_and_the_webrtc_session_beside_it_both_follow_quality_messages(
    start_server: StartServer, camera: Camera
) -> None:
    server, stream = await start_gate(start_server, camera, default_quality="sub")
    async with open_viewer(server.ws_url) as viewer:
        await viewer.send({"type": "fallback", "streamId": "gate"})
        with trio.fail_after(15):
            await stream.changes.wait_until(lambda: stream.quality("sub").viewers == 1)
        # The page tries WebRTC again beside its fallback (still on sub, the default).
        played = await viewer.play("gate", session_id="p-1")
        await played.wait_size(SUB)
        start = len(viewer.messages)
        await viewer.send({"type": "quality", "streamId": "gate", "payload": {"quality": "main"}})

        def answers() -> list[str | None]:
            return [
                m.get("sessionId")
                for m in viewer.messages[start:]
                if m.get("type") == "quality" and m["payload"]["quality"] == "main"
            ]

        await viewer.wait_for(lambda _: None in answers() and "p-1" in answers(), after=start)
        await played.wait_size(MAIN)
        with trio.fail_after(15):
            await stream.changes.wait_until(lambda: stream.quality("main").viewers == 2)
        [connection] = server.services.hub._connections
        assert list(connection.fallbacks) == ["gate"]  # the fallback plays on meanwhile
        assert stream.quality("sub").viewers == 0


async def test_a_short_link_falls_to_sub_and_climbs_back(
    start_server: StartServer, camera: Camera
) -> None:
    server, stream = await start_gate(start_server, camera)
    async with open_viewer(server.ws_url) as viewer:
        played = await play_tile(viewer, 1280, 720)
        await played.wait_size(MAIN)
        with trio.fail_after(10):  # the veto needs main's bitrate, measured over whole GOPs
            await stream.changes.wait_until(lambda: stream.quality("main").bitrate > 0)
        main_bitrate = stream.quality("main").bitrate

        start = len(viewer.messages)
        played.forced_estimate = main_bitrate // 2  # enough for sub, not for main
        fell = await wait_playing(viewer, "sub", start)
        assert fell["payload"]["reason"] == "network"
        await played.wait_size(SUB)
        with trio.fail_after(10):
            await stream.changes.wait_until(lambda: stream.quality("sub").bitrate > 0)
        assert stream.quality("sub").bitrate < main_bitrate // 2

        start = len(viewer.messages)
        played.forced_estimate = 20_000_000
        climbed = await wait_playing(viewer, "main", start)
        assert climbed["payload"]["reason"] == "tile"
        await played.wait_size(MAIN)
        assert [m["type"] for m in viewer.sent].count("offer") == 1


async def test_a_stream_relayed_to_its_owner_node_starts_at_the_offers_quality_and_switches(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    from mediastream.cluster.leases import NodeRecord
    from mediastream.cluster.placement import choose_owner

    records = [NodeRecord(n, f"http://{n}") for n in ("node-a", "node-b")]
    stream_id = next(
        s
        for s in (f"gate-{n}" for n in range(100))
        if (owner := choose_owner(s, records)) is not None and owner.node_id == "node-b"
    )
    pattern = "pattern:testsrc?fps=10&kbps=100&gop=10&size="
    streams = [
        {
            "id": stream_id,
            "qualities": [
                {"name": "main", "source": pattern + "640x360"},
                {"name": "sub", "source": pattern + "160x90"},
            ],
        }
    ]
    nodes = []
    for node_id in ("node-a", "node-b"):
        config = make_config(streams, cluster={"redis_url": redis_server.url, "node_id": node_id})
        nodes.append(await start_server(config))
    a, b = nodes
    async with open_viewer(a.ws_url) as viewer:
        played = await viewer.play(
            stream_id, trickle=True, quality="auto", tile={"width": 150, "height": 80}
        )
        await played.wait_size((160, 90))
        told = await viewer.wait_for(lambda m: m.get("type") == "quality")  # from node B
        assert told["payload"]["quality"] == "sub"
        owner = b.services.registry.get(stream_id)
        assert owner is not None and owner.quality("sub").viewers == 1
        assert not owner.quality("main").running
        # Pinned through node A: node B's session switches, on the same track.
        start = len(viewer.messages)
        await viewer.send(
            {"type": "quality", "streamId": stream_id, "payload": {"quality": "main"}}
        )
        await viewer.wait_for(
            lambda m: m.get("type") == "quality" and m["payload"]["quality"] == "main",
            after=start,
        )
        await played.wait_size((640, 360))
        refused = await viewer.request(
            {"type": "quality", "streamId": stream_id, "payload": {"quality": "hd"}},
            stream_id,
            ("error",),
        )
        assert refused["code"] == "unknown_quality"  # the owner's answer, relayed
        assert [m["type"] for m in viewer.sent].count("offer") == 1
