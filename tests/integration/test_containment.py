"""A failure inside one connection ends that connection only: never the server.

The case that found it: on one socket, a text message over Hypercorn's hard cap (4 ×
``limits.max_message_bytes``) then a binary message raised ``TypeError`` inside Hypercorn's
WebSocket buffer, and the exception ended ``hypercorn.trio.serve`` and with it every stream.
"""

from __future__ import annotations

import logging

import hypercorn.protocol.ws_stream
import pytest
import trio

from mediastream import hypercorn_compat
from mediastream.server import HARD_MESSAGE_LIMIT_FACTOR, RunningServer

from support.http import scrape
from support.servers import DEMO_STREAMS, StartServer, make_config
from support.viewer import open_viewer

MAX_MESSAGE_BYTES = 4096


async def send_oversized_text_then_binary(server: RunningServer) -> int:
    """The two messages of the crash; returns the close code the server sent."""
    oversized = "x" * (MAX_MESSAGE_BYTES * HARD_MESSAGE_LIMIT_FACTOR + 1)
    async with open_viewer(server.ws_url) as attacker:
        await attacker.ws.send_message(oversized)
        await attacker.ws.send_message(b"\x00binary")
        code, _ = await attacker.wait_closed()
        return code


def failures(server: RunningServer) -> dict[str, float]:
    """``mediastream_connection_failures_total`` by reason."""
    return {
        sample.labels["reason"]: sample.value
        for family in server.services.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "mediastream_connection_failures_total"
    }


async def test_oversized_text_then_binary_closes_that_socket_with_1009_only(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_message_bytes": 4096}))
    async with open_viewer(server.ws_url) as bystander:
        playing = await bystander.play("demo-1")
        await playing.wait_frames(5)

        assert await send_oversized_text_then_binary(server) == 1009

        await playing.wait_frames(10)
    assert failures(server) == {}  # refused cleanly: nothing failed inside the server
    async with open_viewer(server.ws_url) as newcomer:
        await (await newcomer.play("demo-2")).wait_frames(5)


async def test_any_failure_inside_a_connection_ends_only_that_connection(
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Hypercorn's bug put back, the connection boundary alone must keep the server up."""
    hypercorn_compat.install()
    # Hypercorn's buffer, and its reading that goes on to the next message after a refused one.
    for cls, name in (
        (hypercorn.protocol.ws_stream.WebsocketBuffer, "extend"),
        (hypercorn.protocol.ws_stream.WSStream, "_handle_events"),
    ):
        monkeypatch.setattr(cls, name, hypercorn_compat.original(cls, name))
    server = await start_server(make_config(DEMO_STREAMS, limits={"max_message_bytes": 4096}))
    async with open_viewer(server.ws_url) as bystander:
        playing = await bystander.play("demo-1")
        await playing.wait_frames(5)

        with caplog.at_level(logging.ERROR, logger="mediastream.hypercorn_compat"):
            await send_oversized_text_then_binary(server)
            with trio.fail_after(10):
                await server.services.changes.wait_until(lambda: bool(failures(server)))

        await playing.wait_frames(10)
    assert failures(server) == {"TypeError": 1}
    samples = await scrape(server.url)
    assert samples[("mediastream_connection_failures_total", (("reason", "TypeError"),))] == 1
    [record] = [r for r in caplog.records if r.name == "mediastream.hypercorn_compat"]
    assert "127.0.0.1:" in record.getMessage() and "TypeError" in record.getMessage()
    async with open_viewer(server.ws_url) as newcomer:
        await (await newcomer.play("demo-2")).wait_frames(5)
