"""The one Redis connection pool of a node (coredis, natively on Trio through anyio).

Every command is bounded in time here, at the call site (:func:`redis_call`), and any way
Redis can fail (refused, reset, silent) becomes one :class:`RedisUnavailable` that names the
server and the command. coredis's own retries are off: the callers know their deadlines (a
lease must not be renewed late) and retry within them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, cast

import anyio
import coredis
import coredis.exceptions
import coredis.retry
import trio

from .errors import RedisUnavailable

#: a command that takes longer is treated as Redis being unavailable.
COMMAND_TIMEOUT: Final = 2.0  # seconds
#: opening a TCP connection to Redis.
CONNECT_TIMEOUT: Final = 1.0  # seconds

#: Told the duration of each command (seconds) and whether it failed (the ``/metrics``
#: histogram of Redis round trips).
CommandObserver = Callable[[float, bool], None]

_T = TypeVar("_T")


class Redis(coredis.Redis[str]):
    """coredis's client, carrying who is told each command's duration (:func:`redis_call`)."""

    on_command: CommandObserver | None = None


@asynccontextmanager
async def open_redis(
    url: str, *, on_command: CommandObserver | None = None
) -> AsyncIterator[Redis]:
    """A coredis client for ``url`` with bounded connect and read times, decoding to ``str``.

    Nothing is sent until the first command, so this succeeds while Redis is down; the
    commands then raise :class:`RedisUnavailable`.

    Resource handling: the pool's connections close when the block exits.
    """
    client = redis_from_url(url, stream_timeout=COMMAND_TIMEOUT)
    client.on_command = on_command
    async with client:
        yield client


def redis_from_url(url: str, **options: Any) -> Redis:
    """A client for ``url`` decoding to ``str``, with a bounded connect time and no retries of
    coredis's own (callers bound and retry at their level); ``options`` add to those."""
    # from_url builds the class it is called on; its annotation says the base class.
    return cast(
        Redis,
        Redis.from_url(
            url,
            decode_responses=True,
            connect_timeout=CONNECT_TIMEOUT,
            retry_policy=coredis.retry.NoRetryPolicy(),
            **options,
        ),
    )


def subscription(client: Redis, channel: str, *, keepalive: float) -> Any:
    """A pub/sub block on ``channel``: subscribe messages skipped, no retries of coredis's own,
    the subscription confirmed within :data:`COMMAND_TIMEOUT`, a ping after ``keepalive``
    idle seconds. coredis's own resubscription after a lost connection was seen to forget the
    channel, so callers open a fresh block after any failure instead."""
    return client.pubsub(
        channels=[channel],
        ignore_subscribe_messages=True,
        retry_policy=coredis.retry.NoRetryPolicy(),
        subscription_timeout=COMMAND_TIMEOUT,
        max_idle_seconds=keepalive,
    )


async def redis_call(client: Redis, what: str, command: Awaitable[_T]) -> _T:
    """Await one Redis command, at most :data:`COMMAND_TIMEOUT` seconds.

    Args:
        what: the command in words, for the error (``'renew lease of "cam-1"'``).

    Raises:
        RedisUnavailable: naming the server and ``what``, when Redis refused the connection,
            dropped it or did not answer in time.
    """
    observe = client.on_command
    started = trio.current_time()
    try:
        result = await _bounded(client, what, command)
    except RedisUnavailable:
        if observe is not None:
            observe(trio.current_time() - started, True)
        raise
    # (A command cancelled by its caller is not observed: its time says nothing of Redis.)
    if observe is not None:
        observe(trio.current_time() - started, False)
    return result


async def _bounded(client: Redis, what: str, command: Awaitable[_T]) -> _T:
    """Raises :class:`RedisUnavailable` (see :func:`redis_call`)."""
    try:
        with trio.fail_after(COMMAND_TIMEOUT):
            return await command
    except trio.TooSlowError:
        raise RedisUnavailable(
            f"Redis at {describe(client)} did not answer {what} within {COMMAND_TIMEOUT:g} s"
        ) from None
    except (
        coredis.exceptions.ConnectionError,
        TimeoutError,
        OSError,
        # the pool's connection was closed under the command (its tasks cancelled at shutdown)
        anyio.ClosedResourceError,
    ) as exc:
        raise RedisUnavailable(f"Redis at {describe(client)} failed {what}: {exc}") from None


def describe(client: Redis) -> str:
    """Where the client connects, without credentials (``127.0.0.1:6379``)."""
    return str(client.connection_pool.location)
