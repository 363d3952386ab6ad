"""Which nodes replicate a stream, from what, with how many viewers: ``ms:replicas:{stream}``.

A hash per stream, one field per replica node, written by that node only. Redis 7.0 has no
expiry per hash field, so each value carries its own: ``"{expires_ms}|{entry JSON}"``, the
expiry taken from Redis's clock inside the script (no node's clock is trusted). Every write
is one Lua script (:data:`_WRITE`): the field set with a fresh expiry, the fields of others
that expired pruned, the whole key's ``PEXPIRE`` pushed to the newest expiry. Every read is
one script too (:data:`_READ`, any number of streams): expired fields pruned, the live ones
returned. So a killed node's entries vanish by themselves within :data:`REPLICA_TTL`, and a
replica that ends deletes its field at once (:data:`_DELETE`).

A replica keeps its entry with :func:`run_replica_registration`: written when it starts,
every :data:`REPLICA_RENEW_INTERVAL`, and :data:`REPLICA_DEBOUNCE` after what it reports
changed (its viewers, its downstream relay connections, its upstream), at once after a quiet
spell.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import trio

from .errors import ClusterError, RedisUnavailable
from .redis_client import Redis, redis_call

log = logging.getLogger(__name__)

#: an entry lives this long without renewal (a killed replica's entry is gone after it).
REPLICA_TTL: Final = 5.0  # seconds
REPLICA_RENEW_INTERVAL: Final = 2.0  # seconds
#: writes that follow changes are at least this far apart (a change after a quiet spell is
#: written at once; the rest of a burst of offers together, this long after the last write).
REPLICA_DEBOUNCE: Final = 0.1  # seconds


def replicas_key(stream_id: str) -> str:
    return f"ms:replicas:{stream_id}"


@dataclass(frozen=True)
class ReplicaEntry:
    """One replica of a stream, as it tells the cluster."""

    node: str
    #: the node whose relay feeds it: the owner (depth 1) or another replica.
    upstream: str
    #: 1: fed by the owner; n: fed by a replica of depth n - 1.
    depth: int
    #: its sessions of the stream, counted from their offer (as the owner counts its own).
    viewers: int
    #: the replicas of the stream it feeds, chained below it (one relay connection per
    #: quality each).
    relays: int
    #: ``host:port`` of its relay (where a replica below it connects).
    relay_address: str
    #: offers it has accepted for the stream since it started (only ever grows): the owner
    #: tells by it which of the viewers it sent there have arrived.
    offers: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ReplicaEntry:
        """Raises ``ClusterError`` naming what is wrong in an entry read from Redis."""
        try:
            item = json.loads(text)
            if not isinstance(item, dict):
                raise TypeError("not a JSON object")
            entry = cls(**item)
            strings = (entry.node, entry.upstream, entry.relay_address)
            numbers = (entry.depth, entry.viewers, entry.relays, entry.offers)
            if not all(isinstance(v, str) for v in strings) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in numbers
            ):
                raise TypeError("a field is of the wrong type")
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"bad replica entry {text[:200]!r}: {exc}") from None
        return entry


#: KEYS: the stream's key. ARGV: node, entry JSON, TTL ms.
_WRITE: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = now_ms + tonumber(ARGV[3])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local stamp = tonumber(string.match(all[i + 1], '^(%d+)|'))
  if all[i] ~= ARGV[1] and (stamp == nil or stamp <= now_ms) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], string.format('%d', expires) .. '|' .. ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

#: KEYS: streams' keys. Returns, per key, a flat list of live entry JSONs.
_READ: Final = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local result = {}
for k = 1, #KEYS do
  local live = {}
  local all = redis.call('HGETALL', KEYS[k])
  for i = 1, #all, 2 do
    local stamp, entry = string.match(all[i + 1], '^(%d+)|(.*)$')
    if stamp ~= nil and tonumber(stamp) > now_ms then
      table.insert(live, entry)
    else
      redis.call('HDEL', KEYS[k], all[i])
    end
  end
  table.insert(result, live)
end
return result
"""


async def write_replica(
    client: Redis, stream_id: str, entry: ReplicaEntry, *, ttl: float = REPLICA_TTL
) -> None:
    """Write (or renew) this node's entry for ``stream_id``.

    Raises:
        RedisUnavailable
    """
    await redis_call(
        client,
        f'register the replica of "{stream_id}" on node "{entry.node}"',
        client.register_script(_WRITE)(
            keys=[replicas_key(stream_id)],
            args=[entry.node, entry.to_json(), max(1, round(ttl * 1000))],
        ),
    )


async def delete_replica(client: Redis, stream_id: str, node_id: str) -> None:
    """Delete ``node_id``'s entry for ``stream_id`` (the replica ended).

    Raises:
        RedisUnavailable
    """
    await redis_call(
        client,
        f'unregister the replica of "{stream_id}" on node "{node_id}"',
        client.hdel(replicas_key(stream_id), [node_id]),
    )


async def read_replicas(client: Redis, stream_ids: list[str]) -> dict[str, list[ReplicaEntry]]:
    """The live replicas of each stream (sorted by depth, then node), in one script call;
    bad entries are skipped.

    Raises:
        RedisUnavailable
    """
    if not stream_ids:
        return {}
    result: Any = await redis_call(
        client,
        "read the replicas of streams",
        client.register_script(_READ)(keys=[replicas_key(s) for s in stream_ids], args=[]),
    )
    replicas: dict[str, list[ReplicaEntry]] = {}
    for stream_id, texts in zip(stream_ids, result, strict=True):
        entries = []
        for text in texts or ():
            try:
                entries.append(ReplicaEntry.from_json(str(text)))
            except ClusterError as exc:
                log.warning('stream "%s": %s; skipped', stream_id, exc)
        replicas[stream_id] = sorted(entries, key=lambda e: (e.depth, e.node))
    return replicas


class ReplicaRegistration:
    """The handle of :func:`run_replica_registration`: say that the entry changed."""

    def __init__(self) -> None:
        self.writes = 0
        self.failures = 0
        self._changed = trio.Event()
        self._written = trio.Event()

    def changed(self) -> None:
        """The entry changed: write it soon (after the debounce)."""
        self._changed.set()

    async def wait_written(self) -> None:
        """Until the next successful write (after this call)."""
        await self._written.wait()


async def run_replica_registration(
    client: Redis,
    stream_id: str,
    entry: Callable[[], ReplicaEntry],
    *,
    ttl: float = REPLICA_TTL,
    interval: float = REPLICA_RENEW_INTERVAL,
    debounce: float = REPLICA_DEBOUNCE,
    task_status: trio.TaskStatus[ReplicaRegistration] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep ``entry()`` in ``ms:replicas:{stream_id}`` until cancelled; started once the first
    write was tried (the task status is the :class:`ReplicaRegistration`).

    Cancellation: the entry is deleted (shielded, bounded); one that cannot be is left to
    expire.
    """
    registration = ReplicaRegistration()
    written: ReplicaEntry | None = None
    node = entry().node
    started = False
    try:
        while True:
            current = entry()
            try:
                await write_replica(client, stream_id, current, ttl=ttl)
            except RedisUnavailable as exc:
                registration.failures += 1
                if registration.failures == 1 or registration.failures % 30 == 0:
                    log.warning("%s (failure %d; retrying)", exc, registration.failures)
            else:
                registration.failures = 0
                registration.writes += 1
                written = current
                registration._written.set()
                registration._written = trio.Event()
            if not started:
                task_status.started(registration)
                started = True
            wrote_at = trio.current_time()
            with trio.move_on_after(interval):
                while True:
                    await registration._changed.wait()
                    # At once after a quiet spell; the rest of a burst of changes together.
                    await trio.sleep_until(wrote_at + debounce)
                    registration._changed = trio.Event()
                    if entry() != written:
                        break
    finally:
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1.0),
            contextlib.suppress(RedisUnavailable),
        ):
            await delete_replica(client, stream_id, node)
