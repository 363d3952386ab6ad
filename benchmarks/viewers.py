"""Load generator: N aiortc viewers of one stream, in this process, without decoding.

    python benchmarks/viewers.py WS_URL STREAM_ID COUNT [--sockets one|each]

Prints ``READY`` once every viewer's peer is connected, then answers each line on stdin
("stats") with one JSON line: packets received and lost, summed over viewers. Quits when
stdin closes. ``--sockets each`` (default) gives each viewer its own socket, as separate tabs
do; ``one`` puts them all on one socket (which needs one stream id per viewer: a socket has
one session per stream).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from typing import Any

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from trio_websocket import open_websocket_url


class _Counter:
    """What one viewer received: RTP packets counted, loss from sequence-number gaps."""

    def __init__(self) -> None:
        self.received = 0
        self.highest: int | None = None  # extended sequence number
        self.first: int | None = None

    def add(self, sequence_number: int) -> None:
        self.received += 1
        if self.highest is None:
            self.first = self.highest = sequence_number
            return
        # Extend the 16-bit number against the highest seen (RFC 3550 A.1, simplified).
        delta = (sequence_number - self.highest) & 0xFFFF
        if delta < 0x8000:
            self.highest += delta

    @property
    def expected(self) -> int:
        return 0 if self.highest is None or self.first is None else self.highest - self.first + 1


COUNTERS: list[_Counter] = []
#: Seconds from sending each offer to receiving its answer.
ANSWER_TIMES: list[float] = []


def _count_only(receiver: RTCRtpReceiver) -> None:
    """Make a viewer count its RTP packets and do nothing else with them: each is counted as
    the ICE connection receives it (the RTP header, sequence number included, is in the
    clear) and goes no further: no decryption, no parsing, no jitter buffer, no NACKs, no
    decoding, none of the asyncio tasks a packet otherwise wakes. The load generator then
    costs a fraction of a real viewer, so the machine's two cores measure the server, and
    lost packets stay lost (no retransmissions muddy the CPU figures). DTLS, STUN and RTCP
    take their usual way; the server's side is untouched."""
    counter = _Counter()
    COUNTERS.append(counter)
    connection: Any = receiver.transport.transport._connection  # aioice's, for this peer
    deliver = connection.data_received

    def count_or_deliver(data: bytes, component: int) -> None:
        # RTP and RTCP share the first byte's range; RTCP's packet types are 192-223.
        if 127 < data[0] < 192 and not 192 <= data[1] <= 223:
            counter.add((data[2] << 8) | data[3])
        else:
            deliver(data, component)

    connection.data_received = count_or_deliver


async def run_janus(api_url: str, count: int) -> None:
    """The same viewers, watching Janus's streaming mountpoint 1 (Janus offers, we answer)."""
    peers: list[RTCPeerConnection] = []
    async with trio_asyncio.open_loop():
        connected = trio.Semaphore(0)
        for _ in range(count):
            session = (await _janus(api_url, {"janus": "create"}))["data"]["id"]
            handle = (
                await _janus(
                    f"{api_url}/{session}",
                    {
                        "janus": "attach",
                        "plugin": "janus.plugin.streaming",
                    },
                )
            )["data"]["id"]
            await _janus(
                f"{api_url}/{session}/{handle}",
                {
                    "janus": "message",
                    "body": {"request": "watch", "id": 1},
                },
            )
            offer = None
            while offer is None:
                event = await _janus_poll(f"{api_url}/{session}")
                offer = event.get("jsep")
            pc = await _new_peer(peers, connected)
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=offer["sdp"], type="offer")
            )
            for transceiver in pc.getTransceivers():
                _count_only(transceiver.receiver)
            await trio_asyncio.aio_as_trio(pc.setLocalDescription)(
                await trio_asyncio.aio_as_trio(pc.createAnswer)()
            )
            await _janus(
                f"{api_url}/{session}/{handle}",
                {
                    "janus": "message",
                    "body": {"request": "start"},
                    "jsep": {"type": "answer", "sdp": pc.localDescription.sdp},
                },
            )
        with trio.fail_after(60):
            for _ in range(count):
                await connected.acquire()
        await _serve_stats(peers)
        await _close_all(peers)


async def _janus(url: str, body: dict[str, Any]) -> dict[str, Any]:
    body = {**body, "transaction": os.urandom(6).hex()}

    def post() -> dict[str, Any]:
        request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.loads(response.read()))

    reply = await trio.to_thread.run_sync(post)
    if reply.get("janus") == "error":
        raise SystemExit(f"Janus: {reply}")
    return reply


async def _janus_poll(url: str) -> dict[str, Any]:
    def get() -> dict[str, Any]:
        with urllib.request.urlopen(f"{url}?maxev=1", timeout=35) as response:
            return dict(json.loads(response.read()))

    return await trio.to_thread.run_sync(get)


async def _serve_stats(peers: list[RTCPeerConnection]) -> None:
    """Print READY, then one JSON line of stats per line read from stdin, until it closes."""
    print("READY", flush=True)
    stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
    buffer = b""
    while data := await stdin.receive_some():
        buffer += data
        while b"\n" in buffer:
            _, buffer = buffer.split(b"\n", 1)
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
            _count_only(transceiver.receiver)
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
            offers.append((connections[index % socket_count], pc, session, json.dumps(message)))
        sent: dict[str, float] = {}
        for ws, _, session, offer in offers:
            sent[session] = time.perf_counter()
            await ws.send_message(offer)
        for _, pc, session, _ in offers:
            arrived, box = answers[session]
            with trio.fail_after(60):
                await arrived.wait()
            answer_sdp, answered_at = box
            ANSWER_TIMES.append(answered_at - sent[session])
            await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
                RTCSessionDescription(sdp=answer_sdp, type="answer")
            )
        with trio.fail_after(120):
            for _ in range(count):
                await connected.acquire()
        await _serve_stats(peers)
        nursery.cancel_scope.cancel()


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


async def _stats(peers: list[RTCPeerConnection]) -> dict[str, int]:
    received = sum(c.received for c in COUNTERS)
    expected = sum(c.expected for c in COUNTERS)
    return {
        "packetsReceived": received,
        "packetsLost": max(0, expected - received),
        "answerSeconds": list(ANSWER_TIMES),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ws_url")
    parser.add_argument("stream_id")
    parser.add_argument("count", type=int)
    parser.add_argument("--sockets", choices=("one", "each"), default="each")
    parser.add_argument("--janus", action="store_true", help="WS_URL is Janus's HTTP API URL")
    args = parser.parse_args()
    if args.janus:
        trio.run(run_janus, args.ws_url, args.count)
    else:
        trio.run(run, args.ws_url, args.stream_id, args.count, args.sockets)


if __name__ == "__main__":
    main()
