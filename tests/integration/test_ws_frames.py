"""Frame-level fuzzing of the signaling socket: WebSocket frames written by hand.

Each test plays one family of bad (or merely odd) frames on raw sockets while a real aiortc
viewer on another socket keeps decoding; afterwards the server must still be serving, a new
socket must still play, the bystander must not have noticed, no session, peer connection or
task may be left, and the server must have logged no error.

RFC 6455 asks a server to fail a connection with 1002 (protocol error) or 1007 (invalid
UTF-8). Hypercorn 0.18 closes such connections at the TCP level without a close frame (a
browser reports 1006): the tests accept either, and say so where they do.

The last test plays seeded random mutations (``support/ws_fuzz.py``): 5,000 cases in CI, or
``MEDIASTREAM_WS_FUZZ_CASES`` from seed ``MEDIASTREAM_WS_FUZZ_SEED`` for a longer run;
``scripts/fuzz_ws.py`` runs them for minutes against a server of its own.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from mediastream.server import HARD_MESSAGE_LIMIT_FACTOR, RunningServer

from support.raw_ws import (
    ABNORMAL_CLOSURE,
    Closure,
    FrameReader,
    Opcode,
    RawWebSocket,
    build_frame,
    close_payload,
    fragments,
    handshake_request,
    new_key,
    open_raw_websocket,
)
from support.servers import DEMO_STREAMS, StartServer, lasting_tasks, make_config
from support.viewer import PlayedStream, Viewer, open_viewer
from support.ws_fuzz import Limits, generate_case, predict

#: Small, so that oversize costs little (Hypercorn's hard cap is 4× this), yet an offer fits.
MAX_MESSAGE_BYTES = 4096
HARD_CAP = MAX_MESSAGE_BYTES * HARD_MESSAGE_LIMIT_FACTOR
FUZZ_CASES = int(os.environ.get("MEDIASTREAM_WS_FUZZ_CASES", "5000"))
FUZZ_SEED = int(os.environ.get("MEDIASTREAM_WS_FUZZ_SEED", "6455"))
FUZZ_CONCURRENCY = 12
FUZZ_SCRIPT = Path(__file__).parents[2] / "scripts" / "fuzz_ws.py"
#: What the server logs when it closes a connection whose client never answered its close.
UNANSWERED_CLOSE = "no answer to the server's close frame"


@dataclass
class Harness:
    server: RunningServer
    bystander: Viewer
    playing: PlayedStream
    caplog: pytest.LogCaptureFixture
    _messages_before: int
    _tasks_before: collections.Counter[str]

    @property
    def url(self) -> str:
        return self.server.ws_url

    def connection_failures(self) -> dict[str, float]:
        """``mediastream_connection_failures_total`` by reason."""
        return {
            sample.labels["reason"]: sample.value
            for family in self.server.services.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "mediastream_connection_failures_total"
        }

    def unanswered_closes(self) -> int:
        """Connections the server closed because the client never answered its close frame."""
        return sum(1 for r in self.caplog.records if UNANSWERED_CLOSE in r.getMessage())

    def server_errors(self) -> list[logging.LogRecord]:
        # asyncio's reports about aiortc's tasks concern the media plane, not framing: a
        # loaded machine can leave one behind when closing a viewer's peer is cut short.
        return [
            r
            for r in self.caplog.records
            if r.levelno >= logging.ERROR and not r.getMessage().startswith("asyncio:")
        ]

    async def assert_unharmed(self) -> None:
        """The bystander kept decoding, a new socket plays, nothing leaked, nothing logged."""
        server = self.server
        assert not server._stopped.is_set(), "the server's serve task ended"
        await self.playing.wait_frames(10)
        news = self.bystander.messages[self._messages_before :]
        assert [m for m in news if m["type"] == "error"] == []
        assert self.bystander.closed_reason is None
        async with open_raw_websocket(self.url) as probe:
            assert await probe.probe(), "a new socket got no answer"
        async with open_viewer(self.url) as newcomer:
            fresh = await newcomer.play("demo-2")
            await fresh.wait_frames(3)
        stats = server.services.statistics

        def settled() -> bool:
            now = stats()
            counts = (now.open_sockets, now.open_sessions, now.open_peer_connections)
            return counts == (1, 1, 1) and not lasting_tasks() - self._tasks_before

        with trio.move_on_after(30):
            await server.services.changes.wait_until(settled)
        left = stats()
        assert (left.open_sockets, left.open_sessions, left.open_peer_connections) == (1, 1, 1)
        leaked = lasting_tasks() - self._tasks_before
        assert not leaked, leaked
        errors = self.server_errors()
        assert not errors, [f"{r.name}: {r.getMessage()}" for r in errors]


@asynccontextmanager
async def open_harness(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, **limits: object
) -> AsyncIterator[Harness]:
    config = make_config(
        DEMO_STREAMS,
        limits={
            "max_message_bytes": MAX_MESSAGE_BYTES,
            # The fuzzer opens sockets and sends far faster than pages do: only framing is
            # under test here.
            "max_messages_per_second": 1e6,
            "max_sockets_per_client": 100_000,
            **limits,
        },
    )
    caplog.set_level(logging.ERROR)
    # And the close handshakes the server had to end itself (logged at INFO).
    caplog.set_level(logging.INFO, logger="mediastream.hypercorn_compat")
    server = await start_server(config)
    async with open_viewer(server.ws_url) as bystander:
        playing = await bystander.play("demo-1")
        await playing.wait_frames(5)
        yield Harness(server, bystander, playing, caplog, len(bystander.messages), lasting_tasks())


@pytest.fixture
async def harness(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Harness]:
    async with open_harness(start_server, caplog) as opened:
        yield opened


async def send_and_wait_closed(url: str, data: bytes, *, answer: bool = True) -> Closure:
    """One connection: ``data`` as one write, then everything the server sends to its end."""
    async with open_raw_websocket(url) as ws:
        await ws.send_raw(data)
        with trio.fail_after(20):
            return await ws.wait_closed(answer=answer)


def assert_failed(closure: Closure, rfc_code: int) -> None:
    """Failed as RFC 6455 asks (a close frame with ``rfc_code``), or as Hypercorn 0.18 does:
    the TCP connection closed with no close frame, which a browser reports as 1006."""
    assert closure.code == rfc_code or (
        closure.code is None and "close frame" not in closure.how
    ), closure
    assert closure.reported_code in (rfc_code, ABNORMAL_CLOSURE)


async def assert_all_fail(url: str, cases: Iterable[bytes], rfc_code: int = 1002) -> None:
    async with trio.open_nursery() as nursery:
        for data in cases:

            async def one(data: bytes = data) -> None:
                assert_failed(await send_and_wait_closed(url, data), rfc_code)

            nursery.start_soon(one)


def ping_message(marker: str) -> bytes:
    return json.dumps({"type": "ping", "payload": {"m": marker}}).encode()


async def replies(ws: RawWebSocket) -> list[dict[str, object]]:
    """Probe the socket; return the application's replies before the probe's pong (and after
    its welcome)."""
    before = len(ws.messages)
    with trio.fail_after(20):
        assert await ws.probe(), ws.closure
    got = [json.loads(m) for m in ws.messages[:-1] if isinstance(m, str)]
    return [r for r in got if r["type"] != "welcome"] if before <= 1 else got[before:]


# --- the client's own frames (no server) -----------------------------------------------------


def test_build_frame_matches_the_examples_of_rfc_6455() -> None:
    hello = bytes.fromhex("48656c6c6f")
    assert build_frame(Opcode.TEXT, hello, mask=None) == bytes.fromhex("8105") + hello
    assert build_frame(Opcode.TEXT, hello) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert fragments(Opcode.TEXT, hello, [3], mask=None) == [
        bytes.fromhex("010348656c"),
        bytes.fromhex("80026c6f"),
    ]
    assert build_frame(Opcode.PING, hello, mask=None) == bytes.fromhex("8905") + hello
    assert build_frame(Opcode.PONG, hello) == bytes.fromhex("8a8537fa213d7f9f4d5158")
    assert build_frame(Opcode.BINARY, bytes(256), mask=None)[:4] == bytes.fromhex("827e0100")
    assert build_frame(Opcode.BINARY, bytes(65536), mask=None)[:10] == bytes.fromhex(
        "827f0000000000010000"
    )


def test_build_frame_writes_whatever_it_is_told_even_lies() -> None:
    frame = build_frame(0xB, b"", fin=False, rsv=7, mask=None, length=2**63, length_form=64)
    assert frame == bytes([0x7B, 127]) + (2**63).to_bytes(8, "big")
    assert build_frame(Opcode.TEXT, b"ab", length_form=16)[:4] == bytes([0x81, 0x80 | 126, 0, 2])
    assert build_frame(Opcode.BINARY, b"abc", length=1, mask=None) == b"\x82\x01abc"
    with pytest.raises(ValueError, match="four bits"):
        build_frame(16)
    with pytest.raises(ValueError, match="16-bit"):
        build_frame(Opcode.BINARY, length=70_000, length_form=16)


def test_frame_reader_parses_frames_cut_anywhere() -> None:
    data = build_frame(Opcode.TEXT, b"Hello", mask=None) + build_frame(
        Opcode.CLOSE, close_payload(1009, b"big"), mask=None
    )
    reader = FrameReader()
    frames = [frame for i in range(len(data)) for frame in reader.feed(data[i : i + 1])]
    assert [(f.opcode, f.payload) for f in frames] == [(1, b"Hello"), (8, b"\x03\xf1big")]
    assert (frames[1].close_code, frames[1].close_reason) == (1009, b"big")
    assert reader.pending == 0


def test_the_reference_model_predicts_what_rfc_6455_asks() -> None:
    cap = 100
    legal = predict(build_frame(Opcode.TEXT, b"{}") + build_frame(Opcode.PING, b"a"), cap)
    assert (legal.accept, legal.idle, legal.pongs, legal.messages) == ({"open"}, True, (b"a",), 1)
    half = predict(build_frame(Opcode.TEXT, b"{}")[:3], cap)
    assert (half.accept, half.idle) == ({"open"}, False)
    assert predict(build_frame(Opcode.TEXT, b"{}", mask=None), cap).accept == {"fail:1002"}
    assert predict(build_frame(Opcode.TEXT, b"\xff"), cap).accept == {"fail:1007"}
    assert predict(build_frame(Opcode.BINARY, bytes(cap + 1)), cap).accept == {"1009"}
    # The cap counts bytes: 26 four-byte characters are over 100.
    assert predict(build_frame(Opcode.TEXT, "😀".encode() * 26), cap).accept == {"1009"}
    assert predict(build_frame(Opcode.TEXT, "😀".encode() * 25), cap).accept == {"open"}
    # Bad UTF-8 past the cap in the same frame: TCP segmentation decides which comes first.
    assert predict(build_frame(Opcode.TEXT, b"x" * 200 + b"\xff"), cap).accept == {
        "1009",
        "fail:1007",
    }
    closing = predict(build_frame(Opcode.CLOSE, close_payload(4000)) + b"ignored", cap)
    assert (closing.accept, closing.consumed) == ({"echo:4000"}, 8)


def test_generated_cases_depend_on_their_seed_and_index_only() -> None:
    limits = Limits(MAX_MESSAGE_BYTES, HARD_CAP)
    assert generate_case(1, 42, limits) == generate_case(1, 42, limits)
    assert generate_case(1, 42, limits).data != generate_case(2, 42, limits).data


# --- one family each -------------------------------------------------------------------------


async def test_fragmented_message_with_legal_control_frames_inside_arrives_whole(
    harness: Harness,
) -> None:
    text = ping_message("fragments")
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_raw(
            build_frame(Opcode.TEXT, text[:5], fin=False)
            + build_frame(Opcode.PING, b"between")
            + build_frame(Opcode.CONTINUATION, b"", fin=False)  # empty fragments are legal
            + build_frame(Opcode.PONG, b"unsolicited")  # and so are unsolicited pongs
            + build_frame(Opcode.CONTINUATION, text[5:20], fin=False)
            + build_frame(Opcode.PING, b"")
            + build_frame(Opcode.CONTINUATION, text[20:])
        )
        [pong] = await replies(ws)
        assert (pong["type"], pong["payload"]) == ("pong", {"m": "fragments"})
        assert ws.pong_payloads == [b"between", b""]
        # A close frame between fragments is legal too: the server answers it.
        await ws.send_raw(
            build_frame(Opcode.BINARY, b"half", fin=False)
            + build_frame(Opcode.CLOSE, close_payload(4000, b"fin"))
        )
        closure = await ws.wait_closed(answer=False)
        assert (closure.code, closure.reason) == (4000, b"fin")
    await harness.assert_unharmed()


async def test_a_new_message_inside_a_fragmented_one_fails_the_connection(
    harness: Harness,
) -> None:
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.TEXT, b"{", fin=False) + build_frame(Opcode.BINARY, b"}"),
            build_frame(Opcode.BINARY, b"{", fin=False) + build_frame(Opcode.TEXT, b"}"),
            build_frame(Opcode.TEXT, b"{", fin=False) + build_frame(Opcode.TEXT, b"}", fin=False),
            build_frame(Opcode.TEXT, b"{", fin=False)
            + build_frame(Opcode.PING, b"")
            + build_frame(Opcode.BINARY, b"", fin=False),
        ],
    )
    await harness.assert_unharmed()


async def test_a_continuation_without_a_start_fails_the_connection(harness: Harness) -> None:
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.CONTINUATION, b"{}"),
            build_frame(Opcode.CONTINUATION, b"", fin=False),
            build_frame(Opcode.TEXT, b"{}") + build_frame(Opcode.CONTINUATION, b"more"),
        ],
    )
    await harness.assert_unharmed()


async def test_control_frames_over_125_bytes_or_fragmented_fail_the_connection(
    harness: Harness,
) -> None:
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.PING, b"p" * 126),
            build_frame(Opcode.PONG, b"p" * 300),
            build_frame(Opcode.CLOSE, close_payload(1000, b"r" * 200)),
            build_frame(Opcode.PING, b"p" * 70_000),  # a 64-bit length on a control frame
            build_frame(Opcode.PING, b"", fin=False),
            build_frame(Opcode.CLOSE, close_payload(1000), fin=False),
            build_frame(Opcode.TEXT, b"{", fin=False) + build_frame(Opcode.PONG, b"", fin=False),
        ],
    )
    # 125 bytes is the most a control frame carries, and still legal.
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_frame(Opcode.PING, b"p" * 125)
        assert await ws.probe()
        assert ws.pong_payloads == [b"p" * 125]
    await harness.assert_unharmed()


async def test_invalid_utf8_in_a_text_message_fails_the_connection_with_1007(
    harness: Harness,
) -> None:
    euro = "€".encode()
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.TEXT, b'{"type":"ping"}\xff'),
            build_frame(Opcode.TEXT, b"\xc0\x80"),  # overlong NUL
            build_frame(Opcode.TEXT, b"\xed\xa0\x80"),  # a surrogate
            build_frame(Opcode.TEXT, b"\xf4\x90\x80\x80"),  # beyond U+10FFFF
            # Cut short at the end of the message (legal inside it, see below).
            build_frame(Opcode.TEXT, b"ok" + euro[:2]),
            build_frame(Opcode.TEXT, b"ok", fin=False) + build_frame(Opcode.CONTINUATION, b"\x80"),
        ],
        rfc_code=1007,
    )
    # A character cut between two fragments is legal, as is invalid UTF-8 in a binary message.
    async with open_raw_websocket(harness.url) as ws:
        text = json.dumps({"type": "ping", "payload": {"m": "€"}}, ensure_ascii=False).encode()
        cut = text.index(euro) + 1
        await ws.send_raw(
            build_frame(Opcode.TEXT, text[:cut], fin=False)
            + build_frame(Opcode.CONTINUATION, text[cut:])
            + build_frame(Opcode.BINARY, b"\xff\xfe")
        )
        pong, error = await replies(ws)
        assert (pong["type"], pong["payload"]) == ("pong", {"m": "€"})
        assert error["code"] == "invalid_json"
    await harness.assert_unharmed()


async def test_reserved_bits_without_an_extension_fail_the_connection(harness: Harness) -> None:
    await assert_all_fail(
        harness.url,
        [build_frame(Opcode.TEXT, b"{}", rsv=rsv) for rsv in range(1, 8)]
        + [
            build_frame(Opcode.PING, b"", rsv=4),
            build_frame(Opcode.TEXT, b"{", fin=False)
            + build_frame(Opcode.CONTINUATION, b"}", rsv=2),
        ],
    )
    await harness.assert_unharmed()


async def test_unmasked_client_frames_fail_the_connection(harness: Harness) -> None:
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.TEXT, ping_message("x"), mask=None),
            build_frame(Opcode.PING, b"", mask=None),
            build_frame(Opcode.CLOSE, close_payload(1000), mask=None),
            build_frame(Opcode.TEXT, b"{", fin=False)
            + build_frame(Opcode.CONTINUATION, b"}", mask=None),
        ],
    )
    await harness.assert_unharmed()


async def test_reserved_opcodes_fail_the_connection(harness: Harness) -> None:
    await assert_all_fail(
        harness.url, [build_frame(opcode, b"x") for opcode in (3, 4, 5, 6, 7, 0xB, 0xC, 0xF)]
    )
    await harness.assert_unharmed()


async def test_lengths_not_in_their_shortest_form_or_with_the_top_bit_fail_the_connection(
    harness: Harness,
) -> None:
    await assert_all_fail(
        harness.url,
        [
            build_frame(Opcode.TEXT, b"{}", length_form=16),
            build_frame(Opcode.TEXT, b"{}", length_form=64),
            build_frame(Opcode.BINARY, b"b" * 300, length_form=64),
            build_frame(Opcode.BINARY, b"", length=2**63, length_form=64),
            build_frame(Opcode.BINARY, b"", length=2**64 - 1, length_form=64),
        ],
    )
    await harness.assert_unharmed()


async def test_a_message_over_the_hard_cap_is_closed_with_1009_in_one_frame_or_many(
    harness: Harness,
) -> None:
    over = HARD_CAP + 1
    cases = [
        build_frame(Opcode.TEXT, b"x" * over),
        build_frame(Opcode.BINARY, b"\x00" * over),
        b"".join(fragments(Opcode.TEXT, b"x" * over, [64] * (over // 64))),
        b"".join(fragments(Opcode.BINARY, b"\x00" * over, [1] * 300 + [HARD_CAP // 2])),
        # The known crash: a text message over the cap, then a binary one.
        build_frame(Opcode.TEXT, b"x" * over) + build_frame(Opcode.BINARY, b"\x00binary"),
        build_frame(Opcode.BINARY, b"x" * over) + build_frame(Opcode.TEXT, b"text"),
    ]
    for data in cases:
        async with open_raw_websocket(harness.url) as ws:
            await ws.send_raw(data)
            with trio.fail_after(20):
                while (frame := await ws.receive_frame()) is not None:
                    if frame.opcode == Opcode.CLOSE:
                        break
                assert ws.closure is not None and ws.closure.code == 1009, ws.closure
                # A message queued behind the refused one, then our close reply, in one write:
                # the server reads past the message to the reply and ends the connection.
                await ws.send_raw(
                    build_frame(Opcode.BINARY, b"queued") + build_frame(Opcode.CLOSE, b"\x03\xe8")
                )
                closure = await ws.wait_closed(answer=False)
            assert closure.how == "close frame, eof", closure
    # Each closed on our reply, none by the server's timeout for an unanswered close.
    assert harness.unanswered_closes() == 0
    # Up to the cap the socket lives: the application refuses the message by itself.
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_raw(
            b"".join(fragments(Opcode.BINARY, b"\x00" * HARD_CAP, [1000, 1000, 1000]))
        )
        [error] = await replies(ws)
        assert error["code"] == "message_too_large"
    await harness.assert_unharmed()


async def test_a_client_that_never_answers_the_close_is_disconnected_by_the_server(
    harness: Harness,
) -> None:
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_frame(Opcode.BINARY, b"\x00" * (HARD_CAP + 1))
        # We read the 1009 and never answer it (nor end our side): the server must not wait
        # for ever. Its bound is CLOSE_HANDSHAKE_TIMEOUT (5 s); this one only catches a hang.
        with trio.fail_after(120):
            closure = await ws.wait_closed(answer=False)
    assert (closure.code, closure.how) == (1009, "close frame, eof")
    assert harness.unanswered_closes() == 1
    await harness.assert_unharmed()


async def test_the_hard_cap_counts_text_in_bytes_not_characters(harness: Harness) -> None:
    four_byte = "😀"
    at_cap = four_byte * (HARD_CAP // 4)
    over = (at_cap[:-1] + "€ab").encode()  # 4 bytes out, 3 + 2 in: one byte over
    assert (len(at_cap.encode()), len(over)) == (HARD_CAP, HARD_CAP + 1)
    # Counted in characters (as Hypercorn did), both would be a quarter of the cap.
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_frame(Opcode.TEXT, over)
        with trio.fail_after(20):
            closure = await ws.wait_closed()
        assert closure.code == 1009, closure
    # Exactly at the cap, cut inside characters between fragments: the socket lives, and the
    # application refuses the message by its size.
    async with open_raw_websocket(harness.url) as ws:
        await ws.send_raw(b"".join(fragments(Opcode.TEXT, at_cap.encode(), [4097, 5001, 3])))
        [error] = await replies(ws)
        assert error["code"] == "message_too_large"
        assert f"{HARD_CAP} bytes" in str(error["payload"])
    await harness.assert_unharmed()


async def test_an_absurd_64_bit_length_is_refused_once_the_cap_is_passed(
    harness: Harness,
) -> None:
    for declared in (2**32, 2**62, 2**63 - 1):
        async with open_raw_websocket(harness.url) as ws:
            # The header promises exabytes; the server reads no more than the cap of them.
            await ws.send_raw(build_frame(Opcode.BINARY, b"", length=declared, length_form=64))
            await ws.send_raw(b"\x00" * (HARD_CAP + 1))
            with trio.fail_after(20):
                while (frame := await ws.receive_frame()) is not None:
                    if frame.opcode == Opcode.CLOSE:
                        break
            assert ws.closure is not None and ws.closure.code == 1009, ws.closure
    await harness.assert_unharmed()


async def test_truncated_frames_and_resets_mid_frame_leave_nothing_behind(
    harness: Harness,
) -> None:
    whole = build_frame(Opcode.TEXT, ping_message("cut") * 10)
    lying = build_frame(Opcode.BINARY, b"short", length=5000)
    cuts = [whole[:1], whole[:2], whole[:4], whole[:8], whole[:30], lying]
    async with trio.open_nursery() as nursery:
        for data in cuts:
            for how in ("fin", "reset"):

                async def one(data: bytes = data, how: str = how) -> None:
                    async with open_raw_websocket(harness.url) as ws:
                        await ws.send_raw(data)
                        if how == "reset":
                            ws.reset()  # SO_LINGER 0: an RST, mid-frame
                            return
                        await ws.send_eof()
                        with trio.fail_after(20):
                            closure = await ws.wait_closed()
                        # The frame never ended: no close frame, the connection just ends.
                        assert closure.code is None and "close frame" not in closure.how

                nursery.start_soon(one)
    await harness.assert_unharmed()


async def test_pings_within_the_limit_are_answered_in_order_and_the_bystander_keeps_playing(
    harness: Harness,
) -> None:
    # The harness allows a million messages (and pings) a second: 3,000 in one write pass.
    payloads = [i.to_bytes(2, "big") * (i % 60) for i in range(3000)]
    flood = b"".join(build_frame(Opcode.PING, p) for p in payloads)
    probe = build_frame(
        Opcode.TEXT, json.dumps({"type": "ping", "payload": {"probe": "end"}}).encode()
    )
    async with open_raw_websocket(harness.url) as ws:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                # Sent by another task while this one reads: the pongs need a reader.
                nursery.start_soon(ws.send_raw, flood + probe)
                assert await ws.wait_pong("end")
        assert ws.pong_payloads == payloads
    await harness.assert_unharmed()


async def test_a_ping_flood_is_closed_with_1008_and_the_bystander_keeps_playing(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    per_second = 50  # pings are held to limits.max_messages_per_second
    payloads = [i.to_bytes(2, "big") for i in range(3000)]
    flood = b"".join(build_frame(Opcode.PING, p) for p in payloads)
    async with open_harness(start_server, caplog, max_messages_per_second=per_second) as harness:
        async with open_raw_websocket(harness.url) as ws:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    # Sent by another task while this one reads: the pongs need a reader.
                    nursery.start_soon(ws.send_raw, flood)
                    while (frame := await ws.receive_frame()) is not None:
                        if frame.opcode == Opcode.CLOSE:
                            break
                # The flood is out (one writer at a time): now answer the close.
                await ws.send_close(1008)
                closure = await ws.wait_closed(answer=False)
        assert (closure.code, closure.how) == (1008, "close frame, eof"), closure
        assert closure.reason == f"more than {per_second} pings a second".encode()
        # A full bucket's worth was answered, in order, then nothing: 3,000 pings at 50 a
        # second would have taken a minute.
        answered = len(ws.pong_payloads)
        assert per_second <= answered < len(payloads)
        assert ws.pong_payloads == payloads[:answered]
        assert harness.connection_failures() == {"ping_flood": 1}
        [warning] = [r for r in caplog.records if "pings a second" in r.getMessage()]
        assert "127.0.0.1:" in warning.getMessage()
        await harness.assert_unharmed()


async def test_close_frames_with_bad_codes_or_payloads_fail_the_connection(
    harness: Harness,
) -> None:
    bad_codes = (0, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2999, 5000, 65535)
    await assert_all_fail(
        harness.url,
        [build_frame(Opcode.CLOSE, close_payload(code)) for code in bad_codes]
        + [build_frame(Opcode.CLOSE, b"\x03")],  # one byte: half a code
    )
    await assert_all_fail(
        harness.url, [build_frame(Opcode.CLOSE, close_payload(1000, b"\xff"))], rfc_code=1007
    )
    # Codes a client may send are echoed, the reason too, and an empty close gets an empty one.
    for code, reason in ((1000, b""), (1001, b"bye"), (3000, "é".encode()), (4999, b"r" * 123)):
        closure = await send_and_wait_closed(
            harness.url, build_frame(Opcode.CLOSE, close_payload(code, reason)), answer=False
        )
        assert (closure.code, closure.reason) == (code, reason)
    closure = await send_and_wait_closed(harness.url, build_frame(Opcode.CLOSE), answer=False)
    assert closure.code is None and closure.how.startswith("close frame")
    await harness.assert_unharmed()


async def test_half_finished_upgrades_are_closed_and_never_block_anyone(
    harness: Harness,
) -> None:
    host, port = harness.server.url.removeprefix("http://").split(":")
    request = handshake_request(f"{host}:{port}", "/ws", key=new_key())
    held = 200  # bounded: a test, not an attack
    ended = 0

    async def slow_client(cut: int) -> None:
        nonlocal ended
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(request[:cut])
            with trio.fail_after(60):  # Hypercorn's keep-alive timeout (5 s) closes them
                try:
                    while await stream.receive_some(4096):
                        pass
                except trio.BrokenResourceError:
                    pass  # closed with a reset: closed all the same
            ended += 1

    async with trio.open_nursery() as nursery:
        for i in range(held):
            nursery.start_soon(slow_client, (i * 7) % (len(request) - 4))
        # While they hang: the bystander plays on, and a newcomer connects and plays.
        await harness.playing.wait_frames(10)
        async with open_viewer(harness.url) as newcomer:
            fresh = await newcomer.play("demo-3")
            await fresh.wait_frames(3)
    assert ended == held
    await harness.assert_unharmed()


async def test_a_compressed_message_is_never_inflated_far_past_the_cap(harness: Harness) -> None:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = compressor.compress(b"\x00" * 2**26) + compressor.flush(zlib.Z_SYNC_FLUSH)
    bomb = bomb.removesuffix(b"\x00\x00\xff\xff")  # RFC 7692: the sender drops the tail
    extensions = [("Sec-WebSocket-Extensions", "permessage-deflate")]
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        async with open_raw_websocket(harness.url, headers=extensions) as ws:
            if ws.deflate:
                await ws.send_frame(Opcode.BINARY, bomb, rsv=4)
                with trio.fail_after(20):
                    closure = await ws.wait_closed()
                assert_failed(closure, 1009)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"the server held {peak / 2**20:.0f} MiB for one message"
    await harness.assert_unharmed()


async def test_a_protocol_error_right_after_answered_messages_logs_no_server_error(
    harness: Harness,
) -> None:
    # Three messages the application answers, then a frame with RSV1 set: the connection is
    # closed while the signaling writer sends its replies. Hypercorn sent EOF outside its send
    # lock, and a writer starting to send then got BusyResourceError (an ERROR per hit, about
    # 1 socket in 20).
    data = build_frame(Opcode.TEXT, b"x") * 3 + build_frame(Opcode.TEXT, b"", rsv=4)
    for _ in range(300):
        assert_failed(await send_and_wait_closed(harness.url, data), 1002)
    errors = harness.server_errors()
    assert not errors, f"{len(errors)} of 300 sockets logged: {errors[0].getMessage()}"
    await harness.assert_unharmed()


# --- seeded random mutations -----------------------------------------------------------------


async def test_fuzzed_frame_sequences_never_disturb_the_server_or_another_socket(
    harness: Harness,
) -> None:
    # The cases are played by the long-run script, in a process of its own: the fuzzing client
    # gets the second core, and in this process the server and the bystander are under test.
    command = [
        sys.executable,
        str(FUZZ_SCRIPT),
        *("--url", harness.url, "--bare", "--seed", str(FUZZ_SEED)),
        *("--cases", str(FUZZ_CASES), "--concurrency", str(FUZZ_CONCURRENCY)),
        *("--max-message-bytes", str(MAX_MESSAGE_BYTES)),
    ]
    with trio.fail_after(max(600, FUZZ_CASES / 10)):  # a bound for a hang, not a speed target
        done = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    output = done.stdout.decode(errors="replace")
    *_, last = output.strip().splitlines() or [""]
    assert done.returncode == 0, output[-20_000:] + done.stderr.decode(errors="replace")[-5000:]
    summary = json.loads(last)
    print(
        f"{summary['cases']} cases on {summary['connections']} connections in "
        f"{summary['seconds']:.1f} s ({summary['cases'] / summary['seconds'] * 60:,.0f}/min); "
        f"verdicts {summary['verdicts']}"
    )
    assert summary["cases"] == FUZZ_CASES
    assert summary["findings"] == {}, summary["shown"]
    # The mutations reached every reaction: open, failed, too big, closed by the client.
    assert {"open", "fail:abrupt", "close:1009", "close:1000"} <= set(summary["verdicts"])
    await harness.assert_unharmed()
