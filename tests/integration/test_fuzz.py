"""Property-based fuzzing of the signaling socket (Hypothesis).

Random and mutated messages go to one socket while a second socket keeps playing. The server
must answer every batch, the second socket must never notice, and once the fuzzing socket
closes, no session, peer connection or task may be left behind.

The CI run sends a few thousand messages; set ``MEDIASTREAM_FUZZ_EXAMPLES`` (batches of up to
twelve messages) for a longer run, e.g. ``MEDIASTREAM_FUZZ_EXAMPLES=5000``.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import trio
import trio_asyncio
from aiortc import RTCPeerConnection
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisDeprecationWarning
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from support.servers import DEMO_STREAMS, StartServer, lasting_tasks, make_config
from support.viewer import open_viewer

EXAMPLES = int(os.environ.get("MEDIASTREAM_FUZZ_EXAMPLES", "300"))
STREAM_IDS = ["demo-1", "demo-2", "demo-3", "nope", "", "a" * 200, "demo-1\x00", "ü"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


def mutated_sdp(base: str) -> st.SearchStrategy[str]:
    lines = base.split("\r\n")

    def mutate(choice: tuple[int, int, str]) -> str:
        kind, index, noise = choice
        index %= len(lines)
        if kind == 0:
            return base[: index * 7]  # truncated
        if kind == 1:
            return "\r\n".join(lines[:index] + lines[index + 1 :])  # a line lost
        if kind == 2:
            return "\r\n".join([*lines[:index], noise, *lines[index:]])  # a line of noise
        if kind == 3:
            return "\r\n".join([*lines[:index], *[lines[index]] * 3, *lines[index:]])  # repeated
        return base.replace(lines[index], noise)

    return st.tuples(st.integers(0, 4), st.integers(0, 10_000), st.text(max_size=60)).map(mutate)


def messages(offer_sdp: str) -> st.SearchStrategy[str | bytes]:
    stream_ids = st.sampled_from(STREAM_IDS) | st.text(max_size=20)
    candidate = st.sampled_from(
        [
            "candidate:1 1 udp 2130706431 127.0.0.1 9 typ host",
            "candidate:1 1 udp 2130706431 x.local 9 typ host",
            "candidate:garbage",
            "",
        ]
    ) | st.text(max_size=80)
    protocol_like = st.one_of(
        st.fixed_dictionaries(
            {"type": st.just("offer"), "streamId": stream_ids},
            optional={
                "payload": st.fixed_dictionaries(
                    {"sdp": mutated_sdp(offer_sdp) | st.just(offer_sdp) | json_values},
                    optional={
                        "type": json_values,
                        "streamId": stream_ids,
                        "sessionId": json_values,
                    },
                )
                | json_values
            },
        ),
        st.fixed_dictionaries(
            {"type": st.just("ice"), "streamId": stream_ids},
            optional={
                "payload": st.fixed_dictionaries(
                    {"candidate": candidate | json_values},
                    optional={"sdpMid": json_values, "sdpMLineIndex": json_values},
                )
                | json_values
            },
        ),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["close", "ping", "auth"])},
            optional={"streamId": stream_ids, "payload": json_values},
        ),
        st.dictionaries(st.sampled_from(["type", "streamId", "payload", "code"]), json_values),
    )
    return st.one_of(
        protocol_like.map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=200),
        st.binary(max_size=200),
    )


async def make_offer() -> str:
    async def build() -> str:
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        sdp = str(pc.localDescription.sdp)
        await pc.close()
        return sdp

    return await trio_asyncio.aio_as_trio(build)()


async def test_fuzzed_messages_never_disturb_the_server_or_another_socket(
    start_server: StartServer,
) -> None:
    config = make_config(
        DEMO_STREAMS,
        webrtc={"negotiation_timeout": 2},
        # The fuzzer sends far faster than a page: only parsing and routing are under test.
        limits={"max_messages_per_second": 1e6, "max_offers_per_second": 1e6},
    )
    server = await start_server(config)
    offer_sdp = await make_offer()
    batches = st.lists(messages(offer_sdp), min_size=1, max_size=12)
    sent = 0
    token = trio.lowlevel.current_trio_token()

    async with open_viewer(server.ws_url) as bystander:
        playing = await bystander.play("demo-1")
        await playing.wait_frames(5)
        bystander_messages = len(bystander.messages)
        names_before = lasting_tasks()

        async with open_websocket_url(server.ws_url, max_message_size=2**22) as fuzz:

            async def send_batch(batch: list[str | bytes]) -> None:
                nonlocal sent
                for message in batch:
                    await fuzz.send_message(message)
                    sent += 1
                await _ping(fuzz)  # every message was handled, and the socket still answers

            valid_offer = {"type": "offer", "streamId": "demo-2", "payload": {"sdp": offer_sdp}}

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(batches)
            # Always among the examples: a valid offer, so the fuzzing reaches the peers too.
            @example([json.dumps(valid_offer), json.dumps({"type": "close", "streamId": "demo-2"})])
            @example([json.dumps(valid_offer), json.dumps(valid_offer)])
            def check(batch: list[str | bytes]) -> None:
                trio.from_thread.run(send_batch, batch, trio_token=token)

            def check_quietly() -> None:
                # The server runs beside Hypothesis in this process: aiortc's RTCP timers use
                # the random module, which Hypothesis would take for its strategies' doing.
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", HypothesisDeprecationWarning)
                    check()

            await trio.to_thread.run_sync(check_quietly)
            await _ping(fuzz)

        await playing.wait_frames(25)  # the bystander never stopped
        news = bystander.messages[bystander_messages:]
        assert [m for m in news if m["type"] == "error"] == []

        stats = server.services.statistics
        with trio.move_on_after(30):
            await server.services.changes.wait_until(
                lambda: (
                    stats().open_sockets == 1
                    and stats().open_sessions == 1
                    and stats().open_peer_connections == 1
                    and not lasting_tasks() - names_before
                )
            )
        left = stats()
        assert (left.open_sockets, left.open_sessions, left.open_peer_connections) == (1, 1, 1)
        leaked = lasting_tasks() - names_before
        assert not leaked, leaked
    assert sent >= EXAMPLES
    # The fuzzer got past the parser too: some mutated offers were answered with a peer.
    assert server.services.statistics().peer_connections_opened > 1


async def _ping(ws: WebSocketConnection) -> None:
    marker = {"fuzz": os.urandom(4).hex()}
    await ws.send_message(json.dumps({"type": "ping", "payload": marker}))
    with trio.fail_after(20):
        while True:
            try:
                reply: Any = json.loads(await ws.get_message())
            except ConnectionClosed as closed:
                raise AssertionError(
                    f"the server closed the fuzzing socket: {closed.reason}"
                ) from None
            if reply.get("type") == "pong" and reply.get("payload") == marker:
                return
