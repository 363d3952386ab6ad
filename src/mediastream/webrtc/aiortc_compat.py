"""Every use of aiortc's (and aioice's) private internals, in one place.

The direct send path (``webrtc/rtp_sender.py``) sends each viewer's RTP itself, synchronously
from the fan-out, instead of through aiortc's per-sender task; and frames are cut into RTP
payloads once per source with aiortc's own H.264 packetizer. Both need state aiortc keeps
private. This module is the only one that touches it; ``tests/unit/test_aiortc_compat.py``
runs :func:`missing_internals` against the installed aiortc and names whatever moved, so an
upgrade fails one test loudly instead of many quietly. ``aiortc`` is pinned to the range this
was verified with (``pyproject.toml``).

What is used, and why:

- ``RTCRtpSender``: its SSRCs and negotiated header extensions (to build the RTP header once
  per viewer), the counters its RTCP sender reports read (updated by our sends), its RTX
  payload type and sequence number, and its ``_retransmit`` hook (NACKs are answered from our
  packet history); its public ``send()`` is wrapped to learn when DTLS is up.
- ``RTCDtlsTransport``: its state, its outgoing SRTP context and ``_send_rtp``.
- ``aioice.Connection._nominated``: the selected candidate pair, whose asyncio datagram
  transport carries the packets (and whose write buffer tells when the socket is full).
- ``H264Encoder._packetize``: RFC 6184 packetization (single NAL units, STAP-A, FU-A).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiortc import RTCPeerConnection, RTCRtpSender
from aiortc.codecs.h264 import H264Encoder
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import HeaderExtensionsMap

#: Private attributes of an ``RTCRtpSender`` this module reads or writes.
SENDER_ATTRIBUTES: Final = (
    "_ssrc",
    "_rtx_ssrc",
    "_retransmit",
    "_RTCRtpSender__rtp_header_extensions_map",
    "_RTCRtpSender__ntp_timestamp",
    "_RTCRtpSender__rtp_timestamp",
    "_RTCRtpSender__packet_count",
    "_RTCRtpSender__octet_count",
    "_RTCRtpSender__rtx_payload_type",
    "_RTCRtpSender__rtx_sequence_number",
)
#: Private attributes of an ``RTCDtlsTransport``.
DTLS_ATTRIBUTES: Final = ("_state", "_tx_srtp", "_send_rtp", "transport")


class AiortcChanged(RuntimeError):
    """aiortc no longer has the internals this module relies on (an upgrade moved them)."""


async def missing_internals() -> list[str]:
    """What this module needs and the installed aiortc lacks; empty when all is there.

    Checked on real (unconnected) objects, since most of it is instance state. An asyncio
    coroutine: aiortc binds its objects to the running loop.
    """
    missing = []
    if not callable(getattr(H264Encoder, "_packetize", None)):
        missing.append("aiortc.codecs.h264.H264Encoder._packetize")
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="sendonly")
        sender = transceiver.sender
        missing += [f"RTCRtpSender.{n}" for n in SENDER_ATTRIBUTES if not hasattr(sender, n)]
        dtls = sender.transport
        missing += [f"RTCDtlsTransport.{n}" for n in DTLS_ATTRIBUTES if not hasattr(dtls, n)]
        if not hasattr(dtls.transport, "_connection"):
            missing.append("RTCIceTransport._connection")
        elif not isinstance(getattr(dtls.transport._connection, "_nominated", None), dict):
            missing.append("aioice.Connection._nominated")
    finally:
        await pc.close()
    return missing


def packetize_h264(nal_units: Iterable[bytes]) -> list[bytes]:
    """RTP payloads (RFC 6184) for one access unit's NAL units, as aiortc's encoder cuts them."""
    return list(H264Encoder._packetize(list(nal_units)))


def on_sender_started(
    sender: RTCRtpSender, started: Callable[[RTCRtpSendParameters], None]
) -> None:
    """Call ``started`` once aiortc has started ``sender`` (DTLS is up, parameters known)."""
    start = sender.send

    async def send(parameters: RTCRtpSendParameters) -> None:
        await start(parameters)
        started(parameters)

    sender.send = send  # type: ignore[method-assign]


@dataclass(frozen=True, slots=True)
class SenderIdentity:
    ssrc: int
    rtx_ssrc: int
    header_extensions: HeaderExtensionsMap


class SenderInternals:
    """One started ``RTCRtpSender``'s private state, as the direct send path needs it."""

    def __init__(self, sender: RTCRtpSender) -> None:
        missing = [name for name in SENDER_ATTRIBUTES if not hasattr(sender, name)]
        if missing:
            raise AiortcChanged(f"aiortc's RTCRtpSender has no {', '.join(missing)}")
        internals: Any = sender  # the name-mangled state is not in aiortc's types
        self._sender = internals
        self.identity = SenderIdentity(
            ssrc=internals._ssrc,
            rtx_ssrc=internals._rtx_ssrc,
            header_extensions=internals._RTCRtpSender__rtp_header_extensions_map,
        )

    def count_sent(self, ntp_timestamp: int, rtp_timestamp: int, packets: int, octets: int) -> None:
        """Record a frame sent, for the RTCP sender reports aiortc's own task writes."""
        sender = self._sender
        sender._RTCRtpSender__ntp_timestamp = ntp_timestamp
        sender._RTCRtpSender__rtp_timestamp = rtp_timestamp
        sender._RTCRtpSender__packet_count += packets
        sender._RTCRtpSender__octet_count += octets

    def next_rtx(self) -> tuple[int, int] | None:
        """(RTX payload type, RTX sequence number) for one retransmission, or None without
        RTX negotiated; takes the sequence number."""
        sender = self._sender
        payload_type = sender._RTCRtpSender__rtx_payload_type
        if payload_type is None:
            return None
        sequence = sender._RTCRtpSender__rtx_sequence_number
        sender._RTCRtpSender__rtx_sequence_number = (sequence + 1) & 0xFFFF
        return payload_type, sequence

    def answer_nacks_with(self, retransmit: Callable[[int], Awaitable[None]]) -> None:
        """Have NACKed sequence numbers resent by ``retransmit`` (aiortc's RTCP task calls it)."""
        setattr(self._sender, "_retransmit", retransmit)  # noqa: B010 (a method, on purpose)


class SrtpSocket:
    """The SRTP-protecting, ``sendto``-ing end of one connected DTLS transport: the same steps
    as aiortc's and aioice's four coroutine layers, without them.

    Raises:
        ConnectionError: the transport is not (or no longer) connected.
    """

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        internals: Any = dtls
        if internals._state != DtlsState.CONNECTED:
            raise ConnectionError("Cannot send encrypted RTP, not connected")
        pair = internals.transport._connection._nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        self._dtls = internals
        self._protect = internals._tx_srtp.protect
        self._transport = pair.protocol.transport
        self._address = pair.remote_addr

    def send(self, packet: bytes) -> None:
        """Protect and send one RTP packet now (asyncio buffers it if the socket is full)."""
        self._transport.sendto(self._protect(packet), self._address)

    def buffered_bytes(self) -> int:
        """Bytes waiting in the datagram transport because the socket would block (EAGAIN)."""
        return int(self._transport.get_write_buffer_size())

    async def send_rtp_through_aiortc(self, packet: bytes) -> None:
        """Send one packet the way aiortc does (for retransmissions, off the hot path)."""
        await self._dtls._send_rtp(packet)
