"""The bus's own logic over an in-memory transport (Redis itself: tests/integration).

The transport hands each published message straight to the target node's ``deliver``, so
every step is deterministic; it can lose chosen messages, as pub/sub does.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

from mediastream.cluster.bus import Bus
from mediastream.cluster.envelope import Envelope, parse_envelope
from mediastream.cluster.errors import ClusterError, OwnerGone, RequestTimeout


class MemoryTransport:
    def __init__(self) -> None:
        self.nodes: dict[str, Bus] = {}
        self.lose: Callable[[Envelope], bool] = lambda envelope: False
        self.lost: list[Envelope] = []

    def bus(self, node_id: str, **options: float) -> Bus:
        bus = self.nodes[node_id] = Bus(node_id, self, **options)  # type: ignore[arg-type]
        return bus

    async def publish(self, node_id: str, data: bytes) -> int:
        target = self.nodes.get(node_id)
        if target is None:
            return 0
        envelope = parse_envelope(data)
        if self.lose(envelope):
            self.lost.append(envelope)
        else:
            await target.deliver(data)
        return 1


async def answer_offers(bus: Bus, answered: list[Envelope]) -> None:
    async for request in bus.inbox:
        answered.append(request)
        await bus.reply(request, {"sdp": f"answer to {request.payload['sdp']}"})


async def test_a_request_gets_its_reply() -> None:
    transport = MemoryTransport()
    a, b = transport.bus("a"), transport.bus("b")
    answered: list[Envelope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_offers, b, answered)
        reply = await a.request(
            "b", "offer", socket="s1", stream="cam", epoch=7, payload={"sdp": "o"}
        )
        nursery.cancel_scope.cancel()
    assert reply.is_reply and reply.payload == {"sdp": "answer to o"}
    assert (reply.reply_to, reply.stream, reply.epoch) == ("b", "cam", 7)
    assert [(r.kind, r.reply_to, r.socket) for r in answered] == [("offer", "a", "s1")]


async def test_a_lost_reply_is_resent_from_the_cache_and_the_request_is_handled_once() -> None:
    transport = MemoryTransport()
    a, b = transport.bus("a", request_timeout=0.2), transport.bus("b")
    first_reply = True

    def lose_first_reply(envelope: Envelope) -> bool:
        nonlocal first_reply
        if envelope.is_reply and first_reply:
            first_reply = False
            return True
        return False

    transport.lose = lose_first_reply
    answered: list[Envelope] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_offers, b, answered)
        reply = await a.request("b", "offer", stream="cam", payload={"sdp": "o"})
        nursery.cancel_scope.cancel()
    assert reply.payload == {"sdp": "answer to o"}
    assert len(answered) == 1  # the retry was recognised by its seq, not handled again
    assert len(transport.lost) == 1
    assert a.statistics().retries == 1
    assert b.statistics().dropped_duplicate == 1
    assert b.statistics().replies_resent == 1


async def test_no_reply_to_the_request_nor_its_retry_is_a_clear_error() -> None:
    transport = MemoryTransport()
    a, b = transport.bus("a", request_timeout=0.05), transport.bus("b")
    with pytest.raises(RequestTimeout) as caught:
        await a.request("b", "offer", stream="cam-9", payload={})
    assert 'node "b" did not answer offer for stream "cam-9"' in str(caught.value)
    assert "twice" in str(caught.value)
    statistics = a.statistics()
    assert (statistics.requests, statistics.retries, statistics.timeouts) == (1, 1, 1)
    # b got the request once; the retry, same seq, was dropped as a repeat
    assert b.statistics().inbox_queued == 1
    assert b.statistics().dropped_duplicate == 1


async def test_sending_to_a_node_nobody_listens_for_is_owner_gone() -> None:
    transport = MemoryTransport()
    a = transport.bus("a")
    with pytest.raises(OwnerGone) as caught:
        await a.send("ghost", "ice", stream="cam", payload={})
    assert caught.value.node_id == "ghost"
    with pytest.raises(OwnerGone):
        await a.request("ghost", "offer", payload={})
    assert a.statistics().retries == 0  # a gone node is not asked twice


async def test_a_full_inbox_drops_new_messages_and_counts_them() -> None:
    transport = MemoryTransport()
    a, b = transport.bus("a"), transport.bus("b", inbox_size=2)
    for index in range(5):
        await a.send("b", "ice", stream="cam", payload={"n": index})
    statistics = b.statistics()
    assert (statistics.received, statistics.inbox_queued, statistics.dropped_full) == (5, 2, 3)
    kept = [b.inbox.receive_nowait().payload["n"] for _ in range(2)]
    assert kept == [0, 1]  # the oldest are kept: they are the start of a negotiation


async def test_a_bad_message_is_dropped_alone() -> None:
    transport = MemoryTransport()
    b = transport.bus("b")
    await b.deliver(b'{"kind": "offer"}')
    await b.deliver(b"\x00garbage")
    good = Envelope("ice", "", "a", "s", "cam", 1, 1, None)
    await b.deliver(good.to_json())
    assert b.statistics().dropped_invalid == 2
    assert b.inbox.receive_nowait() == good


async def test_a_late_reply_is_dropped_and_counted() -> None:
    transport = MemoryTransport()
    a = transport.bus("a")
    await a.deliver(Envelope("reply", "nobody-waits", "b", "", "", 0, 1, None).to_json())
    assert a.statistics().dropped_unmatched_reply == 1
    with pytest.raises(trio.WouldBlock):
        a.inbox.receive_nowait()


async def test_only_requests_can_be_answered() -> None:
    transport = MemoryTransport()
    a = transport.bus("a")
    with pytest.raises(ClusterError, match="is not a request"):
        await a.reply(Envelope("ice", "", "b", "", "cam", 0, 1, None), {})
