"""The bus over Redis pub/sub: node ``N``'s inbox is the channel ``ms:inbox:N``.

Pub/sub delivers at most once: a message published while the receiver is reconnecting is
lost (the sender's timeout and retry cover requests), and ``PUBLISH`` tells how many
subscribers got a message, which is how a sender learns that a node is gone (0).

Task tree: ``open_redis_bus`` owns one nursery holding the receive pump (coredis's pub/sub
connection, its reader and keep-alive tasks under it). The pump hands every message to
:meth:`Bus.deliver`, which never waits for the consumer. When Redis goes away, coredis
reconnects and subscribes again by itself (backing off up to :data:`RESUBSCRIBE_MAX_DELAY`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import coredis.exceptions
import coredis.retry
import trio

from .bus import INBOX_SIZE, REQUEST_TIMEOUT, Bus
from .errors import RedisUnavailable
from .redis_client import COMMAND_TIMEOUT, Redis, describe, redis_call

#: longest wait between two attempts to subscribe again after Redis went away.
RESUBSCRIBE_MAX_DELAY: Final = 1.0  # seconds


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
    bus = Bus(
        node_id, RedisTransport(client), inbox_size=inbox_size, request_timeout=request_timeout
    )
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(COMMAND_TIMEOUT):
                await nursery.start(_receive, client, bus)
        except (trio.TooSlowError, coredis.exceptions.ConnectionError, OSError) as exc:
            reason = "no answer" if isinstance(exc, trio.TooSlowError) else str(exc)
            raise RedisUnavailable(
                f'node "{node_id}" could not subscribe to its inbox at Redis '
                f"{describe(client)} within {COMMAND_TIMEOUT:g} s: {reason}"
            ) from None
        try:
            yield bus
        finally:
            nursery.cancel_scope.cancel()
            bus.close_inbox()


async def _receive(
    client: Redis, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Subscribe to the inbox and feed every message to the bus, for as long as it runs."""
    retry = coredis.retry.CompositeRetryPolicy(
        coredis.retry.ExponentialBackoffRetryPolicy(
            (coredis.exceptions.ConnectionError,),
            retries=None,
            base_delay=0.05,
            max_delay=RESUBSCRIBE_MAX_DELAY,
            jitter=True,
        ),
        coredis.retry.ConstantRetryPolicy((TimeoutError,), retries=2, delay=0.1),
    )
    async with client.pubsub(
        channels=[inbox_channel(bus.node_id)],
        ignore_subscribe_messages=True,
        retry_policy=retry,
        subscription_timeout=COMMAND_TIMEOUT,
    ) as pubsub:
        task_status.started()
        async for message in pubsub:
            data = message["data"]
            if message["type"] == "message" and isinstance(data, str | bytes):
                await bus.deliver(data)
