"""What ``aiortc_compat`` relies on inside aiortc: if an upgrade moves it, this names it."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.rate import RemoteBitrateEstimator
from aiortc.rtcdtlstransport import RTCCertificate

from mediastream.webrtc import aiortc_compat


async def test_aiortc_still_has_every_internal_the_direct_send_path_uses(aio_loop: None) -> None:
    missing = await trio_asyncio.aio_as_trio(aiortc_compat.missing_internals)()
    assert missing == [], (
        f"aiortc moved internals that webrtc/aiortc_compat.py uses: {', '.join(missing)}. "
        "Adapt aiortc_compat.py to the new aiortc, or keep the pinned version."
    )


def test_h264_is_cut_into_rtp_payloads_as_aiortc_cuts_it() -> None:
    small, large = b"\x65" + b"\x01" * 100, b"\x65" + b"\x02" * 3000
    [single] = aiortc_compat.packetize_h264([small])
    assert single == small  # one NAL unit that fits: sent as it is
    fragments = aiortc_compat.packetize_h264([large])
    assert len(fragments) == 3 and all(f[0] & 0x1F == 28 for f in fragments)  # FU-A


# --- the run-time fixes to trio-asyncio and aiortc (aiortc_compat.install) --------------------


@pytest.fixture
def stock_then_fixed() -> Iterator[None]:
    """Stock trio-asyncio and aiortc for the test's first part; the fixes installed after
    (they stay installed: every server of the test session installs them)."""
    aiortc_compat.uninstall()
    try:
        yield
    finally:
        aiortc_compat.install()


async def _rounds_to_run(loop: Any, callbacks: int) -> int:
    """Trio scheduler rounds (checkpoints of this task) until ``callbacks`` asyncio callbacks
    queued at once have all run."""
    ran: list[int] = []
    for index in range(callbacks):
        loop.call_soon(ran.append, index)
    rounds = 0
    while len(ran) < callbacks:
        await trio.lowlevel.checkpoint()
        rounds += 1
    assert ran == list(range(callbacks)), "callbacks ran out of order"
    return rounds


async def test_trio_asyncio_runs_every_ready_callback_in_one_trio_round(
    stock_then_fixed: None,
) -> None:
    async with trio_asyncio.open_loop() as loop:
        stock = await _rounds_to_run(loop, 50)
        aiortc_compat.install()
        fixed = await _rounds_to_run(loop, 50)
    assert stock >= 40, f"stock trio-asyncio ran 50 callbacks in {stock} rounds: fixed upstream?"
    assert fixed <= 3, f"50 ready callbacks took {fixed} Trio rounds with the fix"


async def test_trio_asyncio_fix_keeps_callbacks_scheduled_by_callbacks_for_the_next_round(
    aio_loop: None,
) -> None:
    aiortc_compat.install()
    loop = asyncio.get_event_loop()
    order: list[str] = []

    def first() -> None:
        order.append("first")
        loop.call_soon(order.append, "scheduled by first")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    while len(order) < 3:
        await trio.lowlevel.checkpoint()
    assert order == ["first", "second", "scheduled by first"]


def test_a_receiver_builds_its_bandwidth_estimator_only_when_rtp_arrives() -> None:
    aiortc_compat.install()
    lazy = aiortc_compat._LazyRemoteBitrateEstimator()
    real = RemoteBitrateEstimator()
    assert lazy._estimator is None  # what a server's send-only receiver keeps: nothing
    for n in range(200):  # 40 ms of 1 200-byte packets every 1 ms, abs-send-time ticking
        arrival, send_time = 1_000 + n, (n * 262) & 0xFFFFFF
        assert lazy.add(arrival, send_time, 1_200, 1234) == real.add(
            arrival, send_time, 1_200, 1234
        )
    assert isinstance(lazy._estimator, RemoteBitrateEstimator)


async def test_receivers_get_the_lazy_estimator_and_peers_share_one_certificate(
    aio_loop: None,
) -> None:
    aiortc_compat.install()

    async def two_peers() -> list[RTCPeerConnection]:
        return [RTCPeerConnection(RTCConfiguration(iceServers=[])) for _ in range(2)]

    first, second = await trio_asyncio.aio_as_trio(two_peers)()
    try:
        receiver: Any = first.addTransceiver("video", direction="sendonly").receiver
        estimator = receiver._RTCRtpReceiver__remote_bitrate_estimator
        assert isinstance(estimator, aiortc_compat._LazyRemoteBitrateEstimator)
        assert estimator._estimator is None
        fingerprints = [_fingerprint(pc) for pc in (first, second)]
        assert fingerprints[0] == fingerprints[1]
        # ...and DTLS still works between two peers with that one certificate and context.
        channel = first.createDataChannel("check")
        opened = trio.Event()
        channel.on("open", opened.set)
        await trio_asyncio.aio_as_trio(_connect)(first, second)
        with trio.fail_after(20):
            await opened.wait()
    finally:
        for pc in (first, second):
            await trio_asyncio.aio_as_trio(pc.close)()


def _fingerprint(pc: RTCPeerConnection) -> str:
    internals: Any = pc
    [certificate] = internals._RTCPeerConnection__certificates
    return str(certificate.getFingerprints()[0].value)


async def _connect(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


def test_the_shared_certificate_is_renewed_before_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    aiortc_compat.install()
    first = RTCCertificate.generateCertificate()
    assert RTCCertificate.generateCertificate() is first
    monkeypatch.setattr(aiortc_compat, "CERTIFICATE_RENEWAL", datetime.timedelta(days=365))
    renewed = RTCCertificate.generateCertificate()
    assert renewed is not first and renewed.expires > datetime.datetime.now(datetime.UTC)


# --- a page's shared peer connection: the renegotiation traps ---------------------------------

OFFER_WITH_A_STOPPED_LINE = (
    "v=0\r\no=- 1 3 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 2\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=inactive\r\n"
    "m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=inactive\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=recvonly\r\n"
    "m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=bundle-only\r\na=recvonly\r\n"
)
ANSWER_AS_AIORTC_MAKES_IT = (
    "v=0\r\no=- 2 2 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1 2 3\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:0\r\na=inactive\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=sendonly\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=sendonly\r\n"
)


def test_media_sections_tell_stopped_lines_from_bundle_only_ones() -> None:
    sections = aiortc_compat.media_sections(OFFER_WITH_A_STOPPED_LINE)
    assert [(s.index, s.mid, s.rejected, s.inactive) for s in sections] == [
        (0, "0", False, True),
        (1, "1", True, True),
        (2, "2", False, False),
        (3, "3", False, False),  # port 0, but bundle-only: alive
    ]


def test_a_stopped_line_is_answered_stopped_and_out_of_bundle() -> None:
    answer = aiortc_compat.reject_stopped_sections(
        ANSWER_AS_AIORTC_MAKES_IT, OFFER_WITH_A_STOPPED_LINE
    )
    assert "a=group:BUNDLE 0 2 3\r\n" in answer
    assert "m=video 0 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=inactive\r\n" in answer
    # The others are left as they were.
    assert "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:2\r\na=sendonly\r\n" in answer
    assert "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:3\r\na=sendonly\r\n" in answer
    assert (
        aiortc_compat.reject_stopped_sections(ANSWER_AS_AIORTC_MAKES_IT, ANSWER_AS_AIORTC_MAKES_IT)
        == ANSWER_AS_AIORTC_MAKES_IT
    )


async def _recycled_mid_goes_to(forget: bool) -> tuple[str | None, str | None, str]:
    """A browser-like offerer recycles m-line 1 (mid 1 stopped, then mid 2 in its place):
    which transceiver does aiortc give mid 2, the dead one or the new one?"""
    offerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    answerer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        for _ in range(2):
            offerer.addTransceiver("video", direction="recvonly")
            answerer.addTransceiver("video", direction="sendonly")
        await offerer.setLocalDescription(await offerer.createOffer())
        first_offer = offerer.localDescription.sdp
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        dead = answerer.getTransceivers()[1]
        assert dead.mid == "1"
        # The m-line recycled by the browser: same index, a new mid.
        recycled = first_offer.replace("a=mid:1\r\n", "a=mid:2\r\n").replace(
            "a=group:BUNDLE 0 1", "a=group:BUNDLE 0 2"
        )
        await dead.stop()
        if forget:
            assert aiortc_compat.forget_unoffered_transceivers(answerer, {"0", "2"}) == 1
        fresh = answerer.addTransceiver("video", direction="sendonly")
        await answerer.setRemoteDescription(RTCSessionDescription(sdp=recycled, type="offer"))
        await answerer.setLocalDescription(await answerer.createAnswer())
        return dead.mid, fresh.mid, answerer.localDescription.sdp
    finally:
        await offerer.close()
        await answerer.close()


async def test_a_recycled_mid_goes_to_the_new_transceiver_only(aio_loop: None) -> None:
    stock_dead, _, _ = await trio_asyncio.aio_as_trio(_recycled_mid_goes_to)(False)
    # The trap (if this fails, aiortc fixed it and the workaround may go).
    assert stock_dead == "2"
    dead, fresh, answer = await trio_asyncio.aio_as_trio(_recycled_mid_goes_to)(True)
    assert (dead, fresh) == ("1", "2")
    assert answer.count("a=mid:2\r\n") == 1
