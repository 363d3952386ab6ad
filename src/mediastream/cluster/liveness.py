"""A node's liveness connection: how the others learn within a second that its process died.

A killed process (``kill -9``, a crash, the OOM killer) cannot say goodbye, and its leases
live on in Redis for their TTL: about 10 s of dark tiles if the others had to wait for them.
But its kernel closes its sockets, and Redis forgets a closed connection at once. So each node
keeps one dedicated Redis connection, named ``ms-live:{node}``, and publishes that
connection's id (``CLIENT ID``) in its node record. When another node finds that id gone from
``CLIENT LIST ID …``, the process behind it has ended — or its connection was closed some
other way, which the node itself notices:

- **The node's side.** :func:`hold_liveness` asks ``CLIENT ID`` on the connection every
  :data:`LIVENESS_INTERVAL`. A *different* id means the connection was closed and coredis
  opened a new one. If Redis is the same run (``INFO server`` ``run_id``), someone closed a
  live node's connection (``CLIENT KILL``, a middlebox): the others may take its streams
  :data:`TAKEOVER_GRACE` after they see the id gone, so the node gives every lease up at once
  (``on_break``), before it even publishes its new id. If Redis restarted (another
  ``run_id``), every connection of every node went with it: the node keeps its leases (its
  renewals claim them again), and the others judge nobody gone until Redis has been up for
  :data:`STEADY_AFTER` (below).
- **The others' side** (:func:`gone_nodes`): a node whose record names a liveness id that
  Redis no longer lists is *gone*. A stream it owned may be taken over (its lease deleted by
  compare-and-``DEL``, :func:`take_over`) once it has been seen gone for
  :data:`TAKEOVER_GRACE` — time for a node whose connection was closed under it to notice and
  stop. Nobody is judged gone while Redis has been up for less than :data:`STEADY_AFTER` (a
  lease's TTL; ``INFO server`` ``uptime_in_seconds``, read after the list): a Redis restart
  closes every connection at once and must never read as every node dying, and within that
  time every live node has published its new id.

A *frozen* process (SIGSTOP, a long pause) keeps its sockets open: Redis still lists its
connection, nobody takes over early, and the lease's own deadline applies as before. So the
early takeover only speeds up the deaths Redis can see; everything else waits out the lease.
See docs/cluster.md ("Failover") for the whole argument and its assumptions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

import trio

from .errors import RedisUnavailable
from .leases import LEASE_TTL, NodeRecord, node_key, owner_key
from .redis_client import Redis, redis_call, redis_from_url

log = logging.getLogger(__name__)

#: how often a node checks that its liveness connection is still the same one.
LIVENESS_INTERVAL: Final = 0.25  # seconds
#: how long a node must have been seen gone before its streams are taken over.
TAKEOVER_GRACE: Final = 1.0  # seconds
#: nobody is judged gone by its liveness connection while Redis has been up less than this
#: (a Redis restart must not look like every node dying).
STEADY_AFTER: Final = LEASE_TTL


def liveness_name(node_id: str) -> str:
    return f"ms-live:{node_id}"


@dataclass(frozen=True)
class LivenessStatistics:
    client_id: int
    #: times the connection was replaced on the same Redis run (each gave every lease up)
    breaks: int
    #: times Redis was found restarted (a new run id)
    redis_restarts: int
    #: checks that failed (Redis down or slow), in all
    failures: int


class Liveness:
    """The handle of :func:`hold_liveness`: this node's current liveness id."""

    def __init__(self) -> None:
        #: Redis's id of the liveness connection; 0 until Redis first answered.
        self.client_id = 0
        self.run_id = ""
        self._changed = trio.Event()
        self._counts = {"breaks": 0, "redis_restarts": 0, "failures": 0}

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def statistics(self) -> LivenessStatistics:
        return LivenessStatistics(client_id=self.client_id, **self._counts)

    def _adopt(self, client_id: int, run_id: str) -> None:
        self.client_id, self.run_id = client_id, run_id
        self._changed.set()
        self._changed = trio.Event()


@asynccontextmanager
async def _open_liveness_client(url: str, node_id: str) -> AsyncIterator[Redis]:
    # One connection, named, with no read timeout of coredis's own: a slow answer is
    # cancelled by redis_call's deadline, which leaves the connection open (closing it
    # would look like this node dying).
    client = redis_from_url(url, client_name=liveness_name(node_id), max_connections=1)
    async with client:
        yield client


async def hold_liveness(
    url: str,
    node_id: str,
    on_break: Callable[[str], None],
    *,
    interval: float = LIVENESS_INTERVAL,
    task_status: trio.TaskStatus[Liveness] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep this node's liveness connection and watch that it stays the same one.

    Started once Redis gave its id (or after the first failure: the node works on while Redis
    is down); the task status is the :class:`Liveness`. ``on_break(reason)`` is called when
    the connection was replaced on the same Redis run: every lease must be given up at once,
    before the new id is published (``Liveness.wait_changed`` wakes after).
    """
    liveness = Liveness()
    started = False
    failing = 0  # consecutive failed checks (logged at the first and every 40th)
    async with _open_liveness_client(url, node_id) as client:
        while True:
            try:
                client_id = await redis_call(client, "liveness check", client.client_id())
                if client_id != liveness.client_id:
                    server: dict[str, Any] = await redis_call(
                        client, "liveness check", client.info("server")
                    )
                    _changed(liveness, client_id, str(server.get("run_id", "")), on_break)
                failing = 0
            except RedisUnavailable as exc:
                liveness._counts["failures"] += 1
                failing += 1
                if failing % 40 == 1:
                    log.info('node "%s": %s (liveness connection)', node_id, exc)
            if not started:
                task_status.started(liveness)
                started = True
            await trio.sleep(interval)


def _changed(
    liveness: Liveness, client_id: int, run_id: str, on_break: Callable[[str], None]
) -> None:
    if liveness.client_id and run_id == liveness.run_id:
        liveness._counts["breaks"] += 1
        on_break(
            f"its liveness connection to Redis was closed (id {liveness.client_id}, now "
            f"{client_id}); the other nodes may take its streams over"
        )
    elif liveness.client_id:
        liveness._counts["redis_restarts"] += 1
        log.warning("Redis restarted (run id %s -> %s)", liveness.run_id[:8], run_id[:8])
    liveness._adopt(client_id, run_id)


async def gone_nodes(
    client: Redis, records: Iterable[NodeRecord], *, expected: Iterable[str] = ()
) -> set[str]:
    """The nodes among ``records`` whose liveness connection Redis no longer lists, and those
    of ``expected`` that have no record (it expired, or was deleted by a takeover).

    A record without a liveness id (0: not known yet) is never called gone, and nobody is
    while Redis has been up less than :data:`STEADY_AFTER` (checked after the list, so a
    restart just before it is seen): after a restart, records and connections come back
    within a second or two, and their absence meanwhile means nothing.

    Raises:
        RedisUnavailable
    """
    records = list(records)
    named = {r.liveness: r.node_id for r in records if r.liveness}
    gone = set(expected) - {r.node_id for r in records}
    if named:
        listed: Any = await redis_call(
            client, "list liveness connections", client.client_list(identifiers=list(named))
        )
        alive = {
            int(item["id"])
            for item in listed
            if named.get(int(item["id"])) is not None
            and item.get("name") == liveness_name(named[int(item["id"])])
        }
        gone |= {node_id for client_id, node_id in named.items() if client_id not in alive}
    if gone:
        server: Any = await redis_call(client, "read Redis's uptime", client.info("server"))
        if int(server.get("uptime_in_seconds", 0)) < STEADY_AFTER:
            return set()
    return gone


#: KEYS: owner key, dead node's record key. ARGV: the dead owner's lease value, its liveness
#: id. Deletes the lease if it is still that value, and the record if it still names that id.
_TAKE_OVER: Final = """
local taken = 0
if redis.call('GET', KEYS[1]) == ARGV[1] then
  taken = redis.call('DEL', KEYS[1])
end
local record = redis.call('GET', KEYS[2])
if record then
  local ok, decoded = pcall(cjson.decode, record)
  if ok and tostring(decoded['liveness']) == ARGV[2] then
    redis.call('DEL', KEYS[2])
  end
end
return taken
"""


async def take_over(
    client: Redis, stream_id: str, owner_value: str, node_id: str, liveness_id: int
) -> bool:
    """Delete a gone node's lease on ``stream_id`` (only if still ``owner_value``) and its
    record (only if it still names ``liveness_id``). True if the lease was deleted.

    Raises:
        RedisUnavailable
    """
    result: Any = await redis_call(
        client,
        f'take stream "{stream_id}" over from node "{node_id}"',
        client.register_script(_TAKE_OVER)(
            keys=[owner_key(stream_id), node_key(node_id)],
            args=[owner_value, str(liveness_id)],
        ),
    )
    return bool(result)
