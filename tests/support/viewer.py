"""A test viewer: one signaling socket with real aiortc peers on it, as a page would do.

    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("demo-1")
        await played.wait_frames(5)

Frames are really decoded (aiortc's H.264 decoder); ``capture=True`` also records the
depacketized access units, to compare them with what the source sent. A played stream's
``forced_estimate`` makes its receiver report that bandwidth estimate (REMB) instead of its
own: the seam for a viewer whose link is short, in the client, the server untouched.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from trio_websocket import WebSocketConnection, open_websocket_url

Message = dict[str, Any]
_CANDIDATE_LINE = re.compile(r"^a=candidate:(.*?)\r?$", re.M)
_END_OF_CANDIDATES = "a=end-of-candidates\r\n"


class SignalingFailed(Exception):
    def __init__(self, message: Message) -> None:
        self.message = message
        self.code = message.get("code")
        super().__init__(f"{self.code}: {message.get('payload')}")


class _RecordingQueue(queue.Queue):  # type: ignore[type-arg]
    """aiortc's receiver hands every depacketized frame to its decoder through this queue."""

    def __init__(self, sink: list[bytes]) -> None:
        super().__init__()
        self._sink = sink

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            self._sink.append(bytes(item[1].data))
        super().put(item, block, timeout)


@dataclass
class PlayedStream:
    stream_id: str
    pc: RTCPeerConnection
    frames: int = 0
    sizes: set[tuple[int, int]] = field(default_factory=set)
    access_units: list[bytes] = field(default_factory=list)
    audio_frames: int = 0
    audio_sample_rates: set[int] = field(default_factory=set)
    #: the audio codec the answer chose ("PCMU", "opus"…), None without audio.
    audio_codec: str | None = None
    ended: bool = False
    #: set: the REMB the receiver sends says this many bits per second, whatever it measured
    forced_estimate: int | None = None
    #: the (width, height) of each decoded frame, in order
    frame_sizes: list[tuple[int, int]] = field(default_factory=list)
    #: each decoded frame's RTP timestamp (unwrapped), in order
    frame_timestamps: list[int] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_frames(self, count: int, *, timeout: float = 15) -> None:
        """Wait until ``count`` more frames than now were decoded."""
        target = self.frames + count
        with trio.fail_after(timeout):
            while self.frames < target:
                if self.ended:
                    raise AssertionError(
                        f"{self.stream_id}: track ended after {self.frames} frames"
                    )
                await self._changed.wait()

    async def wait_audio_frames(self, count: int, *, timeout: float = 15) -> None:
        """Wait until ``count`` more audio frames than now were decoded."""
        target = self.audio_frames + count
        with trio.fail_after(timeout):
            while self.audio_frames < target:
                await self._changed.wait()

    async def wait_size(
        self, size: tuple[int, int], *, frames: int = 5, timeout: float = 15
    ) -> int:
        """Wait until ``frames`` frames in a row decode at ``size``; returns the index of the
        first of them."""
        with trio.fail_after(timeout):
            while True:
                recent = self.frame_sizes[-frames:]
                if len(recent) == frames and set(recent) == {size}:
                    index = len(self.frame_sizes) - 1
                    while index > 0 and self.frame_sizes[index - 1] == size:
                        index -= 1
                    return index
                if self.ended:
                    raise AssertionError(f"{self.stream_id}: track ended")
                await self._changed.wait()

    async def wait_ended(self, *, timeout: float = 15) -> None:
        with trio.fail_after(timeout):
            while not self.ended:
                await self._changed.wait()


class Viewer:
    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery) -> None:
        self.ws = ws
        self.messages: list[Message] = []
        #: every message this viewer sent, in order
        self.sent: list[Message] = []
        self.binary_messages = 0
        self.streams: dict[str, PlayedStream] = {}
        #: every peer connection made, those of streams played again too (closed at the end)
        self._peers: list[RTCPeerConnection] = []
        self.closed_reason: tuple[int, str | None] | None = None
        self._nursery = nursery
        self._arrived = trio.Event()

    async def send(self, message: Message | str) -> None:
        if isinstance(message, dict):
            self.sent.append(message)
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def wait_for(
        self, predicate: Callable[[Message], bool], *, after: int = 0, timeout: float = 10
    ) -> Message:
        """The first message from index ``after`` on that matches."""
        index = after
        with trio.fail_after(timeout):
            while True:
                while index < len(self.messages):
                    message = self.messages[index]
                    index += 1
                    if predicate(message):
                        return message
                if self.closed_reason is not None:
                    raise AssertionError(f"socket closed {self.closed_reason} while waiting")
                await self._arrived.wait()

    def errors(self, *, after: int = 0) -> list[Message]:
        """The ``error`` messages the socket got, from index ``after`` on (a mark taken as
        ``len(viewer.messages)``)."""
        return [m for m in self.messages[after:] if m.get("type") == "error"]

    async def wait_closed(self, *, timeout: float = 10) -> tuple[int, str | None]:
        """Wait until the server closes the socket; returns (code, reason)."""
        with trio.fail_after(timeout):
            while self.closed_reason is None:
                await self._arrived.wait()
        return self.closed_reason

    async def request(
        self, message: Message | str, stream_id: str | None, types: tuple[str, ...]
    ) -> Message:
        """Send a message and wait for the reply of one of ``types`` about ``stream_id``."""
        start = len(self.messages)
        await self.send(message)
        return await self.wait_for(
            lambda m: m.get("streamId") == stream_id and m.get("type") in types, after=start
        )

    async def play(
        self,
        stream_id: str,
        *,
        legacy: bool = False,
        trickle: bool = False,
        session_id: str | None = None,
        capture: bool = False,
        mdns_only: bool = False,
        audio: bool = False,
        connect: bool = True,
        quality: str | None = None,
        tile: Message | None = None,
    ) -> PlayedStream:
        """Negotiate ``stream_id`` and start decoding it; raises SignalingFailed on ``error``.

        ``trickle`` sends the candidates as ``ice`` messages, as browsers do; ``mdns_only``
        (with it) disguises every host address as an mDNS name, as Chrome does. With
        ``connect=False`` the answer is not applied: the server waits for a peer that never
        comes.
        """
        pc = await trio_asyncio.aio_as_trio(_new_peer_connection)()
        self._peers.append(pc)
        transceiver = pc.addTransceiver("video", direction="recvonly")
        audio_transceiver = pc.addTransceiver("audio", direction="recvonly") if audio else None
        played = PlayedStream(stream_id, pc)
        receiver: Any = transceiver.receiver
        receiver._RTCRtpReceiver__remote_bitrate_estimator = _ForcedEstimate(
            receiver._RTCRtpReceiver__remote_bitrate_estimator, played
        )
        if capture:
            transceiver.receiver._RTCRtpReceiver__decoder_queue = _RecordingQueue(
                played.access_units
            )
        offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
        await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
        sdp = pc.localDescription.sdp
        candidates = _CANDIDATE_LINE.findall(sdp) if trickle else []
        if trickle:
            # What a browser sends: no candidates yet, and no end-of-candidates either.
            sdp = _CANDIDATE_LINE.sub("", sdp).replace("\r\n\r\n", "\r\n")
            sdp = sdp.replace(_END_OF_CANDIDATES, "")
        payload: Message = {"sdp": sdp, "type": "offer", "streamId": stream_id}
        if session_id:
            payload["sessionId"] = session_id
        if quality is not None:
            payload["quality"] = quality
        if tile is not None:
            payload["tile"] = tile
        message: Message = {"type": "offer", "payload": payload}
        if not legacy:
            message["streamId"] = stream_id
        start = len(self.messages)
        await self.send(message)
        if not mdns_only:
            await self._trickle(stream_id, candidates, end=trickle)
        reply = await self.wait_for(
            lambda m: m.get("streamId") == stream_id and m.get("type") in ("answer", "error"),
            after=start,
        )
        if mdns_only and reply["type"] == "answer":
            # Like a loaded browser: its names and end-of-candidates reach the server before
            # any of its connectivity checks (which start with setRemoteDescription below).
            await self._trickle(stream_id, [_as_mdns(c) for c in candidates], end=True)
            for _ in range(2):
                await self.request({"type": "ping"}, None, ("pong",))
        if reply["type"] == "error":
            await trio_asyncio.aio_as_trio(pc.close)()
            raise SignalingFailed(reply)
        if not connect:
            await self._keep(played)
            return played
        await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
            RTCSessionDescription(sdp=reply["payload"], type="answer")
        )
        await self._keep(played)
        self._nursery.start_soon(self._decode, played, transceiver.receiver.track)
        audio_section = re.search(r"^m=audio [1-9].*?(?=^m=|\Z)", reply["payload"], re.S | re.M)
        sending = audio_section and re.search(r"^a=send(only|recv)", audio_section.group(), re.M)
        if audio_transceiver is not None and audio_section and sending:
            rtpmap = re.search(r"^a=rtpmap:\d+ ([\w-]+)/", audio_section.group(), re.M)
            played.audio_codec = rtpmap.group(1) if rtpmap else None
            self._nursery.start_soon(self._hear, played, audio_transceiver.receiver.track)
        return played

    async def _trickle(self, stream_id: str, candidates: list[str], *, end: bool) -> None:
        where = {"sdpMid": "0", "sdpMLineIndex": 0}
        for candidate in candidates:
            await self.send(
                {
                    "type": "ice",
                    "streamId": stream_id,
                    "payload": {"candidate": f"candidate:{candidate}", **where},
                }
            )
        if end:
            await self.send(
                {"type": "ice", "streamId": stream_id, "payload": {"candidate": "", **where}}
            )

    async def stop(self, stream_id: str) -> None:
        """``close`` the stream on the server and close our peer."""
        await self.send({"type": "close", "streamId": stream_id})
        played = self.streams.pop(stream_id)
        await trio_asyncio.aio_as_trio(played.pc.close)()

    async def _decode(self, played: PlayedStream, track: Any) -> None:
        try:
            while True:
                frame = await trio_asyncio.aio_as_trio(track.recv)()
                played.frames += 1
                played.sizes.add((frame.width, frame.height))
                played.frame_sizes.append((frame.width, frame.height))
                played.frame_timestamps.append(_unwrap(frame.pts, played.frame_timestamps))
                played._notify()
        except MediaStreamError:
            played.ended = True
            played._notify()

    async def _hear(self, played: PlayedStream, track: Any) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await trio_asyncio.aio_as_trio(track.recv)()
                played.audio_frames += 1
                played.audio_sample_rates.add(frame.sample_rate)
                played._notify()

    async def _read(self) -> None:
        from trio_websocket import ConnectionClosed

        try:
            while True:
                text = await self.ws.get_message()
                if isinstance(text, bytes):
                    self.binary_messages += 1  # video over the socket (a fallback stream)
                    continue
                self.messages.append(json.loads(text))
                self._arrived.set()
                self._arrived = trio.Event()
        except ConnectionClosed as exc:
            self.closed_reason = (exc.reason.code, exc.reason.reason)
            self._arrived.set()

    async def _keep(self, played: PlayedStream) -> None:
        """Keep ``played`` as its stream's peer; the one it replaces (the server ended that
        session when the new offer came) is closed, not left to the garbage collector with
        its ICE sockets open."""
        previous = self.streams.get(played.stream_id)
        self.streams[played.stream_id] = played
        if previous is not None and previous.pc is not played.pc:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(previous.pc.close)()

    async def close_peers(self) -> None:
        with trio.CancelScope(shield=True):
            for pc in self._peers:
                await trio_asyncio.aio_as_trio(pc.close)()


def _unwrap(timestamp: int, earlier: list[int]) -> int:
    """A 32-bit RTP timestamp made continuous with the ones before it."""
    if not earlier:
        return timestamp
    last = earlier[-1]
    delta = (timestamp - last) & 0xFFFFFFFF
    return last + (delta - (1 << 32) if delta >= 1 << 31 else delta)


class _ForcedEstimate:
    """Stands in for a receiver's bandwidth estimator: what it reports (REMB) is the played
    stream's ``forced_estimate`` when that is set, the estimator's own otherwise."""

    def __init__(self, estimator: Any, played: PlayedStream) -> None:
        self._estimator = estimator
        self._played = played

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        estimate = self._estimator.add(arrival_time_ms, abs_send_time, payload_size, ssrc)
        forced = self._played.forced_estimate
        if estimate is None or forced is None:
            return estimate
        return forced, estimate[1]


def _as_mdns(candidate: str) -> str:
    fields = candidate.split()
    fields[4] = f"{uuid.uuid4()}.local"
    return " ".join(fields)


async def _new_peer_connection() -> RTCPeerConnection:
    # No STUN: these machines have no internet, and gathering would wait for it.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


@asynccontextmanager
async def open_viewer(
    ws_url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[Viewer]:
    async with open_websocket_url(ws_url, ssl_context=ssl_context, extra_headers=headers) as ws:
        try:
            async with trio.open_nursery() as nursery:
                viewer = Viewer(ws, nursery)
                nursery.start_soon(viewer._read)
                try:
                    yield viewer
                finally:
                    await viewer.close_peers()
                    nursery.cancel_scope.cancel()
        finally:
            # Outside the cancelled nursery, so it can't turn the body's own exception into
            # a Cancelled that the nursery would swallow. trio-websocket 0.12 never closes
            # the TCP stream when the server reset it: close it here.
            await ws._stream.aclose()


@asynccontextmanager
async def open_playing_viewers(
    ws_url: str, stream_id: str, count: int, *, capture: bool = False
) -> AsyncIterator[list[Viewer]]:
    """``count`` viewers, one socket each, each playing ``stream_id`` (trickling its
    candidates, as browsers do), one after the other: a viewer has decoded five frames before
    the next one opens its socket, so the server (a cluster node counting its viewers) meets
    each offer with the ones before it in place. All are closed after the block."""
    async with contextlib.AsyncExitStack() as stack:
        viewers = []
        for _ in range(count):
            viewer = await stack.enter_async_context(open_viewer(ws_url))
            played = await viewer.play(stream_id, trickle=True, capture=capture)
            await played.wait_frames(5, timeout=30)
            viewers.append(viewer)
        yield viewers
