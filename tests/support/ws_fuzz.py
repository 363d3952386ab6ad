"""Frame-level WebSocket fuzzing: mutated frame sequences, what the server should do with them,
and a runner that plays them against a live server over many connections at once.

Three parts, the first two without I/O:

- :func:`predict` reads the bytes a client sent the way RFC 6455 says a server must (with
  Hypercorn's message cap and wsproto's strictness), and says which reactions are right:
  stay open (and answer every ping), fail the connection (1002, or 1007 for bad UTF-8),
  close with 1009, or echo the client's close.
- :func:`generate_case` makes case ``index`` of a seed: a legal sequence of messages,
  fragments and control frames, then zero or more mutations (reserved bits and opcodes,
  unmasked or fragmented control frames, continuations out of place, lying and absurd lengths,
  invalid UTF-8, oversize, bad close frames, truncation, garbage), cut into random writes.
  The same (seed, index) always gives the same bytes.
- :func:`run_campaign` plays cases over ``concurrency`` connections; a connection that is still
  open and idle after a case (the application answered a probe) carries the next case.
  Anything other than a predicted reaction is a :class:`Finding`.

Hypercorn 0.18 deviates from RFC 6455 in one way this module accepts: a connection it fails
for a protocol error (1002/1007) is closed at the TCP level without a close frame, so a browser
reports 1006. Those closures are counted (``CampaignStats.closed_without_frame``).
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import json
import random
import struct
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import trio

from support.raw_ws import (
    MAX_CONTROL_PAYLOAD,
    LengthForm,
    Opcode,
    ProtocolViolation,
    RawWebSocket,
    build_frame,
    close_payload,
    open_raw_websocket,
)

#: Close codes a client may send (RFC 6455 section 7.4, as wsproto knows them).
VALID_CLOSE_CODES: Final = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013)
#: Codes a client must not send: out of range, reserved, local-only, unassigned.
BAD_CLOSE_CODES: Final = (0, 1, 999, 1004, 1005, 1006, 1014, 1015, 1016, 2000, 2999, 5000, 65535)
RESERVED_OPCODES: Final = (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF)
INVALID_UTF8: Final = (
    b"\xff",
    b"\xfe\xfe",
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # a UTF-16 surrogate
    b"\xf4\x90\x80\x80",  # above U+10FFFF
    b"\x80",  # a lone continuation byte
    b"\xe2\x82",  # a sequence cut short, then ASCII
)
#: The application's replies the fuzzer may see on an open socket.
KNOWN_REPLIES: Final = frozenset({"welcome", "error", "pong"})
CASE_TIMEOUT: Final = 30.0  # seconds: a case with no verdict by then is a finding ("hung")

Verdict = str  # "open", "fail:1002", "fail:1007", "1009", "echo:1000", "echo:none", "eof"


# --- the reference model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """What the server should do with the bytes a client sent.

    ``accept`` holds every right verdict (more than one when TCP segmentation decides, e.g.
    bad UTF-8 in the very frame that crosses the size cap). ``idle``: the connection is open
    between messages, so a probe message can follow. ``pongs``: the payloads of the pings the
    server must answer, in order (checked when the connection stays open).
    """

    accept: frozenset[Verdict]
    idle: bool
    pongs: tuple[bytes, ...]
    messages: int
    why: str
    #: how many of the bytes the server reads before it stops listening (a close frame's end)
    consumed: int


@dataclass
class _Reader:
    data: bytes
    hard_cap: int
    pos: int = 0
    message: int | None = None  # opcode of the message being received
    decoder: codecs.IncrementalDecoder | None = None
    length: int = 0  # bytes of the message so far (text: of the characters decoded so far)
    pongs: list[bytes] = field(default_factory=list)
    messages: int = 0


def predict(data: bytes, hard_cap: int) -> Prediction:
    """The right reactions of a server (message cap ``hard_cap``) to ``data`` from a client.

    The checks follow RFC 6455 section 5 in the order a frame's bytes arrive, so a frame cut
    short is "pending" exactly when a strict server can't yet tell it is wrong.
    """
    r = _Reader(data, hard_cap)

    def result(
        accept: set[Verdict], why: str, *, idle: bool = False, consumed: int | None = None
    ) -> Prediction:
        end = len(data) if consumed is None else consumed
        return Prediction(frozenset(accept), idle, tuple(r.pongs), r.messages, why, end)

    def fail(why: str, code: int = 1002) -> Prediction:
        return result({f"fail:{code}"}, why)

    while True:
        start = r.pos
        if len(data) - start < 2:
            idle = start == len(data) and r.message is None
            return result({"open"}, "idle" if idle else "a frame header cut short", idle=idle)
        first, second = data[start], data[start + 1]
        fin, rsv, opcode = bool(first & 0x80), (first >> 4) & 7, first & 0xF
        if opcode not in set(Opcode):
            return fail(f"reserved opcode {opcode:#x}")
        control = Opcode.is_control(opcode)
        if control and not fin:
            return fail("fragmented control frame")
        short = second & 0x7F
        if control and short > MAX_CONTROL_PAYLOAD:
            return fail("control frame longer than 125 bytes")
        offset = start + 2
        length = short
        if short == 126:
            if len(data) < offset + 2:
                return result({"open"}, "a 16-bit length cut short")
            (length,) = struct.unpack_from("!H", data, offset)
            offset += 2
            if length <= MAX_CONTROL_PAYLOAD:
                return fail("16-bit length for a 7-bit size")
        elif short == 127:
            if len(data) < offset + 8:
                return result({"open"}, "a 64-bit length cut short")
            (length,) = struct.unpack_from("!Q", data, offset)
            offset += 8
            if length <= 0xFFFF:
                return fail("64-bit length for a 16-bit size")
            if length >> 63:
                return fail("64-bit length with its top bit set")
        if rsv:
            return fail(f"RSV bits {rsv:#o} without an extension")
        if not second & 0x80:
            return fail("unmasked client frame")
        if len(data) < offset + 4:
            return result({"open"}, "a masking key cut short")
        key = data[offset : offset + 4]
        offset += 4
        available = min(length, len(data) - offset)
        payload = _unmask(data[offset : offset + available], key)
        complete = available == length

        if control:
            if not complete:
                return result({"open"}, "a control frame cut short")
            r.pos = offset + length
            if opcode == Opcode.PING:
                r.pongs.append(payload)
            elif opcode == Opcode.CLOSE:
                return _close(r, payload, result, fail)
            continue

        if available == 0 and length > 0:
            return result({"open"}, "a data frame with none of its payload yet")
        if opcode == Opcode.CONTINUATION and r.message is None:
            return fail("continuation with no message started")
        if opcode != Opcode.CONTINUATION and r.message is not None:
            return fail("a new message inside a fragmented one")
        if opcode != Opcode.CONTINUATION:
            r.message = opcode
            r.length = 0
            r.decoder = codecs.getincrementaldecoder("utf-8")() if opcode == Opcode.TEXT else None
        final = complete and fin
        if r.decoder is not None:
            # Byte by byte would be exact but slow; decode at once, and if that fails, find
            # whether the cap was crossed before the bad byte (then TCP segmentation decides).
            try:
                text = r.decoder.decode(payload, final)
            except UnicodeDecodeError as exc:
                valid = len(payload[: exc.start].decode("utf-8", "ignore").encode())
                accept = {"fail:1007"}
                if r.length + valid > hard_cap:
                    accept.add("1009")
                return result(accept, "invalid UTF-8 in a text message")
            # The server counts the bytes of whole characters: a character cut between two
            # fragments counts once its last byte has come.
            r.length += len(text.encode())
        else:
            r.length += len(payload)
        if r.length > hard_cap:
            return result({"1009"}, "message over the hard cap", consumed=offset + available)
        if not complete:
            return result({"open"}, "a data frame cut short")
        r.pos = offset + length
        if fin:
            r.message = None
            r.decoder = None
            r.messages += 1


def _close(
    r: _Reader,
    payload: bytes,
    result: Callable[..., Prediction],
    fail: Callable[..., Prediction],
) -> Prediction:
    if not payload:
        return result({"echo:none"}, "client close without a code", consumed=r.pos)
    if len(payload) == 1:
        return fail("close payload of one byte")
    (code,) = struct.unpack_from("!H", payload)
    if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
        return fail(f"close code {code} a client may not send")
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return fail("invalid UTF-8 in a close reason", 1007)
    return result({f"echo:{code}"}, f"client close {code}", consumed=r.pos)


def _unmask(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


# --- the generator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FrameSpec:
    """One frame to send, every field explicit (see :func:`support.raw_ws.build_frame`)."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    masked: bool = True
    length: int | None = None
    length_form: LengthForm | None = None
    key: bytes = b"\x37\xfa\x21\x3d"

    def encode(self) -> bytes:
        return build_frame(
            self.opcode,
            self.payload,
            fin=self.fin,
            rsv=self.rsv,
            mask=self.key if self.masked else None,
            length=self.length,
            length_form=self.length_form,
        )

    def describe(self) -> str:
        bits = [f"op={self.opcode:#x}", f"len={len(self.payload)}"]
        if not self.fin:
            bits.append("fin=0")
        if self.rsv:
            bits.append(f"rsv={self.rsv}")
        if not self.masked:
            bits.append("unmasked")
        if self.length is not None:
            bits.append(f"declared={self.length}")
        if self.length_form is not None:
            bits.append(f"form={self.length_form}")
        return " ".join(bits)


Ending = Literal["probe", "read", "fin", "reset"]


@dataclass(frozen=True)
class Case:
    """Case ``index`` of ``seed``: the bytes to send, how to cut them, what should happen."""

    seed: int
    index: int
    family: str
    frames: tuple[FrameSpec, ...]
    data: bytes
    chunks: tuple[int, ...]
    ending: Ending
    prediction: Prediction

    def reproducer(self) -> str:
        return (
            f"seed={self.seed} index={self.index} family={self.family} ending={self.ending}\n"
            f"  frames: {'; '.join(f.describe() for f in self.frames)}\n"
            f"  bytes ({len(self.data)}): {self.data[:600].hex()}"
            f"{'…' if len(self.data) > 600 else ''}\n"
            f"  chunks: {self.chunks[:40]}\n"
            f"  predicted: {sorted(self.prediction.accept)} ({self.prediction.why})"
        )


@dataclass(frozen=True)
class Limits:
    """The server's limits the generator aims at (``limits.max_message_bytes`` and 4× it)."""

    max_message_bytes: int
    hard_cap: int


def generate_case(seed: int, index: int, limits: Limits) -> Case:
    """Case ``index`` of ``seed`` (deterministic: the same arguments give the same bytes)."""
    rng = random.Random(f"ws-fuzz:{seed}:{index}")
    family, frames = _legal_sequence(rng, limits)
    if rng.random() < 0.55:
        count = rng.choice((1, 1, 1, 2, 3))
        names = []
        for _ in range(count):
            name, mutate = rng.choice(_MUTATIONS)
            frames = mutate(rng, frames, limits)
            names.append(name)
        family = "+".join(names)
    frames = [
        dataclasses.replace(f, key=rng.randbytes(4)) if rng.random() < 0.3 else f for f in frames
    ]
    data = b"".join(f.encode() for f in frames)
    if rng.random() < 0.06:
        family += "+garbage"
        at = rng.randrange(len(data) + 1)
        data = data[:at] + rng.randbytes(rng.randint(1, 16)) + data[at:]
    if rng.random() < 0.05 and data:
        family += "+truncated"
        data = data[: rng.randrange(len(data))]
    prediction = predict(data, limits.hard_cap)
    if prediction.accept == {"open"}:
        if prediction.idle:
            ending: Ending = "probe" if rng.random() < 0.92 else rng.choice(("fin", "reset"))
        else:
            ending = rng.choice(("fin", "reset"))
    else:
        # Nothing after the point where the server stops reading: unread bytes would make its
        # close a TCP reset, which can destroy the close frame on its way to us.
        data = data[: prediction.consumed]
        ending = "read"
    return Case(
        seed=seed,
        index=index,
        family=family,
        frames=tuple(frames),
        data=data,
        chunks=_chunks(rng, len(data)),
        ending=ending,
        prediction=prediction,
    )


def _chunks(rng: random.Random, size: int) -> tuple[int, ...]:
    if size == 0:
        return ()
    style = rng.random()
    if style < 0.6:
        return (size,)
    if style < 0.65 and size <= 300:
        return (1,) * size  # byte by byte
    cuts = sorted(rng.sample(range(1, size), min(size - 1, rng.randint(1, 6)))) if size > 1 else []
    edges = [0, *cuts, size]
    return tuple(b - a for a, b in itertools.pairwise(edges) if b > a)


def _text(rng: random.Random, size: int) -> bytes:
    """``size`` bytes of valid UTF-8 (ASCII, two-, three- and four-byte characters)."""
    alphabet = ("a", "{", '"', "é", "ü", "€", "中", "😀", "\u2028", "\x00")
    out = bytearray()
    while len(out) < size:
        out += rng.choice(alphabet).encode()
    while True:
        try:
            out.decode("utf-8")
            return bytes(out)
        except UnicodeDecodeError:
            out = out[:-1]


def _message_payload(rng: random.Random, opcode: int, limits: Limits) -> bytes:
    roll = rng.random()
    if roll < 0.75:
        size = rng.choice((0, 1, 2, 5, 17, 60, 125, 126, 200))
    elif roll < 0.9:
        size = rng.randint(0, limits.max_message_bytes + 64)
    else:
        size = limits.max_message_bytes + rng.randint(-8, 8)
    if opcode == Opcode.TEXT:
        if rng.random() < 0.3:
            return json.dumps({"type": rng.choice(("ping", "close", "nope")), "n": size}).encode()
        return _text(rng, size)
    return rng.randbytes(size)


def _control(rng: random.Random) -> FrameSpec:
    opcode = rng.choice((Opcode.PING, Opcode.PING, Opcode.PONG))
    size = rng.choice((0, 1, 8, 125, rng.randint(0, 125)))
    return FrameSpec(opcode, rng.randbytes(size))


def _split(payload: bytes, pieces: int, rng: random.Random) -> list[bytes]:
    if pieces <= 1 or not payload:
        return [payload] + [b""] * (pieces - 1)
    cuts = sorted(rng.randrange(len(payload) + 1) for _ in range(pieces - 1))
    edges = [0, *cuts, len(payload)]
    return [payload[a:b] for a, b in itertools.pairwise(edges)]


def _fragmented(
    rng: random.Random, opcode: int, payload: bytes, pieces: int, controls: float
) -> list[FrameSpec]:
    frames: list[FrameSpec] = []
    parts = _split(payload, pieces, rng)
    for i, part in enumerate(parts):
        frames.append(
            FrameSpec(opcode if i == 0 else Opcode.CONTINUATION, part, fin=i == len(parts) - 1)
        )
        if i < len(parts) - 1 and rng.random() < controls:
            frames.append(_control(rng))  # legal: control frames may come between fragments
    return frames


def _legal_sequence(rng: random.Random, limits: Limits) -> tuple[str, list[FrameSpec]]:
    roll = rng.random()
    if roll < 0.04:
        count = rng.choice((20, 100, 300))
        return "ping-flood", [
            FrameSpec(Opcode.PING, rng.randbytes(rng.randint(0, 125))) for _ in range(count)
        ]
    if roll < 0.08:
        payload = _text(rng, rng.randint(0, 600))
        return "many-fragments", _fragmented(rng, Opcode.TEXT, payload, rng.randint(100, 400), 0.05)
    if roll < 0.13:
        opcode = rng.choice((Opcode.TEXT, Opcode.BINARY))
        size = limits.hard_cap + rng.choice((-1, 0, 1, 2, 50))
        payload = _text(rng, size) if opcode == Opcode.TEXT else rng.randbytes(size)
        pieces = rng.choice((1, 2, 7, 40))
        return "near-hard-cap", _fragmented(rng, opcode, payload, pieces, 0.1)
    frames: list[FrameSpec] = []
    for _ in range(rng.choice((1, 1, 2, 3, 5))):
        if rng.random() < 0.2:
            frames.append(_control(rng))
        opcode = rng.choice((Opcode.TEXT, Opcode.BINARY))
        payload = _message_payload(rng, opcode, limits)
        pieces = rng.choice((1, 1, 1, 2, 3, 8))
        frames += _fragmented(rng, opcode, payload, pieces, 0.3)
    if rng.random() < 0.08:
        reason = _text(rng, rng.randint(0, 60))
        frames.append(FrameSpec(Opcode.CLOSE, close_payload(rng.choice(VALID_CLOSE_CODES), reason)))
        return "legal+close", frames
    return "legal", frames


# Mutations: each takes the frames and returns new ones (most make the sequence illegal).

Mutation = Callable[[random.Random, list[FrameSpec], Limits], list[FrameSpec]]


def _pick(rng: random.Random, frames: list[FrameSpec]) -> int:
    return rng.randrange(len(frames))


def _with(frames: list[FrameSpec], index: int, **changes: object) -> list[FrameSpec]:
    out = list(frames)
    out[index] = dataclasses.replace(out[index], **changes)  # type: ignore[arg-type]
    return out


def _m_rsv(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    return _with(frames, _pick(rng, frames), rsv=rng.randint(1, 7))


def _m_unmasked(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    return _with(frames, _pick(rng, frames), masked=False)


def _m_reserved_opcode(
    rng: random.Random, frames: list[FrameSpec], limits: Limits
) -> list[FrameSpec]:
    return _with(frames, _pick(rng, frames), opcode=rng.choice(RESERVED_OPCODES))


def _m_swap_opcode(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    opcode = rng.choice((Opcode.CONTINUATION, Opcode.TEXT, Opcode.BINARY))
    return _with(frames, _pick(rng, frames), opcode=opcode)


def _m_toggle_fin(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    index = _pick(rng, frames)
    return _with(frames, index, fin=not frames[index].fin)


def _m_drop(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    if len(frames) < 2:
        return [FrameSpec(Opcode.CONTINUATION, b"orphan"), *frames]
    index = _pick(rng, frames)
    return frames[:index] + frames[index + 1 :]


def _m_duplicate(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    index = _pick(rng, frames)
    return [*frames[: index + 1], frames[index], *frames[index + 1 :]]


def _m_long_control(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    opcode = rng.choice((Opcode.PING, Opcode.PONG, Opcode.CLOSE))
    size = rng.choice((126, 127, 200, 1000, 70000))
    payload = close_payload(1000, b"x" * (size - 2)) if opcode == Opcode.CLOSE else b"p" * size
    at = rng.randrange(len(frames) + 1)
    return [*frames[:at], FrameSpec(opcode, payload), *frames[at:]]


def _m_fragmented_control(
    rng: random.Random, frames: list[FrameSpec], limits: Limits
) -> list[FrameSpec]:
    at = rng.randrange(len(frames) + 1)
    opcode = rng.choice((Opcode.PING, Opcode.PONG, Opcode.CLOSE))
    return [*frames[:at], FrameSpec(opcode, b"", fin=False), *frames[at:]]


def _m_length_form(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    index = _pick(rng, frames)
    frame = frames[index]
    size = len(frame.payload) if frame.length is None else frame.length
    forms: list[LengthForm] = [form for form in (16, 64) if not (form == 16 and size > 0xFFFF)]
    return _with(frames, index, length_form=rng.choice(forms))


def _m_lying_length(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    index = _pick(rng, frames)
    size = len(frames[index].payload)
    declared = max(0, size + rng.choice((-3, -1, 1, 2, 10, 1000)))
    return _with(frames, index, length=declared)


def _m_absurd_length(
    rng: random.Random, frames: list[FrameSpec], limits: Limits
) -> list[FrameSpec]:
    index = _pick(rng, frames)
    declared = rng.choice((2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1, 0x10000, limits.hard_cap + 1))
    return _with(frames, index, length=declared, length_form=64)


def _m_bad_utf8(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    texts = [i for i, f in enumerate(frames) if f.opcode in (Opcode.TEXT, Opcode.CONTINUATION)]
    bad = rng.choice(INVALID_UTF8)
    if not texts:
        return [*frames, FrameSpec(Opcode.TEXT, b"ok" + bad + b"ok")]
    index = rng.choice(texts)
    payload = frames[index].payload
    at = rng.randrange(len(payload) + 1)
    return _with(frames, index, payload=payload[:at] + bad + payload[at:])


def _m_split_utf8(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    # Legal: a character cut between two fragments; illegal if the message then ends.
    char = rng.choice(("é", "€", "😀")).encode()
    cut = rng.randint(1, len(char) - 1)
    ends = rng.random() < 0.5
    tail = [] if ends else [FrameSpec(Opcode.CONTINUATION, char[cut:] + b"!")]
    return [*frames, FrameSpec(Opcode.TEXT, b"a" + char[:cut], fin=ends), *tail]


def _m_oversize(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    opcode = rng.choice((Opcode.TEXT, Opcode.BINARY))
    size = limits.hard_cap + rng.choice((1, 2, 100, limits.hard_cap))
    payload = b"x" * size if opcode == Opcode.TEXT else rng.randbytes(size)
    pieces = rng.choice((1, 3, 50))
    extra = (
        [FrameSpec(rng.choice((Opcode.TEXT, Opcode.BINARY)), b"after")]
        if rng.random() < 0.5
        else []
    )
    return [*frames, *_fragmented(rng, opcode, payload, pieces, 0.2), *extra]


def _m_bad_close(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    roll = rng.random()
    if roll < 0.4:
        payload = close_payload(rng.choice(BAD_CLOSE_CODES), b"bye")
    elif roll < 0.6:
        payload = rng.randbytes(1)
    elif roll < 0.8:
        payload = close_payload(1000, rng.choice(INVALID_UTF8))
    else:
        payload = close_payload(rng.choice(VALID_CLOSE_CODES), _text(rng, rng.randint(0, 123)))
    at = rng.randrange(len(frames) + 1)
    return [*frames[:at], FrameSpec(Opcode.CLOSE, payload), *frames[at:]]


def _m_flip_bit(rng: random.Random, frames: list[FrameSpec], limits: Limits) -> list[FrameSpec]:
    # Expressed as a frame whose header is taken from another's with one bit flipped.
    index = _pick(rng, frames)
    frame = frames[index]
    choice = rng.randrange(4)
    if choice == 0:
        return _with(frames, index, fin=not frame.fin)
    if choice == 1:
        return _with(frames, index, rsv=frame.rsv ^ (1 << rng.randrange(3)))
    if choice == 2:
        return _with(frames, index, opcode=frame.opcode ^ (1 << rng.randrange(4)))
    return _with(frames, index, masked=not frame.masked)


_MUTATIONS: Final[tuple[tuple[str, Mutation], ...]] = (
    ("rsv", _m_rsv),
    ("unmasked", _m_unmasked),
    ("reserved-opcode", _m_reserved_opcode),
    ("swap-opcode", _m_swap_opcode),
    ("toggle-fin", _m_toggle_fin),
    ("drop-frame", _m_drop),
    ("duplicate-frame", _m_duplicate),
    ("long-control", _m_long_control),
    ("fragmented-control", _m_fragmented_control),
    ("non-minimal-length", _m_length_form),
    ("lying-length", _m_lying_length),
    ("absurd-length", _m_absurd_length),
    ("bad-utf8", _m_bad_utf8),
    ("split-utf8", _m_split_utf8),
    ("oversize", _m_oversize),
    ("bad-close", _m_bad_close),
    ("flip-bit", _m_flip_bit),
)


# --- the runner ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A case whose outcome no right reaction explains."""

    kind: str  # "unexpected reaction", "hung", "protocol violation", "bad reply", …
    detail: str
    case: Case

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}\n{self.case.reproducer()}"


@dataclass
class CampaignStats:
    cases: int = 0
    connections: int = 0
    seconds: float = 0.0
    verdicts: Counter[str] = field(default_factory=Counter)
    families: Counter[str] = field(default_factory=Counter)
    #: protocol failures closed at the TCP level with no close frame (Hypercorn's deviation)
    closed_without_frame: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def cases_per_minute(self) -> float:
        return self.cases / self.seconds * 60 if self.seconds else 0.0


async def run_campaign(
    ws_url: str,
    *,
    seed: int,
    cases: int,
    limits: Limits,
    concurrency: int = 8,
    first_index: int = 0,
    on_finding: Callable[[Finding], None] | None = None,
    stop_after: float | None = None,
) -> CampaignStats:
    """Play cases ``first_index`` … ``first_index + cases - 1`` of ``seed`` against ``ws_url``.

    ``stop_after`` (seconds) ends the campaign early, after the cases in flight.
    Cancellation: cancelling the caller closes every connection (they are the campaign's own).
    """
    stats = CampaignStats()
    next_index = first_index
    last = first_index + cases
    started = time.monotonic()

    def take() -> int | None:
        nonlocal next_index
        if next_index >= last:
            return None
        if stop_after is not None and time.monotonic() - started > stop_after:
            return None
        next_index += 1
        return next_index - 1

    async def worker() -> None:
        index = take()
        while index is not None:
            stats.connections += 1
            async with open_raw_websocket(ws_url) as ws:
                while index is not None:
                    case = generate_case(seed, index, limits)
                    reusable = await play_case(ws, case, stats, on_finding)
                    index = take()
                    if not reusable:
                        break

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    stats.seconds = time.monotonic() - started
    return stats


async def play_case(
    ws: RawWebSocket,
    case: Case,
    stats: CampaignStats,
    on_finding: Callable[[Finding], None] | None = None,
) -> bool:
    """Send one case on ``ws`` and judge the server's reaction; True if ``ws`` can go on."""
    findings_before = len(stats.findings)

    def found(kind: str, detail: str) -> None:
        finding = Finding(kind, detail, case)
        stats.findings.append(finding)
        if on_finding is not None:
            on_finding(finding)

    stats.cases += 1
    stats.families[case.family.split("+")[0]] += 1
    pongs_before = _pong_count(ws)
    messages_before = len(ws.messages)
    verdict = "hung"
    try:
        with trio.move_on_after(CASE_TIMEOUT):
            position = 0
            for size in case.chunks:
                await ws.send_raw(case.data[position : position + size])
                position += size
            verdict = await _observe(ws, case)
    except ProtocolViolation as violation:
        found("protocol violation", str(violation))
        return False
    stats.verdicts[verdict] += 1
    if verdict == "hung":
        found("hung", f"no reaction within {CASE_TIMEOUT:.0f} s")
        return False
    if verdict == "fail:abrupt":
        stats.closed_without_frame += 1
    if not _matches(verdict, case):
        found("unexpected reaction", f"observed {verdict}, closure {ws.closure}")
    if verdict == "open":
        pongs = ws.pong_payloads[pongs_before:]
        if tuple(pongs) != case.prediction.pongs:
            found(
                "wrong pongs",
                f"{len(case.prediction.pongs)} pings, {len(pongs)} pongs "
                f"(first differing: {_first_difference(pongs, case.prediction.pongs)})",
            )
        for message in ws.messages[messages_before:]:
            problem = _reply_problem(message)
            if problem:
                found("bad reply", problem)
    return verdict == "open" and len(stats.findings) == findings_before


async def _observe(ws: RawWebSocket, case: Case) -> Verdict:
    if case.ending == "probe":
        return "open" if await ws.probe() else _closed_verdict(ws)
    if case.ending == "reset":
        ws.reset()
        return "reset"
    too_big = "1009" in case.prediction.accept
    if too_big:
        # Answer the server's close frame, and end our side too: the refused frame may still be
        # open (a lying length), so the server might read our close as its payload and only
        # end the connection after its close-handshake timeout.
        while (frame := await ws.receive_frame()) is not None:
            if frame.opcode == Opcode.CLOSE:
                await ws.send_close(1000)
                break
    if case.ending == "fin" or too_big:
        await ws.send_eof()
    await ws.wait_closed(answer=False)
    verdict = _closed_verdict(ws)
    return "eof" if case.ending == "fin" and verdict == "fail:abrupt" else verdict


def _closed_verdict(ws: RawWebSocket) -> Verdict:
    closure = ws.closure
    assert closure is not None
    if "close frame" not in closure.how:
        return "fail:abrupt"
    return f"close:{closure.code if closure.code is not None else 'none'}"


def _matches(verdict: Verdict, case: Case) -> bool:
    accept = case.prediction.accept
    if verdict in accept or verdict == "reset":
        return True
    if verdict == "eof":
        return case.ending == "fin" and "open" in accept
    if verdict == "fail:abrupt":
        # Hypercorn's way to fail a connection: no close frame (the module docstring).
        return any(v.startswith("fail:") for v in accept)
    if verdict.startswith("close:"):
        code = verdict.split(":")[1]
        return bool({f"fail:{code}", f"echo:{code}"} & accept) or (
            code == "1009" and "1009" in accept
        )
    return False


def _pong_count(ws: RawWebSocket) -> int:
    return len(ws.pong_payloads)


def _first_difference(got: list[bytes], want: tuple[bytes, ...]) -> str:
    for i, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"#{i}: {a[:20]!r} != {b[:20]!r}"
    return "lengths"


def _reply_problem(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        return f"a binary message from the application: {message[:60]!r}"
    try:
        reply = json.loads(message)
    except ValueError:
        return f"a reply that is not JSON: {message[:80]!r}"
    if not isinstance(reply, dict) or reply.get("type") not in KNOWN_REPLIES:
        return f"an unexpected reply: {message[:120]}"
    if reply.get("code") == "internal_error":
        return f"the application failed handling a message: {message[:200]}"
    return None
