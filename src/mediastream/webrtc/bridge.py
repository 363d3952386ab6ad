"""The bridge to aiortc: the only module that touches asyncio.

aiortc runs on asyncio; MediaStream runs on Trio. trio-asyncio's loop (opened around the whole
server, see ``server.py``) hosts aiortc, and every aiortc coroutine is called from Trio through
:func:`trio_asyncio.aio_as_trio`. Nothing else in the code base imports asyncio.

What this module adds to stock aiortc, and why:

- **H.264 only, decided before the offer is applied.** aiortc fixes the negotiated codecs
  inside ``setRemoteDescription``; the transceiver's codec preferences must be set before it,
  or VP8 is negotiated and the browser can't decode the H.264 it receives.
- **Packetize once per source.** A viewer's track yields :class:`EncodedFrame` objects whose
  RTP payloads were cut when the frame was read; the sender's encoder is replaced by one that
  hands those payloads back unchanged. Per viewer remain only the RTP header, SRTP and the
  send. (aiortc keeps the encoder in a private attribute; ``aiortc`` is pinned to the range
  this was verified against, and a test fails loudly if the attribute disappears.)
- **Bounded per-viewer queues.** The track reads a :class:`Subscriber` from the fan-out and
  is woken by it; aiortc's own relay keeps unbounded queues (or silently drops frames and
  corrupts H.264).
- **mDNS candidates are skipped** (configurable): aioice resolves ``.local`` names with a fixed
  one-second timeout per peer connection, while the browser's connectivity checks reveal its
  address anyway.
- **Closing is explicit, shielded and bounded**: cancellation does not close an aiortc peer.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, cast

import trio
import trio_asyncio
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import RtpPacket, wrap_rtx
from aiortc.sdp import candidate_from_sdp
from aiortc.utils import random16, random32

from ..changes import ChangeSignal
from ..config import WebRTCConfig
from ..errors import ErrorCode, SignalingError
from ..ice import ice_servers as ice_servers_for
from ..media.fanout import CatchUpPacer, Subscriber
from ..media.frames import EncodedFrame
from ..protocol import IceCandidate

log = logging.getLogger(__name__)

CLOSE_TIMEOUT: Final = 5.0  # seconds allowed for closing one peer connection
_MDNS_CANDIDATE: Final = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ \S+\.local \d+ .*$", re.M)
_CANDIDATE_SHAPE: Final = re.compile(
    r"^(candidate:)?\S{1,64} \d{1,5} (udp|tcp|UDP|TCP) \d{1,10} \S{1,255} \d{1,5} typ "
    r"(host|srflx|prflx|relay)( .*)?$"
)

#: What aiortc's SDP parsing raises on offers it can't make sense of (found by fuzzing: it
#: assumes fields it never checks for, such as a DTLS setup role).
_MALFORMED_SDP: Final = (
    ValueError,
    AssertionError,
    IndexError,
    KeyError,
    AttributeError,
    TypeError,
    InvalidStateError,
)

#: Connection states after which a peer connection never carries media again.
FINAL_STATES: Final = frozenset({"failed", "closed"})


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    open_peer_connections: int
    peer_connections_opened: int


class PeerConnectionFactory:
    """Makes the server's peer connections and counts them.

    Args:
        config: ICE servers and candidate policy.
        changes: notified whenever a peer connection opens or closes.
        catchup_rate: bytes per second at most while a viewer catches up on a cached GOP.
    """

    def __init__(
        self,
        config: WebRTCConfig,
        changes: ChangeSignal | None = None,
        *,
        catchup_rate: float = 20e6 / 8,
    ) -> None:
        self._config = config
        self._catchup_rate = catchup_rate
        self._changes = changes or ChangeSignal()
        self._open = 0
        self._opened = 0

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            open_peer_connections=self._open, peer_connections_opened=self._opened
        )

    @asynccontextmanager
    async def open(self, label: str) -> AsyncIterator[PeerConnection]:
        """A new peer connection, closed on exit however the block ends.

        Resource handling: the connection is closed in a shielded ``finally``, bounded by
        :data:`CLOSE_TIMEOUT`, so a cancelled session still releases its sockets and threads.
        """
        ice_servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in ice_servers_for(self._config.ice_servers, label="mediastream", now=time.time())
        ]

        async def create() -> RTCPeerConnection:
            # Created inside the asyncio loop: aiortc binds to the running loop on creation.
            return RTCPeerConnection(RTCConfiguration(iceServers=ice_servers))

        pc = await trio_asyncio.aio_as_trio(create)()
        self._open += 1
        self._opened += 1
        self._changes.notify()
        peer = PeerConnection(
            pc,
            label,
            ignore_mdns=self._config.ignore_mdns_candidates,
            catchup_rate=self._catchup_rate,
        )
        try:
            yield peer
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(CLOSE_TIMEOUT) as closing:
                    await peer._close()
                if closing.cancelled_caught:
                    log.warning(
                        "%s: peer connection did not close within %.0f s", label, CLOSE_TIMEOUT
                    )
            self._open -= 1
            self._changes.notify()


class PeerConnection:
    """One aiortc peer connection, seen from Trio. Made by :meth:`PeerConnectionFactory.open`."""

    def __init__(
        self, pc: RTCPeerConnection, label: str, *, ignore_mdns: bool, catchup_rate: float
    ) -> None:
        self._pc = pc
        self._label = label
        self._ignore_mdns = ignore_mdns
        self._catchup_rate = catchup_rate
        self._state_changed = trio.Event()
        self._tracks: list[SubscriberTrack] = []

        @pc.on("connectionstatechange")
        def _on_state_change() -> None:
            self._state_changed.set()
            self._state_changed = trio.Event()

    @property
    def connection_state(self) -> str:
        return str(self._pc.connectionState)

    async def wait_state_change(self) -> str:
        """Wait for the next connection state change; returns the new state."""
        await self._state_changed.wait()
        return self.connection_state

    async def answer(
        self,
        offer_sdp: str,
        video: Subscriber,
        audio: Subscriber | None = None,
        audio_codec: str | None = None,
        *,
        on_first_frame: Callable[[], None] | None = None,
    ) -> str:
        """Apply the browser's offer, send ``video`` as H.264 (and ``audio`` in ``audio_codec``),
        and return the answer SDP.

        Raises:
            SignalingError: ``invalid_sdp`` or ``unsupported_codec``, saying what was wrong.
        """
        if self._ignore_mdns:
            offer_sdp = _MDNS_CANDIDATE.sub("", offer_sdp).replace("\r\n\r\n", "\r\n")
        self._tracks = [
            SubscriberTrack(video, "video", self._catchup_rate, on_first_frame=on_first_frame)
        ]
        if audio is not None and audio_codec is not None:
            self._tracks.append(SubscriberTrack(audio, "audio", self._catchup_rate))
        try:
            return str(
                await trio_asyncio.aio_as_trio(self._answer)(offer_sdp, self._tracks, audio_codec)
            )
        except OperationError as exc:
            raise SignalingError(
                ErrorCode.UNSUPPORTED_CODEC,
                f"The offer has no video the server can send (it needs H.264): {exc}",
            ) from None
        except _MALFORMED_SDP as exc:
            raise SignalingError(
                ErrorCode.INVALID_SDP, f"Invalid SDP offer: {_describe(exc)}"
            ) from None

    async def _answer(
        self, offer_sdp: str, tracks: list[SubscriberTrack], audio_codec: str | None
    ) -> str:
        wanted = {"video": ("video/h264", "video/rtx"), "audio": (f"audio/{audio_codec}".lower(),)}
        transceivers = []
        for track in tracks:
            sender = self._pc.addTrack(track)
            track.attach(sender)
            transceiver = next(t for t in self._pc.getTransceivers() if t.sender is sender)
            capabilities = RTCRtpSender.getCapabilities(track.kind)
            transceiver.setCodecPreferences(
                [c for c in capabilities.codecs if c.mimeType.lower() in wanted[track.kind]]
            )
            transceivers.append(transceiver)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if transceivers[0].mid is None:
            raise ValueError("the offer has no video section for the stream")
        answer = await self._pc.createAnswer()
        await self._pc.setLocalDescription(answer)
        return str(self._pc.localDescription.sdp)

    async def add_ice_candidate(self, ice: IceCandidate) -> bool:
        """Apply one browser candidate; returns False when it was skipped on purpose.

        Raises:
            SignalingError: ``invalid_candidate`` for a candidate aiortc can't parse.
        """
        if ice.candidate is None:
            if self._ignore_mdns:
                # The browser's reachable address may only ever show up through its own
                # connectivity checks (its host candidates are mDNS names we skip). Telling
                # aioice "no more candidates" would let it declare failure before those checks
                # arrive; without it, a dead peer is caught by the negotiation timeout.
                return False
            await trio_asyncio.aio_as_trio(self._pc.addIceCandidate)(None)
            return True
        text = ice.candidate.strip()
        if not _CANDIDATE_SHAPE.match(text):
            raise SignalingError(
                ErrorCode.INVALID_CANDIDATE, f"Not an ICE candidate: {text[:80]!r}"
            )
        try:
            candidate = candidate_from_sdp(text.removeprefix("candidate:"))
        except (ValueError, AssertionError, IndexError) as exc:
            raise SignalingError(
                ErrorCode.INVALID_CANDIDATE, f"Bad ICE candidate: {_describe(exc)}"
            ) from None
        if self._ignore_mdns and candidate.ip.endswith(".local"):
            return False
        candidate.sdpMid = ice.sdp_mid
        candidate.sdpMLineIndex = ice.sdp_mline_index
        await trio_asyncio.aio_as_trio(self._pc.addIceCandidate)(candidate)
        return True

    async def _close(self) -> None:
        for track in self._tracks:
            track.stop()
        await trio_asyncio.aio_as_trio(self._pc.close)()


class DirectRtpSender:
    """Sends one viewer's frames as RTP straight from the fan-out.

    aiortc's sender would take each frame through its own task (a wake-up, a ``recv`` and a
    packetizer per frame and viewer). Instead, once the viewer is live, the fan-out calls
    :meth:`send` for it synchronously as it publishes: per packet there remain a copied RTP
    header with its sequence number and marker, SRTP protection, and the ``sendto``. aiortc
    keeps doing RTCP (sender reports read the counters updated here) and NACKs (served from
    this history).

    Uses aiortc's private sender state (pinned to the aiortc range it was verified with; a
    test fails if it moves).
    """

    def __init__(self, sender: RTCRtpSender, parameters: RTCRtpSendParameters) -> None:
        missing = [name for name in _SENDER_STATE if not hasattr(sender, name)]
        if missing:
            raise RuntimeError(f"aiortc's RTCRtpSender changed: no {', '.join(missing)}")
        # Typed loosely on purpose: the name-mangled state below is not in aiortc's types.
        self._sender: Any = cast(Any, sender)
        self._dtls: Any = sender.transport
        payload_type = parameters.codecs[0].payloadType
        if payload_type is None:
            raise RuntimeError("aiortc started a sender without a payload type")
        self._payload_type: int = payload_type
        self._mid = parameters.muxId
        self._ssrc = sender._ssrc
        self._extensions = self._sender._RTCRtpSender__rtp_header_extensions_map
        self._sequence = random16() % 32768  # as aiortc: far from wrapping, for SRTP
        self._timestamp_origin = random32()
        self._history: dict[int, bytes] = {}
        # The header is made once; each frame patches its timestamp and send time into it.
        self._header, self._send_time_at = self._header_template()
        # NACKed packets come from this history (aiortc keeps its own for its own loop).
        setattr(self._sender, "_retransmit", self._retransmit)  # noqa: B010 (a method, on purpose)

    def _header_template(self) -> tuple[bytearray, int | None]:
        """This viewer's RTP header, and where its abs-send-time extension sits (None when the
        browser did not negotiate it): found by serializing two headers that differ only there.
        """

        def serialize(send_time: int) -> bytes:
            packet = RtpPacket(payload_type=self._payload_type)
            packet.ssrc = self._ssrc
            packet.extensions.abs_send_time = send_time
            packet.extensions.mid = self._mid
            return bytes(packet.serialize(self._extensions))

        zeros, ones = serialize(0), serialize(0xFFFFFF)
        differ = [index for index, (a, b) in enumerate(zip(zeros, ones, strict=True)) if a != b]
        return bytearray(zeros), (differ[0] if differ else None)

    def send(self, frame: EncodedFrame) -> None:
        """Send one frame now. Raises ConnectionError once the transport is gone."""
        timestamp = (self._timestamp_origin + frame.timestamp) & 0xFFFFFFFF
        ntp_now = _ntp_time()
        header = self._header
        header[4:8] = timestamp.to_bytes(4, "big")
        if (at := self._send_time_at) is not None:
            header[at : at + 3] = ((ntp_now >> 14) & 0xFFFFFF).to_bytes(3, "big")
        send = self._packet_sender()
        last = len(frame.payloads) - 1
        octets = 0
        sequence = self._sequence
        for index, payload in enumerate(frame.payloads):
            header[1] = (0x80 if index == last else 0) | self._payload_type
            header[2] = sequence >> 8
            header[3] = sequence & 0xFF
            packet = bytes(header) + payload
            self._history[sequence % RTP_HISTORY_SIZE] = packet
            send(packet)
            sequence = (sequence + 1) & 0xFFFF
            octets += len(payload)
        self._sequence = sequence
        sender = self._sender
        # What aiortc's RTCP task reports in its sender reports.
        sender._RTCRtpSender__ntp_timestamp = ntp_now
        sender._RTCRtpSender__rtp_timestamp = timestamp
        packets = sender._RTCRtpSender__packet_count + len(frame.payloads)
        sender._RTCRtpSender__packet_count = packets
        sender._RTCRtpSender__octet_count += octets

    def _packet_sender(self) -> Callable[[bytes], None]:
        """How to send one RTP packet right now: SRTP-protect it and hand it to the socket of
        the nominated ICE pair, without the four coroutine layers of aiortc and aioice (the
        same steps, read off them)."""
        dtls = self._dtls
        if dtls._state != DtlsState.CONNECTED:
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        pair = dtls.transport._connection._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        protect = dtls._tx_srtp.protect
        sendto = pair.protocol.transport.sendto
        address = pair.remote_addr

        def send(packet: bytes) -> None:
            sendto(protect(packet), address)

        return send

    async def _retransmit(self, sequence_number: int) -> None:
        raw = self._history.get(sequence_number % RTP_HISTORY_SIZE)
        if raw is None or int.from_bytes(raw[2:4], "big") != sequence_number:
            return
        packet = RtpPacket.parse(raw, self._extensions)
        sender = self._sender
        rtx_payload_type = sender._RTCRtpSender__rtx_payload_type
        if rtx_payload_type is not None:
            rtx_sequence = sender._RTCRtpSender__rtx_sequence_number
            packet = wrap_rtx(
                packet,
                payload_type=rtx_payload_type,
                sequence_number=rtx_sequence,
                ssrc=sender._rtx_ssrc,
            )
            sender._RTCRtpSender__rtx_sequence_number = (rtx_sequence + 1) & 0xFFFF
        await self._dtls._send_rtp(packet.serialize(self._extensions))


_NTP_EPOCH_OFFSET: Final = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)


def _ntp_time() -> int:
    """Now as a 64-bit NTP timestamp, as aiortc's clock gives it, without its datetimes."""
    return int((time.time() + _NTP_EPOCH_OFFSET) * (1 << 32))


#: aiortc's private sender state that :class:`DirectRtpSender` relies on.
_SENDER_STATE: Final = (
    "_ssrc",
    "_rtx_ssrc",
    "_RTCRtpSender__rtp_header_extensions_map",
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__rtx_payload_type",
    "_RTCRtpSender__rtx_sequence_number",
)
RTP_HISTORY_SIZE: Final = 128  # packets kept for NACKs, as aiortc


class SubscriberTrack(MediaStreamTrack):
    """A track that plays one viewer's :class:`Subscriber` queue (video or audio).

    aiortc's sender loop only ever waits in :meth:`recv`: frames go out through a
    :class:`DirectRtpSender`. While the viewer catches up (a replayed GOP, or right after it
    connected) this track sends the queue, paced; once it is live, the fan-out sends each
    frame synchronously as it publishes it. The track never ends on its own: a source that
    restarts keeps the same track (a track that ends stops aiortc's sender for good).
    """

    def __init__(
        self,
        subscriber: Subscriber,
        kind: str,
        catchup_rate: float,
        *,
        on_first_frame: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._subscriber = subscriber
        self._on_first_frame = on_first_frame
        self._pacer = CatchUpPacer(catchup_rate)
        self._waiter: asyncio.Future[None] | None = None
        self._direct: DirectRtpSender | None = None
        subscriber.set_wakeup(self._wake)

    def attach(self, sender: RTCRtpSender) -> None:
        """Take over ``sender``'s sending once aiortc starts it (DTLS is up)."""
        start = sender.send

        async def send(parameters: RTCRtpSendParameters) -> None:
            await start(parameters)
            self._direct = DirectRtpSender(sender, parameters)
            self._wake()

        sender.send = send  # type: ignore[method-assign]

    def _wake(self) -> None:
        # Called from Trio (the fan-out) or asyncio, in the same thread.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> Any:
        while self._direct is None:
            await self._wait()
        direct = self._direct
        loop = asyncio.get_running_loop()
        while True:
            # Catching up through a queue (a replayed GOP, or right after connecting): paced,
            # other peers send in between. A spent budget waits for the next frame published.
            while self._pacer.ready(loop.time()):
                if (frame := self._subscriber.get_nowait()) is None:
                    break
                if self._subscriber.queued_frames:
                    self._pacer.spend(frame.size)
                self._send(direct, frame)
            if self._subscriber.closed or self.readyState != "live":
                raise MediaStreamError
            if not self._subscriber.queued_frames:
                # Live: from now on the fan-out sends each frame as it publishes it. The sink
                # is dropped (and this track woken) if sending fails or the queue takes over.
                self._subscriber.set_sink(functools.partial(self._send, direct))
            await self._wait()

    def _send(self, direct: DirectRtpSender, frame: EncodedFrame) -> None:
        direct.send(frame)
        if self._on_first_frame is not None:
            self._on_first_frame()
            self._on_first_frame = None

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def stop(self) -> None:
        super().stop()
        self._subscriber.set_sink(None)
        self._subscriber.set_wakeup(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_AUDIO_SECTION: Final = re.compile(r"^m=audio [1-9]\d* .*?(?=^m=|\Z)", re.M | re.S)


def offer_accepts_audio(offer_sdp: str, codec: str) -> bool:
    """Whether the offer has an active audio section that lists ``codec`` (e.g. "PCMU")."""
    section = _AUDIO_SECTION.search(offer_sdp)
    if section is None or re.search(r"^a=inactive", section.group(), re.M):
        return False
    return (
        re.search(rf"^a=rtpmap:\d+ {re.escape(codec)}/", section.group(), re.M | re.I) is not None
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text[:200] if text else type(exc).__name__
