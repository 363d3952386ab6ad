"""One viewer's RTP, sent straight from the fan-out.

aiortc's sender would take each frame through its own task (a wake-up, a ``recv`` and a
packetizer per frame and viewer). Instead the viewer's :class:`~mediastream.media.fanout.
Subscriber` calls :meth:`DirectRtpSender.send` synchronously as frames are published: per
packet there remain a copied RTP header with its sequence number and marker, SRTP protection
and the ``sendto``. aiortc keeps doing RTCP (sender reports read the counters updated here) and
NACKs (served from this history). The aiortc internals it needs come from ``aiortc_compat``.
"""

from __future__ import annotations

import time
from typing import Final

from aiortc import RTCRtpSender
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.rtp import RtpPacket, wrap_rtx
from aiortc.utils import random16, random32

from ..media.fanout import ContinuousTimestamps
from ..media.frames import EncodedFrame
from .aiortc_compat import SenderInternals, SrtpSocket

RTP_HISTORY_SIZE: Final = 128  # packets kept for NACKs, as aiortc
_NTP_EPOCH_OFFSET: Final = 2_208_988_800  # seconds from 1900 (NTP) to 1970 (Unix)


class DirectRtpSender:
    """Sends one viewer's frames of one track as RTP (a :class:`~mediastream.media.fanout.
    Transport` for its subscriber).

    Args:
        timestamps: the viewer's timestamps of this track (its subscriber's), which stay
            continuous when the viewer moves to another quality; a fresh one when omitted.

    Raises:
        AiortcChanged: aiortc's sender no longer has the state this relies on.
    """

    def __init__(
        self,
        sender: RTCRtpSender,
        parameters: RTCRtpSendParameters,
        timestamps: ContinuousTimestamps | None = None,
    ) -> None:
        self._internals = SenderInternals(sender)
        self._dtls = sender.transport
        payload_type = parameters.codecs[0].payloadType
        if payload_type is None:
            raise RuntimeError("aiortc started a sender without a payload type")
        self._payload_type: int = payload_type
        self._timestamps = timestamps or ContinuousTimestamps()
        self._timestamps.clock_rate = parameters.codecs[0].clockRate
        self._mid = parameters.muxId
        identity = self._internals.identity
        self._ssrc = identity.ssrc
        self._rtx_ssrc = identity.rtx_ssrc
        self._extensions = identity.header_extensions
        self._sequence = random16() % 32768  # as aiortc: far from wrapping, for SRTP
        self._timestamp_origin = random32()
        self._history: dict[int, bytes] = {}
        #: the socket the last frame went out on (its buffer says whether it is full)
        self._last_socket: SrtpSocket | None = None
        # The header is made once; each frame patches its timestamp and send time into it.
        self._header, self._send_time_at = self._header_template()
        self._internals.answer_nacks_with(self._retransmit)

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

    def ready(self) -> bool:
        """Whether the socket takes a frame now: nothing of earlier frames is still waiting in
        the buffer of the socket they went out on (it returned EAGAIN). Cheap on purpose: it
        runs before every frame; :meth:`send` checks the socket is still the way out."""
        return self._last_socket is None or self._last_socket.buffered_bytes() == 0

    def send(self, frame: EncodedFrame) -> None:
        """Send one frame now. Raises ConnectionError once the transport is gone."""
        # Checked per frame: ICE may nominate another pair, DTLS may close (then this raises
        # ConnectionError).
        socket = self._last_socket = SrtpSocket.of(self._dtls, self._last_socket)
        timestamp = (self._timestamp_origin + self._timestamps.place(frame.timestamp)) & 0xFFFFFFFF
        ntp_now = _ntp_time()
        header = self._header
        header[4:8] = timestamp.to_bytes(4, "big")
        if (at := self._send_time_at) is not None:
            header[at : at + 3] = ((ntp_now >> 14) & 0xFFFFFF).to_bytes(3, "big")
        send = socket.send
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
        self._internals.count_sent(ntp_now, timestamp, len(frame.payloads), octets)

    async def _retransmit(self, sequence_number: int) -> None:
        raw = self._history.get(sequence_number % RTP_HISTORY_SIZE)
        if raw is None or int.from_bytes(raw[2:4], "big") != sequence_number:
            return
        packet = RtpPacket.parse(raw, self._extensions)
        rtx = self._internals.next_rtx()
        if rtx is not None:
            payload_type, rtx_sequence = rtx
            packet = wrap_rtx(
                packet, payload_type=payload_type, sequence_number=rtx_sequence, ssrc=self._rtx_ssrc
            )
        await SrtpSocket(self._dtls).send_rtp_through_aiortc(packet.serialize(self._extensions))


def _ntp_time() -> int:
    """Now as a 64-bit NTP timestamp, as aiortc's clock gives it, without its datetimes."""
    return int((time.time() + _NTP_EPOCH_OFFSET) * (1 << 32))
