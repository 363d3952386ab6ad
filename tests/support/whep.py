"""A WHEP player for tests: a real aiortc peer that POSTs its offer over plain HTTP.

player = await WhepPlayer.create()
response = await player.offer(server.url + "/whep/demo-1")
await player.accept(response)
await player.wait_frames(5)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from support.http import HttpResponse, request

_CANDIDATE_LINE = re.compile(r"^a=candidate:.*\r\n", re.M)


@dataclass
class WhepPlayer:
    pc: RTCPeerConnection
    #: the offer as sent (without candidates when trickling)
    sdp: str = ""
    #: the local candidates, as ``a=candidate:…`` lines, for a trickle PATCH
    candidates: list[str] = field(default_factory=list)
    frames: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    async def create(cls) -> WhepPlayer:
        async def make() -> RTCPeerConnection:
            # No STUN: these machines have no internet, and gathering would wait for it.
            return RTCPeerConnection(RTCConfiguration(iceServers=[]))

        pc = await trio_asyncio.aio_as_trio(make)()
        pc.addTransceiver("video", direction="recvonly")
        offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
        await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
        return cls(pc, sdp=pc.localDescription.sdp)

    def strip_candidates(self) -> None:
        """Send the offer without candidates, as a browser that trickles does."""
        self.candidates = [line.strip() for line in _CANDIDATE_LINE.findall(self.sdp)]
        self.sdp = _CANDIDATE_LINE.sub("", self.sdp).replace("a=end-of-candidates\r\n", "")

    def trickle_fragment(self) -> str:
        """An RFC 8840 fragment with this peer's credentials and candidates."""
        ufrag = re.search(r"a=ice-ufrag:(\S+)", self.sdp)
        pwd = re.search(r"a=ice-pwd:(\S+)", self.sdp)
        assert ufrag and pwd
        return (
            f"a=ice-ufrag:{ufrag.group(1)}\r\na=ice-pwd:{pwd.group(1)}\r\n"
            "m=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n"
            + "".join(f"{line}\r\n" for line in self.candidates)
            + "a=end-of-candidates\r\n"
        )

    async def offer(self, url: str, *, token: str | None = None, **kwargs: Any) -> HttpResponse:
        headers = {"Content-Type": "application/sdp"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await request(
            url, method="POST", headers=headers, body=self.sdp.encode(), timeout=30, **kwargs
        )

    async def accept(self, response: HttpResponse, nursery: trio.Nursery) -> None:
        """Apply the server's answer and start decoding the video."""
        answer = RTCSessionDescription(sdp=response.body.decode(), type="answer")
        await trio_asyncio.aio_as_trio(self.pc.setRemoteDescription)(answer)
        track = self.pc.getTransceivers()[0].receiver.track
        nursery.start_soon(self._decode, track)

    async def _decode(self, track: Any) -> None:
        try:
            while True:
                await trio_asyncio.aio_as_trio(track.recv)()
                self.frames += 1
                self._changed.set()
                self._changed = trio.Event()
        except MediaStreamError:
            pass

    async def wait_frames(self, count: int, *, timeout: float = 20) -> None:
        """Wait until ``count`` more frames than now were decoded."""
        target = self.frames + count
        with trio.fail_after(timeout):
            while self.frames < target:
                await self._changed.wait()

    async def close(self) -> None:
        with trio.CancelScope(shield=True):
            await trio_asyncio.aio_as_trio(self.pc.close)()
