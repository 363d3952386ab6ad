"""Who is in the cluster and who owns which stream: leases in Redis with fencing epochs.

Keys (all written by their owner only, all with a TTL so a dead node's vanish by themselves):

- ``ms:node:{id}`` = the node's :class:`NodeRecord` as JSON, ``PX`` :data:`NODE_TTL`,
  rewritten every :data:`NODE_RENEW_INTERVAL` (so a Redis restarted empty has every live node
  back within one interval).
- ``ms:owner:{stream}`` = ``"{node}|{epoch}"``, ``PX`` :data:`LEASE_TTL`: the node reading the
  stream's camera. Claimed and renewed by one Lua script (:data:`_CLAIM_OR_RENEW`): renew when
  the value is ours, claim when the key is missing, report the owner otherwise. Released with
  a compare-and-``DEL``.
- ``ms:epoch:{stream}``: the last epoch handed out. A claim takes ``INCR`` of it, raised to
  at least Redis's clock in milliseconds, so epochs keep increasing even across a Redis that
  restarted empty. Every message about a stream carries the epoch; an owner drops messages
  for an epoch that is not its own (fencing).

The owner side is :func:`hold_stream_lease`, a task started with ``nursery.start``. Its
promise: **this node stops using a stream before Redis can give the stream to another node.**
It keeps a local deadline, measured with Trio's clock from *before* each successful claim or
renewal was sent (so it is never later than Redis's own expiry), minus
:data:`LEASE_SAFETY_MARGIN` (time for the ingest to stop). If the deadline passes without a
renewal — Redis down, Redis hung, this process frozen by SIGSTOP or a long pause — the lease
is lost: its state becomes ``LOST``, the registered cancel scopes are cancelled and
:attr:`StreamLease.lost` is set. After every wait (a sleep, a Redis reply) the clock is read
*before* anything else, so a process that wakes from a freeze declares the loss first.
A task that must not act on a lost lease calls :meth:`StreamLease.check` right before acting.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Final

import trio

from .errors import ClusterError, LeaseLost, LeaseStateError, OwnedElsewhere, RedisUnavailable
from .redis_client import Redis, redis_call

log = logging.getLogger(__name__)

NODE_TTL: Final = 6.0  # seconds a node record lives without renewal
NODE_RENEW_INTERVAL: Final = 2.0  # seconds
LEASE_TTL: Final = 10.0  # seconds a stream lease lives in Redis without renewal
LEASE_RENEW_INTERVAL: Final = 3.0  # seconds
#: the owner gives a lease up this long before Redis would let it go: time for its ingest
#: to stop, and for the two clocks running at slightly different rates.
LEASE_SAFETY_MARGIN: Final = 1.5  # seconds
#: after a failed renewal, the next try comes this soon (always before the deadline).
RENEW_RETRY_DELAY: Final = 0.25  # seconds


def node_key(node_id: str) -> str:
    return f"ms:node:{node_id}"


def owner_key(stream_id: str) -> str:
    return f"ms:owner:{stream_id}"


def epoch_key(stream_id: str) -> str:
    return f"ms:epoch:{stream_id}"


# --- nodes ---------------------------------------------------------------------------------


class NodeState(enum.StrEnum):
    SERVING = "serving"
    #: taking no new streams, handing its own over before it exits.
    DRAINING = "draining"


@dataclass(frozen=True)
class NodeRecord:
    """What a node tells the cluster about itself."""

    node_id: str
    #: where browsers and other nodes reach it (``http://10.0.0.5:8107``).
    public_url: str
    #: ``host:port`` where replicas pull encoded frames from it; empty: no relay.
    relay_address: str = ""
    state: NodeState = NodeState.SERVING
    #: share of its capacity in use: 0.0 idle, 1.0 and more full.
    load: float = 0.0
    #: Redis's id of the node's liveness connection (``cluster/liveness.py``); 0: not known.
    liveness: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> NodeRecord:
        """Raises ``ClusterError`` naming what is wrong in a record read from Redis."""
        try:
            item = json.loads(text)
            record = cls(
                node_id=_typed(item, "node_id", str),
                public_url=_typed(item, "public_url", str),
                relay_address=_typed(item, "relay_address", str),
                state=NodeState(_typed(item, "state", str)),
                load=float(_typed(item, "load", (int, float))),
                # absent in records of nodes older than the liveness connection
                liveness=int(_typed(item, "liveness", int)) if "liveness" in item else 0,
            )
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"bad node record {text[:200]!r}: {exc}") from None
        return record


def _typed(item: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(item, dict):
        raise TypeError("not a JSON object")
    value = item.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} is missing or of the wrong type")
    return value


async def register_node(client: Redis, record: NodeRecord, *, ttl: float = NODE_TTL) -> None:
    """Write (or rewrite) this node's record with a fresh TTL.

    Raises:
        RedisUnavailable
    """
    await redis_call(
        client,
        f'register node "{record.node_id}"',
        client.set(node_key(record.node_id), record.to_json(), px=_ms(ttl)),
    )


async def live_nodes(client: Redis) -> list[NodeRecord]:
    """Every node whose record has not expired, sorted by id; bad records are skipped.

    Raises:
        RedisUnavailable
    """
    keys: list[str] = []
    cursor = 0
    while True:
        cursor, batch = await redis_call(
            client, "list nodes", client.scan(cursor, match=node_key("*"), count=1000)
        )
        keys.extend(batch)
        if cursor == 0:
            break
    if not keys:
        return []
    values = await redis_call(client, "read node records", client.mget(keys))
    records = []
    for value in values:
        if value is None:  # expired between SCAN and MGET
            continue
        try:
            records.append(NodeRecord.from_json(value))
        except ClusterError as exc:
            log.warning("%s; skipped", exc)
    return sorted(records, key=lambda record: record.node_id)


class NodeRegistration:
    """The handle of :func:`run_node_registration`: change the record, see how it goes."""

    def __init__(self, record: NodeRecord) -> None:
        self.record = record
        self.renewals = 0
        self.failures = 0
        self._renewed = trio.Event()
        self._updated = trio.Event()

    def update(self, record: NodeRecord) -> None:
        """Publish ``record`` at once (state, load or liveness id changed)."""
        if record.node_id != self.record.node_id:
            raise ClusterError(f'a node cannot change its id ("{self.record.node_id}")')
        self.record = record
        self._updated.set()

    async def wait_renewed(self) -> None:
        """Until the next successful write of the record (after this call)."""
        await self._renewed.wait()

    def _succeeded(self) -> None:
        self.renewals += 1
        self._renewed.set()
        self._renewed = trio.Event()


async def run_node_registration(
    client: Redis,
    record: NodeRecord,
    *,
    ttl: float = NODE_TTL,
    interval: float = NODE_RENEW_INTERVAL,
    task_status: trio.TaskStatus[NodeRegistration] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep this node's record in Redis, rewriting it every ``interval`` until cancelled.

    Started once Redis has the record, or after the first failure (the node works on while
    Redis is down, and registers as soon as it is back); the task status is the
    :class:`NodeRegistration`.

    Cancellation: the record is deleted (shielded, bounded) so the others see the node leave
    at once rather than after ``ttl``.
    """
    registration = NodeRegistration(record)
    started = False
    try:
        while True:
            try:
                await register_node(client, registration.record, ttl=ttl)
            except RedisUnavailable as exc:
                registration.failures += 1
                if registration.failures == 1 or registration.failures % 30 == 0:
                    log.warning("%s (failure %d; retrying)", exc, registration.failures)
            else:
                if registration.failures:
                    log.info('node "%s" registered again', record.node_id)
                    registration.failures = 0
                registration._succeeded()
            if not started:
                task_status.started(registration)
                started = True
            with trio.move_on_after(interval):
                await registration._updated.wait()
            registration._updated = trio.Event()
    finally:
        # Suppressed: a record that cannot be deleted expires by itself.
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1.0),
            contextlib.suppress(RedisUnavailable),
        ):
            await redis_call(
                client,
                f'unregister node "{record.node_id}"',
                client.delete([node_key(record.node_id)]),
            )


# --- stream ownership ----------------------------------------------------------------------


#: KEYS: owner key, epoch key. ARGV: node id, TTL in ms, our current value ("" if none).
#: Returns {"renewed"|"claimed"|"taken", owner value}.
_CLAIM_OR_RENEW: Final = """
local current = redis.call('GET', KEYS[1])
if current and current == ARGV[3] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'renewed', current}
end
if current then
  return {'taken', current}
end
local epoch = redis.call('INCR', KEYS[2])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
if epoch < now_ms then
  epoch = now_ms
  redis.call('SET', KEYS[2], string.format('%d', epoch))
end
local value = ARGV[1] .. '|' .. string.format('%d', epoch)
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return {'claimed', value}
"""

#: KEYS: owner key. ARGV: our value. Returns 1 if deleted.
_RELEASE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Owner:
    """Who owns a stream, as read from ``ms:owner:{stream}``."""

    node_id: str
    epoch: int

    @property
    def value(self) -> str:
        return f"{self.node_id}|{self.epoch}"

    @classmethod
    def parse(cls, value: str) -> Owner:
        node_id, separator, epoch = value.rpartition("|")
        if not separator or not node_id or not epoch.isdigit():
            raise ClusterError(f'bad owner value {value[:200]!r} (expected "node|epoch")')
        return cls(node_id, int(epoch))


async def current_owner(client: Redis, stream_id: str) -> Owner | None:
    """The stream's owner, or None when nobody holds it.

    Raises:
        RedisUnavailable
    """
    value = await redis_call(
        client, f'read the owner of "{stream_id}"', client.get(owner_key(stream_id))
    )
    return None if value is None else Owner.parse(value)


class LeaseState(enum.StrEnum):
    CLAIMING = "claiming"
    HELD = "held"
    #: not renewed in time, or taken over: whoever used it must have stopped.
    LOST = "lost"
    #: given up by this node (cancelled, or refused because another node owns it).
    RELEASED = "released"


_TRANSITIONS: Final = {
    LeaseState.CLAIMING: {LeaseState.HELD, LeaseState.RELEASED},
    # HELD -> HELD: renewed, or claimed again with a new epoch after Redis lost the key.
    LeaseState.HELD: {LeaseState.HELD, LeaseState.LOST, LeaseState.RELEASED},
    LeaseState.LOST: set(),
    LeaseState.RELEASED: set(),
}


@dataclass(frozen=True)
class LeaseStatistics:
    state: LeaseState
    epoch: int
    renewals: int
    #: claimed again (new epoch) after Redis lost the key, e.g. restarted empty.
    reclaims: int
    failed_renewals: int


class StreamLease:
    """This node's ownership of one stream (the task status of :func:`hold_stream_lease`).

    Read :attr:`state` and :attr:`epoch`; wait on :attr:`lost`; call :meth:`check` before
    acting on the stream; :meth:`cancel_on_loss` to have a scope cancelled the moment the
    lease is lost.
    """

    def __init__(self, stream_id: str, node_id: str) -> None:
        self.stream_id = stream_id
        self.node_id = node_id
        self.state = LeaseState.CLAIMING
        self.epoch = 0
        self.lost = trio.Event()
        #: why the lease was lost (empty while it is not).
        self.loss_reason = ""
        #: Trio's clock when the loss was declared.
        self.lost_at: float | None = None
        self._stop_at = -float("inf")
        #: held weakly: a scope is registered per ingest started (each quality, each restart)
        #: and must not be kept for the lease's whole life once its task has ended
        self._scopes: weakref.WeakSet[trio.CancelScope] = weakref.WeakSet()
        self._changed = trio.Event()
        self._counts = {"renewals": 0, "reclaims": 0, "failed_renewals": 0}

    @property
    def value(self) -> str:
        return Owner(self.node_id, self.epoch).value

    @property
    def stop_at(self) -> float:
        """Trio's clock at which this node stops using the stream unless renewed before."""
        return self._stop_at

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless the lease is held and its deadline not passed.

        Reads the clock itself, so it is right even in a process that has just woken from a
        freeze and whose lease task has not run yet (it then declares the loss).
        """
        if self.state is LeaseState.HELD and trio.current_time() >= self._stop_at:
            self._lose("not renewed before its deadline (checked on use)")
        if self.state is not LeaseState.HELD:
            raise LeaseLost(
                f'node "{self.node_id}" does not own stream "{self.stream_id}" '
                f"(lease {self.state}{': ' + self.loss_reason if self.loss_reason else ''})"
            )

    def give_up(self, reason: str) -> None:
        """Declare the lease lost now (this node can no longer vouch for it): the registered
        scopes are cancelled at once. The key is left to expire (or to be taken over)."""
        self._lose(reason)

    def cancel_on_loss(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` when the lease is lost (at once if it already is)."""
        if self.state is LeaseState.LOST:
            scope.cancel()
        else:
            self._scopes.add(scope)

    def cancel_users(self) -> None:
        """Cancel the registered scopes now, the lease still held: this node is handing the
        stream over (drain) and its ingest must stop before the lease is released."""
        for scope in list(self._scopes):
            scope.cancel()
        self._scopes.clear()

    async def wait_changed(self) -> None:
        """Until the next change of state or epoch (or renewal)."""
        await self._changed.wait()

    def statistics(self) -> LeaseStatistics:
        return LeaseStatistics(state=self.state, epoch=self.epoch, **self._counts)

    def _move(self, to: LeaseState) -> None:
        if to not in _TRANSITIONS[self.state]:
            raise LeaseStateError(
                f'lease of stream "{self.stream_id}" cannot go from "{self.state}" to "{to}"'
            )
        self.state = to
        self._changed.set()
        self._changed = trio.Event()

    def _hold(self, epoch: int, stop_at: float) -> None:
        self._move(LeaseState.HELD)
        self.epoch = epoch
        self._stop_at = stop_at

    def _lose(self, reason: str) -> None:
        if self.state is not LeaseState.HELD:
            return
        self._move(LeaseState.LOST)
        self.loss_reason = reason
        self.lost_at = trio.current_time()
        for scope in list(self._scopes):
            scope.cancel()
        self._scopes.clear()
        self.lost.set()
        log.warning(
            'node "%s" lost stream "%s" (epoch %d): %s',
            self.node_id, self.stream_id, self.epoch, reason,
        )  # fmt: skip


async def _claim_or_renew(
    client: Redis, lease: StreamLease, ttl: float, *, renew: bool
) -> tuple[str, Owner]:
    """Run :data:`_CLAIM_OR_RENEW`; returns its verdict and the owner it names."""
    script = client.register_script(_CLAIM_OR_RENEW)
    verb = "renew" if renew else "claim"
    result: Any = await redis_call(
        client,
        f'{verb} the lease of stream "{lease.stream_id}"',
        script(
            keys=[owner_key(lease.stream_id), epoch_key(lease.stream_id)],
            args=[lease.node_id, _ms(ttl), lease.value if renew else ""],
        ),
    )
    verdict, value = result
    return str(verdict), Owner.parse(str(value))


async def hold_stream_lease(
    client: Redis,
    stream_id: str,
    node_id: str,
    *,
    ttl: float = LEASE_TTL,
    renew_interval: float = LEASE_RENEW_INTERVAL,
    safety_margin: float = LEASE_SAFETY_MARGIN,
    task_status: trio.TaskStatus[StreamLease] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Own ``stream_id`` for this node until cancelled or lost.

    Started (``await nursery.start(hold_stream_lease, …)``) once the stream is claimed; the
    task status is the :class:`StreamLease`. Returns when the lease is lost.

    Raises (from ``nursery.start``, before it is started):
        OwnedElsewhere: another node holds the stream (its owner and epoch are in it).
        RedisUnavailable: the claim could not be made.

    Cancellation: the lease is released (compare-and-``DEL``, shielded, bounded) so another
    node can claim the stream at once. A lost lease is not deleted: Redis lets it expire,
    which leaves this node's ingest the safety margin to stop.
    """
    if not 0 < safety_margin < ttl or not 0 < renew_interval < ttl - safety_margin:
        raise ClusterError(
            f"lease timing must satisfy 0 < renew_interval ({renew_interval:g}) < ttl "
            f"({ttl:g}) - safety_margin ({safety_margin:g})"
        )
    lease = StreamLease(stream_id, node_id)
    sent = trio.current_time()
    try:
        verdict, owner = await _claim_or_renew(client, lease, ttl, renew=False)
    except BaseException:
        lease._move(LeaseState.RELEASED)
        raise
    if verdict != "claimed":
        lease._move(LeaseState.RELEASED)
        raise OwnedElsewhere(stream_id, owner.node_id, owner.epoch)
    lease._hold(owner.epoch, sent + ttl - safety_margin)
    log.info('node "%s" owns stream "%s" (epoch %d)', node_id, stream_id, owner.epoch)
    task_status.started(lease)
    try:
        await _keep(client, lease, ttl, renew_interval, safety_margin)
    finally:
        if lease.state is LeaseState.HELD:
            lease._move(LeaseState.RELEASED)
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await _release(client, lease)


async def _keep(
    client: Redis, lease: StreamLease, ttl: float, renew_interval: float, safety_margin: float
) -> None:
    """Renew until the lease is lost (returns) or the task is cancelled."""
    next_try = trio.current_time() + renew_interval
    while True:
        await trio.sleep_until(min(next_try, lease.stop_at))
        # Whatever woke us (the timer, or the process after a freeze): the clock first.
        if trio.current_time() >= lease.stop_at:
            lease._lose(f"not renewed before its deadline ({ttl:g} s lease)")
            return
        sent = trio.current_time()
        try:
            with trio.move_on_at(lease.stop_at):
                verdict, owner = await _claim_or_renew(client, lease, ttl, renew=True)
        except RedisUnavailable as exc:
            lease._counts["failed_renewals"] += 1
            log.info("%s; retrying until the lease's deadline", exc)
            next_try = trio.current_time() + RENEW_RETRY_DELAY
            continue
        if trio.current_time() >= lease.stop_at:  # no answer in time, or woke up late
            lease._lose(f"not renewed before its deadline ({ttl:g} s lease)")
            return
        if lease.state is not LeaseState.HELD:  # lost meanwhile, through check()
            return
        if verdict == "renewed":
            lease._counts["renewals"] += 1
            lease._hold(lease.epoch, sent + ttl - safety_margin)
        elif verdict == "claimed":
            # The key was gone while our deadline still held: Redis lost it (restarted
            # empty). Nobody holds the stream now, and it is ours again under a new epoch
            # (docs/cluster.md, known limits: the window before this renewal).
            lease._counts["reclaims"] += 1
            log.warning(
                'node "%s": lease of stream "%s" was missing in Redis; claimed again '
                "(epoch %d -> %d)",
                lease.node_id, lease.stream_id, lease.epoch, owner.epoch,
            )  # fmt: skip
            lease._hold(owner.epoch, sent + ttl - safety_margin)
        else:
            lease._lose(f'taken over by node "{owner.node_id}" (epoch {owner.epoch})')
            return
        next_try = sent + renew_interval


async def _release(client: Redis, lease: StreamLease) -> None:
    try:
        await redis_call(
            client,
            f'release the lease of stream "{lease.stream_id}"',
            client.register_script(_RELEASE)(keys=[owner_key(lease.stream_id)], args=[lease.value]),
        )
    except RedisUnavailable as exc:
        log.info("%s; it expires by itself", exc)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
