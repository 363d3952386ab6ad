"""The direct RTP sender's pieces that stand alone: the header template, the clock, and
segmented sends (on a real loopback socket)."""

from __future__ import annotations

import socket
import types
from collections.abc import Iterator

import pytest
from aiortc import clock
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from mediastream.webrtc.bridge import DirectRtpSender, _ntp_time, _send_segmented

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


@pytest.fixture
def loopback() -> Iterator[tuple[socket.socket, socket.socket]]:
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.setblocking(False)
    yield receiver, sender
    receiver.close()
    sender.close()


class _Transport:
    """The two things of asyncio's datagram transport that segmented sends use."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def get_write_buffer_size(self) -> int:
        return 0


def test_a_frames_packets_go_out_in_one_call_and_arrive_as_separate_datagrams(
    loopback: tuple[socket.socket, socket.socket],
) -> None:
    receiver, sender = loopback
    packets = [bytes([n]) * 1100 for n in range(45)] + [b"last" * 50]  # two calls of <= 40
    assert _send_segmented(_Transport(sender), packets, receiver.getsockname())
    assert [receiver.recv(2000) for _ in packets] == packets


def test_packets_of_unequal_sizes_are_left_to_plain_sends(
    loopback: tuple[socket.socket, socket.socket],
) -> None:
    receiver, sender = loopback
    address = receiver.getsockname()
    assert not _send_segmented(_Transport(sender), [b"a" * 100, b"b" * 200, b"c"], address)
    assert not _send_segmented(_Transport(sender), [b"a" * 100, b"b" * 200], address)
    assert not _send_segmented(_Transport(sender), [b"only one"], address)
