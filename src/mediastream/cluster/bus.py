"""The message bus between nodes: each node has an inbox; send, request/reply, de-duplicate.

The logic here does not know Redis. A :class:`Transport` moves bytes to a node's inbox and
says how many listeners got them; :mod:`.redis_bus` is the Redis pub/sub transport (a NATS
one would implement the same two things). Everything else is here, once:

- ``send``: one message to a node's inbox, at most once. Nobody listening on that inbox
  (``PUBLISH`` reached 0 subscribers) raises :class:`OwnerGone` at once: the node is dead.
- ``request``: a message with a correlation id, then wait for the matching reply; on timeout
  the same message (same ``seq``) is sent once more; a second timeout raises
  :class:`RequestTimeout`.
- ``reply``: the answer to a request. The last replies are kept, so a request that arrives
  twice (its retry after a lost reply) is answered again from that cache, never processed
  twice.
- the inbox: received messages other than replies, parsed once into :class:`Envelope`,
  repeats removed by ``seq``, in a bounded buffer. When the buffer is full new messages are
  dropped and counted (the sender's timeout and retry, then renegotiation, recover), with a
  warning at most every few seconds; the receive pump never waits for the consumer.

Cancellation: ``request`` and ``send`` are cancellable at any point; a cancelled request's
reply, if it comes, is counted as unmatched and dropped.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final, Protocol

import trio

from .envelope import REPLY, Envelope, SeqWindow, parse_envelope
from .errors import ClusterError, EnvelopeError, OwnerGone, RequestTimeout

log = logging.getLogger(__name__)

INBOX_SIZE: Final = 256  # messages received but not yet taken by the consumer
REQUEST_TIMEOUT: Final = 5.0  # seconds per try; a request makes two tries
MAX_PENDING_REQUESTS: Final = 4096  # requests of this node waiting for replies at once
REPLY_CACHE_SIZE: Final = 1024  # replies kept to answer a retried request again
DROP_LOG_INTERVAL: Final = 10.0  # seconds between two warnings about dropped messages


class Transport(Protocol):
    """What a bus needs from the messaging system underneath."""

    async def publish(self, node_id: str, data: bytes) -> int:
        """Put ``data`` in ``node_id``'s inbox; return how many subscribers received it.

        Raises:
            RedisUnavailable: (or the transport's equivalent) when it cannot be reached.
        """
        ...


@dataclass(frozen=True)
class BusStatistics:
    """Counters since the bus opened (for ``/metrics`` and tests)."""

    sent: int
    received: int
    requests: int
    retries: int
    timeouts: int
    replies_resent: int
    #: the inbox buffer was full.
    dropped_full: int
    #: a repeat of a ``seq`` already received from that sender.
    dropped_duplicate: int
    #: not a valid envelope.
    dropped_invalid: int
    #: a reply nobody waits for (its request timed out or was cancelled).
    dropped_unmatched_reply: int
    inbox_queued: int


class _PendingReply:
    def __init__(self) -> None:
        self.arrived = trio.Event()
        self.reply: Envelope | None = None


class Bus:
    """One node's end of the bus. Built by an ``open_*_bus`` function, which also feeds
    :meth:`deliver` from its transport's receive loop.

    Args:
        node_id: this node's id; its inbox and the ``reply_to`` of everything it sends.
        transport: moves bytes to other nodes' inboxes.
        inbox_size: bound of the inbox buffer.
        request_timeout: default wait for a reply, per try.
    """

    def __init__(
        self,
        node_id: str,
        transport: Transport,
        *,
        inbox_size: int = INBOX_SIZE,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.node_id = node_id
        self.request_timeout = request_timeout
        self._transport = transport
        self._inbox_send, self.inbox = trio.open_memory_channel[Envelope](inbox_size)
        # Numbers start at the microsecond clock so a restarted node continues above its old
        # ones (receivers drop repeats by seq); see SeqWindow.
        self._next_seq = time.time_ns() // 1000
        self._seen = SeqWindow()
        self._pending: dict[str, _PendingReply] = {}
        self._replies: OrderedDict[tuple[str, int], tuple[str, bytes]] = OrderedDict()
        self._counts = dict.fromkeys(
            (
                "sent", "received", "requests", "retries", "timeouts", "replies_resent",
                "dropped_full", "dropped_duplicate", "dropped_invalid", "dropped_unmatched_reply",
            ),
            0,
        )  # fmt: skip
        self._last_warning: dict[str, float] = {}

    # --- sending ---------------------------------------------------------------------------

    async def send(
        self,
        node_id: str,
        kind: str,
        *,
        socket: str = "",
        stream: str = "",
        epoch: int = 0,
        payload: Any = None,
    ) -> None:
        """Send a one-way message to ``node_id``'s inbox.

        Raises:
            OwnerGone: nobody listens on that inbox.
            RedisUnavailable: the transport could not be reached.
        """
        envelope = self._envelope(kind, "", socket, stream, epoch, payload)
        await self._publish(node_id, envelope.to_json())

    async def request(
        self,
        node_id: str,
        kind: str,
        *,
        socket: str = "",
        stream: str = "",
        epoch: int = 0,
        payload: Any = None,
        reply_timeout: float | None = None,
    ) -> Envelope:
        """Send a request to ``node_id`` and return its reply (an envelope of kind ``reply``).

        Args:
            reply_timeout: wait per try (default ``request_timeout``); there are two tries.

        Raises:
            OwnerGone: nobody listens on that inbox (not retried: the node is gone).
            RequestTimeout: no reply to the request nor to its retry.
            RedisUnavailable: the transport could not be reached.
        """
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            raise ClusterError(
                f"{MAX_PENDING_REQUESTS} requests already wait for replies; "
                f'"{kind}" for stream "{stream}" to node "{node_id}" not sent'
            )
        per_try = self.request_timeout if reply_timeout is None else reply_timeout
        envelope = self._envelope(kind, uuid.uuid4().hex, socket, stream, epoch, payload)
        data = envelope.to_json()
        pending = self._pending[envelope.corr] = _PendingReply()
        self._counts["requests"] += 1
        try:
            for attempt in (1, 2):
                if attempt == 2:
                    self._counts["retries"] += 1
                    log.info(
                        'no reply from node "%s" to %s for stream "%s" within %g s; retrying',
                        node_id, kind, stream, per_try,
                    )  # fmt: skip
                await self._publish(node_id, data)
                with trio.move_on_after(per_try):
                    await pending.arrived.wait()
                if pending.reply is not None:
                    return pending.reply
            self._counts["timeouts"] += 1
            raise RequestTimeout(
                f'node "{node_id}" did not answer {kind} for stream "{stream}" within '
                f"{per_try:g} s, twice"
            )
        finally:
            del self._pending[envelope.corr]

    async def reply(self, request: Envelope, payload: Any) -> None:
        """Answer ``request`` (sent to its ``reply_to`` with its ``corr``).

        Raises:
            OwnerGone: the requesting node is gone.
            RedisUnavailable: the transport could not be reached.
        """
        if not request.is_request:
            raise ClusterError(
                f"{request.kind} from node {request.reply_to!r} is not a request; not answered"
            )
        envelope = self._envelope(
            REPLY, request.corr, request.socket, request.stream, request.epoch, payload
        )
        data = envelope.to_json()
        self._replies[(request.reply_to, request.seq)] = (request.reply_to, data)
        while len(self._replies) > REPLY_CACHE_SIZE:
            self._replies.popitem(last=False)
        await self._publish(request.reply_to, data)

    def _envelope(
        self, kind: str, corr: str, socket: str, stream: str, epoch: int, payload: Any
    ) -> Envelope:
        self._next_seq += 1
        return Envelope(
            kind=kind,
            corr=corr,
            reply_to=self.node_id,
            socket=socket,
            stream=stream,
            epoch=epoch,
            seq=self._next_seq,
            payload=payload,
        )

    async def _publish(self, node_id: str, data: bytes) -> None:
        receivers = await self._transport.publish(node_id, data)
        self._counts["sent"] += 1
        if receivers == 0:
            raise OwnerGone(node_id)

    # --- receiving -------------------------------------------------------------------------

    async def deliver(self, data: bytes | str) -> None:
        """Take one message off the transport: parse, de-duplicate, route.

        Replies wake their request; a repeated request whose reply is cached is answered
        again; everything else goes to :attr:`inbox`, or is dropped and counted when it is
        full. Never raises for bad input and never waits for the inbox's consumer.
        """
        try:
            envelope = parse_envelope(data)
        except EnvelopeError as exc:
            self._counts["dropped_invalid"] += 1
            if self._may_warn("invalid"):
                log.warning(
                    'node "%s" dropped a message from the bus: %s (%d invalid so far)',
                    self.node_id, exc, self._counts["dropped_invalid"],
                )  # fmt: skip
            return
        self._counts["received"] += 1
        if not self._seen.accept(envelope.reply_to, envelope.seq):
            self._counts["dropped_duplicate"] += 1
            await self._answer_repeat(envelope)
            return
        if envelope.is_reply:
            pending = self._pending.get(envelope.corr)
            if pending is None or pending.reply is not None:
                self._counts["dropped_unmatched_reply"] += 1
                log.debug("reply %s from node %s came too late", envelope.corr, envelope.reply_to)
                return
            pending.reply = envelope
            pending.arrived.set()
            return
        try:
            self._inbox_send.send_nowait(envelope)
        except trio.WouldBlock:
            self._counts["dropped_full"] += 1
            if self._may_warn("full"):
                log.warning(
                    'node "%s": inbox full (%d messages), dropped %s for stream "%s" '
                    "(%d dropped so far)",
                    self.node_id, self.statistics().inbox_queued, envelope.kind,
                    envelope.stream, self._counts["dropped_full"],
                )  # fmt: skip

    async def _answer_repeat(self, envelope: Envelope) -> None:
        cached = self._replies.get((envelope.reply_to, envelope.seq))
        if cached is None or not envelope.is_request:
            return
        target, data = cached
        try:
            await self._publish(target, data)
        except ClusterError as exc:  # the requester is gone or Redis is: it will time out
            log.info("reply to a repeated %s not resent: %s", envelope.kind, exc)
            return
        self._counts["replies_resent"] += 1

    def _may_warn(self, about: str) -> bool:
        """At most one warning per :data:`DROP_LOG_INTERVAL` about each kind of drop."""
        now = trio.current_time()
        if now - self._last_warning.get(about, -math.inf) < DROP_LOG_INTERVAL:
            return False
        self._last_warning[about] = now
        return True

    def close_inbox(self) -> None:
        """No more messages: the consumer's ``async for`` over :attr:`inbox` ends."""
        self._inbox_send.close()

    def statistics(self) -> BusStatistics:
        return BusStatistics(
            **self._counts, inbox_queued=self._inbox_send.statistics().current_buffer_used
        )
