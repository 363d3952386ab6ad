"""The direct RTP sender's pieces that stand alone: the header template and the clock."""

from __future__ import annotations

import types

from aiortc import clock
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from mediastream.webrtc.rtp_sender import DirectRtpSender, _ntp_time

MID = "urn:ietf:params:rtp-hdrext:sdes:mid"
ABS_SEND_TIME = "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time"


def header_owner(*uris: str) -> types.SimpleNamespace:
    extensions = HeaderExtensionsMap()
    extensions.configure(
        RTCRtpParameters(
            headerExtensions=[
                RTCRtpHeaderExtensionParameters(id=n, uri=uri) for n, uri in enumerate(uris, 1)
            ]
        )
    )
    return types.SimpleNamespace(_payload_type=102, _ssrc=1234, _mid="0", _extensions=extensions)


def test_the_header_template_finds_where_abs_send_time_goes() -> None:
    owner = header_owner(MID, ABS_SEND_TIME)
    header, at = DirectRtpSender._header_template(owner)  # type: ignore[arg-type]
    assert at is not None
    header[4:8] = (90000).to_bytes(4, "big")
    header[at : at + 3] = (0x123456).to_bytes(3, "big")
    packet = RtpPacket.parse(bytes(header) + b"payload", owner._extensions)
    assert (packet.timestamp, packet.ssrc, packet.payload_type) == (90000, 1234, 102)
    assert packet.extensions.abs_send_time == 0x123456
    assert packet.extensions.mid == "0"
    assert packet.payload == b"payload"


def test_without_abs_send_time_negotiated_there_is_nothing_to_patch() -> None:
    owner = header_owner(MID)
    header, at = DirectRtpSender._header_template(owner)  # type: ignore[arg-type]
    assert at is None
    assert RtpPacket.parse(bytes(header), owner._extensions).extensions.mid == "0"


def test_the_ntp_clock_agrees_with_aiortcs() -> None:
    ours, theirs = _ntp_time(), clock.current_ntp_time()
    assert abs(ours - theirs) < 0.05 * 2**32  # 50 ms: two calls, a busy machine
