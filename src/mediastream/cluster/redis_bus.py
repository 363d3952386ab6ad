"""The bus over Redis pub/sub: node ``N``'s inbox is the channel ``ms:inbox:N``.

Pub/sub delivers at most once: a message published while the receiver is reconnecting is
lost (the sender's timeout and retry cover requests), and ``PUBLISH`` tells how many
subscribers got a message, which is how a sender learns that a node is gone (0).

Task tree: ``open_redis_bus`` owns one nursery holding the receive pump (coredis's pub/sub
connection, its reader and keep-alive tasks under it). The pump hands every message to
:meth:`Bus.deliver`, which never waits for the consumer. When Redis goes away, the pump
subscribes again (backing off up to :data:`RESUBSCRIBE_MAX_DELAY`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import anyio
import coredis.exceptions
import coredis.retry
import trio

from .bus import INBOX_SIZE, REQUEST_TIMEOUT, Bus
from .errors import RedisUnavailable
from .redis_client import COMMAND_TIMEOUT, Redis, describe, redis_call, subscription

log = logging.getLogger(__name__)

#: waits between two attempts to subscribe again after Redis went away (doubling).
RESUBSCRIBE_MIN_DELAY: Final = 0.05  # seconds
RESUBSCRIBE_MAX_DELAY: Final = 1.0  # seconds
#: an inbox connection quiet for this long is PINGed. coredis notices a dead subscription
#: connection only when a command on it fails (its reader may just stop), so this is also how
#: soon a node subscribes again after Redis restarts (coredis's default is 15 s).
INBOX_KEEPALIVE: Final = 1.0  # seconds


def inbox_channel(node_id: str) -> str:
    return f"ms:inbox:{node_id}"


class RedisTransport:
    """:class:`Transport` over ``PUBLISH``."""

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def publish(self, node_id: str, data: bytes) -> int:
        return await redis_call(
            self._client,
            f'PUBLISH to node "{node_id}"',
            self._client.publish(inbox_channel(node_id), data),
        )


@asynccontextmanager
async def open_redis_bus(
    client: Redis,
    node_id: str,
    *,
    inbox_size: int = INBOX_SIZE,
    request_timeout: float = REQUEST_TIMEOUT,
) -> AsyncIterator[Bus]:
    """This node's bus, subscribed to its inbox before it is returned.

    Raises:
        RedisUnavailable: Redis did not confirm the subscription within
            :data:`COMMAND_TIMEOUT` (it is down or hung).

    Resource handling: on exit the subscription ends and the inbox is closed (a consumer's
    ``async for`` over ``bus.inbox`` ends).
    """
    transport = RedisTransport(client)
    bus = Bus(node_id, transport, inbox_size=inbox_size, request_timeout=request_timeout)
    subscribed = False
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(COMMAND_TIMEOUT):
            await nursery.start(_receive, client, bus)
            subscribed = True
        if subscribed:
            try:
                yield bus
            finally:
                bus.close_inbox()
        nursery.cancel_scope.cancel()
    if not subscribed:  # raised here, outside the nursery, so not inside an ExceptionGroup
        raise RedisUnavailable(
            f'node "{node_id}" could not subscribe to its inbox at Redis {describe(client)} '
            f"within {COMMAND_TIMEOUT:g} s"
        )


async def _receive(
    client: Redis, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Keep the inbox subscribed and feed every message to the bus, for as long as it runs.

    Started once the first subscription is confirmed. coredis's own resubscription after a
    lost connection was seen to forget the channel (about half the time after a Redis
    restart, the subscription never came back), so each subscription here lives in one
    ``pubsub`` block without retries, and this loop opens a fresh one after any failure.
    """
    channel = inbox_channel(bus.node_id)
    delay = RESUBSCRIBE_MIN_DELAY
    started = False
    while True:
        try:
            async with subscription(client, channel, keepalive=INBOX_KEEPALIVE) as pubsub:
                if started:
                    log.info('node "%s" subscribed to its inbox again', bus.node_id)
                else:
                    task_status.started()
                    started = True
                delay = RESUBSCRIBE_MIN_DELAY
                async for message in pubsub:
                    data = message["data"]
                    if message["type"] == "message" and isinstance(data, str | bytes):
                        await bus.deliver(data)
            reason = "the subscription ended"
        except* (
            coredis.exceptions.RedisError,
            TimeoutError,
            OSError,
            anyio.ClosedResourceError,
        ) as group:
            reason = "; ".join(str(exc) for exc in group.exceptions)
        log.warning(
            'node "%s" lost its inbox subscription at Redis %s (%s); subscribing again in %g s',
            bus.node_id, describe(client), reason, delay,
        )  # fmt: skip
        await trio.sleep(delay)
        delay = min(2 * delay, RESUBSCRIBE_MAX_DELAY)
