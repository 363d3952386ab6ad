"""Closing peer connections: a close that outlives its session's wait still runs to its end.

aiortc's ``RTCPeerConnection.close()`` needs dozens of asyncio callbacks, and trio-asyncio
runs one per Trio scheduler round; on a loaded machine it can outlast any wait. Cut off
half-way it leaked the peer's UDP sockets and left an ICE task pending until the garbage
collector destroyed it (docs/benchmarks.md, "Soak"). Here the session's wait is zero, so
every close of a real, connected aiortc peer outlives it, deterministically.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from mediastream.config import WebRTCConfig
from mediastream.media.fanout import Subscriber
from mediastream.webrtc.bridge import PeerConnection, PeerConnectionFactory


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the descriptor listdir itself used
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


async def wait_until(condition: Callable[[], bool], timeout: float = 20) -> None:
    """Poll ``condition``: what it watches (/proc, a socket closed by asyncio) has no event to
    wait on. The poll only decides when to look again, never what the test concludes."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 (nothing to wait on: see above)
            await trio.sleep(0.02)


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[list[dict[str, Any]]]:
    """trio-asyncio's loop, its error reports (a task destroyed while pending) collected."""
    reports: list[dict[str, Any]] = []
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(lambda _loop, context: reports.append(context))
        yield reports


async def new_viewer() -> RTCPeerConnection:
    """A real aiortc viewer with its offer made (and its candidates gathered)."""

    async def offer() -> RTCPeerConnection:
        viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        viewer.addTransceiver("video", direction="recvonly")
        await viewer.setLocalDescription(await viewer.createOffer())
        return viewer

    return await trio_asyncio.aio_as_trio(offer)()


async def connect(
    peer: PeerConnection, viewer: RTCPeerConnection | None = None
) -> RTCPeerConnection:
    """``viewer`` (or a new one) connected to ``peer`` (ICE and DTLS)."""
    viewer = viewer or await new_viewer()
    subscriber = Subscriber("close-test", 10, keyframe_gated=True)
    answer = await peer.answer(viewer.localDescription.sdp, subscriber)
    await trio_asyncio.aio_as_trio(viewer.setRemoteDescription)(
        RTCSessionDescription(sdp=answer, type="answer")
    )
    with trio.fail_after(20):
        while peer.connection_state != "connected":
            await peer.wait_state_change()
    return viewer


def assert_nothing_destroyed(
    reports: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    gc.collect()  # a pending task left behind is destroyed (and reported) here
    assert reports == []
    assert "Task was destroyed" not in caplog.text


async def test_a_close_past_the_sessions_wait_runs_to_its_end_in_the_closer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    overruns: list[None] = []
    factory = PeerConnectionFactory(
        WebRTCConfig(), close_wait=0, on_close_overrun=lambda: overruns.append(None)
    )
    async with asyncio_loop() as reports, trio.open_nursery() as nursery:
        await nursery.start(factory.run)
        baseline = open_sockets()
        viewer = await new_viewer()
        with_viewer = open_sockets()
        async with factory.open("cam#close-test") as peer:
            await connect(peer, viewer)
            assert open_sockets() > with_viewer
        # The session has gone on; its peer is still closing, owned by the factory. The
        # viewer is left open: nothing from its side helps the server's peer close (it closes
        # its own sockets once the server's DTLS close reaches it).
        assert (len(overruns), factory.statistics().close_overruns) == (1, 1)
        assert "cam#close-test: peer connection still closing after 0 s" in caplog.text
        assert factory.statistics().open_peer_connections == 0
        assert factory.statistics().closing_in_background == 1
        await wait_until(lambda: factory.statistics().closing_in_background == 0)
        await wait_until(lambda: open_sockets() <= with_viewer)
        await trio_asyncio.aio_as_trio(viewer.close)()
        assert open_sockets() == baseline
        nursery.cancel_scope.cancel()
    assert_nothing_destroyed(reports, caplog)


async def test_shutdown_waits_for_the_closes_still_running(
    caplog: pytest.LogCaptureFixture,
) -> None:
    factory = PeerConnectionFactory(WebRTCConfig(), close_wait=0)
    async with asyncio_loop() as reports:
        baseline = open_sockets()
        async with trio.open_nursery() as nursery:
            await nursery.start(factory.run)
            for index in range(3):
                async with factory.open(f"cam#shutdown-{index}") as peer:
                    viewer = await connect(peer)
                await trio_asyncio.aio_as_trio(viewer.close)()
            assert factory.statistics().close_overruns == 3
            # Shutdown: the closer is cancelled with closes still running; it returns once
            # they have finished (each is bounded by SHUTDOWN_CLOSE_TIMEOUT from here).
            nursery.cancel_scope.cancel()
        assert factory.statistics().closing_in_background == 0
        assert open_sockets() == baseline
    assert_nothing_destroyed(reports, caplog)
    assert "close given up" not in caplog.text


async def test_a_factory_whose_closer_is_not_running_refuses_to_open_peers() -> None:
    factory = PeerConnectionFactory(WebRTCConfig())
    async with asyncio_loop():
        with pytest.raises(RuntimeError, match=r"PeerConnectionFactory\.run must be running"):
            async with factory.open("cam#no-closer"):
                pass


async def test_a_session_cancelled_at_any_point_of_its_answer_leaves_no_socket(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Cut off inside ICE gathering, aioice lost the UDP sockets it was opening: no close
    # could find them. Cancel the session after 0, 1, 2, ... scheduler rounds of its answer,
    # until the answer finishes first (every point of it was cut once).
    factory = PeerConnectionFactory(WebRTCConfig())
    async with asyncio_loop() as reports, trio.open_nursery() as nursery:
        await nursery.start(factory.run)
        viewer = await new_viewer()
        baseline = open_sockets()
        answered = False
        rounds = 0
        while not answered:
            with trio.CancelScope() as session:
                async with factory.open(f"cam#cut-{rounds}") as peer:
                    nursery.start_soon(cancel_after, session, rounds)
                    subscriber = Subscriber("close-test", 10, keyframe_gated=True)
                    await peer.answer(viewer.localDescription.sdp, subscriber)
                    answered = True
            await wait_until(lambda: open_sockets() == baseline)
            rounds += 1
        assert rounds > 5  # the answer did get cut at several points
        await trio_asyncio.aio_as_trio(viewer.close)()
        nursery.cancel_scope.cancel()
    assert_nothing_destroyed(reports, caplog)


async def cancel_after(scope: trio.CancelScope, rounds: int) -> None:
    for _ in range(rounds):
        await trio.lowlevel.checkpoint()
    scope.cancel()
