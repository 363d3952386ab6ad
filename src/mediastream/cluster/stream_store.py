"""The stream store shared by a cluster: the management API's changes, in Redis, for every node.

In a single process the API's changes go to SQLite (``store.py``). In a cluster they go here,
and every node applies every change, whichever node's API took it.

Keys:

- ``ms:streams``, a hash: stream id → the stream's :class:`StreamRecord` as JSON — its
  definition (or none: the configuration file's), whether it is deleted (a tombstone, kept so
  a node that missed the delete does not bring the stream back) or stopped, its ``version``,
  and the node that made the change.
- ``ms:streams:changed``, a pub/sub channel: each record, as it is written.

**Versions.** A change is a Lua script (:data:`_WRITE`): it compares the stream's version in
Redis with the version the node's own copy has; equal, it writes the record with a new
version and publishes it in the same step; different, it writes nothing and answers the
current record: another node changed the stream since this node last saw it, and the API
answers 409 ``stream_changed`` (this node takes the newer record at once, so a retry works).
Two nodes changing one stream at once: the first script Redis runs wins, the other gets 409.
A new version is the old one plus one, raised to at least Redis's clock in milliseconds (like
lease epochs), so versions keep increasing across a Redis that restarted empty, and the
latest change wins when nodes write their copies back (below).

**Every node keeps a copy** of every record it has seen, in memory and in
``<data_dir>/cluster-streams.sqlite3``: it starts from that copy (so a node restarted while
Redis is down serves the streams it last knew), and after every (re)subscription to the
channel — its start, Redis restarted, a lost connection — it **writes its copy back** (a
record Redis lacks, or has with a lower version: :data:`_MERGE`, which publishes what it
wrote) and then reads the whole hash and applies every record newer than its own. So a Redis
that restarted empty gets the streams back from whichever node returns first, a node that
missed messages catches up, and no change made through the API is lost while one node
remembers it. Why write back rather than only read: the nodes are the only other place the
changes live when Redis runs without persistence (the recommended cache-like setup), and a
change the cluster accepted must survive a Redis restart.

Task tree (``SharedStreamStore.run``, in the server's lifetime nursery)::

    SharedStreamStore.run      its Redis pool; ready after the first sync (or Redis failed)
    └── subscription           ``ms:streams:changed``: write back, read all, then apply each
                               message; subscribed again after any failure

Secrets: a definition holds the source as written, camera credentials included, in the
clear — as the single process's SQLite store does (``docs/security.md``). Protect Redis as
you protect that file: a password in ``redis_url``, ``rediss://`` (TLS) between machines,
Redis on a private network.
"""

from __future__ import annotations

import functools
import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import coredis.exceptions
import coredis.retry
import trio

from ..changes import ChangeSignal
from ..config import stream_from_dict, stream_to_dict
from ..errors import ConfigError
from ..registry import StreamRegistry
from ..store import StoredStream, StoreUnavailable, StreamChanged
from .errors import ClusterError, RedisUnavailable
from .redis_client import (
    CommandObserver,
    Redis,
    describe,
    open_redis,
    redis_call,
    subscription,
)

log = logging.getLogger(__name__)

STREAMS_KEY: Final = "ms:streams"
CHANGES_CHANNEL: Final = "ms:streams:changed"
#: records written back to Redis per script call.
MERGE_BATCH: Final = 100
#: waits between two attempts to subscribe again after Redis went away (doubling).
RESUBSCRIBE_MIN_DELAY: Final = 0.05  # seconds
RESUBSCRIBE_MAX_DELAY: Final = 1.0  # seconds
#: the channel's connection is PINGed when quiet this long: how soon a dead one is noticed.
KEEPALIVE: Final = 1.0  # seconds

#: KEYS: the hash. ARGV: id, expected version, the record's JSON *without* its version and
#: without its opening brace, the channel. Returns {"written", record} or {"conflict", record}.
_WRITE: Final = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local version = 0
if current then
  local ok, decoded = pcall(cjson.decode, current)
  if ok and type(decoded) == 'table' and tonumber(decoded['version']) then
    version = tonumber(decoded['version'])
  end
end
if version ~= tonumber(ARGV[2]) then
  return {'conflict', current or ''}
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local new = math.max(version + 1, now_ms)
local record = '{"version":' .. string.format('%d', new) .. ',' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], record)
redis.call('PUBLISH', ARGV[4], record)
return {'written', record}
"""

#: KEYS: the hash. ARGV: the channel, then (id, version, record) triples. Writes (and
#: publishes) each record Redis lacks or has with a lower version; returns how many.
_MERGE: Final = """
local written = 0
for i = 2, #ARGV, 3 do
  local current = redis.call('HGET', KEYS[1], ARGV[i])
  local version = -1
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' and tonumber(decoded['version']) then
      version = tonumber(decoded['version'])
    end
  end
  if tonumber(ARGV[i + 1]) > version then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2])
    redis.call('PUBLISH', ARGV[1], ARGV[i + 2])
    written = written + 1
  end
end
return written
"""


@dataclass(frozen=True)
class StreamRecord:
    """One stream's state in the shared store."""

    id: str
    version: int
    #: the stream's table (``stream_to_dict``); None: the configuration file's definition
    definition: dict[str, Any] | None
    deleted: bool
    enabled: bool
    #: the node whose API made the change
    node: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    def body_json(self) -> str:
        """The JSON without ``version`` and without its ``{`` (:data:`_WRITE` adds them)."""
        fields = asdict(self)
        del fields["version"]
        return json.dumps(fields, separators=(",", ":"))[1:]

    def stored(self) -> StoredStream:
        return StoredStream(self.id, self.definition, self.deleted, self.enabled)

    @classmethod
    def from_json(cls, text: str) -> StreamRecord:
        """Raises ``ClusterError`` naming what is wrong in a record read from Redis or disk."""
        try:
            item = json.loads(text)
            if not isinstance(item, dict):
                raise TypeError("not a JSON object")
            definition = item.get("definition")
            checks = {
                "id": isinstance(item.get("id"), str),
                "version": isinstance(item.get("version"), int),
                "definition": definition is None or isinstance(definition, dict),
                "deleted": isinstance(item.get("deleted"), bool),
                "enabled": isinstance(item.get("enabled"), bool),
                "node": isinstance(item.get("node"), str),
            }
            for name, ok in checks.items():
                if not ok:
                    raise TypeError(f"{name} is missing or of the wrong type")
            return cls(
                item["id"], item["version"], definition, item["deleted"], item["enabled"],
                item["node"],
            )  # fmt: skip
        except (ValueError, TypeError) as exc:
            raise ClusterError(f"bad stream record {text[:200]!r}: {exc}") from None


@dataclass(frozen=True)
class StoreStatistics:
    #: changes made through this node's API and written to Redis
    written: int
    #: refused because another node had changed the stream (409)
    conflicts: int
    #: records of other nodes' changes applied here
    applied: int
    #: records written back to Redis after a (re)subscription (Redis had lost them)
    written_back: int
    #: (re)subscriptions to the channel, each followed by a full sync
    syncs: int
    records: int


class LocalCopy:
    """This node's copy of the records, in ``<data_dir>/cluster-streams.sqlite3``.

    Blocking ``sqlite3`` calls: callers run them in a worker thread. A record never replaces
    one with a higher version (several workers of one machine may share ``data_dir``).
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "cluster-streams.sqlite3"
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS records "
                "(id TEXT PRIMARY KEY, version INTEGER NOT NULL, record TEXT NOT NULL)"
            )

    def load(self) -> list[StreamRecord]:
        with self._connect() as db:
            rows = db.execute("SELECT record FROM records").fetchall()
        records = []
        for (text,) in rows:
            try:
                records.append(StreamRecord.from_json(text))
            except ClusterError as exc:
                log.error("%s: %s; skipped", self.path, exc)
        return records

    def save(self, record: StreamRecord) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO records (id, version, record) VALUES (?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET version = excluded.version, "
                "record = excluded.record WHERE excluded.version > records.version",
                (record.id, record.version, record.to_json()),
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=5)) as db, db:
            yield db


class SharedStreamStore:
    """The cluster's :class:`~mediastream.store.StreamChanges`, and the task that applies
    other nodes' changes to this node's registry.

    Args:
        redis_url: ``[cluster] redis_url``.
        node_id: this node's id (recorded with its changes).
        copy: this node's copy on disk (loaded with :meth:`load`).
        on_command: told each Redis command's duration (the ``/metrics`` histogram).
    """

    def __init__(
        self,
        redis_url: str,
        node_id: str,
        copy: LocalCopy,
        *,
        on_command: CommandObserver | None = None,
    ) -> None:
        self.lock = trio.Lock()
        self.node_id = node_id
        #: set before :meth:`run`: the registry other nodes' changes are applied to.
        self.registry: StreamRegistry | None = None
        self._redis_url = redis_url
        self._copy = copy
        self._on_command = on_command
        self._records: dict[str, StreamRecord] = {}
        self._redis: Redis | None = None
        self._counts = dict.fromkeys(
            ("written", "conflicts", "applied", "written_back", "syncs"), 0
        )
        #: notified after every sync and every record applied (tests and the API wait on it)
        self.changes = ChangeSignal()

    async def load(self) -> list[StoredStream]:
        """This node's copy, to apply to the registry at start-up (before :meth:`run`)."""
        records = await trio.to_thread.run_sync(self._copy.load)
        self._records = {record.id: record for record in records}
        return [record.stored() for record in records]

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(**self._counts, records=len(self._records))

    def version(self, stream_id: str) -> int:
        """The version of ``stream_id`` this node knows (0: never changed through the API)."""
        record = self._records.get(stream_id)
        return 0 if record is None else record.version

    # --- StreamChanges (the API, holding self.lock) -----------------------------------------

    async def save(
        self, stream_id: str, definition: dict[str, Any], *, enabled: bool = True
    ) -> None:
        await self._write(stream_id, definition, deleted=False, enabled=enabled)

    async def delete(self, stream_id: str) -> None:
        await self._write(stream_id, None, deleted=True, enabled=True)

    async def set_enabled(self, stream_id: str, enabled: bool) -> None:
        known = self._records.get(stream_id)
        definition = None if known is None or known.deleted else known.definition
        stream = self.registry.get(stream_id) if self.registry is not None else None
        if definition is None and stream is not None and stream.origin == "api":
            # Added through this node's API before it joined the cluster (``streams.sqlite3``):
            # shared with its definition, so the other nodes get the stream, not just a flag.
            definition = stream_to_dict(stream.config)
        await self._write(stream_id, definition, deleted=False, enabled=enabled)

    async def _write(
        self, stream_id: str, definition: dict[str, Any] | None, *, deleted: bool, enabled: bool
    ) -> None:
        """Raises :class:`StreamChanged` (409) or :class:`StoreUnavailable` (503)."""
        redis = self._redis
        if redis is None:
            raise StoreUnavailable(
                "Stream changes need the cluster's Redis, and this node is not connected to it"
            )
        expected = self.version(stream_id)
        draft = StreamRecord(stream_id, expected, definition, deleted, enabled, self.node_id)
        try:
            result: Any = await redis_call(
                redis,
                f'change stream "{stream_id}"',
                redis.register_script(_WRITE)(
                    keys=[STREAMS_KEY],
                    args=[stream_id, expected, draft.body_json(), CHANGES_CHANNEL],
                ),
            )
        except RedisUnavailable as exc:
            raise StoreUnavailable(f"Stream changes need the cluster's Redis: {exc}") from None
        verdict, text = str(result[0]), str(result[1])
        if verdict == "conflict":
            self._counts["conflicts"] += 1
            current = _parse_or_none(text) if text else None
            if current is not None:
                await self._apply(current)  # the caller holds the lock; a retry now works
            if current is None:
                raise StreamChanged(
                    f'Stream "{stream_id}" is at version {expected} here but not in the '
                    "cluster's store (Redis lost it and this node has not written it back "
                    "yet); read it again and retry"
                )
            raise StreamChanged(
                f'Stream "{stream_id}" was changed on node "{current.node}" meanwhile (version '
                f"{expected} here, {current.version} in the cluster); read it again and retry"
            )
        written = StreamRecord.from_json(text)
        self._counts["written"] += 1
        await self._remember(written)

    # --- applying the cluster's records -----------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep this node in step with the shared store until cancelled.

        Ready after the first full sync, or after the first attempt failed (Redis down: the
        node serves its own copy, changes through its API are refused with 503, and it syncs
        as soon as Redis is back).
        """
        async with open_redis(self._redis_url, on_command=self._on_command) as redis:
            self._redis = redis
            try:
                await self._follow(redis, task_status)
            finally:
                self._redis = None

    async def _follow(self, redis: Redis, task_status: trio.TaskStatus[None]) -> None:
        delay = RESUBSCRIBE_MIN_DELAY
        started = False
        while True:
            try:
                async with subscription(redis, CHANGES_CHANNEL, keepalive=KEEPALIVE) as pubsub:
                    # Subscribed first, then synced: a change made meanwhile is in both, and
                    # applying a record twice changes nothing.
                    await self._sync(redis)
                    if not started:
                        task_status.started()
                        started = True
                    delay = RESUBSCRIBE_MIN_DELAY
                    async for message in pubsub:
                        data = message["data"]
                        if message["type"] == "message" and isinstance(data, str | bytes):
                            text = data.decode() if isinstance(data, bytes) else data
                            record = _parse_or_none(text)
                            if record is not None:
                                async with self.lock:
                                    await self._apply_logged(record)
                reason = "the subscription ended"
            except* (
                coredis.exceptions.RedisError,
                TimeoutError,
                OSError,
                anyio.ClosedResourceError,
                RedisUnavailable,
            ) as group:
                reason = "; ".join(str(exc) for exc in group.exceptions)
            if not started:
                task_status.started()
                started = True
            log.warning(
                'node "%s" lost the shared stream store at Redis %s (%s); '
                "syncing again in %g s",
                self.node_id, describe(redis), reason, delay,
            )  # fmt: skip
            await trio.sleep(delay)
            delay = min(2 * delay, RESUBSCRIBE_MAX_DELAY)

    async def _sync(self, redis: Redis) -> None:
        """Write this node's copy back where Redis lacks it, then apply what Redis has."""
        records = list(self._records.values())
        for start in range(0, len(records), MERGE_BATCH):
            args: list[str | int] = [CHANGES_CHANNEL]
            for record in records[start : start + MERGE_BATCH]:
                args += [record.id, record.version, record.to_json()]
            written: Any = await redis_call(
                redis,
                "write the stream store back",
                redis.register_script(_MERGE)(keys=[STREAMS_KEY], args=args),
            )
            if written:
                self._counts["written_back"] += int(written)
                log.warning(
                    'node "%s" wrote %s stream records back to Redis (it had lost them)',
                    self.node_id, written,
                )  # fmt: skip
        everything = await redis_call(redis, "read the stream store", redis.hgetall(STREAMS_KEY))
        async with self.lock:
            for text in everything.values():
                if (found := _parse_or_none(str(text))) is not None:
                    await self._apply_logged(found)
        self._counts["syncs"] += 1
        self.changes.notify()

    async def _apply_logged(self, record: StreamRecord) -> None:
        try:
            await self._apply(record)
        except Exception:
            # A bug met by one record: that change is lost here, the node carries on.
            log.exception('%s: failed to apply the change of node "%s"', record.id, record.node)

    async def _apply(self, record: StreamRecord) -> None:
        """Make the registry say what ``record`` says, if it is newer than this node's copy.

        Called with :attr:`lock` held. A definition that does not load here (a file source
        missing on this machine) is logged and remembered, not retried.
        """
        if record.version <= self.version(record.id):
            return
        registry = self.registry
        assert registry is not None
        stream = registry.get(record.id)
        if record.deleted:
            if stream is not None:
                registry.remove(record.id)
        elif record.definition is not None:
            try:
                config = await trio.to_thread.run_sync(
                    functools.partial(stream_from_dict, record.definition)
                )
            except ConfigError as exc:
                log.error(
                    '%s: the cluster\'s definition (node "%s") does not load here: %s',
                    record.id, record.node, exc,
                )  # fmt: skip
            else:
                if stream is None:
                    registry.add(config, enabled=record.enabled)
                else:
                    if stream.origin != "api" or stream_to_dict(stream.config) != record.definition:
                        registry.replace(config)
                    if stream.enabled != record.enabled:
                        registry.set_enabled(record.id, record.enabled)
        elif stream is None:
            log.warning(
                '%s: node "%s" changed a stream of its configuration file that this node\'s '
                "file does not have; ignored",
                record.id, record.node,
            )  # fmt: skip
        elif stream.enabled != record.enabled:
            registry.set_enabled(record.id, record.enabled)
        if record.node != self.node_id:
            self._counts["applied"] += 1
            log.info(
                '%s: changed by node "%s" (version %d)', record.id, record.node, record.version
            )
        await self._remember(record)

    async def _remember(self, record: StreamRecord) -> None:
        self._records[record.id] = record
        await trio.to_thread.run_sync(self._copy.save, record)
        self.changes.notify()


def _parse_or_none(text: str) -> StreamRecord | None:
    try:
        return StreamRecord.from_json(text)
    except ClusterError as exc:
        log.warning("%s; ignored", exc)
        return None
