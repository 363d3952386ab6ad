"""Load generator: N aiortc viewers of one stream, in this process, without decoding.

    python benchmarks/viewers.py WS_URL STREAM_ID COUNT [--sockets one|each] [--janus]
                                 [--silent] [--drop FRACTION]

Browser-like by default: each viewer sends the RTCP a browser sends (receiver reports with
loss and jitter, SDES and REMB every second; NACKs on sequence gaps); ``--silent`` makes the
old counting viewers, which send no RTCP at all. Prints ``OFFERS`` when its viewers are ready
to join and joins on the next line read from stdin (so that the viewers of several processes
join together); prints ``READY`` once every viewer's peer is connected, then answers each
further line ("stats") with one JSON line: packets received and lost, answer times, times to
the first complete keyframe, RTCP sent, summed over viewers. Quits when stdin closes.
``--sockets each`` (default) gives each viewer its own socket, as separate tabs do; ``one``
puts them all on one socket (which needs one stream id per viewer: a socket has
one session per stream).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import urllib.request
from typing import Any

import pylibsrtp
import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_RTPFB_NACK,
    RtcpPsfbPacket,
    RtcpReceiverInfo,
    RtcpRrPacket,
    RtcpRtpfbPacket,
    RtcpSdesPacket,
    RtcpSourceInfo,
    pack_remb_fci,
)
from trio_websocket import open_websocket_url


class _Viewer:
    """One viewer's side of its RTP stream: packets counted, loss from sequence-number gaps,
    and, unless silent, the RTCP a browser sends back (see :func:`_watch`)."""

    def __init__(self, receiver: RTCRtpReceiver, *, silent: bool, drop: float) -> None:
        self.receiver: Any = receiver  # aiortc internals: its RTCP SSRC, the SRs it saw
        self.silent = silent
        self.drop = drop  # fraction of packets thrown away on arrival (simulated loss)
        self.received = 0
        self.octets = 0
        self.highest: int | None = None  # extended sequence number
        self.first: int | None = None
        self.media_ssrc: int | None = None
        self.retransmissions = 0  # packets on another SSRC (RTX) after NACKs
        self.jitter = 0.0  # RFC 3550 interarrival jitter, in 90 kHz units
        self.last_transit: float | None = None
        self.nacks_sent = 0
        self.rtcp_sent = 0
        # what the last report covered (for its fraction lost)
        self.expected_prior = 0
        self.received_prior = 0
        self.octets_prior = 0
        self.reported_at = time.monotonic()
        # set by the joiners' round: when the offer (or Janus's "watch") went out, and when
        # the first complete keyframe arrived (packets are decrypted until then)
        self.requested_at: float | None = None
        self.keyframe_at: float | None = None
        self.frames: dict[int, _AccessUnit] = {}
        self.early: list[tuple[bytes, int]] = []

    @property
    def expected(self) -> int:
        return 0 if self.highest is None or self.first is None else self.highest - self.first + 1

    def on_rtp(self, data: bytes) -> None:
        if self.drop and random.random() < self.drop:
            return
        ssrc = int.from_bytes(data[8:12], "big")
        if self.media_ssrc is None:
            self.media_ssrc = ssrc
        elif ssrc != self.media_ssrc:
            self.retransmissions += 1
            return
        self.received += 1
        self.octets += len(data)
        sequence = (data[2] << 8) | data[3]
        if self.highest is None:
            self.first = self.highest = sequence
        else:
            # Extend the 16-bit number against the highest seen (RFC 3550 A.1, simplified).
            delta = (sequence - self.highest) & 0xFFFF
            if delta < 0x8000:
                if delta > 1 and not self.silent:
                    self._nack(range(self.highest + 1, self.highest + delta))
                self.highest += delta
        if self.silent:
            return
        # RFC 3550 6.4.1: jitter from the RTP timestamp and the arrival time.
        transit = time.monotonic() * 90_000 - int.from_bytes(data[4:8], "big")
        if self.last_transit is not None:
            self.jitter += (abs(transit - self.last_transit) - self.jitter) / 16
        self.last_transit = transit
        if self.keyframe_at is None and self.requested_at is not None:
            self._look_for_keyframe(data, sequence)

    def _nack(self, lost: range) -> None:
        """A browser NACKs a gap as soon as it sees it. (It asks again only if the packets
        have not come after a round trip; on loopback they have, so no retries here.)"""
        if len(lost) > 100:  # a jump, not a gap: a browser would ask for a keyframe
            return
        self._send(self._nack_packet(sorted(n & 0xFFFF for n in lost)))
        self.nacks_sent += 1

    def _nack_packet(self, lost: list[int]) -> bytes:
        assert self.media_ssrc is not None
        packet = RtcpRtpfbPacket(
            fmt=RTCP_RTPFB_NACK, ssrc=self._rtcp_ssrc(), media_ssrc=self.media_ssrc
        )
        packet.lost = lost
        return bytes(packet)

    def report(self) -> None:
        """One compound RTCP packet, as a browser sends about every second: a receiver report
        (loss, jitter, LSR/DLSR of the server's last sender report), SDES CNAME, REMB."""
        now = time.monotonic()
        ssrc = self._rtcp_ssrc()
        packets: list[Any] = []
        if self.media_ssrc is not None and self.highest is not None:
            expected = self.expected
            interval_expected = expected - self.expected_prior
            interval_lost = interval_expected - (self.received - self.received_prior)
            fraction = 0
            if interval_expected > 0 and interval_lost > 0:
                fraction = min(255, (interval_lost << 8) // interval_expected)
            lsr = self.receiver._RTCRtpReceiver__lsr.get(self.media_ssrc, 0)
            lsr_time = self.receiver._RTCRtpReceiver__lsr_time.get(self.media_ssrc)
            dlsr = int((time.time() - lsr_time) * 65536) if lsr_time else 0
            report = RtcpReceiverInfo(
                ssrc=self.media_ssrc,
                fraction_lost=fraction,
                packets_lost=max(0, expected - self.received),
                highest_sequence=self.highest & 0xFFFFFFFF,
                jitter=int(self.jitter),
                lsr=lsr,
                dlsr=dlsr,
            )
            packets.append(RtcpRrPacket(ssrc=ssrc, reports=[report]))
            packets.append(RtcpSdesPacket(chunks=[RtcpSourceInfo(ssrc, [(1, CNAME)])]))
            bitrate = 8 * (self.octets - self.octets_prior) / max(0.1, now - self.reported_at)
            remb = pack_remb_fci(max(300_000, int(1.5 * bitrate)), [self.media_ssrc])
            packets.append(RtcpPsfbPacket(fmt=RTCP_PSFB_APP, ssrc=ssrc, media_ssrc=0, fci=remb))
            self.expected_prior, self.received_prior = expected, self.received
            self.octets_prior, self.reported_at = self.octets, now
        else:
            packets.append(RtcpRrPacket(ssrc=ssrc))
        self._send(b"".join(bytes(p) for p in packets))

    def _rtcp_ssrc(self) -> int:
        return int(self.receiver._RTCRtpReceiver__rtcp_ssrc or 1)

    def _send(self, rtcp: bytes) -> None:
        """SRTCP-protect and send now, on the selected candidate pair: no asyncio task, no
        coroutine (what aiortc's ``_send_rtp`` does through four layers of them)."""
        dtls: Any = self.receiver.transport
        srtp = dtls._tx_srtp
        pair = dtls.transport._connection._nominated.get(1)
        if srtp is None or pair is None:
            return
        pair.protocol.transport.sendto(srtp.protect_rtcp(rtcp), pair.remote_addr)
        self.rtcp_sent += 1

    def _look_for_keyframe(self, data: bytes, sequence: int) -> None:
        """Decrypt until the first complete keyframe: every packet of an access unit with an
        IDR slice, from one that starts a NAL unit to the one with the marker bit. Packets
        that come before this peer has its SRTP keys wait for them (aiortc would drop them;
        a browser, the DTLS server here, has its keys before the server sends any)."""
        srtp = self.receiver.transport._rx_srtp
        if srtp is None:
            if len(self.early) < 1000:
                self.early.append((data, sequence))
            return
        if self.early:
            early, self.early = self.early, []
            for packet in early:
                self._look_for_keyframe(*packet)
        try:
            plain = srtp.unprotect(data)
        except pylibsrtp.Error:  # a replay: skip it
            return
        timestamp = int.from_bytes(plain[4:8], "big")
        unit = self.frames.setdefault(timestamp, _AccessUnit())
        unit.add(sequence, plain)
        if unit.complete() and self.keyframe_at is None:
            self.keyframe_at = time.perf_counter()
            self.frames.clear()


class _AccessUnit:
    """The packets of one RTP timestamp, as far as telling a complete keyframe needs."""

    def __init__(self) -> None:
        self.sequences: set[int] = set()
        self.first: int | None = None
        self.last: int | None = None  # the marker packet's
        self.starts_clean = False
        self.has_idr = False

    def add(self, sequence: int, packet: bytes) -> None:
        self.sequences.add(sequence)
        offset = 12 + 4 * (packet[0] & 0x0F)
        if packet[0] & 0x10:  # header extension
            offset += 4 + 4 * int.from_bytes(packet[offset + 2 : offset + 4], "big")
        payload = packet[offset:]
        nal_type = payload[0] & 0x1F
        starts_nal = True
        if nal_type == 28:  # FU-A
            starts_nal = bool(payload[1] & 0x80)
            self.has_idr |= payload[1] & 0x1F == 5
        elif nal_type == 24:  # STAP-A
            at = 1
            while at + 2 < len(payload):
                size = int.from_bytes(payload[at : at + 2], "big")
                self.has_idr |= payload[at + 2] & 0x1F == 5
                at += 2 + size
        else:
            self.has_idr |= nal_type == 5
        if self.first is None or (sequence - self.first) & 0xFFFF > 0x8000:
            self.first, self.starts_clean = sequence, starts_nal
        if packet[1] & 0x80:
            self.last = sequence

    def complete(self) -> bool:
        if not (self.has_idr and self.starts_clean) or self.first is None or self.last is None:
            return False
        return len(self.sequences) == ((self.last - self.first) & 0xFFFF) + 1


VIEWERS: list[_Viewer] = []
#: Seconds from sending each offer to receiving its answer.
ANSWER_TIMES: list[float] = []
CNAME = b"benchmark-viewer"
#: How the viewers behave: silent counters, or browser-like RTCP (set by ``main``).
OPTIONS: dict[str, Any] = {"silent": False, "drop": 0.0}


def _watch(receiver: RTCRtpReceiver) -> _Viewer:
    """Make a viewer handle its RTP the cheap way: each packet is looked at as the ICE
    connection receives it (the RTP header is in the clear) and goes no further: no
    decryption (except until the first keyframe of a joiners' round), no jitter buffer, no
    decoding, none of the asyncio tasks a packet otherwise wakes. The load generator then
    costs a fraction of a real viewer, so the machine's two cores measure the server.

    Unless ``--silent``, the viewer loads the server as a browser does: a receiver report
    with real loss and jitter, SDES and REMB every second (:func:`_report_every_second`),
    and a NACK as soon as it sees a sequence gap (``--drop`` makes gaps). Its RTCP is built
    with aiortc's classes and SRTCP-protected and sent directly. DTLS, STUN and the server's
    RTCP take their usual way through aiortc."""
    viewer = _Viewer(receiver, silent=OPTIONS["silent"], drop=OPTIONS["drop"])
    VIEWERS.append(viewer)
    connection: Any = receiver.transport.transport._connection  # aioice's, for this peer
    deliver = connection.data_received
    on_rtp = viewer.on_rtp

    def count_or_deliver(data: bytes, component: int) -> None:
        # RTP and RTCP share the first byte's range; RTCP's packet types are 192-223.
        if 127 < data[0] < 192 and not 192 <= data[1] <= 223:
            on_rtp(data)
        else:
            deliver(data, component)

    connection.data_received = count_or_deliver
    return viewer


async def _report_every_second() -> None:
    """Each viewer's RTCP report once a second, at a random phase of its own (a browser
    sends video receiver reports about every second)."""
    if OPTIONS["silent"]:
        return
    due = {id(v): time.monotonic() + random.random() for v in VIEWERS}
    while True:
        now = time.monotonic()
        for viewer in VIEWERS:
            if due.setdefault(id(viewer), now + random.random()) <= now:
                due[id(viewer)] += 1.0
                viewer.report()
        await trio.sleep(max(0.005, min(due.values(), default=now + 1) - time.monotonic()))


async def run_janus(api_url: str, count: int) -> None:
    """The same viewers, watching Janus's streaming mountpoint 1 (Janus offers, we answer).

    Joining together, as the MediaStream viewers do: sessions, handles and peer connections
    are made first; then every viewer sends its "watch" at once, takes Janus's offer, answers
    and sends "start". "Answer seconds" is watch sent → Janus's offer received (its side of
    the negotiation; the answer is ours)."""
    peers: list[RTCPeerConnection] = []
    limiter = trio.CapacityLimiter(count + 8)  # every long poll its own thread
    async with trio_asyncio.open_loop(), trio.open_nursery() as nursery:
        connected = trio.Semaphore(0)
        handles = []
        for _ in range(count):
            session = (await _janus(api_url, {"janus": "create"}, limiter))["data"]["id"]
            attach = {"janus": "attach", "plugin": "janus.plugin.streaming"}
            handle = (await _janus(f"{api_url}/{session}", attach, limiter))["data"]["id"]
            handles.append((session, handle, await _new_peer(peers, connected)))
        await _ready_to_join()
        nursery.start_soon(_report_every_second)
        async with trio.open_nursery() as joining:
            for session, handle, pc in handles:
                joining.start_soon(_janus_join, api_url, session, handle, pc, limiter)
        with trio.fail_after(60):
            for _ in range(count):
                await connected.acquire()
        await _serve_stats(peers)
        nursery.cancel_scope.cancel()
        await _close_all(peers)


async def _janus_join(
    api_url: str, session: int, handle: int, pc: RTCPeerConnection, limiter: trio.CapacityLimiter
) -> None:
    watch = {"janus": "message", "body": {"request": "watch", "id": 1}}
    requested = time.perf_counter()
    await _janus(f"{api_url}/{session}/{handle}", watch, limiter)
    offer = None
    while offer is None:
        event = await _janus_poll(f"{api_url}/{session}", limiter)
        offer = event.get("jsep")
    ANSWER_TIMES.append(time.perf_counter() - requested)
    await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
        RTCSessionDescription(sdp=offer["sdp"], type="offer")
    )
    for transceiver in pc.getTransceivers():
        _watch(transceiver.receiver).requested_at = requested
    await trio_asyncio.aio_as_trio(pc.setLocalDescription)(
        await trio_asyncio.aio_as_trio(pc.createAnswer)()
    )
    start = {
        "janus": "message",
        "body": {"request": "start"},
        "jsep": {"type": "answer", "sdp": pc.localDescription.sdp},
    }
    await _janus(f"{api_url}/{session}/{handle}", start, limiter)


async def _janus(url: str, body: dict[str, Any], limiter: trio.CapacityLimiter) -> dict[str, Any]:
    body = {**body, "transaction": os.urandom(6).hex()}

    def post() -> dict[str, Any]:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    reply = await trio.to_thread.run_sync(post, limiter=limiter)
    if reply.get("janus") == "error":
        raise SystemExit(f"Janus: {reply}")
    return reply


async def _janus_poll(url: str, limiter: trio.CapacityLimiter) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"{url}?maxev=1", timeout=35) as response:
            return dict(json.loads(response.read()))

    return await trio.to_thread.run_sync(get, limiter=limiter)


class _Lines:
    """Lines from stdin, for the process that drives the viewers."""

    def __init__(self) -> None:
        self._stream = trio.lowlevel.FdStream(sys.stdin.fileno())
        self._buffer = b""

    async def next(self) -> str | None:
        """The next line, or None once stdin is closed."""
        while b"\n" not in self._buffer:
            data = await self._stream.receive_some()
            if not data:
                return None
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()


STDIN: list[_Lines] = []


def _stdin() -> _Lines:
    if not STDIN:
        STDIN.append(_Lines())
    return STDIN[0]


async def _ready_to_join() -> None:
    """Print OFFERS when every viewer is ready to join, and wait for a line saying go: the
    driver then starts the viewers of all its processes at the same moment."""
    print("OFFERS", flush=True)
    if await _stdin().next() is None:
        raise SystemExit("stdin closed before the viewers joined")


async def _serve_stats(peers: list[RTCPeerConnection]) -> None:
    """Print READY, then one JSON line of stats per line read from stdin, until it closes."""
    print("READY", flush=True)
    while await _stdin().next() is not None:
        print(json.dumps(await _stats(peers)), flush=True)


async def run(ws_url: str, stream_id: str, count: int, sockets: str) -> None:
    """``count`` viewers join at once: every offer is made first, then all are sent together
    (as a camera wall connecting its tiles), then the answers are applied as they come."""
    peers: list[RTCPeerConnection] = []
    socket_count = 1 if sockets == "one" else count
    async with trio_asyncio.open_loop():
        try:
            await _run_viewers(ws_url, stream_id, count, socket_count, peers)
        finally:
            # After the sockets: a peer closed first would be reported by the server as an error.
            await _close_all(peers)


async def _close_all(peers: list[RTCPeerConnection]) -> None:
    with trio.CancelScope(shield=True):
        for pc in peers:
            await trio_asyncio.aio_as_trio(pc.close)()


async def _run_viewers(
    ws_url: str, stream_id: str, count: int, socket_count: int, peers: list[RTCPeerConnection]
) -> None:
    async with trio.open_nursery() as nursery:
        answers: dict[str, tuple[trio.Event, list[Any]]] = {}
        connections = [
            await nursery.start(_open_socket, ws_url, answers) for _ in range(socket_count)
        ]
        connected = trio.Semaphore(0)
        offers = []
        for index in range(count):
            pc = await _new_peer(peers, connected)
            transceiver = pc.addTransceiver("video", direction="recvonly")
            viewer = _watch(transceiver.receiver)
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(
                await trio_asyncio.aio_as_trio(pc.createOffer)()
            )
            session = f"v{index}"
            answers[session] = (trio.Event(), [])
            message = {
                "type": "offer",
                "streamId": stream_id.format(i=index),
                "payload": {"sdp": pc.localDescription.sdp, "sessionId": session},
            }
            offers.append(
                (connections[index % socket_count], pc, session, json.dumps(message), viewer)
            )
        await _ready_to_join()
        nursery.start_soon(_report_every_second)
        async with trio.open_nursery() as answering:
            for ws, pc, session, offer, viewer in offers:
                viewer.requested_at = time.perf_counter()
                await ws.send_message(offer)
                answering.start_soon(_take_answer, pc, answers[session], viewer.requested_at)
        with trio.fail_after(120):
            for _ in range(count):
                await connected.acquire()
        await _serve_stats(peers)
        nursery.cancel_scope.cancel()


async def _take_answer(
    pc: RTCPeerConnection, answer: tuple[trio.Event, list[Any]], sent_at: float
) -> None:
    arrived, box = answer
    with trio.fail_after(60):
        await arrived.wait()
    answer_sdp, answered_at = box
    ANSWER_TIMES.append(answered_at - sent_at)
    await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
        RTCSessionDescription(sdp=answer_sdp, type="answer")
    )


async def _open_socket(
    ws_url: str,
    answers: dict[str, tuple[trio.Event, list[Any]]],
    task_status: trio.TaskStatus[Any],
) -> None:
    async with open_websocket_url(ws_url, max_message_size=2**22) as ws:
        task_status.started(ws)
        while True:
            message = json.loads(await ws.get_message())
            if message["type"] == "answer":
                arrived, box = answers[message["sessionId"]]
                box.extend([message["payload"], time.perf_counter()])
                arrived.set()
            elif message["type"] == "error":
                raise SystemExit(f"server error: {message}")


async def _new_peer(peers: list[RTCPeerConnection], connected: trio.Semaphore) -> RTCPeerConnection:
    """A viewer's peer connection, kept in ``peers``; ``connected`` is released once it is."""
    pc = await trio_asyncio.aio_as_trio(_make_pc)()
    peers.append(pc)

    @pc.on("connectionstatechange")
    def _state() -> None:
        if pc.connectionState == "connected":
            connected.release()

    return pc


async def _make_pc() -> RTCPeerConnection:
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


async def _stats(peers: list[RTCPeerConnection]) -> dict[str, Any]:
    received = sum(v.received for v in VIEWERS)
    expected = sum(v.expected for v in VIEWERS)
    return {
        "packetsReceived": received,
        "packetsLost": max(0, expected - received),
        "answerSeconds": list(ANSWER_TIMES),
        "keyframeSeconds": [
            v.keyframe_at - v.requested_at
            for v in VIEWERS
            if v.keyframe_at is not None and v.requested_at is not None
        ],
        "rtcpSent": sum(v.rtcp_sent for v in VIEWERS),
        "nacksSent": sum(v.nacks_sent for v in VIEWERS),
        "retransmissionsReceived": sum(v.retransmissions for v in VIEWERS),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ws_url")
    parser.add_argument("stream_id")
    parser.add_argument("count", type=int)
    parser.add_argument("--sockets", choices=("one", "each"), default="each")
    parser.add_argument("--janus", action="store_true", help="WS_URL is Janus's HTTP API URL")
    parser.add_argument(
        "--silent", action="store_true", help="count packets only, send no RTCP (the old viewers)"
    )
    parser.add_argument(
        "--drop", type=float, default=0.0, help="fraction of packets to lose on arrival (NACKed)"
    )
    args = parser.parse_args()
    OPTIONS.update(silent=args.silent, drop=args.drop)
    if args.janus:
        trio.run(run_janus, args.ws_url, args.count)
    else:
        trio.run(run, args.ws_url, args.stream_id, args.count, args.sockets)


if __name__ == "__main__":
    main()
