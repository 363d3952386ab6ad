"""Envelopes between nodes: parsed once, bad ones named by field; seq de-duplication."""

from __future__ import annotations

import json
from typing import Any

import pytest

from mediastream.cluster.envelope import (
    MAX_ENVELOPE_BYTES,
    Envelope,
    SeqWindow,
    parse_envelope,
)
from mediastream.cluster.errors import EnvelopeError

GOOD: dict[str, Any] = {
    "kind": "offer",
    "corr": "c1",
    "reply_to": "node-a",
    "socket": "s-1",
    "stream": "cam-1",
    "epoch": 1764750000123,
    "seq": 17,
    "payload": {"sdp": "v=0\r\n"},
}


def test_an_envelope_survives_the_wire_unchanged() -> None:
    envelope = parse_envelope(json.dumps(GOOD))
    assert envelope == Envelope(**GOOD)
    assert parse_envelope(envelope.to_json()) == envelope
    assert envelope.is_request and not envelope.is_reply


def test_unknown_fields_are_ignored_so_newer_nodes_can_add_some() -> None:
    assert parse_envelope(json.dumps({**GOOD, "trace": "x"})) == Envelope(**GOOD)


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        ({"kind": None}, "kind", "must be a string"),
        ({"kind": ""}, "kind", "must not be empty"),
        ({"reply_to": ""}, "reply_to", "must not be empty"),
        ({"corr": 5}, "corr", "must be a string"),
        ({"socket": ["s"]}, "socket", "must be a string"),
        ({"stream": "x" * 300}, "stream", "longer than"),
        ({"epoch": "7"}, "epoch", "must be an integer"),
        ({"epoch": True}, "epoch", "must be an integer"),
        ({"epoch": -1}, "epoch", "must be 0 to"),
        ({"seq": 1.5}, "seq", "must be an integer"),
        ({"seq": 2**60}, "seq", "must be 0 to"),
    ],
)
def test_a_bad_field_is_named(change: dict[str, Any], field: str, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(json.dumps({**GOOD, **change}))
    assert caught.value.field == field
    assert reason in caught.value.reason
    assert repr(field) in str(caught.value)


@pytest.mark.parametrize(
    "missing", ["kind", "corr", "reply_to", "socket", "stream", "epoch", "seq", "payload"]
)
def test_a_missing_field_is_named(missing: str) -> None:
    item = {name: value for name, value in GOOD.items() if name != missing}
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(json.dumps(item))
    assert (caught.value.field, caught.value.reason) == (missing, "missing")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object, got list"),
        (b'"offer"', "must be a JSON object, got str"),
        (b" " * (MAX_ENVELOPE_BYTES + 1), "larger than"),
    ],
)
def test_a_message_that_is_no_envelope_at_all(data: bytes, reason: str) -> None:
    with pytest.raises(EnvelopeError) as caught:
        parse_envelope(data)
    assert caught.value.field == "envelope"
    assert reason in caught.value.reason


def test_a_repeated_seq_from_one_sender_is_refused_and_other_senders_are_independent() -> None:
    window = SeqWindow(window=8)
    assert window.accept("a", 100)
    assert not window.accept("a", 100)
    assert window.accept("b", 100)
    assert window.accept("a", 99)  # out of order but new
    assert not window.accept("a", 99)
    assert window.accept("a", 101)


def test_a_sender_that_restarted_with_lower_numbers_is_heard_again() -> None:
    window = SeqWindow(window=8)
    for seq in range(1000, 1020):
        assert window.accept("a", seq)
    assert window.accept("a", 5)  # far below the window: a restart, not a repeat
    assert not window.accept("a", 5)
    assert window.accept("a", 6)


def test_the_window_stays_bounded() -> None:
    window = SeqWindow(window=8, max_senders=3)
    for seq in range(10_000):
        window.accept("a", seq)
    assert len(window._senders["a"][1]) <= 16
    for sender in "bcde":
        window.accept(sender, 1)
    assert list(window._senders) == ["c", "d", "e"]
