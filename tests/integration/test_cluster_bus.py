"""The bus over a real redis-server: inboxes, request/reply, retries, repeats, dead nodes."""

from __future__ import annotations

import pytest
import trio

from mediastream.cluster.bus import Bus
from mediastream.cluster.envelope import Envelope
from mediastream.cluster.errors import OwnerGone, RedisUnavailable, RequestTimeout
from mediastream.cluster.redis_bus import inbox_channel, open_redis_bus
from mediastream.cluster.redis_client import Redis

from support.redis import RedisServer


async def answer(bus: Bus, handled: list[Envelope]) -> None:
    """An owner: answers every request with what it was asked."""
    async for request in bus.inbox:
        handled.append(request)
        if request.is_request:
            await bus.reply(request, {"answer": request.payload})


async def test_a_request_travels_to_the_owner_and_its_reply_comes_back(client: Redis) -> None:
    handled: list[Envelope] = []
    async with (
        open_redis_bus(client, "node-a") as a,
        open_redis_bus(client, "node-b") as b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer, b, handled)
        with trio.fail_after(10):
            reply = await a.request(
                "node-b", "offer", socket="s-1", stream="cam-1", epoch=42, payload={"sdp": "v=0"}
            )
        nursery.cancel_scope.cancel()
    assert reply.payload == {"answer": {"sdp": "v=0"}}
    assert (reply.reply_to, reply.stream, reply.epoch) == ("node-b", "cam-1", 42)
    (request,) = handled
    assert (request.kind, request.reply_to, request.socket) == ("offer", "node-a", "s-1")
    assert a.statistics().retries == 0


async def test_an_unanswered_request_is_retried_once_then_fails_clearly(client: Redis) -> None:
    async with (
        open_redis_bus(client, "node-a", request_timeout=0.3) as a,
        open_redis_bus(client, "node-b") as b,
    ):
        with pytest.raises(RequestTimeout) as caught:
            await a.request("node-b", "offer", stream="cam-1", payload={})
        assert 'node "node-b" did not answer offer for stream "cam-1"' in str(caught.value)
        assert (a.statistics().retries, a.statistics().timeouts) == (1, 1)
        # the owner saw the request once: the retry carried the same seq
        assert b.inbox.receive_nowait().kind == "offer"
        with pytest.raises(trio.WouldBlock):
            b.inbox.receive_nowait()
        assert b.statistics().dropped_duplicate == 1


async def test_sending_to_a_node_that_is_gone_is_a_distinct_error(client: Redis) -> None:
    async with open_redis_bus(client, "node-a") as a:
        async with open_redis_bus(client, "node-b"):
            pass  # node-b existed, and is gone
        with pytest.raises(OwnerGone) as caught:
            await a.request("node-b", "offer", stream="cam-1", payload={})
        assert caught.value.node_id == "node-b"
        with pytest.raises(OwnerGone):
            await a.send("never-was", "ice", stream="cam-1", payload={})
        assert a.statistics().retries == 0


async def test_a_repeated_message_is_delivered_once_and_a_bad_one_is_dropped_alone(
    client: Redis,
) -> None:
    repeated = Envelope("ice", "", "node-x", "s-1", "cam-1", 7, 1001, {"candidate": "c1"})
    last = Envelope("ice", "", "node-x", "s-1", "cam-1", 7, 1002, {"candidate": "c2"})
    async with open_redis_bus(client, "node-b") as b:
        channel = inbox_channel("node-b")
        # one connection publishes in order, so node-b receives in this order
        for data in (repeated.to_json(), repeated.to_json(), b'{"kind": 5}', last.to_json()):
            assert await client.publish(channel, data) == 1
        with trio.fail_after(10):
            received = [await b.inbox.receive(), await b.inbox.receive()]
        assert received == [repeated, last]
        statistics = b.statistics()
        assert (statistics.dropped_duplicate, statistics.dropped_invalid) == (1, 1)


async def test_the_inbox_comes_back_after_redis_restarts_empty(
    redis_server: RedisServer, client: Redis
) -> None:
    handled: list[Envelope] = []
    async with (
        open_redis_bus(client, "node-a", request_timeout=1.0) as a,
        open_redis_bus(client, "node-b") as b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(answer, b, handled)
        redis_server.restart_empty()
        with trio.fail_after(10):
            reply = await request_until_subscribed(a, "node-b")
        assert reply.payload == {"answer": "after restart"}
        nursery.cancel_scope.cancel()


async def request_until_subscribed(bus: Bus, node: str) -> Envelope:
    """While node-b resubscribes, PUBLISH reaches nobody (OwnerGone) or Redis is still
    starting (RedisUnavailable): a sender tries again, as routing will."""
    while True:
        try:
            return await bus.request(node, "offer", stream="cam-1", payload="after restart")
        except (OwnerGone, RedisUnavailable):
            await trio.sleep(0.05)


async def test_redis_down_gives_clear_errors_within_bounded_time(
    redis_server: RedisServer, client: Redis
) -> None:
    async with open_redis_bus(client, "node-a") as a:
        redis_server.stop()
        with pytest.raises(RedisUnavailable) as caught:
            await a.send("node-b", "ice", stream="cam-1", payload={})
        assert f"127.0.0.1:{redis_server.port}" in str(caught.value)
        assert 'PUBLISH to node "node-b"' in str(caught.value)
    with pytest.raises(RedisUnavailable) as caught:
        async with open_redis_bus(client, "node-c"):
            pass
    assert 'node "node-c" could not subscribe to its inbox' in str(caught.value)


async def test_a_hung_redis_is_reported_as_unavailable_not_waited_for(
    redis_server: RedisServer, client: Redis
) -> None:
    async with open_redis_bus(client, "node-a") as a:
        redis_server.freeze()
        try:
            with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{redis_server.port}"):
                await a.send("node-b", "ice", stream="cam-1", payload={})
        finally:
            redis_server.thaw()
