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
  packet history); its public ``send()`` is wrapped to learn when DTLS is up, and its
  ``_handle_rtcp_packet`` to read the viewer's bandwidth estimates (REMB), which aiortc only
  hands to an encoder (passthrough has none).
- ``RTCDtlsTransport``: its state, its outgoing SRTP context and ``_send_rtp``.
- ``aioice.Connection._nominated``: the selected candidate pair, whose asyncio datagram
  transport carries the packets (and whose write buffer tells when the socket is full);
  that transport's ``_buffer`` and socket, to ``sendto`` directly while nothing waits.
- ``H264Encoder._packetize``: RFC 6184 packetization (single NAL units, STAP-A, FU-A).
- ``RTCPeerConnection``'s transceiver list (and its remote ICE/DTLS parameters by
  transceiver), for a page's shared peer connection renegotiated by the browser
  (:func:`forget_unoffered_transceivers`, :func:`reject_stopped_sections`; see below).

Two aiortc 1.16 behaviours break a connection the browser renegotiates to add and remove
streams (measured with Chromium; ``docs/architecture.md``, "One peer connection per page"):

- **A stopped (port-0) m-line is answered with a real port and kept in BUNDLE**, and Chromium
  then rejects every later negotiation of that connection. :func:`reject_stopped_sections`
  answers such an m-line with port 0, ``a=inactive`` and out of the BUNDLE group.
- **Transceivers are looked up by m-line index**: when the browser recycles a stopped
  m-line for a new stream (a new mid at the same index), ``setLocalDescription`` hands the new
  mid to the dead transceiver too, and the answer is built from the dead one.
  :func:`forget_unoffered_transceivers` drops, before the offer is applied, every transceiver
  whose mid the offer no longer has.

And three fixes that belong in the dependencies, applied at run time by :func:`install` (each
written so that it could go upstream as it is, and each with a test that proves the
behaviour and fails if the dependency changes under it):

- **trio-asyncio runs every ready asyncio callback per Trio round**, not one
  (:func:`_main_loop_one`). Stock trio-asyncio 0.16 takes one callback from its queue per
  round of Trio's scheduler, so each aiortc step (every RTCP packet, STUN check and DTLS
  record passes through several) waits for a whole scheduler round, and negotiation bursts and
  closes crawl behind everything else queued.
- **aiortc builds a receiver's bandwidth estimator when RTP first arrives**, not for every
  receiver (:class:`_LazyRemoteBitrateEstimator`): a server's transceivers only send, yet
  each built a ``RemoteBitrateEstimator`` with a thousand rate buckets (~100 KB, ~0.6 ms).
- **One DTLS certificate per process** (:func:`_shared_certificate`), as Janus and browsers
  keep one: aiortc made a new ECDSA key and certificate, and an SSL context from them, for
  every peer connection (~0.5 ms each). The fingerprint still goes in every answer.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import heapq
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import aiortc.rtcrtpreceiver
import sniffio
import trio
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.codecs.h264 import H264Encoder
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcdtlstransport import State as DtlsState
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import RTCP_PSFB_APP, HeaderExtensionsMap, RtcpPsfbPacket, unpack_remb_fci
from trio_asyncio._base import BaseTrioEventLoop
from trio_asyncio._handles import AsyncHandle

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
    "_handle_rtcp_packet",
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
        for name in ("__transceivers", "__remoteDtls", "__remoteIce"):
            if not hasattr(pc, f"_RTCPeerConnection{name}"):
                missing.append(f"RTCPeerConnection.{name}")
        if not hasattr(dtls.transport, "_connection"):
            missing.append("RTCIceTransport._connection")
        elif not isinstance(getattr(dtls.transport._connection, "_nominated", None), dict):
            missing.append("aioice.Connection._nominated")
    finally:
        await pc.close()
    # asyncio's datagram transport, which SrtpSocket.send bypasses while it holds nothing
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    try:
        if not isinstance(getattr(transport, "_buffer", None), collections.deque):
            missing.append("asyncio datagram transport ._buffer")
        if not hasattr(transport.get_extra_info("socket"), "_sock"):
            missing.append("asyncio TransportSocket._sock")
    finally:
        transport.close()
    return missing


def packetize_h264(nal_units: Iterable[bytes]) -> list[bytes]:
    """RTP payloads (RFC 6184) for one access unit's NAL units, as aiortc's encoder cuts them."""
    return list(H264Encoder._packetize(list(nal_units)))


def on_sender_started(
    sender: RTCRtpSender, started: Callable[[RTCRtpSendParameters], None]
) -> None:
    """Call ``started`` once aiortc has started ``sender`` (DTLS is up, parameters known).

    Once only: aiortc calls ``send`` again after every renegotiation of the connection (a
    shared one), and a second start would restart the RTP sequence numbers, which SRTP refuses
    ("replay check failed").
    """
    start = sender.send
    called = False

    async def send(parameters: RTCRtpSendParameters) -> None:
        nonlocal called
        await start(parameters)
        if not called:
            called = True
            started(parameters)

    sender.send = send  # type: ignore[method-assign]


def on_bandwidth_estimate(sender: RTCRtpSender, estimated: Callable[[int], None]) -> None:
    """Call ``estimated`` with each bandwidth estimate (REMB, bits per second) the viewer
    reports for ``sender``'s stream, before aiortc handles the packet as usual."""
    internals: Any = sender
    handle = internals._handle_rtcp_packet

    async def handle_rtcp_packet(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            try:
                bitrate, ssrcs = unpack_remb_fci(packet.fci)
            except ValueError:
                pass  # another application-layer feedback, not REMB
            else:
                if internals._ssrc in ssrcs:
                    estimated(bitrate)
        await handle(packet)

    internals._handle_rtcp_packet = handle_rtcp_packet


@dataclass(frozen=True, slots=True)
class SenderIdentity:
    ssrc: int
    rtx_ssrc: int
    header_extensions: HeaderExtensionsMap


@dataclass(frozen=True, slots=True)
class MediaSection:
    """One m-line of an offer, as far as a shared peer connection needs it."""

    index: int
    kind: str
    mid: str | None
    #: stopped by the browser: port 0 and not ``a=bundle-only`` (which also has port 0)
    rejected: bool
    #: ``a=inactive``: neither side sends (a page's anchor m-line)
    inactive: bool = False


def media_sections(sdp: str) -> list[MediaSection]:
    """The m-lines of ``sdp`` in order: kind, mid, and whether the browser stopped them."""
    sections = []
    for index, text in enumerate(sdp.replace("\r\n", "\n").split("\nm=")[1:]):
        lines = text.split("\n")
        fields = lines[0].split()
        mid = next((line[6:].strip() for line in lines if line.startswith("a=mid:")), None)
        port_zero = len(fields) > 1 and fields[1] == "0"
        bundle_only = any(line.strip() == "a=bundle-only" for line in lines)
        inactive = any(line.strip() == "a=inactive" for line in lines)
        sections.append(
            MediaSection(
                index, fields[0] if fields else "", mid, port_zero and not bundle_only, inactive
            )
        )
    return sections


def reject_stopped_sections(answer_sdp: str, offer_sdp: str) -> str:
    """``answer_sdp`` with every m-line the offer stopped answered as stopped: port 0,
    ``a=inactive``, and its mid out of the BUNDLE group (aiortc answers it with a real port
    and keeps it bundled, and Chromium then rejects every later negotiation)."""
    rejected = {s.index for s in media_sections(offer_sdp) if s.rejected}
    if not rejected:
        return answer_sdp
    head, *sections = answer_sdp.split("\r\nm=")
    rejected_mids: set[str] = set()
    for index, section in enumerate(sections):
        if index not in rejected:
            continue
        lines = section.split("\r\n")
        first = lines[0].split(" ")
        first[1] = "0"
        lines[0] = " ".join(first)
        lines = [
            "a=inactive"
            if line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive")
            else line
            for line in lines
        ]
        rejected_mids.update(line[6:] for line in lines if line.startswith("a=mid:"))
        sections[index] = "\r\n".join(lines)
    head_lines = head.split("\r\n")
    for position, line in enumerate(head_lines):
        if line.startswith("a=group:BUNDLE"):
            kept = [mid for mid in line.split(" ")[1:] if mid not in rejected_mids]
            head_lines[position] = " ".join(["a=group:BUNDLE", *kept])
    return "\r\nm=".join(["\r\n".join(head_lines), *sections])


def forget_unoffered_transceivers(pc: RTCPeerConnection, offered_mids: set[str]) -> int:
    """Drop from ``pc`` the transceivers whose mid the next offer no longer has (the browser
    recycled their m-line); returns how many. Their senders must be stopped already."""
    internals: Any = pc
    transceivers = internals._RTCPeerConnection__transceivers
    gone = [t for t in transceivers if t.mid is not None and t.mid not in offered_mids]
    for transceiver in gone:
        transceivers.remove(transceiver)
        internals._RTCPeerConnection__remoteDtls.pop(transceiver, None)
        internals._RTCPeerConnection__remoteIce.pop(transceiver, None)
    return len(gone)


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
        nominated = internals.transport._connection._nominated
        pair = nominated.get(1)
        if pair is None:
            raise ConnectionError("Cannot send data, not connected")
        self._dtls = internals
        self._nominated = nominated
        self._pair = pair
        self._protect = internals._tx_srtp.protect
        self._transport = pair.protocol.transport
        self._socket = self._transport.get_extra_info("socket")._sock  # the socket itself
        self._address = pair.remote_addr

    @classmethod
    def of(cls, dtls: RTCDtlsTransport, last: SrtpSocket | None) -> SrtpSocket:
        """``last`` if it is still the transport's way out (DTLS connected, the same pair
        nominated), else a new one: cheaper than :class:`SrtpSocket` per frame.

        Raises:
            ConnectionError: the transport is not (or no longer) connected.
        """
        if (
            last is not None
            and last._dtls is dtls
            and last._dtls._state == DtlsState.CONNECTED
            and last._nominated.get(1) is last._pair
        ):
            return last
        return cls(dtls)

    def send(self, packet: bytes) -> None:
        """Protect and send one RTP packet now. Straight to the socket while asyncio's
        datagram transport has nothing waiting (its ``sendto`` does the same, with more
        Python around it); through the transport otherwise, or when the socket refuses
        (EAGAIN: the transport buffers it and waits for the socket; an error: it reports)."""
        data = self._protect(packet)
        transport = self._transport
        if not transport._buffer:
            try:
                self._socket.sendto(data, self._address)
                return
            except OSError:
                pass
        transport.sendto(data, self._address)

    def buffered_bytes(self) -> int:
        """Bytes waiting in the datagram transport because the socket would block (EAGAIN)."""
        return int(self._transport.get_write_buffer_size())

    async def send_rtp_through_aiortc(self, packet: bytes) -> None:
        """Send one packet the way aiortc does (for retransmissions, off the hot path)."""
        await self._dtls._send_rtp(packet)


# --- fixes that belong in the dependencies, applied at run time ------------------------------

#: What :func:`install` replaces, kept to check it is still what was patched.
_ORIGINAL_MAIN_LOOP_ONE: Final = BaseTrioEventLoop._main_loop_one
_ORIGINAL_RECEIVER_INIT: Final = RTCRtpReceiver.__init__
_ORIGINAL_GENERATE_CERTIFICATE: Final = RTCCertificate.__dict__["generateCertificate"]
_ORIGINAL_CREATE_SSL_CONTEXT: Final = RTCCertificate._create_ssl_context


def install() -> None:
    """Apply the three run-time fixes (idempotent); before the asyncio loop is opened.

    Raises:
        AiortcChanged: trio-asyncio or aiortc no longer has what is being replaced.
    """
    if not all(
        callable(f)
        for f in (
            _ORIGINAL_MAIN_LOOP_ONE,
            _ORIGINAL_RECEIVER_INIT,
            _ORIGINAL_GENERATE_CERTIFICATE.__func__,
            _ORIGINAL_CREATE_SSL_CONTEXT,
        )
    ) or not hasattr(_RECEIVER_MODULE, "RemoteBitrateEstimator"):
        raise AiortcChanged("trio-asyncio or aiortc moved what aiortc_compat.install replaces")
    BaseTrioEventLoop._main_loop_one = _main_loop_one
    RTCRtpReceiver.__init__ = _receiver_init  # type: ignore[method-assign]
    setattr(RTCCertificate, "generateCertificate", classmethod(_shared_certificate))  # noqa: B010
    RTCCertificate._create_ssl_context = _shared_ssl_context  # type: ignore[method-assign]


def uninstall() -> None:
    """Undo :func:`install` (for tests that compare with the stock behaviour)."""
    BaseTrioEventLoop._main_loop_one = _ORIGINAL_MAIN_LOOP_ONE
    RTCRtpReceiver.__init__ = _ORIGINAL_RECEIVER_INIT  # type: ignore[method-assign]
    setattr(RTCCertificate, "generateCertificate", _ORIGINAL_GENERATE_CERTIFICATE)  # noqa: B010
    RTCCertificate._create_ssl_context = _ORIGINAL_CREATE_SSL_CONTEXT  # type: ignore[method-assign]


async def _main_loop_one(self: Any, no_wait: bool = False) -> None:
    """trio-asyncio's ``BaseTrioEventLoop._main_loop_one``, running every callback that is
    ready when the round starts instead of one.

    Stock: take one item (a due timer, or the next queued handle), run it, return; the loop
    calls it again after a checkpoint, i.e. one asyncio callback per Trio scheduler round.
    Here: the same for the first item, then, without a checkpoint, the timers that are due and
    as many queued handles as were queued when the round began (callbacks those schedule wait
    for the next round, so Trio's other tasks are not starved). Order is kept: timers and
    handles are taken exactly as the stock loop would take them, only more per round.
    """
    budget = self._q_recv.statistics().current_buffer_used - 1  # the stock step takes one
    await _ORIGINAL_MAIN_LOOP_ONE(self, no_wait)
    if no_wait:  # the loop is closing: keep the stock one-by-one drain
        return
    while budget > 0:
        if self._timers and self._timers[0]._when <= self.time():
            handle = heapq.heappop(self._timers)
        else:
            try:
                handle = self._q_recv.receive_nowait()
            except trio.WouldBlock:
                return
            budget -= 1
            if isinstance(handle, asyncio.TimerHandle):
                heapq.heappush(self._timers, handle)
                continue
        if isinstance(handle, AsyncHandle):
            handle._context.run(self._nursery.start_soon, handle._run, name=handle._callback)
            await handle._started.wait()
        elif not handle._cancelled:
            previous, sniffio.thread_local.name = sniffio.thread_local.name, "asyncio"
            try:
                handle._run()
            finally:
                sniffio.thread_local.name = previous


class _LazyRemoteBitrateEstimator:
    """Stands in for a receiver's ``RemoteBitrateEstimator`` until RTP arrives (aiortc only
    calls its ``add``), so receivers that never receive, a server's, never build one."""

    __slots__ = ("_estimator",)

    def __init__(self) -> None:
        self._estimator: RemoteBitrateEstimator | None = None

    def add(
        self, arrival_time_ms: int, abs_send_time: int, payload_size: int, ssrc: int
    ) -> tuple[int, list[int]] | None:
        if self._estimator is None:
            self._estimator = RemoteBitrateEstimator()
        return self._estimator.add(arrival_time_ms, abs_send_time, payload_size, ssrc)


#: aiortc's receiver module, whose global ``RemoteBitrateEstimator`` its constructor calls.
_RECEIVER_MODULE: Final[Any] = aiortc.rtcrtpreceiver


def _receiver_init(self: Any, kind: str, transport: RTCDtlsTransport) -> None:
    """``RTCRtpReceiver.__init__``, with a lazy estimator in place of the real one."""
    _RECEIVER_MODULE.RemoteBitrateEstimator = _LazyRemoteBitrateEstimator
    try:
        _ORIGINAL_RECEIVER_INIT(self, kind, transport)
    finally:
        _RECEIVER_MODULE.RemoteBitrateEstimator = RemoteBitrateEstimator


#: Renewed this long before it expires (aiortc's certificates are valid for 30 days).
CERTIFICATE_RENEWAL: Final = datetime.timedelta(days=1)
_certificates: list[RTCCertificate] = []


def _shared_certificate(cls: type[RTCCertificate]) -> RTCCertificate:
    """The process's DTLS certificate, made on first use and renewed before it expires."""
    now = datetime.datetime.now(datetime.UTC)
    if not _certificates or _certificates[0].expires - now < CERTIFICATE_RENEWAL:
        _certificates[:] = [_ORIGINAL_GENERATE_CERTIFICATE.__func__(cls)]
    return _certificates[0]


def _shared_ssl_context(self: Any, srtp_profiles: list[Any]) -> Any:
    """One SSL context per certificate and SRTP profiles (OpenSSL contexts are shared by
    many connections; each DTLS transport still gets its own connection)."""
    contexts = self.__dict__.setdefault("_mediastream_ssl_contexts", {})
    key = tuple(p.openssl_profile for p in srtp_profiles)
    if key not in contexts:
        contexts[key] = _ORIGINAL_CREATE_SSL_CONTEXT(self, srtp_profiles)
    return contexts[key]
