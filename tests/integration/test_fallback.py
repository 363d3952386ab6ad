"""Video over the signaling socket (``fallback``): fMP4 in binary messages, several streams on
one socket, decoded here by FFmpeg from what arrived. Real server, real socket, real sources."""

from __future__ import annotations

import collections
import itertools
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import av
import trio
from trio_websocket import open_websocket_url

from mediastream.fallback import BinaryKind, FallbackSession, parse_binary
from mediastream.media.fmp4 import end_time
from mediastream.server import RunningServer

from support.fallback import FallbackClient, split_fragments
from support.servers import DEMO_STREAMS, Camera, StartServer, make_config, wait_published
from support.viewer import open_viewer

MAIN = (1280, 720)
SUB = (320, 180)


def two_qualities(camera: Camera) -> list[dict[str, object]]:
    """One stream, main 1280x720 and sub 320x180 from the camera (main the default)."""
    return [
        {
            "id": "gate",
            "qualities": [
                {"name": "main", "source": camera.url("/h264-720")},
                {"name": "sub", "source": camera.url("/h264-180")},
            ],
        }
    ]


def decode(path: Path) -> list[Any]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return list(container.decode(stream))


def fallback_sessions(server: RunningServer) -> list[FallbackSession]:
    return [
        session
        for connection in server.services.hub._connections
        for session in connection.fallbacks.values()
    ]


async def test_two_streams_play_over_one_socket_and_decode(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(make_config(DEMO_STREAMS[:2]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "demo-1"})
        await client.send({"type": "fallback", "streamId": "demo-2"})
        await client.wait_until(
            lambda: min(client.fragments("demo-1"), client.fragments("demo-2")) >= 40
        )

        for stream_id in ("demo-1", "demo-2"):
            first_kind, _, _ = next(m for m in client.binary if m[1] == stream_id)
            assert first_kind is BinaryKind.INIT
            path = tmp_path / f"{stream_id}.mp4"
            path.write_bytes(client.media(stream_id))
            pictures = decode(path)
            assert len(pictures) >= 40
            assert {(p.width, p.height) for p in pictures} == {(320, 180)}
        # Interleaved on the one socket: neither stream waited for the other to finish.
        order = [s for k, s, _ in client.binary if k is BinaryKind.FRAGMENT]
        assert order.index("demo-2") < len(order) - 1 - order[::-1].index("demo-1")
        # The stream's state reached the client as for a WebRTC session.
        assert any(m["type"] == "state" and m["streamId"] == "demo-1" for m in client.messages)
        stats = server.services.statistics()
        assert stats.sessions_per_socket == (2,)
        assert stats.open_peer_connections == 0
        nursery.cancel_scope.cancel()


async def test_each_frame_is_remuxed_once_for_every_fallback_viewer(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS[:1]))
    async with (
        open_websocket_url(server.ws_url) as ws_a,
        open_websocket_url(server.ws_url) as ws_b,
        trio.open_nursery() as nursery,
    ):
        clients = [FallbackClient(ws_a), FallbackClient(ws_b)]
        for client in clients:
            nursery.start_soon(client.read)
            await client.send({"type": "fallback", "streamId": "demo-1"})
        for client in clients:
            await client.wait_until(lambda c=client: c.fragments("demo-1") >= 30)
        sent = [session.fragments_sent for session in fallback_sessions(server)]
        [stream] = [s for s in server.services.registry if s.id == "demo-1"]
        # Both viewers were sent the same frames from the same keyframe on: the remuxer built
        # each fragment once, so no more than the busier viewer was sent (plus one fragment in
        # flight per viewer, built but not yet counted as sent).
        assert len(sent) == 2 and min(sent) >= 30
        remuxer = server.services.hub.remuxers.get(stream)
        assert remuxer is not None
        assert remuxer.fragments_built <= max(sent) + len(sent)
        nursery.cancel_scope.cancel()


async def test_a_bad_fallback_request_is_answered_and_nothing_else_is_lost(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS[:1]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "demo-1"})
        await client.wait_until(lambda: client.fragments("demo-1") >= 5)
        await client.send({"type": "fallback"})
        await client.send({"type": "fallback", "streamId": "nope"})
        await client.send({"type": "fallback", "streamId": "bad id!"})
        await client.wait_until(
            lambda: sum(1 for m in client.messages if m["type"] == "error") >= 3
        )
        errors = [m for m in client.messages if m["type"] == "error"]
        assert '"fallback" needs a "streamId"' in errors[0]["payload"]
        assert errors[1]["streamId"] == "nope" and errors[1]["code"] == "stream_not_found"
        assert '"streamId" must be' in errors[2]["payload"]
        before = client.fragments("demo-1")
        await client.wait_until(lambda: client.fragments("demo-1") >= before + 25)
        # close ends it like a WebRTC session; the socket stays open and can ask again.
        await client.send({"type": "close", "streamId": "demo-1"})
        with trio.fail_after(10):
            await server.services.changes.wait_until(
                lambda: server.services.statistics().sessions_per_socket == (0,)
            )
        stopped_at = client.fragments("demo-1")
        await client.send({"type": "fallback", "streamId": "demo-1"})
        await client.wait_until(lambda: client.fragments("demo-1") >= stopped_at + 5)
        inits = [k for k, s, _ in client.binary if s == "demo-1" and k is BinaryKind.INIT]
        assert len(inits) == 2  # a new session starts with its init segment
        nursery.cancel_scope.cancel()


async def test_a_fallback_replaces_an_offer_and_an_offer_runs_beside_the_fallback(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS[:1]))
    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1")
        await played.wait_frames(5)
        await viewer.send(json.dumps({"type": "fallback", "streamId": "demo-1"}))
        with trio.fail_after(15):
            await server.services.changes.wait_until(
                lambda: (
                    len(fallback_sessions(server)) == 1
                    and server.services.statistics().open_peer_connections == 0
                )
            )
        [fallback] = fallback_sessions(server)
        # Retrying WebRTC in the background: the new peer connection plays while the
        # fallback goes on sending.
        played = await viewer.play("demo-1")
        await played.wait_frames(5)
        assert fallback_sessions(server) == [fallback]
        sent = fallback.fragments_sent
        await wait_published(
            next(s for s in server.services.registry if s.id == "demo-1"),
            lambda: fallback.fragments_sent >= sent + 5,
        )
        assert server.services.statistics().sessions_per_socket == (2,)
        # The page ends the fallback once WebRTC shows a picture: only the fallback ends
        # (said twice, counted once).
        for _ in range(2):
            await viewer.send(
                json.dumps({"type": "close", "streamId": "demo-1", "payload": {"fallback": True}})
            )
        with trio.fail_after(10):
            await server.services.changes.wait_until(lambda: fallback_sessions(server) == [])
        assert server.services.hub.statistics().fallback_returns == 1
        assert b"mediastream_fallback_returns_total 1.0" in server.services.metrics.exposition()
        await played.wait_frames(5)
        assert server.services.statistics().sessions_per_socket == (1,)


async def test_the_cameras_opus_or_aac_audio_goes_into_the_fmp4_beside_the_video(
    start_server: StartServer, camera: Camera, tmp_path: Path
) -> None:
    server = await start_server(
        make_config(
            [
                {"id": "opus-cam", "source": camera.url("/h264-opus")},
                {"id": "aac-cam", "source": camera.url("/h264-aac")},
            ]
        )
    )
    async with (
        open_websocket_url(server.ws_url) as ws,
        open_websocket_url(server.ws_url) as ws_opus_only,
        trio.open_nursery() as nursery,
    ):
        client, opus_only = FallbackClient(ws), FallbackClient(ws_opus_only)
        nursery.start_soon(client.read)
        nursery.start_soon(opus_only.read)
        # A browser that takes both: the camera's own codec goes through, never transcoded.
        # One that takes only Opus: an AAC camera's sound as the Opus made once for WebRTC.
        for stream_id in ("opus-cam", "aac-cam"):
            await client.send(
                {
                    "type": "fallback",
                    "streamId": stream_id,
                    "payload": {"audio": ["opus", "mp4a.40.2"]},
                }
            )
        await opus_only.send(
            {"type": "fallback", "streamId": "aac-cam", "payload": {"audio": ["opus"]}}
        )
        await client.wait_until(
            lambda: min(client.fragments("opus-cam"), client.fragments("aac-cam")) >= 150
        )
        await opus_only.wait_until(lambda: opus_only.fragments("aac-cam") >= 150)
        sessions = {
            (s.stream.id, s.audio.codec if s.audio else None) for s in fallback_sessions(server)
        }
        assert sessions == {("opus-cam", "opus"), ("aac-cam", "aac"), ("aac-cam", "opus")}
        received = [
            (client, "opus-cam", "opus"),
            (client, "aac-cam", "aac"),
            (opus_only, "aac-cam", "opus"),
        ]
        for receiver, stream_id, codec in received:
            path = tmp_path / f"{stream_id}-{codec}.mp4"
            path.write_bytes(receiver.media(stream_id))
            with av.open(str(path)) as container:
                assert [s.codec_context.name for s in container.streams] == ["h264", codec]
                sound = list(container.decode(container.streams.audio[0]))
                container.seek(0)
                pictures = list(container.decode(container.streams.video[0]))
            assert len(sound) >= 40 and len(pictures) >= 30
            # One timeline: the sound covers the time the pictures cover, give or take the
            # GOP the pictures started with (audio is not replayed from the cache).
            picture_end = float(pictures[-1].time)
            sound_end = float(sound[-1].time)
            assert abs(picture_end - sound_end) < 0.5, (picture_end, sound_end)
        nursery.cancel_scope.cancel()


async def test_g711_audio_is_left_out_of_the_fallback_and_says_why(
    start_server: StartServer, camera: Camera, tmp_path: Path
) -> None:
    server = await start_server(make_config([{"id": "door", "source": camera.url("/h264-pcmu")}]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send(
            {"type": "fallback", "streamId": "door", "payload": {"audio": ["opus", "mp4a.40.2"]}}
        )
        await client.wait_until(lambda: client.fragments("door") >= 30)
        [session] = fallback_sessions(server)
        assert session.audio is None and session.audio_fragments_sent == 0
        assert session.audio_omitted is not None and "PCMU audio has no" in session.audio_omitted
        path = tmp_path / "door.mp4"
        path.write_bytes(client.media("door"))
        with av.open(str(path)) as container:
            assert [s.codec_context.name for s in container.streams] == ["h264"]
        nursery.cancel_scope.cancel()


async def test_an_rtsp_camera_plays_through_the_fallback(
    start_server: StartServer, camera: Camera, tmp_path: Path
) -> None:
    server = await start_server(make_config([{"id": "cam", "source": camera.url("/h264")}]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "cam"})
        await client.wait_until(lambda: client.fragments("cam") >= 30)
        path = tmp_path / "cam.mp4"
        path.write_bytes(client.media("cam"))
        pictures = decode(path)
        assert len(pictures) >= 30
        assert {(p.width, p.height) for p in pictures} == {(640, 360)}
        assert collections.Counter(k for k, _, _ in client.binary)[BinaryKind.INIT] == 1
        nursery.cancel_scope.cancel()


class StallableSocket:
    """The hub's side of a socket whose client can stop reading: while ``stalled``, every send
    waits, as a send into a full TCP window does. (A real TCP socket takes megabytes of loopback
    buffers to fill; this stalls at once, so the test sees the policy, not the buffers.)"""

    def __init__(self) -> None:
        self._to_server, self._from_client = trio.open_memory_channel[str](16)
        self._flowing = trio.Event()
        self._flowing.set()
        self.binary: list[tuple[BinaryKind, str, bytes]] = []
        self.closed: tuple[int, str] | None = None
        self._arrived = trio.Condition()

    def stall(self) -> None:
        self._flowing = trio.Event()

    def resume(self) -> None:
        self._flowing.set()

    async def client_sends(self, message: dict[str, Any]) -> None:
        await self._to_server.send(json.dumps(message))

    async def receive(self) -> str:
        return await self._from_client.receive()

    async def send(self, data: str | bytes) -> None:
        await self._flowing.wait()
        if isinstance(data, bytes):
            self.binary.append(parse_binary(data))
        async with self._arrived:
            self._arrived.notify_all()

    async def close(self, code: int, reason: str = "") -> None:
        self.closed = (code, reason)

    async def wait_until(self, condition: Any, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            async with self._arrived:
                while not condition():
                    await self._arrived.wait()

    def fragments(self, stream_id: str) -> list[bytes]:
        return [
            fragment
            for k, s, p in self.binary
            if s == stream_id and k is BinaryKind.FRAGMENT
            for fragment in split_fragments(p)
        ]


def decode_time_and_sync(fragment: bytes) -> tuple[int, bool]:
    """A fragment's tfdt and whether its sample is a sync sample (the layout fmp4.py writes)."""
    tfdt = fragment.index(b"tfdt")
    trun = fragment.index(b"trun")
    (decode_time,) = struct.unpack_from("!Q", fragment, tfdt + 8)
    (flags,) = struct.unpack_from("!I", fragment, trun + 24)
    return decode_time, not flags & 0x10000


async def test_a_socket_that_stops_reading_skips_each_stream_to_its_next_keyframe(
    start_server: StartServer, tmp_path: Path
) -> None:
    streams = [
        {"id": f"gop-{n}", "source": "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=10"}
        for n in (1, 2)
    ]
    server = await start_server(make_config(streams))
    hub = server.services.hub
    socket = StallableSocket()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.serve, socket, "stalling client", hub.admit("stalling client", None))
        for stream_id in ("gop-1", "gop-2"):
            await socket.client_sends({"type": "fallback", "streamId": stream_id})
        await socket.wait_until(
            lambda: min(len(socket.fragments("gop-1")), len(socket.fragments("gop-2"))) >= 5
        )
        socket.stall()
        sessions = fallback_sessions(server)
        assert len(sessions) == 2
        [stream] = [s for s in server.services.registry if s.id == "gop-1"]

        def both_dropped() -> bool:
            return all(
                (stats := session.subscriber_statistics()) is not None and stats.dropped_frames > 0
                for session in sessions
            )

        await wait_published(stream, both_dropped)
        # Nobody was cut off, and the shared outbox holds at most one fragment per stream.
        assert socket.closed is None
        [connection] = hub._connections
        assert connection._outbox_in.statistics().current_buffer_used <= 4
        received = {s: len(socket.fragments(s)) for s in ("gop-1", "gop-2")}
        # Frames wait for the stalled socket (the queue restarts at each keyframe).
        stalled = next(s for s in sessions if s.stream.id == "gop-1")
        await wait_published(
            stream,
            lambda: (
                (stats := stalled.subscriber_statistics()) is not None and stats.queued_frames >= 3
            ),
        )
        messages_before = len(socket.binary)
        socket.resume()
        await socket.wait_until(
            lambda: all(len(socket.fragments(s)) >= received[s] + 20 for s in received)
        )
        for stream_id in received:
            fragments = socket.fragments(stream_id)
            timing = [decode_time_and_sync(f) for f in fragments]
            gaps = [
                index
                for index in range(1, len(timing))
                if timing[index][0] - timing[index - 1][0] > 2 * 3600
            ]
            assert gaps, f"{stream_id}: no frames were skipped"
            assert all(timing[index][1] for index in gaps), f"{stream_id}: resumed mid-GOP"
            path = tmp_path / f"{stream_id}.mp4"
            path.write_bytes(b"".join(p for _, s, p in socket.binary if s == stream_id))
            assert len(decode(path)) >= len(fragments) - 1
        # What waited while the socket was stalled went out together, in one message.
        sizes = [
            len(split_fragments(p))
            for k, s, p in socket.binary[messages_before:]
            if s == "gop-1" and k is BinaryKind.FRAGMENT
        ]
        assert max(sizes) >= 3, sizes
        stats = server.services.statistics()
        assert stats.sessions_per_socket == (2,)
        nursery.cancel_scope.cancel()


def init_size(init: bytes) -> tuple[int, int]:
    """The width and height of an init segment's avc1 sample entry."""
    avc1 = init.index(b"avc1", init.index(b"moov"))  # ftyp lists "avc1" as a brand too
    # after the type: reserved (6), data_reference_index (2), pre_defined and reserved (16)
    width, height = struct.unpack_from("!HH", init, avc1 + 4 + 24)
    return width, height


def video_fragments(
    binary: list[tuple[BinaryKind, str, bytes]], stream_id: str, track: int = 1
) -> list[tuple[int, bytes]]:
    """Every video fragment (track 1; or audio, track 2) of the stream, in order, each with the
    number of the init segment it follows (1 for the first)."""
    found: list[tuple[int, bytes]] = []
    inits = 0
    for kind, stream, payload in binary:
        if stream != stream_id:
            continue
        if kind is BinaryKind.INIT:
            inits += 1
            continue
        for fragment in split_fragments(payload):
            (in_track,) = struct.unpack_from("!I", fragment, fragment.index(b"tfhd") + 8)
            if in_track == track:
                found.append((inits, fragment))
    return found


async def test_a_fallback_starts_on_the_quality_asked_and_switches_at_a_keyframe_on_its_timeline(
    start_server: StartServer, camera: Camera, tmp_path: Path
) -> None:
    server = await start_server(make_config(two_qualities(camera)))
    stream = server.services.registry.get("gate")
    assert stream is not None
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "gate", "payload": {"quality": "sub"}})
        await client.wait_until(lambda: client.fragments("gate") >= 10)
        inits = [p for k, s, p in client.binary if s == "gate" and k is BinaryKind.INIT]
        assert [init_size(init) for init in inits] == [SUB]
        # main (the default) was never read for it
        assert await trio.to_thread.run_sync(camera.sessions, "/h264-720") == 0
        assert [
            (m["payload"]["quality"], m["payload"]["requested"], m["payload"]["reason"])
            for m in client.messages
            if m["type"] == "quality"
        ] == [("sub", "sub", "pinned")]

        await client.send({"type": "quality", "streamId": "gate", "payload": {"quality": "main"}})

        def switched() -> bool:
            return any(
                m["type"] == "quality" and m["payload"]["quality"] == "main"
                for m in client.messages
            ) and any(after == 2 for after, _ in video_fragments(client.binary, "gate"))

        await client.wait_until(switched)
        await client.wait_until(
            lambda: sum(after == 2 for after, _ in video_fragments(client.binary, "gate")) >= 30
        )
        answer = next(
            m
            for m in client.messages
            if m["type"] == "quality" and m["payload"]["quality"] == "main"
        )
        assert answer["payload"]["requested"] == "main" and "sessionId" not in answer
        inits = [p for k, s, p in client.binary if s == "gate" and k is BinaryKind.INIT]
        assert [init_size(init) for init in inits] == [SUB, MAIN]
        fragments = video_fragments(client.binary, "gate")
        timing = [decode_time_and_sync(fragment) for _, fragment in fragments]
        first_main = next(i for i, (after, _) in enumerate(fragments) if after == 2)
        assert timing[first_main][1], "the new quality starts with a P-frame"
        assert timing[0][1], "the fallback starts with a P-frame"
        # Decode times go on where the last sub frame ended: never back, no gap.
        decode_times = [time for time, _ in timing]
        assert all(b > a for a, b in itertools.pairwise(decode_times))
        assert decode_times[first_main] == end_time(fragments[first_main - 1][1])
        # Each part decodes at its size from its init segment.
        for number, (init, size) in enumerate(zip(inits, (SUB, MAIN), strict=True), start=1):
            path = tmp_path / f"part-{number}.mp4"
            path.write_bytes(
                init + b"".join(fragment for after, fragment in fragments if after == number)
            )
            pictures = decode(path)
            assert pictures and {(p.width, p.height) for p in pictures} == {size}
        [session] = fallback_sessions(server)
        assert (session.quality_sent, session.switches) == ("main", 1)
        subscriber = session._subscriber
        assert subscriber is not None and stream.quality_of(subscriber) == "main"
        nursery.cancel_scope.cancel()


async def test_a_bad_quality_for_a_fallback_is_refused_and_every_stream_plays_on(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config([*two_qualities(camera), *DEMO_STREAMS[:1]]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send({"type": "fallback", "streamId": "gate", "payload": {"quality": "sub"}})
        await client.send({"type": "fallback", "streamId": "demo-1"})
        await client.wait_until(
            lambda: min(client.fragments("gate"), client.fragments("demo-1")) >= 5
        )
        bad = [
            {"type": "quality", "streamId": "gate", "payload": {"quality": "ultra"}},
            {"type": "quality", "streamId": "gate", "payload": {"quality": "no spaces"}},
            {"type": "quality", "streamId": "gate", "payload": {"tile": {"width": "wide"}}},
            {"type": "fallback", "streamId": "gate", "payload": {"quality": "ultra"}},
            {"type": "fallback", "streamId": "gate", "payload": {"tile": [1, 2]}},
        ]
        for message in bad:
            await client.send(message)
        await client.wait_until(
            lambda: sum(m["type"] == "error" for m in client.messages) >= len(bad)
        )
        errors = [m for m in client.messages if m["type"] == "error"]
        assert [(e["streamId"], e["code"]) for e in errors] == [
            ("gate", "unknown_quality"),
            ("gate", "invalid_message"),
            ("gate", "invalid_message"),
            ("gate", "unknown_quality"),
            ("gate", "invalid_message"),
        ]
        assert 'no quality "ultra"; it has main, sub' in errors[0]["payload"]
        assert "payload.tile" in errors[2]["payload"]
        # Nothing was lost: the same fallbacks play on, the gate still on sub.
        [gate_session] = [s for s in fallback_sessions(server) if s.stream.id == "gate"]
        before = {s: client.fragments(s) for s in ("gate", "demo-1")}
        await client.wait_until(
            lambda: all(client.fragments(s) >= n + 25 for s, n in before.items())
        )
        assert [s for s in fallback_sessions(server) if s.stream.id == "gate"] == [gate_session]
        assert (gate_session.quality_sent, gate_session.switches) == ("sub", 0)
        inits = [p for k, s, p in client.binary if s == "gate" and k is BinaryKind.INIT]
        assert [init_size(init) for init in inits] == [SUB]
        nursery.cancel_scope.cancel()


def clip_with_sound(path: Path, size: str) -> None:
    """Six seconds of a test picture of ``size`` and a 440 Hz tone (AAC), a keyframe a second."""
    subprocess.run(
        [
            "ffmpeg", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25",
            "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
            "-t", "6", "-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency",
            "-g", "25", "-bf", "0", "-pix_fmt", "yuv420p", "-c:a", "aac", "-ac", "2",
            "-shortest", str(path),
        ],
        check=True,
    )  # fmt: skip


async def test_sound_stays_with_the_picture_across_a_switch_and_never_goes_back(
    start_server: StartServer, tmp_path: Path
) -> None:
    for size in ("640x360", "320x180"):
        clip_with_sound(tmp_path / f"{size}.mp4", size)
    qualities = [
        {"name": "main", "source": f"file:{tmp_path / '640x360.mp4'}"},
        {"name": "sub", "source": f"file:{tmp_path / '320x180.mp4'}"},
    ]
    server = await start_server(make_config([{"id": "clip", "qualities": qualities}]))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)
        await client.send(
            {
                "type": "fallback",
                "streamId": "clip",
                "payload": {"quality": "sub", "audio": ["mp4a.40.2"]},
            }
        )

        def counted(track: int, after: int) -> int:
            return sum(n == after for n, _ in video_fragments(client.binary, "clip", track))

        await client.wait_until(lambda: counted(1, 1) >= 30 and counted(2, 1) >= 30)
        await client.send({"type": "quality", "streamId": "clip", "payload": {"quality": "main"}})
        await client.wait_until(lambda: counted(1, 2) >= 50 and counted(2, 2) >= 50)

        inits = [p for k, s, p in client.binary if s == "clip" and k is BinaryKind.INIT]
        assert [init_size(init) for init in inits] == [(320, 180), (640, 360)]
        video = video_fragments(client.binary, "clip", 1)
        sound = video_fragments(client.binary, "clip", 2)
        for fragments in (video, sound):
            times = [decode_time_and_sync(fragment)[0] for _, fragment in fragments]
            assert all(b > a for a, b in itertools.pairwise(times))  # never back
        # After the new init, the picture comes first, from a keyframe.
        second_init = [
            i for i, (k, s, _) in enumerate(client.binary) if s == "clip" and k is BinaryKind.INIT
        ][1]
        first_after = split_fragments(client.binary[second_init + 1][2])[0]
        assert first_after in [f for _, f in video] and decode_time_and_sync(first_after)[1]
        # In step: where the picture and the sound received so far end, give or take a
        # GOP's replay and a message in flight.
        picture_end = end_time(video[-1][1]) / 90_000
        sound_end = end_time(sound[-1][1]) / 48_000
        assert abs(picture_end - sound_end) < 1.0, (picture_end, sound_end)
        # What came after the switch decodes: picture at main's size, and sound.
        path = tmp_path / "after.mp4"
        path.write_bytes(
            inits[1] + b"".join(p for k, s, p in client.binary[second_init + 1 :] if s == "clip")
        )
        with av.open(str(path)) as container:
            assert [s.codec_context.name for s in container.streams] == ["h264", "aac"]
            heard = list(container.decode(container.streams.audio[0]))
            container.seek(0)
            pictures = list(container.decode(container.streams.video[0]))
        assert len(heard) >= 40 and {(p.width, p.height) for p in pictures} == {(640, 360)}
        nursery.cancel_scope.cancel()


async def test_an_auto_fallback_follows_its_tile_size_and_visibility(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config(two_qualities(camera)))
    async with open_websocket_url(server.ws_url) as ws, trio.open_nursery() as nursery:
        client = FallbackClient(ws)
        nursery.start_soon(client.read)

        def inits() -> list[tuple[int, int]]:
            return [init_size(p) for k, s, p in client.binary if k is BinaryKind.INIT]

        def said(quality: str, reason: str) -> bool:
            return any(
                m["type"] == "quality"
                and (m["payload"]["quality"], m["payload"]["reason"]) == (quality, reason)
                for m in client.messages
            )

        # A wall's tile, 300x170 device pixels: sub covers it.
        tile = {"width": 300, "height": 170, "visible": True}
        await client.send(
            {"type": "fallback", "streamId": "gate", "payload": {"quality": "auto", "tile": tile}}
        )
        await client.wait_until(lambda: said("sub", "tile") and client.fragments("gate") >= 5)
        assert inits() == [SUB]
        # Made full screen: only main covers it.
        tile = {"width": 1280, "height": 720, "visible": True}
        await client.send({"type": "quality", "streamId": "gate", "payload": {"tile": tile}})
        await client.wait_until(lambda: said("main", "tile") and inits() == [SUB, MAIN])
        # Scrolled out of sight: the smallest.
        tile = {**tile, "visible": False}
        await client.send({"type": "quality", "streamId": "gate", "payload": {"tile": tile}})
        await client.wait_until(lambda: said("sub", "hidden") and inits() == [SUB, MAIN, SUB])
        nursery.cancel_scope.cancel()
