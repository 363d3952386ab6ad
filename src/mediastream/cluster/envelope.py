"""The envelope every node-to-node message travels in, and duplicate detection by ``seq``.

On the wire an envelope is one JSON object (the field names are the wire names)::

    {"kind": "offer", "corr": "9f2c…", "reply_to": "node-a", "socket": "s-17",
     "stream": "front-door", "epoch": 1764750000123, "seq": 1764749990000042,
     "payload": {"sdp": "v=0…"}}

It is parsed once, where it comes off the bus, into a frozen :class:`Envelope`; a message
that is not a valid envelope raises :class:`EnvelopeError` naming the field and is dropped on
its own (the bus keeps running; the other messages are not affected).

- ``kind``: what the message is (the routing layer's vocabulary; ``"reply"`` is the bus's).
- ``corr``: correlation id of a request and its reply; empty for one-way messages.
- ``reply_to``: the sending node's id (its inbox), which is also where a reply goes.
- ``socket``: the browser socket the message is about, on the sending node; may be empty.
- ``stream``: the stream id the message is about; may be empty.
- ``epoch``: the stream's ownership epoch the sender believes in (a fencing token: the owner
  drops messages for an epoch that is not its own); 0 when not about a stream.
- ``seq``: per-sender sequence number; a receiver drops a repeat of one it has seen.
- ``payload``: any JSON value.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Final

from .errors import EnvelopeError

#: the kind of a reply to a request (matched to it by ``corr``).
REPLY: Final = "reply"

#: larger messages are refused when sent and dropped when received (an SDP is at most
#: ``limits.max_sdp_bytes``, 48 KiB by default).
MAX_ENVELOPE_BYTES: Final = 256 * 1024

_MAX_NAME_CHARS: Final = 256  # kind, corr, reply_to, socket and stream
_MAX_JSON_INT: Final = 2**53  # integers that survive every JSON parser (and Lua's doubles)


@dataclass(frozen=True)
class Envelope:
    """One message between nodes, validated (see the module docstring for each field)."""

    kind: str
    corr: str
    reply_to: str
    socket: str
    stream: str
    epoch: int
    seq: int
    payload: Any

    @property
    def is_reply(self) -> bool:
        return self.kind == REPLY

    @property
    def is_request(self) -> bool:
        return bool(self.corr) and not self.is_reply

    def to_json(self) -> bytes:
        """The wire form; the inverse of :func:`parse_envelope`."""
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=False).encode()


def parse_envelope(data: bytes | str) -> Envelope:
    """Validate one message from the bus.

    Unknown fields are ignored, so a newer node can add one without breaking older ones
    during a rolling upgrade.

    Raises:
        EnvelopeError: naming the first missing or invalid field (``"envelope"`` when the
            message is not a JSON object of acceptable size).
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise EnvelopeError("envelope", f"larger than {MAX_ENVELOPE_BYTES} bytes")
    try:
        item = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError("envelope", f"not JSON ({exc})") from None
    if not isinstance(item, dict):
        raise EnvelopeError("envelope", f"must be a JSON object, got {type(item).__name__}")
    if "payload" not in item:
        raise EnvelopeError("payload", "missing")
    return Envelope(
        kind=_text(item, "kind", required=True),
        corr=_text(item, "corr"),
        reply_to=_text(item, "reply_to", required=True),
        socket=_text(item, "socket"),
        stream=_text(item, "stream"),
        epoch=_count(item, "epoch"),
        seq=_count(item, "seq"),
        payload=item["payload"],
    )


def _text(item: dict[str, Any], name: str, *, required: bool = False) -> str:
    if name not in item:
        raise EnvelopeError(name, "missing")
    value = item[name]
    if not isinstance(value, str):
        raise EnvelopeError(name, f"must be a string, got {type(value).__name__}")
    if required and not value:
        raise EnvelopeError(name, "must not be empty")
    if len(value) > _MAX_NAME_CHARS:
        raise EnvelopeError(name, f"longer than {_MAX_NAME_CHARS} characters")
    return value


def _count(item: dict[str, Any], name: str) -> int:
    if name not in item:
        raise EnvelopeError(name, "missing")
    value = item[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise EnvelopeError(name, f"must be an integer, got {type(value).__name__}")
    if not 0 <= value < _MAX_JSON_INT:
        raise EnvelopeError(name, f"must be 0 to 2**53-1, got {value}")
    return value


class SeqWindow:
    """Remembers which ``seq`` numbers each sender has used, to drop repeats.

    Pub/sub may deliver a message and its retry both; a sender numbers its messages upwards
    from the microsecond clock at its start (so a restarted sender continues above its old
    numbers). Per sender the last ``window`` numbers below its highest are remembered; a
    number further below than that is taken as the sender having restarted with a clock set
    back, and starts its window afresh. At most ``max_senders`` senders are tracked (the
    least recently heard is forgotten).
    """

    def __init__(self, window: int = 1024, max_senders: int = 1024) -> None:
        self._window = window
        self._max_senders = max_senders
        self._senders: OrderedDict[str, tuple[int, set[int]]] = OrderedDict()

    def accept(self, sender: str, seq: int) -> bool:
        """True the first time ``(sender, seq)`` is seen, False for a repeat."""
        known = self._senders.get(sender)
        seen: set[int]
        if known is None or seq < known[0] - self._window:
            highest, seen = seq, set()
        else:
            highest, seen = known
            if seq in seen:
                self._senders.move_to_end(sender)
                return False
        seen.add(seq)
        highest = max(highest, seq)
        if len(seen) > 2 * self._window:
            seen = {s for s in seen if s >= highest - self._window}
        self._senders[sender] = (highest, seen)
        self._senders.move_to_end(sender)
        while len(self._senders) > self._max_senders:
            self._senders.popitem(last=False)
        return True
