"""A viewer whose socket really can't keep up: a link slower than the stream, not a fake.

The slow viewer is a separate process in a network namespace behind a 200 kbit/s veth whose
shaper queues instead of dropping (``support/netns.py``); the stream is ~1.5 Mbit/s. What the
server sends it piles up in the shaper, charged to the server's UDP socket, until the socket's
send buffer is full and ``sendto`` returns EAGAIN. That backpressure must feed the same
drop-to-keyframe policy as a slow catch-up (the slow viewer loses whole GOP tails and keeps
decoding clean pictures from keyframes) and must not touch anybody else (a viewer on loopback
of the same stream loses nothing).

Keep the congested part short: the link queues ~4 s of media (the socket's ~210 KB send
buffer at 200 kbit/s), so ICE consent checks, which aioice gives 0.5 s, fail in both
directions while it is full, and after six of them (~30-36 s) the connection is closed.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from mediastream.media.fanout import SubscriberStatistics
from mediastream.server import RunningServer
from mediastream.session import StreamSession

from support.netns import NetnsUnavailable, SlowLink, slow_link
from support.servers import StartServer, make_config, wait_published
from support.viewer import open_viewer

SLOW_VIEWER = Path(__file__).parents[1] / "support" / "slow_viewer.py"
LINK_KBIT = 200
#: ~7x the link; a keyframe every second, so a slow viewer has a keyframe to resume from often.
STREAM = {
    "id": "cam",
    "source": "pattern:testsrc2?size=640x360&fps=25&kbps=1500&gop=25",
    "on_demand": False,
}


@pytest.fixture
def link() -> Iterator[SlowLink]:
    with ExitStack() as stack:
        try:
            made = stack.enter_context(slow_link(rate_kbit=LINK_KBIT))
        except NetnsUnavailable as exc:
            pytest.skip(f"no network namespace for a slow link: {exc}")
        yield made


@dataclass
class SlowViewer:
    """The viewer process in the namespace, as its status lines describe it."""

    process: trio.Process
    status: dict[str, Any] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                self.status = json.loads(line)
                self.changed.set()
                self.changed = trio.Event()

    async def wait_until(self, condition: Any, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while not condition(self.status):
                if self.process.poll() is not None:
                    raise AssertionError(f"slow viewer exited: {self.process.returncode}")
                await self.changed.wait()

    def get(self, key: str) -> int:
        return int(self.status.get(key, 0))


@dataclass(frozen=True)
class SocketMemory:
    """One UDP socket's kernel memory (``ss -m``): bytes charged for sending, and its limit."""

    local: str
    charged: int  # sk_wmem_alloc: datagrams handed to the kernel and not yet transmitted
    limit: int  # sk_sndbuf: sendto returns EAGAIN once the charge reaches it

    @property
    def fill(self) -> float:
        return self.charged / self.limit


def udp_sockets(address: str) -> list[SocketMemory]:
    """The UDP sockets bound to ``address`` (the server's ICE sockets on the veth among them)."""
    text = subprocess.run(
        ["ss", "-uanmH", "src", address], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return [
        SocketMemory(local, int(charged), int(limit))
        for local, charged, limit in re.findall(
            r"(\S+:\d+)\s+\S+\s*\n?\s*skmem:\(r\d+,rb\d+,t(\d+),tb(\d+)", text
        )
    ]


def session_from(server: RunningServer, client: str) -> StreamSession:
    (session,) = [
        s
        for c in server.services.hub._connections
        if c.label.startswith(f"{client} ")
        for s in c.sessions.values()
    ]
    return session


def queue_of(session: StreamSession) -> SubscriberStatistics:
    statistics = session.subscriber_statistics()
    assert statistics is not None
    return statistics


async def test_a_viewer_whose_link_cannot_keep_up_drops_to_keyframes_alone(
    start_server: StartServer, link: SlowLink
) -> None:
    # Bound to the veth's root-side address: reachable from the namespace, and from here
    # (local traffic, which never crosses the veth or its shaper).
    config = make_config([STREAM], server={"host": link.host_address})
    server = await start_server(config)
    stream = server.services.registry.get("cam")
    assert stream is not None

    async with open_viewer(server.ws_url) as viewer:
        fast = await viewer.play("cam")
        await fast.wait_frames(10, timeout=30)
        fast_session = session_from(server, link.host_address)

        command = link.exec_command(sys.executable, str(SLOW_VIEWER), server.ws_url, "cam")
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        slow = SlowViewer(process)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow.read)
                fullest: list[SocketMemory] = []

                async def watch_sockets() -> None:
                    # The fullest server socket on the veth, sampled: its send buffer full is
                    # what makes sendto return EAGAIN.
                    while True:
                        sockets = await trio.to_thread.run_sync(udp_sockets, link.host_address)
                        top = max(sockets, key=lambda s: s.fill, default=None)
                        if top is not None and (not fullest or top.fill > fullest[0].fill):
                            fullest[:] = [top]
                        await trio.sleep(0.1)

                nursery.start_soon(watch_sockets)

                await slow.wait_until(lambda s: s.get("frames", 0) > 0, timeout=40)
                slow_session = session_from(server, link.peer_address)
                published_before = stream.fanout.statistics().published_frames
                fast_before = fast.frames

                # Backpressure turns into drops for the slow viewer...
                await wait_published(
                    stream, lambda: queue_of(slow_session).dropped_frames > 0, timeout=30
                )
                # ...and it goes on decoding: it resumes at keyframes, more than once.
                keyframes, frames = slow.get("keyframes"), slow.get("frames")
                await slow.wait_until(
                    lambda s: s["keyframes"] >= keyframes + 3 and s["frames"] > frames + 3
                )
                slow_queue = queue_of(slow_session)
                assert slow_queue.dropped_frames > 0

                # The loopback viewer got every frame published meanwhile, and lost none.
                published = stream.fanout.statistics().published_frames - published_before
                await fast.wait_frames(published - (fast.frames - fast_before), timeout=30)
                fast_queue = queue_of(fast_session)
                assert fast_queue.dropped_frames == 0
                assert not fast_queue.waiting_for_keyframe

                shaper = link.qdisc_statistics()
                status = dict(slow.status)
                nursery.cancel_scope.cancel()
        finally:
            assert process.stdin is not None
            with trio.CancelScope(shield=True):
                await process.stdin.aclose()
                with trio.move_on_after(10):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    print(
        f"slow viewer: {status}; its queue: {slow_queue}; loopback viewer: {fast.frames} "
        f"frames, its queue: {fast_queue}; shaper: {shaper}; fullest socket: {fullest}"
    )
    assert status["state"] == "connected" and not status["ended"]
    # Clean pictures only: no reference picture missing (whole GOP tails dropped, never a
    # frame in the middle), nothing FFmpeg had to conceal or refused.
    assert status["gaps"] == 0
    assert status["corrupt"] == 0
    assert status["decode_errors"] == 0
    assert status["before_keyframe"] == 0
    # The drops were the server's decision, not the link's: the shaper lost nothing, it held
    # a queue; and the server's socket towards the namespace was full (sendto: EAGAIN).
    assert shaper.dropped == 0
    assert shaper.sent_bytes > 0
    assert fullest and fullest[0].fill > 0.9, fullest
