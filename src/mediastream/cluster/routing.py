"""A cluster node: its record, its inbox, the streams it owns, and routing over one socket.

Task tree (started in the server's lifetime nursery with ``nursery.start(node.run, port)``)::

    ClusterNode.run                    the Redis pool; ready once the node record is written
    ├── hold_liveness                  the named liveness connection, its id checked
    │                                  every 0.25 s (a new id on the same Redis run: every
    │                                  lease given up at once)
    ├── run_node_registration          ms:node:{id}, rewritten every 2 s and at once when
    │                                  the liveness id changes
    ├── inbox                          open_redis_bus (its receive pump) and the dispatcher,
    │                                  subscribed again after Redis comes back
    ├── watch nodes                    every 0.25 s while anything crosses nodes: ends relayed
    │                                  sessions whose owner is gone (its liveness connection
    │                                  dropped by Redis, or its record expired), reaps remote
    │                                  sockets whose node is gone
    ├── place always-on streams        every 2 s: always-on streams nobody reads are
    │                                  resolved (claimed here if placement says so)
    ├── measure load                   the process's share of a core, into the record
    ├── RelayServer.run                always (a node replicates streams for its own WHEP
    │   │                              sessions, fallbacks and snapshots: serve_locally)
    │   └── one task per replica       feeds replicas the frames of the streams this node
    │                                  owns or replicates (relay.py)
    ├── _replicate × streams           this node a replica of a stream owned elsewhere; the
    │   └── run_replica_registration   supervisor runs a relay source per quality watched
    │                                  there (relay.py) from its upstream (the owner or
    │                                  another replica); its entry in ms:replicas:{stream}
    │                                  kept; ends when its last viewer has left (after the
    │                                  grace), or is promoted: this node claimed the stream
    ├── _promote × streams             a replica whose owner is gone claims the stream in its
    │                                  turn (within REATTACH_WAIT), its viewers kept
    ├── own × streams owned            hold_stream_lease; the stream's ingest runs only while
    │                                  it is held (``may_ingest``) and is cancelled by its loss
    │                                  (``guard_ingest``); released once the stream is idle
    └── RemoteSocket.run × N           a browser socket on another node that watches streams
        ├── writer                     this node owns: StreamSessions whose ``post`` publishes
        └── StreamSession.run × M      to the socket node's inbox with the stream's epoch

On a socket's node, a stream this node owns is a plain :class:`StreamSession` (no Redis); any
other stream is a :class:`RoutedSession`: it finds the owner (or the node placement picks,
possibly this one, which then claims the stream) and either runs a local session or relays
the offer, candidates and close to the owner, and posts what the owner says to the browser.
The owner answers with its own ICE addresses, so media flows from the owner to the browser.

Messages between nodes (envelope ``kind``):

- ``offer`` (request) socket node → owner; reply ``{"epoch"}`` or ``{"error", "message",
  "owner"?}``. ``ice`` and ``close`` socket node → owner (one-way, carry the epoch and the
  offer's relay id; others dropped). ``socket_closed`` (understood, not sent yet).
- An owner with ``max_viewers_per_node`` sessions of the stream (or a load of
  ``max_load_per_node``) answers an ``offer`` with ``{"error": "full", "replica", "upstream",
  "depth", "epoch"}``; the socket node then sends the offer to that node with ``"replicaOf":
  owner, "upstream", "depth"`` in its payload (see ``Replica``): the replica's frames come
  from ``upstream``'s relay, the owner's or another replica's (chained).
- ``client`` owner → socket node: one protocol message for the browser (payload: its text);
  ``ended`` owner → socket node: that stream's session is over.
- ``relay_refused`` replica → owner (payload ``{"reason"}``): the owner's relay refused this
  node (another secret, TLS on one side only); the owner leaves it out of the stream's
  placement for a cool-down before the replica's viewers are told to re-offer.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import logging
import math
import secrets
import socket as sockets
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import trio

from .. import protocol
from ..config import Config
from ..errors import ErrorCode, SignalingError
from ..protocol import IceCandidate, Offer, QualityRequest
from ..registry import Stream, StreamRegistry
from ..session import SessionPhase, StreamSession, queue_candidate
from ..signaling import LocalRouter, Session, SocketEnd
from . import node_identity
from .bus import Bus, BusStatistics
from .envelope import Envelope
from .errors import (
    ClusterError,
    LeaseLost,
    OwnedElsewhere,
    OwnerGone,
    RedisUnavailable,
    RelayRefused,
)
from .leases import (
    LeaseState,
    NodeRecord,
    NodeRegistration,
    NodeState,
    Owner,
    StreamLease,
    current_owner,
    hold_stream_lease,
    live_nodes,
    owner_key,
    register_node,
    run_node_registration,
)
from .liveness import TAKEOVER_GRACE, Liveness, gone_nodes, hold_liveness, take_over
from .placement import (
    COOLDOWN_FIRST,
    FULL,
    ReplicaChoice,
    ReplicaCooldowns,
    ReplicaView,
    choose_owner,
    choose_replica,
    choose_upstream,
    rank_nodes,
)
from .redis_bus import open_redis_bus
from .redis_client import CommandObserver, Redis, open_redis, redis_call
from .relay import (
    HANDSHAKE_TIMEOUT,
    RelayServer,
    ReplicaStatistics,
    relay_key,
    run_relay_source,
)
from .relay_tls import load_relay_tls
from .replica_registry import (
    ReplicaEntry,
    ReplicaRegistration,
    read_replicas,
    run_replica_registration,
)

log = logging.getLogger(__name__)

#: how long a freshly claimed stream waits for its first viewer before it is released.
CLAIM_GRACE: Final = 15.0  # seconds
#: messages for one remote socket's browser queued before that socket is dropped.
REMOTE_OUTBOX: Final = 256
#: how long a route waits for the inbox when Redis has not answered yet.
BUS_WAIT: Final = 2.0  # seconds
#: wait for a session message's acknowledgement before sending it again (once).
ACK_TIMEOUT: Final = 1.0  # seconds
#: a bounded wait for telling an owner that a relayed session closed (room for one retry).
CLOSE_NOTICE_TIMEOUT: Final = 2 * ACK_TIMEOUT + 0.5  # seconds
#: how often, while sessions cross nodes, the nodes involved are checked for life.
WATCH_INTERVAL: Final = 0.25  # seconds
#: how long a node seen gone is remembered (its record is deleted or expires well before).
GONE_MEMORY: Final = 60.0  # seconds
#: how long a replica whose owner died looks for the stream's next owner (itself, once it
#: has claimed the stream, or another node it re-attaches to) before it ends and its viewers
#: re-offer; and how often it looks.
REATTACH_WAIT: Final = 10.0  # seconds
REATTACH_POLL: Final = 0.5  # seconds
#: the replicas of a dead owner claim the stream in turn, the best placed first (the
#: shallowest, then the stream's placement ranking), each this much after the one before;
#: the lease decides between those that try at once.
PROMOTION_STEP: Final = 1.0  # seconds
#: how often each node looks for always-on streams that nobody reads, to claim its share.
PLACEMENT_INTERVAL: Final = 2.0  # seconds
#: how often the node's load (the share of one core its process uses) is measured; a change
#: of at least LOAD_STEP is published in its record at once.
LOAD_INTERVAL: Final = 2.0  # seconds
LOAD_STEP: Final = 0.05
#: viewers (and replicas) the owner sent to a replica are counted there until its entry in
#: Redis shows them, or for this long at most (an offer that never arrived).
PLACED_MEMORY: Final = 10.0  # seconds
#: a replica node the owner sent viewers to, fed from its relay, that has not connected
#: (proved the secret) within this is left out of the stream's placement for a cool-down
#: (``placement.ReplicaCooldowns``): its relay port unreachable, or its TLS or secret not the
#: owner's. The replica's side needs one handshake, plus its start and a retry or two.
REPLICA_CONNECT_WAIT: Final = HANDSHAKE_TIMEOUT + 5.0  # seconds
#: a replica that no upstream has accepted within this ends, and its viewers re-offer (they
#: would wait for ever); longer than REPLICA_CONNECT_WAIT, so that by then the owner leaves
#: the node out and serves them itself.
REPLICA_REACH_WAIT: Final = 2 * REPLICA_CONNECT_WAIT  # seconds

_T = TypeVar("_T")


class OwnerChanging(ClusterError):
    """The owner named for a stream refused its offer twice (it is moving): try again."""


@dataclass(frozen=True)
class RoutingStatistics:
    #: offers served by a session of this node on a stream it already owned (no Redis)
    local_offers: int
    #: offers whose owner had to be found (Redis), served here or relayed
    routed_offers: int
    relayed_offers: int
    #: offers from other nodes' sockets served here
    remote_offers: int
    #: Redis commands made on behalf of offers, candidates and closes (not renewals)
    redis_commands: int
    stale_dropped: int
    #: leases of nodes whose process ended, deleted by this node (liveness.take_over)
    takeovers: int
    owned_streams: tuple[str, ...]
    relayed_sessions: int
    remote_sockets: int
    #: bus messages this node sent (relayed out), by kind; replies are the bus's own
    messages_out: tuple[tuple[str, int], ...] = ()
    #: bus messages this node's inbox handed on (relayed in), by kind
    messages_in: tuple[tuple[str, int], ...] = ()
    #: sends and requests that failed (owner gone, timed out, Redis), by kind
    message_errors: tuple[tuple[str, int], ...] = ()
    #: the bus's counters since the node started (summed over its reconnections)
    bus: BusStatistics | None = None
    #: offers served here as a replica (the owner was full)
    replica_offers: int = 0
    #: streams this node replicates now (fed by their owner's relay)
    replicas: tuple[str, ...] = ()
    #: the relay (owner side): replicas served now, connections refused, frames slow replicas
    #: skipped to the next keyframe
    relay_connections: int = 0
    relay_refused: int = 0
    relay_skipped_frames: int = 0
    #: the relay (replica side): reconnections, and frames left out to resume at a keyframe
    relay_reconnects: int = 0
    relay_resume_skipped_frames: int = 0
    #: the relay (replica side): connections an upstream refused (secret, TLS, not serving)
    relay_upstream_refused: int = 0
    #: (stream, replica node) pairs this node, as the owner, leaves out of placement now or
    #: remembers as failing (their relay refused, or never connected)
    replica_cooldowns: int = 0


@dataclass
class _Placed:
    """Viewers the owner sent to a replica node that its entry in Redis does not show yet."""

    upstream: str
    depth: int
    #: the entry's ``offers`` when last compared (what arrived since is no longer pending)
    offers: int
    #: the node has an entry (else: sent there as a fresh replica, not registered yet)
    registered: bool
    viewers: int = 0
    #: Trio's clock at the last viewer sent there
    since: float = 0.0


class Replica:
    """This node serving a stream it does not own, fed by its upstream's relay: the owner's,
    or another replica's (one per stream).

    Ends when its last viewer has left (after the grace period); at once when the relay
    cannot go on (the owner refusing, or gone with no node owning the stream in time): its
    viewers are then told to re-offer; or *promoted* when this node claims the stream (its
    owner gone): its viewers keep their sessions, fed by this node's camera session. An
    upstream replica that ends or dies is left for the owner (never for a node deeper than
    this one: no cycles), and the viewers keep their sessions.
    """

    def __init__(
        self, stream: Stream, owner: str, epoch: int, upstream: str = "", depth: int = 1
    ) -> None:
        self.stream = stream
        self.owner = owner
        #: the node whose relay feeds this one: the owner (depth 1) or a replica of it
        self.upstream = upstream or owner
        self.depth = depth if self.upstream != owner else 1
        #: offers accepted for the stream (the owner tells by it which of the viewers it
        #: sent here arrived)
        self.offers = 0
        #: its entry in ms:replicas:{stream} (None until written once)
        self.registration: ReplicaRegistration | None = None
        #: the owner's epochs its sessions were offered in (messages in others are stale)
        self.epochs = {epoch}
        self.scope = trio.CancelScope()
        self.ended = False
        self.failed = False
        #: ended because this node claimed the stream: its viewers stay, the camera feeds them
        self.promoted = False
        #: a task of this node is trying to claim the stream (its owner is gone)
        self.promoting = False
        self.reason = ""
        #: the relay sources' scopes, one per quality started: weak, so the scopes of the
        #: sources that ended (a quality idle past the grace) do not pile up
        self._guarded: weakref.WeakSet[trio.CancelScope] = weakref.WeakSet()

    def chained(self) -> bool:
        return self.upstream != self.owner

    def attach_to_owner(self) -> None:
        """Be fed by the owner from now on (the upstream replica died, ended or refused)."""
        self.upstream, self.depth = self.owner, 1
        self.changed()

    def changed(self) -> None:
        """What its entry in Redis says changed (viewers, upstream): written soon."""
        if self.registration is not None:
            self.registration.changed()

    def guard(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` (the relay source's) when the replica ends."""
        if self.ended:
            scope.cancel()
        else:
            self._guarded.add(scope)

    def end(self, reason: str, *, failed: bool = False, promoted: bool = False) -> None:
        """End the relay: ``failed``, its viewers are told to re-offer; ``promoted``, this
        node owns the stream now and its camera session feeds them on the same fan-out."""
        if self.ended:
            return
        self.ended, self.failed, self.promoted, self.reason = True, failed, promoted, reason
        self.scope.cancel()
        for scope in list(self._guarded):
            scope.cancel()
        self.stream.changes.notify()


class ClusterNode:
    """Routing and ownership for one node (a :class:`Router` and an :class:`IngestGate`)."""

    def __init__(
        self,
        config: Config,
        local: LocalRouter,
        *,
        on_redis_command: CommandObserver | None = None,
        worker: int | None = None,
    ) -> None:
        self._config = config
        self._on_redis_command = on_redis_command
        #: the index of this node among ``serve --workers N`` (None: a process of its own)
        self._worker = worker
        #: set by the server once built (the registry is built with this node as its gate)
        self.registry: StreamRegistry | None = None
        self._local = local
        self.node_id = ""
        self._redis: Redis | None = None
        self._bus: Bus | None = None
        self._bus_ready = trio.Event()
        self._started = trio.Event()
        self._stopped = trio.Event()
        self._stop_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._owned: dict[str, StreamLease] = {}
        self._claims: dict[str, trio.Lock] = {}
        #: streams this node replicates (owned elsewhere, fed by the owner's relay)
        self._replicas: dict[str, Replica] = {}
        self._replicating: dict[str, trio.Lock] = {}
        #: serves this node's streams to replicas (None until the node has started)
        self.relay: RelayServer | None = None
        #: per stream this node owns, per replica node: viewers and replicas sent there that
        #: its entry in Redis does not show yet (a burst of offers must not all go to one)
        self._placed: dict[str, dict[str, _Placed]] = {}
        #: per stream this node owns, the replica nodes it could not feed (refused, or never
        #: connected), left out of placement for a while
        self._cooldowns = ReplicaCooldowns()
        #: upstream node -> Trio's clock when this node last warned that it refused a relay
        self._refusals_warned: dict[str, float] = {}
        self._relay_key = relay_key(config.cluster.relay_secret, config.cluster.redis_url)
        #: mutual TLS on the relay, both sides (None: plain TCP); the files were checked at load
        self._relay_tls = load_relay_tls(config.cluster)
        self._replica_stats = ReplicaStatistics()
        self._relayed: dict[tuple[str, str], RoutedSession] = {}
        #: per stream this node owns after promoting its replica of it, the epochs of the
        #: replica's sessions for other nodes' sockets (their messages still name them)
        self._inherited_epochs: dict[str, set[int]] = {}
        #: sessions of this node's sockets on streams it owns, ended if the lease is lost
        self._local_sessions: weakref.WeakKeyDictionary[Session, SocketEnd] = (
            weakref.WeakKeyDictionary()
        )
        self._remote: dict[tuple[str, str], RemoteSocket] = {}
        self._liveness: Liveness | None = None
        #: this node's record in Redis (set once started)
        self.registration: NodeRegistration | None = None
        #: node id -> (its liveness id, Trio's clock when first seen gone, Redis's run id)
        self._gone_since: dict[str, tuple[int, float, str]] = {}
        #: RemoteSocket.run tasks still running (their outbox may still hold messages)
        self._remote_running = 0
        self._remote_changed = trio.Event()
        #: set by :meth:`drain`: no new streams, and the owned ones are handed over
        self.draining = False
        #: owned streams being handed over: their ingest stops, their lease is released
        self._handing_over: set[str] = set()
        self._crossing = trio.Event()  # something crosses nodes: the node watcher has work
        self._counts = dict.fromkeys(
            ("local_offers", "routed_offers", "relayed_offers", "remote_offers",
             "redis_commands", "stale_dropped", "takeovers", "replica_offers"),
            0,
        )  # fmt: skip
        self._messages_out: collections.Counter[str] = collections.Counter()
        self._messages_in: collections.Counter[str] = collections.Counter()
        self._message_errors: collections.Counter[str] = collections.Counter()
        #: the counters of the buses closed so far (one per inbox subscription)
        self._closed_buses: BusStatistics | None = None

    # --- lifetime ---------------------------------------------------------------------------

    async def run(
        self, port: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Be a node of the cluster until :meth:`stop` (or cancelled); ready once registered
        (or once Redis failed: the node then serves what it owns while Redis is down).

        :meth:`stop` ends the node's tasks while the Redis pool still runs, so the leases are
        released and the record deleted at once; a plain cancellation (the server's deadline)
        cancels the pool too, and they expire by themselves.
        """
        self.node_id, public_url = node_identity(self._config.cluster, port, self._worker)
        try:
            async with open_redis(
                self._config.cluster.redis_url, on_command=self._on_redis_command
            ) as redis:
                with self._stop_scope:
                    async with trio.open_nursery() as nursery:
                        self._redis = redis
                        self._nursery = nursery
                        liveness: Liveness = await nursery.start(
                            hold_liveness,
                            self._config.cluster.redis_url,
                            self.node_id,
                            self._liveness_broken,
                        )
                        self._liveness = liveness
                        # Always on: any node may become a replica for its own WHEP
                        # sessions, fallbacks and snapshots (serve_locally), not only for
                        # the viewers an owner over its limits sends it.
                        relay_address = await self._start_relay(nursery, public_url)
                        record = NodeRecord(
                            self.node_id, public_url, relay_address, liveness=liveness.client_id
                        )
                        registration = await nursery.start(run_node_registration, redis, record)
                        self.registration = registration
                        nursery.start_soon(self._publish_liveness, liveness, registration)
                        nursery.start_soon(self._keep_inbox, redis)
                        nursery.start_soon(self._watch_nodes)
                        nursery.start_soon(self._measure_load, registration)
                        nursery.start_soon(self._place_always_on)
                        # Ready once the inbox listens: another node relaying an offer here
                        # right after start-up found nobody subscribed ("node is gone").
                        with trio.move_on_after(BUS_WAIT):
                            await self._bus_ready.wait()
                        log.info('cluster node "%s" (%s) started', self.node_id, public_url)
                        self._started.set()
                        task_status.started()
        finally:
            self._stopped.set()

    async def _start_relay(self, nursery: trio.Nursery, public_url: str) -> str:
        """Listen for replicas; the address the others reach the relay at (``host:port``)."""
        cluster = self._config.cluster
        host = self._config.server.host
        wildcard = host in ("", "0.0.0.0", "::")
        advertised = (urlsplit(public_url).hostname or sockets.gethostname()) if wildcard else host
        port = cluster.relay_port + (self._worker or 0) if cluster.relay_port else 0
        self.relay = RelayServer(
            self._relay_key,
            self.node_id,
            lambda stream_id: self.registry.get(stream_id) if self.registry else None,
            self.serves,
            tls=self._relay_tls,
        )
        bound = await nursery.start(self.relay.run, host or "0.0.0.0", port)
        return f"[{advertised}]:{bound}" if ":" in advertised else f"{advertised}:{bound}"

    @property
    def replicas_on(self) -> bool:
        """Viewers beyond a limit go to replicas: a viewer cap or a load limit is set."""
        cluster = self._config.cluster
        return cluster.max_viewers_per_node > 0 or cluster.max_load_per_node > 0

    def stop(self) -> None:
        """Leave the cluster: release every lease, delete the record (see :meth:`run`)."""
        self._stop_scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- drain ------------------------------------------------------------------------------

    async def drain(self, limit: float) -> None:
        """Hand every stream this node owns over to the others, within ``limit`` seconds.

        Called by the server on a shutdown request (SIGTERM), before its sockets close. The
        node record turns ``draining`` (placement skips it from then on, and this node
        claims nothing more); then, for each owned stream: its ingest stops, its lease is
        released (another node may claim it at once), and the viewers whose sockets are on
        other nodes are told ``peer_failed`` "…send a new offer": their re-offers are placed
        on a serving node, which claims the stream. This node's own sockets are closed
        afterwards by the server (1001), and their pages reconnect to another node. What was
        not done within ``limit`` is left to the stop that follows (leases released, record
        deleted) and to the other nodes' watchers.
        """
        if self._redis is None or self.draining:
            return
        self.draining = True
        owned = sorted(s for s in self._owned if self.owns(s))
        viewers = sum(remote.watching(owned) for remote in self._remote.values())
        log.info(
            'node "%s" draining: handing over %d streams (%d viewers on other nodes\' sockets), '
            "at most %g s",
            self.node_id, len(owned), viewers, limit,
        )  # fmt: skip
        began = trio.current_time()
        with trio.move_on_after(limit) as bounded:
            await self._announce_draining()
            async with trio.open_nursery() as handovers:
                for stream_id in owned:
                    handovers.start_soon(self._hand_over, stream_id)
            # Until every remote socket's outbox is out: its peer_failed and ended messages.
            while self._remote_running:
                await self._remote_changed.wait()
            new_owners = await self._owners_of(owned)
        took = trio.current_time() - began
        if bounded.cancelled_caught:
            log.warning(
                'node "%s": drain cut off after %g s; %d streams still owned here, %d remote '
                "sockets still open (they end with the node)",
                self.node_id, limit, len(self._owned), len(self._remote),
            )  # fmt: skip
            return
        handed = [f"{s} -> {new_owners.get(s) or 'released, not claimed again yet'}" for s in owned]
        log.info(
            'node "%s" drained in %.1f s: %s',
            self.node_id, took, ", ".join(handed) or "it owned no streams",
        )  # fmt: skip

    async def _announce_draining(self) -> None:
        """Write the record as ``draining`` now (not at the next renewal): placement on the
        other nodes must skip this node before any of its streams is released."""
        assert self._redis is not None
        if self.registration is None:
            return
        record = dataclasses.replace(self.registration.record, state=NodeState.DRAINING)
        self.registration.update(record)
        try:
            await register_node(self._redis, record)
        except RedisUnavailable as exc:
            log.warning("%s; the record turns draining at its next renewal", exc)

    async def _hand_over(self, stream_id: str) -> None:
        lease = self._owned.get(stream_id)
        assert self.registry is not None
        stream = self.registry.get(stream_id)
        if lease is None or stream is None or lease.state is not LeaseState.HELD:
            return
        # The ingest stops before the lease is released: never two readers of one camera.
        self._handing_over.add(stream_id)
        lease.cancel_users()
        if self.relay is not None:
            self.relay.disconnect(stream_id)  # the replicas follow it to its next owner
        stream.changes.notify()
        await stream.changes.wait_until(lambda: not stream.source_running)
        # ``_own`` releases the lease (compare-and-DEL) and forgets it.
        await stream.changes.wait_until(lambda: self._owned.get(stream_id) is not lease)
        self._handing_over.discard(stream_id)
        # Released before the viewers are told: their re-offers find nobody holding it.
        reason = f'node "{self.node_id}" is shutting down and handed the stream over'
        for remote in list(self._remote.values()):
            remote.end_stream(stream_id, reason)

    async def _owners_of(self, stream_ids: list[str]) -> dict[str, str]:
        """Who owns each stream now, for the drain's log (best effort)."""
        assert self._redis is not None
        redis = self._redis
        owners: dict[str, str] = {}
        for stream_id in stream_ids:
            with contextlib.suppress(ClusterError):
                owner = await current_owner(redis, stream_id)
                if owner is not None:
                    owners[stream_id] = owner.node_id
        return owners

    def _remote_started(self, on: bool) -> None:
        self._remote_running += 1 if on else -1
        self._remote_changed.set()
        self._remote_changed = trio.Event()

    async def _keep_inbox(self, redis: Redis) -> None:
        while True:
            try:
                async with open_redis_bus(redis, self.node_id) as bus:
                    self._bus = bus
                    self._bus_ready.set()
                    async with trio.open_nursery() as handlers:
                        async for envelope in bus.inbox:
                            try:
                                self._dispatch(envelope, bus, handlers)
                            except Exception:
                                # A bug met by one message: that message is lost, the inbox
                                # and the node carry on.
                                log.exception(
                                    'node "%s": failed to handle %s from node "%s"',
                                    self.node_id, envelope.kind, envelope.reply_to,
                                )  # fmt: skip
            except RedisUnavailable as exc:
                log.warning("%s; trying again in 1 s", exc)
            finally:
                if self._bus is not None:
                    self._closed_buses = _sum_bus(self._closed_buses, self._bus.statistics())
                self._bus = None
                self._bus_ready = trio.Event()
            await trio.sleep(1.0)

    async def _wait_bus(self) -> Bus:
        with trio.move_on_after(BUS_WAIT):
            while self._bus is None:
                await self._bus_ready.wait()
            return self._bus
        raise RedisUnavailable(
            f'node "{self.node_id}" has no inbox: Redis did not answer within {BUS_WAIT:g} s'
        )

    async def _publish_liveness(self, liveness: Liveness, registration: NodeRegistration) -> None:
        """Keep the record's liveness id current (written at once when it changes)."""
        while True:
            if registration.record.liveness != liveness.client_id:
                registration.update(replace(registration.record, liveness=liveness.client_id))
            await liveness.wait_changed()

    def _liveness_breaks(self) -> int:
        return self._liveness.statistics().breaks if self._liveness is not None else 0

    def _liveness_broken(self, reason: str) -> None:
        """The liveness connection was closed under this live node: the others may take its
        streams over after ``TAKEOVER_GRACE``, so it gives every one of them up now."""
        for lease in list(self._owned.values()):
            lease.give_up(f'node "{self.node_id}": {reason}')

    async def _redis_call(self, call: Callable[[], Awaitable[_T]]) -> _T:
        self._counts["redis_commands"] += 1
        return await call()

    # --- IngestGate -------------------------------------------------------------------------

    def may_ingest(self, stream_id: str) -> bool:
        replica = self._replicas.get(stream_id)
        if replica is not None and not replica.ended:
            return True
        lease = self._owned.get(stream_id)
        if lease is None or stream_id in self._handing_over:
            return False
        try:
            lease.check()
        except ClusterError:
            return False
        return True

    def guard_ingest(self, stream_id: str, scope: trio.CancelScope) -> None:
        replica = self._replicas.get(stream_id)
        if replica is not None and stream_id not in self._owned:
            replica.guard(scope)
            return
        lease = self._owned.get(stream_id)
        if lease is None:
            scope.cancel()
        else:
            lease.cancel_on_loss(scope)

    def relay_source(self, stream: Stream, quality: str) -> Callable[..., Awaitable[None]] | None:
        replica = self._replicas.get(stream.id)
        if replica is None or replica.ended or stream.id in self._owned:
            return None
        return functools.partial(self._run_replica_source, replica, quality)

    async def serve_locally(self, stream: Stream) -> None:
        """Make ``stream``'s frames available on this node for a viewer that is not a routed
        offer (a WHEP session, a fallback, a snapshot): nothing if this node owns it or is a
        replica of it; claimed here if nobody owns it; else this node becomes a replica of
        it, fed by the owner or, when the owner feeds ``max_relays_per_node`` replicas
        already, by the shallowest replica with room (:func:`choose_upstream`). Such a
        replica serves only this node's viewers and ends after its last one left (the
        grace), like any replica; the camera is still read once, by the owner.

        Raises:
            SignalingError: ``cluster_unavailable`` (Redis unreachable) or ``relay_failed``
                (the stream could not be claimed nor replicated here: the node is draining, or
                its claims were given up as they were made), naming the stream and why; both
                retryable.
        """
        try:
            for _ in range(2):  # again when a claim here was given up as it was made
                if self.serves(stream.id):
                    return
                node_id, epoch = await self.resolve(stream)
                if node_id == self.node_id:
                    continue  # claimed here (served, unless given up at once)
                if not epoch:
                    # Nobody owns it and placement prefers another node; but this viewer is
                    # here, so it is read here (one claim wins a race with that node's).
                    try:
                        await self.claim(stream)
                        continue
                    except OwnedElsewhere as exc:
                        node_id, epoch = exc.node_id, exc.epoch
                upstream, depth = await self._upstream_for(stream, node_id)
                try:
                    await self.replicate(stream, node_id, epoch, upstream, depth)
                except ClusterError:
                    if not self.serves(stream.id):  # not claimed here meanwhile either
                        raise
                return
            if not self.serves(stream.id):
                raise ClusterError("it was claimed here and given up at once, twice")
        except RedisUnavailable as exc:
            raise SignalingError(
                ErrorCode.CLUSTER_UNAVAILABLE,
                f'Unavailable: stream "{stream.id}" is not read on node "{self.node_id}", '
                f"and the cluster cannot be asked where it is: {exc}; try again",
                stream_id=stream.id,
            ) from None
        except ClusterError as exc:
            raise SignalingError(
                ErrorCode.RELAY_FAILED,
                f'Stream "{stream.id}" could not be served on node "{self.node_id}": {exc}; '
                "try again",
                stream_id=stream.id,
            ) from None

    async def _upstream_for(self, stream: Stream, owner: str) -> tuple[str, int]:
        """What feeds a new replica of ``stream`` (owned by ``owner``) on this node, and at
        which depth: the rule placement uses for a fresh replica, over the registry.

        Raises:
            RedisUnavailable
        """
        assert self._redis is not None
        redis = self._redis
        entries = (await self._redis_call(lambda: read_replicas(redis, [stream.id])))[stream.id]
        views = [
            ReplicaView(e.node, e.upstream, e.depth, e.viewers, e.relays)
            for e in entries
            if e.node != self.node_id and e.relay_address
        ]
        return choose_upstream(owner, views, max_relays=self._config.cluster.max_relays_per_node)

    # --- replicas ---------------------------------------------------------------------------

    def _sessions_of(self, stream: Stream) -> int:
        """This node's sessions of ``stream``, its own sockets' and other nodes', counted from
        their offer (not from when they start to play: a burst of offers must not all land
        here)."""
        local = sum(
            1
            for session in self._local_sessions
            if session.stream is stream and session.phase is not SessionPhase.ENDED
        )
        return local + sum(remote.watching([stream.id]) for remote in self._remote.values())

    def _full(self, stream: Stream) -> bool:
        """Whether this node serves as many of the stream's viewers as it should: as many
        sessions as ``max_viewers_per_node``, or a published load of ``max_load_per_node``."""
        if not self.replicas_on:
            return False
        cluster = self._config.cluster
        load = self.registration.record.load if self.registration is not None else 0.0
        if cluster.max_load_per_node > 0 and load >= cluster.max_load_per_node:
            return True
        cap = cluster.max_viewers_per_node
        return cap > 0 and self._sessions_of(stream) >= cap

    async def overflow(self, stream: Stream, prefer: str | None) -> ReplicaChoice | None:
        """The owner is full: the node to serve the stream's next viewer as a replica and what
        feeds it, or None (no other node can: the owner serves it anyway).

        Reads the stream's replicas from Redis (the whole tree, not only those this node's
        relay feeds) and the node records; :func:`choose_replica` decides. The viewers and
        replicas sent somewhere are counted there until its entry shows them.
        """
        if self.relay is None or self._redis is None:
            return None
        redis = self._redis
        cluster = self._config.cluster
        try:
            nodes = await self._redis_call(lambda: live_nodes(redis))
            entries = (await self._redis_call(lambda: read_replicas(redis, [stream.id])))[stream.id]
        except RedisUnavailable as exc:
            log.info('stream "%s": %s; served on its owner', stream.id, exc)
            return None
        by_node = {entry.node: entry for entry in entries if entry.node != self.node_id}
        live = {n.node_id for n in nodes if self._known_gone(n.node_id) is None}
        now = trio.current_time()
        # Sent viewers as fed from here and never connected: a refused or unreachable relay
        # (else every re-offer of its failed viewers would be placed there again).
        for node in self.relay.overdue(stream.id, now - REPLICA_CONNECT_WAIT):
            self._unreachable(stream.id, node, f"did not connect within {REPLICA_CONNECT_WAIT:g} s")
        self._cooldowns.keep_nodes(live)  # a node that left is forgotten
        for node in self.relay.fed_nodes(stream.id):
            self._cooldowns.connected(stream.id, node)
        cooling = self._cooldowns.cooling(stream.id, now)
        # Fed from here: the report up each relay connection is current to the frame (its own
        # sockets' viewers too), plus the viewers sent there since (relay.py).
        direct = self.relay.replica_viewers(stream.id)
        views = {
            entry.node: ReplicaView(
                entry.node, entry.upstream, entry.depth, entry.viewers, entry.relays
            )
            for entry in by_node.values()
        }
        for node, viewers in direct.items():
            entry = by_node.get(node)
            views[node] = ReplicaView(node, self.node_id, 1, viewers, entry.relays if entry else 0)
        # The replicas it feeds (one connection per quality each), and the replicas sent viewers
        # as fed from here not connected yet.
        owner_relays = self.relay.replicas_fed(stream.id) + self.relay.unconnected(stream.id)
        # Fed by replicas: the viewers sent there count until its entry shows them arrived.
        placed = self._placed.setdefault(stream.id, {})
        for node, sent in list(placed.items()):
            entry = by_node.get(node)
            if entry is not None:
                sent.viewers -= max(0, entry.offers - sent.offers)
                sent.offers = entry.offers
                sent.registered = True
            if sent.viewers <= 0 or now - sent.since > PLACED_MEMORY or node in direct:
                del placed[node]
                continue
            placed_view = views.get(node, ReplicaView(node, sent.upstream, sent.depth, 0, 0))
            views[node] = replace(placed_view, viewers=placed_view.viewers + sent.viewers)
            if not sent.registered and sent.upstream in views:
                # A fresh replica not registered yet: its upstream will feed it.
                feeder = views[sent.upstream]
                views[sent.upstream] = replace(feeder, relays=feeder.relays + 1)
        choice = choose_replica(
            stream.id,
            nodes,
            self.node_id,
            owner_relays,
            views.values(),
            max_viewers=cluster.max_viewers_per_node,
            max_relays=cluster.max_relays_per_node,
            max_load=cluster.max_load_per_node,
            prefer=prefer,
            excluded=[n.node_id for n in nodes if n.node_id not in live] + sorted(cooling),
        )
        if choice is not None and choice.upstream == self.node_id:
            self.relay.placed(stream.id, choice.node)
        elif choice is not None:
            entry = by_node.get(choice.node)
            if choice.node not in placed:
                placed[choice.node] = _Placed(
                    choice.upstream, choice.depth, entry.offers if entry else 0, entry is not None
                )
            placed[choice.node].viewers += 1
            placed[choice.node].since = now
        return choice

    def _unreachable(self, stream_id: str, node: str, why: str) -> None:
        """``node``, sent viewers of ``stream_id`` as a replica, could not be fed (``why``):
        the viewers sent there no longer count on it, and it is left out of the stream's
        placement for a cool-down (the owner serves the re-offers when no other node can)."""
        if self.relay is not None:
            self.relay.forget(stream_id, node)
        self._placed.get(stream_id, {}).pop(node, None)
        cooldown = self._cooldowns.failed(stream_id, node, trio.current_time())
        log.warning(
            'replica node "%s" of "%s" %s; not placing viewers there for %g s',
            node, stream_id, why, cooldown,
        )  # fmt: skip

    async def replicate(
        self, stream: Stream, owner: str, epoch: int, upstream: str = "", depth: int = 1
    ) -> Replica:
        """Be a replica of ``stream`` (owned by ``owner`` in ``epoch``, fed by ``upstream``'s
        relay at ``depth``), or stay one (with the upstream it has).

        Raises:
            ClusterError: this node owns the stream, or is draining.
        """
        lock = self._replicating.setdefault(stream.id, trio.Lock())
        async with lock:
            existing = self._replicas.get(stream.id)
            if existing is not None and not existing.ended:
                # The same owner, or a new one that placed a viewer here before this replica
                # found it: the relay source moves to it at its next connection.
                if not existing.chained():
                    existing.upstream = owner
                existing.owner = owner
                if existing.upstream == owner and existing.depth != 1:
                    existing.depth = 1  # its upstream replica has become the owner
                    existing.changed()
                existing.epochs.add(epoch)
                return existing
            if existing is not None:
                existing.end(f'the stream is owned by node "{owner}" now', failed=True)
                await stream.changes.wait_until(
                    lambda: stream.id not in self._replicas and not stream.source_running
                )
            if self.owns(stream.id) or stream.id in self._owned:
                raise ClusterError(f'node "{self.node_id}" owns "{stream.id}": no replica of it')
            if self.draining:
                raise ClusterError(f'node "{self.node_id}" is shutting down')
            if upstream == self.node_id:
                raise ClusterError(f'node "{self.node_id}" cannot feed its own replica')
            assert self._nursery is not None
            replica: Replica = await self._nursery.start(
                self._replicate, Replica(stream, owner, epoch, upstream, depth)
            )
            return replica

    async def _replicate(self, replica: Replica, *, task_status: trio.TaskStatus[Replica]) -> None:
        stream = replica.stream
        self._replicas[stream.id] = replica
        fed_by = (
            f'replica node "{replica.upstream}" (depth {replica.depth})'
            if replica.chained()
            else "the owner"
        )
        log.info(
            'stream "%s": replica of node "%s" (epoch %d), fed by %s',
            stream.id, replica.owner, min(replica.epochs), fed_by,
        )  # fmt: skip
        stream.changes.notify()  # the supervisor starts the relay source
        try:
            with replica.scope:
                async with trio.open_nursery() as tasks:
                    # Started before its entry is written: the offer is answered without
                    # waiting for Redis (the owner counts the viewers it sent here meanwhile).
                    task_status.started(replica)
                    assert self._redis is not None
                    replica.registration = await tasks.start(
                        run_replica_registration,
                        self._redis,
                        stream.id,
                        functools.partial(self._replica_entry, replica),
                    )
                    tasks.start_soon(self._follow_replica_changes, replica)
                    with trio.move_on_after(CLAIM_GRACE):
                        await stream.changes.wait_until(lambda: stream.viewers > 0)
                    while True:
                        await stream.changes.wait_until(lambda: stream.viewers == 0)
                        with trio.move_on_after(self._config.media.on_demand_grace) as idle:
                            await stream.changes.wait_until(lambda: stream.viewers > 0)
                        if idle.cancelled_caught:
                            break
                    tasks.cancel_scope.cancel()
                replica.end("its last viewer left")
        finally:
            replica.end("the node stopped")
            if self._replicas.get(stream.id) is replica:
                del self._replicas[stream.id]
            if self.relay is not None and not self.owns(stream.id):
                # The replicas fed from here re-attach to the owner.
                self.relay.disconnect(stream.id)
            log.info('stream "%s": replica ended (%s)', stream.id, replica.reason)
            if replica.failed:
                reason = f'node "{self.node_id}": {replica.reason}'
                self._end_stream_sessions(stream, reason)
                if not self._taking_over(stream.id):
                    self._end_other_viewers(stream, reason)
            stream.changes.notify()

    def _taking_over(self, stream_id: str) -> bool:
        """Whether this node is claiming ``stream_id`` or replicating it anew right now: the
        viewers that are not socket sessions keep their place in the fan-out, which the
        camera (or the new upstream) feeds again."""
        locks = (self._claims.get(stream_id), self._replicating.get(stream_id))
        return any(lock is not None and lock.locked() for lock in locks)

    def _replica_entry(self, replica: Replica) -> ReplicaEntry:
        """What ``ms:replicas:{stream}`` says of this node's replica of the stream now."""
        stream = replica.stream
        return ReplicaEntry(
            node=self.node_id,
            upstream=replica.upstream,
            depth=replica.depth,
            viewers=self._sessions_of(stream),
            relays=self.relay.replicas_fed(stream.id) if self.relay is not None else 0,
            relay_address=self.registration.record.relay_address if self.registration else "",
            offers=replica.offers,
        )

    async def _follow_replica_changes(self, replica: Replica) -> None:
        """Viewers and relay connections come and go as the stream's viewers: each change is
        written (the registration debounces, and writes only what differs)."""
        while True:
            await replica.stream.changes.wait()
            replica.changed()

    def _replica_offered(self, stream: Stream) -> None:
        """A session of ``stream`` was offered here, as a replica of it."""
        replica = self._replicas.get(stream.id)
        if replica is not None and not replica.ended and stream.id not in self._owned:
            replica.offers += 1
            replica.changed()

    async def _run_replica_source(
        self,
        replica: Replica,
        quality: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """One quality's relay connection (each quality has its own, while it has viewers)."""
        try:
            await run_relay_source(
                replica.stream.id,
                self.node_id,
                self._relay_key,
                functools.partial(self._locate_upstream, replica),
                replica.stream,
                self._replica_stats,
                refused=functools.partial(self._upstream_refused, replica),
                quality=quality,
                tls=self._relay_tls,
                reach_within=REPLICA_REACH_WAIT,
                task_status=task_status,
            )
        except RelayRefused as exc:
            # The owner's relay refused this node: a misconfigured cluster (another secret,
            # TLS on one side only), which the owner is told of before the viewers re-offer,
            # so that it serves them elsewhere.
            upstream = replica.upstream
            self._warn_refused(replica.stream.id, upstream, exc)
            with (
                trio.move_on_after(CLOSE_NOTICE_TIMEOUT),
                contextlib.suppress(ClusterError),
            ):
                await self.send(
                    upstream, "relay_refused", stream=replica.stream.id,
                    epoch=max(replica.epochs), payload={"reason": str(exc)},
                )  # fmt: skip
            replica.end(
                f'node "{upstream}" refused the relay of quality "{quality}": {exc}', failed=True
            )
            await trio.sleep_forever()  # cancelled by the replica's end (the guard)
        except ClusterError as exc:
            if replica.stream.id not in self._owned:
                relay = f'the relay of quality "{quality}" from node "{replica.upstream}"'
                replica.end(f"{relay} ended: {exc}", failed=True)
            # Else this node has just claimed the stream: the claim ends the replica as
            # promoted (its viewers stay), or as failed if the lease was given up at once.
            await trio.sleep_forever()  # cancelled by the replica's end (the guard)

    def _warn_refused(self, stream_id: str, upstream: str, refusal: RelayRefused) -> None:
        """A warning once per cool-down per upstream (the owner leaves this node out that
        long, then may try it again); the repeats within it at info level."""
        now = trio.current_time()
        for node, warned in list(self._refusals_warned.items()):
            if now - warned >= COOLDOWN_FIRST:
                del self._refusals_warned[node]
        level = logging.INFO if upstream in self._refusals_warned else logging.WARNING
        self._refusals_warned.setdefault(upstream, now)
        log.log(
            level,
            'stream "%s": node "%s" refused to relay it to this node: %s (check relay_secret '
            "and relay_tls_* on both nodes); its viewers are served elsewhere",
            stream_id, upstream, refusal,
        )  # fmt: skip

    def _upstream_refused(self, replica: Replica, refusal: RelayRefused) -> None:
        """The upstream refused the relay: a replica that ended (or now owns the stream and
        answers as the owner from the next connection on) is left for the owner; the owner's
        refusal ends this replica."""
        if not replica.chained():
            raise refusal
        log.info(
            'stream "%s": replica node "%s" refused the relay (%s); re-attaching to the owner, '
            'node "%s"',
            replica.stream.id, replica.upstream, refusal, replica.owner,
        )  # fmt: skip
        replica.attach_to_owner()

    async def _locate_upstream(self, replica: Replica) -> tuple[str, str]:
        """The upstream's relay address and its timeline's name.

        A chained replica's upstream replica while it lives (and is not the owner: that one
        is the owner's timeline); once it is gone, the owner: a replica re-attaches only to
        the owner, never to a node deeper than itself, so replicas never feed each other in
        a circle. The owner gone (killed, or its lease released): this replica tries to
        claim the stream itself (:meth:`_promote`, in a task of the node's), and looks up to
        ``REATTACH_WAIT`` for its next owner: this node (the claim ends the replica as
        promoted, which cancels this relay source) or another one, which it re-attaches to.
        Either way the replica's viewers keep their sessions. The owner changing while both
        live does the same.

        Raises:
            ClusterError: the replica must end (nobody claimed the stream in time, this node
                owns it now, or Redis is unavailable).
        """
        assert self._redis is not None
        redis = self._redis
        stream_id = replica.stream.id
        if replica.chained():
            owner = await current_owner(redis, stream_id)
            nodes = await live_nodes(redis)
            record = next((n for n in nodes if n.node_id == replica.upstream), None)
            alive = record is not None and record.relay_address and not await self._gone(record)
            if (
                alive
                and record is not None
                and owner is not None
                and owner.node_id != record.node_id
            ):
                return record.relay_address, f'replica node "{record.node_id}"'
            state = "gone" if not alive else "between owners" if owner is None else "the owner now"
            log.info(
                'stream "%s": upstream replica node "%s" is %s; re-attaching to the owner',
                stream_id, replica.upstream, state,
            )  # fmt: skip
            replica.attach_to_owner()
        deadline = trio.current_time() + REATTACH_WAIT
        while True:
            owner = await current_owner(redis, stream_id)
            if owner is not None and owner.node_id == self.node_id:
                raise ClusterError(f'node "{self.node_id}" owns "{stream_id}" now')
            if owner is not None:
                nodes = await live_nodes(redis)
                record = next((n for n in nodes if n.node_id == owner.node_id), None)
                if record is not None and record.relay_address and not await self._gone(record):
                    if owner.node_id != replica.owner:
                        log.info(
                            'stream "%s": replica re-attached to its new owner, node "%s" '
                            '(was "%s")',
                            stream_id, owner.node_id, replica.owner,
                        )  # fmt: skip
                        replica.owner = owner.node_id
                        replica.epochs.add(owner.epoch)
                    if replica.upstream != owner.node_id:
                        replica.attach_to_owner()
                    return record.relay_address, f'owner node "{owner.node_id}" ({owner.epoch})'
            self._start_promotion(replica)
            if trio.current_time() >= deadline:
                raise OwnerGone(
                    f'node "{replica.owner}" serving "{stream_id}" stopped, and no node took '
                    f"the stream over within {REATTACH_WAIT:g} s"
                )
            await trio.sleep(REATTACH_POLL)

    def _start_promotion(self, replica: Replica) -> None:
        """The replica's owner is not there (gone, or between owners): try to claim the stream
        here, once at a time (:meth:`_promote`)."""
        if replica.promoting or replica.ended or self.draining or self._nursery is None:
            return
        replica.promoting = True
        self._nursery.start_soon(self._promote, replica)

    async def _promote(self, replica: Replica) -> None:
        """Claim the stream of ``replica``, whose owner is gone, and become its owner without
        ending the replica's viewers' sessions (:meth:`claim` promotes the replica).

        It is :meth:`resolve`'s: the same evidence and grace as any takeover (a gone owner's
        lease is deleted only ``TAKEOVER_GRACE`` after its liveness connection was seen gone,
        a frozen owner's is waited out, a live owner is never challenged); then the replicas
        of the stream claim it in turn, the best placed first (:meth:`_promotion_turn`), the
        lease letting one win, and the others re-attach to it (:meth:`_locate_upstream`).
        Bounded by ``REATTACH_WAIT``, as the replica's look for an owner is.
        """
        stream = replica.stream
        former = replica.owner
        try:
            with trio.move_on_after(REATTACH_WAIT):
                # Taken over and claimed here, this node being a live replica of it (claim
                # logs the promotion); or another node's now, or still the owner's (alive).
                node_id, epoch = await self.resolve(stream)
                if node_id != self.node_id and not replica.ended:
                    log.info(
                        'stream "%s": owner node "%s" gone; node "%s" owns it now (epoch %d), '
                        "this replica re-attaches to it",
                        stream.id, former, node_id, epoch,
                    )  # fmt: skip
        except ClusterError as exc:  # Redis, the claim given up at once, draining
            log.info('stream "%s": this replica did not take the stream over: %s', stream.id, exc)
        finally:
            replica.promoting = False

    async def _promotion_turn(self, replica: Replica) -> int:
        """How many of the stream's live replicas are better placed than this one to own it:
        shallower, or as deep and ranked before it by the stream's placement.

        Raises:
            RedisUnavailable
        """
        assert self._redis is not None
        redis = self._redis
        stream_id = replica.stream.id
        nodes = await self._redis_call(lambda: live_nodes(redis))
        entries = (await self._redis_call(lambda: read_replicas(redis, [stream_id])))[stream_id]
        ranks = {node.node_id: index for index, node in enumerate(rank_nodes(stream_id, nodes))}
        gone = await self._redis_call(lambda: gone_nodes(redis, nodes))
        depths = {
            entry.node: entry.depth
            for entry in entries
            if entry.node in ranks and entry.node not in gone and entry.node != replica.owner
        }
        depths[self.node_id] = replica.depth

        def placed(node_id: str) -> tuple[int, int]:
            return depths[node_id], ranks.get(node_id, len(ranks))

        return sorted(depths, key=placed).index(self.node_id)

    # --- ownership --------------------------------------------------------------------------

    def serves(self, stream_id: str) -> bool:
        """Whether this node may feed the stream to replicas: it owns it, or is a live
        replica of it (replicas chain)."""
        replica = self._replicas.get(stream_id)
        return self.owns(stream_id) or (
            replica is not None and not replica.ended and stream_id not in self._owned
        )

    def owns(self, stream_id: str) -> bool:
        lease = self._owned.get(stream_id)
        return (
            lease is not None
            and lease.state is LeaseState.HELD
            and stream_id not in self._handing_over
        )

    async def claim(self, stream: Stream) -> StreamLease:
        """Own ``stream`` (claim its lease unless held); its ingest may then start.

        A replica of the stream here is *promoted*: the lease is claimed first (the replica
        relays on meanwhile), then the replica ends without ending its viewers' sessions. The
        supervisor runs one source per quality at a time, so the relay source is gone before
        the camera's starts; the viewers stay in the fan-out and get the camera's frames from
        its first keyframe, on the quality's timeline (which followed the relayed frames).

        Raises:
            OwnedElsewhere: another node holds it.
            ClusterError: this node is draining.
            RedisUnavailable
        """
        lock = self._claims.setdefault(stream.id, trio.Lock())
        async with lock:
            lease = self._owned.get(stream.id)
            if lease is not None and self.owns(stream.id):
                return lease
            if self.draining:
                raise ClusterError(
                    f'node "{self.node_id}" is shutting down and takes no new streams, and no '
                    "other node serves"
                )
            assert self._nursery is not None and self._redis is not None
            replica = self._replicas.get(stream.id)
            if replica is not None and replica.ended:
                # Ending (its viewers told to re-offer, or re-attaching): its relay source
                # must be gone before this node reads the camera.
                await stream.changes.wait_until(lambda: stream.id not in self._replicas)
                replica = None
            self._counts["redis_commands"] += 1
            claimed: StreamLease = await self._nursery.start(self._own, stream)
            try:
                claimed.check()  # LeaseLost if it was given up at once (see _own)
            except LeaseLost:
                if replica is not None:
                    why = f"this node's claim of the stream was given up: {claimed.loss_reason}"
                    replica.end(why, failed=True)
                raise
            if replica is not None:
                self._promote_replica(replica, claimed)
            return claimed

    def _promote_replica(self, replica: Replica, lease: StreamLease) -> None:
        """This node owns the stream it replicated: the relay source gives way to the camera
        (the supervisor starts it once the relay's is gone); the viewers, their sessions and
        the replicas fed from here stay."""
        stream = replica.stream
        self._inherited_epochs[stream.id] = set(replica.epochs)
        log.info(
            'stream "%s": owner node "%s" gone; this replica takes the stream over (epoch %d): '
            "%d viewers keep their sessions",
            stream.id, replica.owner, lease.epoch, stream.viewers,
        )  # fmt: skip
        replica.end(f"this node owns the stream now (epoch {lease.epoch})", promoted=True)
        if self.relay is not None:
            # The replicas fed from here reconnect (they resume at the camera's first
            # keyframe anyway) and find this node the owner: depth 1, its epoch.
            self.relay.disconnect(stream.id)

    async def _own(self, stream: Stream, *, task_status: trio.TaskStatus[StreamLease]) -> None:
        assert self._redis is not None
        lease: StreamLease | None = None
        breaks = self._liveness_breaks()
        try:
            async with trio.open_nursery() as holder:
                lease = await holder.start(
                    functools.partial(hold_stream_lease, self._redis, stream.id, self.node_id)
                )
                assert lease is not None
                held = lease
                if self._liveness_breaks() != breaks:
                    # Claimed while the liveness connection was replaced: the others may
                    # judge this node gone by its old id, so this lease is not kept either.
                    held.give_up("claimed while this node's liveness connection was replaced")
                self._owned[stream.id] = held
                stream.changes.notify()  # the supervisor may start the ingest now
                task_status.started(held)
                holder.start_soon(self._end_sessions_on_loss, stream, held)
                # Released when idle: no viewer came within the grace, or all have left and the
                # source has stopped (the supervisor's own grace).
                with trio.move_on_after(CLAIM_GRACE):
                    await stream.changes.wait_until(
                        lambda: stream.viewers > 0 or stream.id in self._handing_over
                    )
                await stream.changes.wait_until(
                    lambda: (
                        held.state is not LeaseState.HELD
                        or (stream.viewers == 0 and not stream.source_running)
                        or (stream.id in self._handing_over and not stream.source_running)
                    )
                )
                holder.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if lease is not None or len(group.exceptions) != 1:
                raise
            raise group.exceptions[0] from None  # the claim's own error: OwnedElsewhere, …
        finally:
            if lease is not None and self._owned.get(stream.id) is lease:
                del self._owned[stream.id]
                self._inherited_epochs.pop(stream.id, None)
                # The viewers placed on replicas no longer count anywhere (their cool-downs
                # stay: bounded, and they still hold should the stream come back here).
                self._placed.pop(stream.id, None)
                if self.relay is not None:
                    self.relay.overdue(stream.id, math.inf)  # every one not connected
            stream.changes.notify()

    async def _end_sessions_on_loss(self, stream: Stream, lease: StreamLease) -> None:
        await lease.lost.wait()
        if self.relay is not None:
            self.relay.disconnect(stream.id)  # never a frame relayed without the lease
        reason = f'node "{self.node_id}" lost the stream ({lease.loss_reason})'
        self._end_stream_sessions(stream, reason)
        self._end_other_viewers(stream, reason)

    def _end_stream_sessions(self, stream: Stream, reason: str) -> None:
        """Every session of ``stream`` served here ends, its page told to re-offer."""
        for remote in list(self._remote.values()):
            remote.end_stream(stream.id, reason)
        for session, socket in list(self._local_sessions.items()):
            if session.stream is stream and session.phase is not SessionPhase.ENDED:
                socket.post_error(
                    ErrorCode.PEER_FAILED, f"{reason}; send a new offer", stream.id,
                    session.session_id,
                )  # fmt: skip
                session.end(reason)
        stream.changes.notify()

    def _end_other_viewers(self, stream: Stream, reason: str) -> None:
        """The viewers of ``stream`` here that are not socket sessions (WHEP sessions,
        fallbacks) end with a retryable error: nothing feeds them here any more."""
        stream.end_viewers(ErrorCode.PEER_FAILED, f"{reason}; play it again")

    # --- placement of always-on streams and the node's load ---------------------------------

    async def _place_always_on(self) -> None:
        """Always-on streams are read with no viewer, so no offer places them: every node
        looks for those nobody reads and claims the ones placement gives it.

        One round: one ``MGET`` of their owners and the node list, plus one ``CLIENT LIST``
        when some are owned by other nodes (is the owner's process still there?). A stream
        with no owner, or whose owner ended, goes through :meth:`resolve` in a task of its
        own, as a viewer's offer would: it waits out or takes over a dead owner's lease, and
        claims the stream only if placement chooses this node (the chosen node does the same).
        """
        assert self._redis is not None
        redis = self._redis
        placing: set[str] = set()
        async with trio.open_nursery() as nursery:
            while True:
                wanted = [
                    stream
                    for stream in (self.registry or ())
                    if stream.always_on and not self.owns(stream.id) and stream.id not in placing
                ]
                if wanted and not self.draining:
                    try:
                        unread = await self._unread(redis, wanted)
                    except RedisUnavailable as exc:
                        log.info("%s; always-on streams not placed this round", exc)
                        unread = []
                    for stream in unread:
                        placing.add(stream.id)
                        nursery.start_soon(self._place, stream, placing)
                if not self.draining:
                    try:
                        await self._rebalance(redis, nursery)
                    except RedisUnavailable as exc:
                        log.info("%s; always-on streams not rebalanced this round", exc)
                await trio.sleep(PLACEMENT_INTERVAL)

    async def _rebalance(self, redis: Redis, nursery: trio.Nursery) -> None:
        """Hand the always-on streams nobody watches to the node placement now prefers.

        Placement is sticky: a stream stays where it was claimed. Nodes of a cluster start one
        after the other, so the first would keep every always-on camera; an unwatched one
        moves at no cost to anybody (its ingest stops here before the lease is released, and
        the preferred node claims it in its next round). Watched streams never move.

        Raises:
            RedisUnavailable
        """
        idle = [
            stream
            for stream in (self.registry or ())
            if stream.always_on and stream.viewers == 0 and self.owns(stream.id)
        ]
        if not idle:
            return
        nodes = await live_nodes(redis)
        for stream in idle:
            # The stream's first node in the rendezvous ranking, not load-aware placement: a
            # ranking does not change with load, so a stream moves at most once and never
            # back (two nodes handing each other streams as their loads cross would flap).
            ranked = rank_nodes(stream.id, nodes)
            chosen = ranked[0] if ranked else None
            if (
                chosen is not None
                and chosen.node_id != self.node_id
                and chosen.load < FULL
                and self.owns(stream.id)
            ):
                log.info(
                    'always-on stream "%s": nobody watches it; handed to node "%s", first in '
                    "its placement ranking",
                    stream.id, chosen.node_id,
                )  # fmt: skip
                nursery.start_soon(self._hand_over, stream.id)  # owns() is False from its start

    async def _unread(self, redis: Redis, streams: list[Stream]) -> list[Stream]:
        """Those of ``streams`` that no live node owns (or owned by an earlier run of this one).

        Raises:
            RedisUnavailable
        """
        values = await redis_call(
            redis,
            "read the owners of always-on streams",
            redis.mget([owner_key(s.id) for s in streams]),
        )
        nodes = {node.node_id: node for node in await live_nodes(redis)}
        owners: dict[str, str] = {}
        for stream, value in zip(streams, values, strict=True):
            try:
                owners[stream.id] = Owner.parse(value).node_id if value else ""
            except ClusterError as exc:
                log.warning('stream "%s": %s; placing it again', stream.id, exc)
                owners[stream.id] = ""
        involved = [nodes[n] for n in set(owners.values()) if n in nodes and n != self.node_id]
        gone = await gone_nodes(redis, involved) if involved else set()
        for node_id in gone:
            self._seen_gone(nodes[node_id])
        return [
            stream
            for stream in streams
            if owners[stream.id] not in nodes
            or owners[stream.id] in gone
            or owners[stream.id] == self.node_id
        ]

    async def _place(self, stream: Stream, placing: set[str]) -> None:
        try:
            node_id, _ = await self.resolve(stream)
            if node_id == self.node_id:
                log.info('always-on stream "%s": placed on this node', stream.id)
        except ClusterError as exc:  # Redis, another node won the race, draining
            log.info('always-on stream "%s" not placed here: %s', stream.id, exc)
        finally:
            placing.discard(stream.id)

    async def _measure_load(self, registration: NodeRegistration) -> None:
        """Publish the node's load: the share of one core its process used (all threads,
        decoders and readers included) over the last ``LOAD_INTERVAL``, which placement reads
        to send new streams elsewhere once a node is full."""
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            await trio.sleep(LOAD_INTERVAL)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            load = round((now_cpu - cpu) / max(now_wall - wall, 1e-3), 2)
            wall, cpu = now_wall, now_cpu
            if abs(load - registration.record.load) >= LOAD_STEP:
                registration.update(dataclasses.replace(registration.record, load=load))

    # --- Router (the socket's node) ---------------------------------------------------------

    def open_session(self, stream: Stream, offer: Offer, socket: SocketEnd) -> Session:
        replica = self._replicas.get(stream.id)
        serving = self.owns(stream.id) or (replica is not None and not replica.ended)
        if serving and not self._full(stream):
            self._counts["local_offers"] += 1
            return self.open_local(stream, offer, socket)
        self._counts["routed_offers"] += 1
        return RoutedSession(self, stream, offer, socket)

    def open_local(self, stream: Stream, offer: Offer, socket: SocketEnd) -> Session:
        """A session served here, on a stream this node owns."""
        session = self._local.open_session(stream, offer, socket)
        self._local_sessions[session] = socket
        self._replica_offered(stream)
        return session

    async def resolve(self, stream: Stream) -> tuple[str, int]:
        """Where ``stream`` is served: ``(this node's id, epoch)`` once claimed here, else the
        owner's (or the placed node's, epoch 0) id.

        Nobody owning it (or its owner gone and taken over), it is claimed here if this node
        is a live replica of it (its viewers stay: see :meth:`claim`), once the better placed
        replicas have had their turn; else it goes where placement says.

        Raises:
            RedisUnavailable
        """
        if self.owns(stream.id):
            return self.node_id, self._owned[stream.id].epoch
        await self._started.wait()  # a socket can open while the node is still starting
        assert self._redis is not None
        redis = self._redis
        #: this node replicates the stream: it claims it, after its turn (_promotion_turn)
        replica_here = False
        while True:
            owner = await self._redis_call(lambda: current_owner(redis, stream.id))
            if owner is None:
                replica = self._replicas.get(stream.id)
                if replica_here or replica is None or replica.ended:
                    break
                # Its viewers stay (claim promotes the replica); but the replicas better
                # placed than this one have their turn first.
                replica_here = True
                turn = await self._promotion_turn(replica)
                if not turn:
                    break
                await trio.sleep(turn * PROMOTION_STEP)
                continue
            if owner.node_id == self.node_id:
                claiming = self._claims.get(stream.id)
                if stream.id in self._owned or (claiming is not None and claiming.locked()):
                    break  # ours, or being claimed here right now
                # A lease of this node's previous life: it restarted under the same id (a
                # worker of --workers restarted by its parent) before the lease expired. It
                # cannot be adopted (a twin with the same id would look the same): wait.
                why = "an earlier run of this node"
            else:
                nodes = await self._redis_call(lambda: live_nodes(redis))
                record = next((node for node in nodes if node.node_id == owner.node_id), None)
                if record is not None:
                    if not await self._gone(record):
                        return owner.node_id, owner.epoch
                    self._seen_gone(record)
                gone = self._known_gone(owner.node_id)
                if gone is not None:
                    # Its process ended (Redis dropped its liveness connection; its record may
                    # already be deleted by a takeover of another of its streams): once it has
                    # been gone for the grace, its lease is deleted and the stream placed again.
                    liveness_id, first_seen = gone
                    await trio.sleep_until(first_seen + TAKEOVER_GRACE)
                    if record is None or await self._gone(record):
                        takeover = functools.partial(
                            take_over, redis, stream.id, owner.value, owner.node_id, liveness_id
                        )
                        if await self._redis_call(takeover):
                            self._counts["takeovers"] += 1
                            log.info(
                                'stream "%s": took it over from node "%s" (epoch %d), whose '
                                "process ended",
                                stream.id, owner.node_id, owner.epoch,
                            )  # fmt: skip
                    continue
                # The owner's record expired (it died); its lease outlives it by design (an
                # owner frozen past it must stop first). Wait until Redis lets the stream go.
                why = f'owner node "{owner.node_id}", gone'
            remaining = await self._redis_call(
                lambda: redis_call(
                    redis,
                    f'read the lease expiry of "{stream.id}"',
                    redis.pttl(owner_key(stream.id)),
                )
            )
            log.info(
                'stream "%s": held by %s; its lease expires in %d ms',
                stream.id, why, remaining,
            )  # fmt: skip
            await trio.sleep(max(remaining, 50) / 1000)
        if not replica_here:
            nodes = await self._redis_call(lambda: live_nodes(redis))
            chosen = choose_owner(stream.id, nodes)
            if chosen is not None and chosen.node_id != self.node_id:
                return chosen.node_id, 0
        try:
            lease = await self.claim(stream)
        except OwnedElsewhere as exc:
            return exc.node_id, exc.epoch
        return self.node_id, lease.epoch

    def _seen_gone(self, record: NodeRecord) -> None:
        run_id = self._liveness.run_id if self._liveness is not None else ""
        known = self._gone_since.get(record.node_id)
        if known is None or known[0] != record.liveness:
            self._gone_since[record.node_id] = (record.liveness, trio.current_time(), run_id)

    def _known_gone(self, node_id: str) -> tuple[int, float] | None:
        """(liveness id, first seen) if ``node_id`` was seen gone during this Redis run."""
        known = self._gone_since.get(node_id)
        if known is None or self._liveness is None or known[2] != self._liveness.run_id:
            return None
        return known[0], known[1]

    async def _gone(self, record: NodeRecord) -> bool:
        """Has ``record``'s process ended (its liveness connection gone from Redis)?"""
        if not record.liveness:
            return False
        assert self._redis is not None
        redis = self._redis
        return bool(await self._redis_call(lambda: gone_nodes(redis, [record])))

    async def send(self, node_id: str, kind: str, **fields: Any) -> None:
        """Deliver one message about a session (``ice``, ``quality``, ``close``, ``client``,
        ``ended``): a request that the receiver acknowledges, sent again with the same ``seq``
        if the acknowledgement does not come within ``ACK_TIMEOUT`` (the receiver's bus drops
        the repeat, or answers it again from its reply cache: each message is handled once).
        ``PUBLISH`` reaching nobody is tried again once after ``ACK_TIMEOUT`` too: the
        receiver may be subscribing again after a Redis hiccup.

        Raises:
            RequestTimeout: never acknowledged; OwnerGone: nobody listened, twice;
            RedisUnavailable.
        """
        try:
            bus = await self._wait_bus()
            self._messages_out[kind] += 1
            for attempt in (1, 2):
                self._counts["redis_commands"] += 1
                try:
                    await bus.request(node_id, kind, reply_timeout=ACK_TIMEOUT, **fields)
                    return
                except OwnerGone:
                    if attempt == 2:
                        raise
                    await trio.sleep(ACK_TIMEOUT)
        except ClusterError:
            self._message_errors[kind] += 1
            raise

    async def request(self, node_id: str, kind: str, **fields: Any) -> Envelope:
        try:
            bus = await self._wait_bus()
            self._counts["redis_commands"] += 1
            self._messages_out[kind] += 1
            return await bus.request(node_id, kind, **fields)
        except ClusterError:
            self._message_errors[kind] += 1
            raise

    # --- the cluster view (the API) ---------------------------------------------------------

    async def owners(self, stream_ids: list[str]) -> dict[str, Owner | None]:
        """Which node owns each stream (None: nobody), in one ``MGET``.

        The streams this node holds are known without Redis; with Redis unreachable, they
        are all that is known (the others are None) rather than an error: listing streams
        does not depend on Redis.
        """
        owners: dict[str, Owner | None] = {
            stream_id: Owner(self.node_id, self._owned[stream_id].epoch)
            if self.owns(stream_id)
            else None
            for stream_id in stream_ids
        }
        unknown = [stream_id for stream_id, owner in owners.items() if owner is None]
        redis = self._redis
        if redis is None or not unknown:
            return owners
        try:
            values = await redis_call(
                redis, "read the owners of streams", redis.mget([owner_key(s) for s in unknown])
            )
        except RedisUnavailable as exc:
            log.info("%s; only this node's own streams are known", exc)
            return owners
        for stream_id, value in zip(unknown, values, strict=True):
            if value is not None:
                with contextlib.suppress(ClusterError):
                    owners[stream_id] = Owner.parse(value)
        return owners

    async def replicas(self, stream_ids: list[str]) -> dict[str, list[ReplicaEntry]]:
        """The live replicas of each stream (from ``ms:replicas:{stream}``), in one script
        call; with Redis unreachable, nothing (listing streams does not depend on Redis)."""
        redis = self._redis
        if redis is None or not stream_ids:
            return {}
        try:
            return await read_replicas(redis, stream_ids)
        except RedisUnavailable as exc:
            log.info("%s; the streams' replicas are not known", exc)
            return {}

    async def nodes(self) -> list[NodeRecord]:
        """The live nodes of the cluster, sorted by id.

        Raises:
            RedisUnavailable
        """
        redis = self._redis
        if redis is None:
            raise RedisUnavailable(f'node "{self.node_id}" is not connected to Redis')
        return await live_nodes(redis)

    def _relaying(self, session: RoutedSession, on: bool) -> None:
        key = (session.socket.socket_id, session.stream.id)
        if on:
            self._relayed[key] = session
            self._crossing.set()
        elif self._relayed.get(key) is session:
            del self._relayed[key]

    # --- the inbox --------------------------------------------------------------------------

    def _dispatch(self, envelope: Envelope, bus: Bus, handlers: trio.Nursery) -> None:
        kind = envelope.kind
        self._messages_in[kind] += 1
        if kind != "offer" and envelope.is_request:
            # A session message, acknowledged once handled (stale ones too: they arrived).
            handlers.start_soon(_reply, bus, envelope, {"ok": True})
        if kind == "offer":
            handlers.start_soon(self._serve_remote_offer, envelope, bus)
        elif kind in ("ice", "close", "quality"):
            remote = self._remote.get((envelope.reply_to, envelope.socket))
            lease = self._owned.get(envelope.stream)
            replica = self._replicas.get(envelope.stream)
            inherited = self._inherited_epochs.get(envelope.stream, ())
            current = (
                lease is not None and (envelope.epoch == lease.epoch or envelope.epoch in inherited)
            ) or (replica is not None and envelope.epoch in replica.epochs)
            if remote is None or not current:
                self._counts["stale_dropped"] += 1
                return
            remote.deliver(envelope)
        elif kind == "relay_refused":
            # A replica this node's relay refused (it names itself: the relay could not tell
            # who it was before the secret or TLS failed). Handled before the ack goes out, so
            # before its viewers are told to re-offer.
            payload = envelope.payload if isinstance(envelope.payload, dict) else {}
            reason = payload.get("reason")
            if self.owns(envelope.stream):
                self._unreachable(
                    envelope.stream,
                    envelope.reply_to,
                    f"could not take the relay ({reason if isinstance(reason, str) else '?'})",
                )
        elif kind == "socket_closed":
            remote = self._remote.get((envelope.reply_to, envelope.socket))
            if remote is not None:
                remote.close("the socket closed on its node")
        elif kind in ("client", "ended"):
            session = self._relayed.get((envelope.socket, envelope.stream))
            if session is None or not session.accepts(envelope):
                self._counts["stale_dropped"] += 1
                return
            session.from_owner(envelope)
        else:
            log.info('node "%s": message of unknown kind %r ignored', self.node_id, kind)

    async def _serve_remote_offer(self, envelope: Envelope, bus: Bus) -> None:
        try:
            await self._answer_remote_offer(envelope, bus)
        except Exception:
            log.exception(
                'node "%s": failed to serve an offer for "%s" from node "%s"',
                self.node_id, envelope.stream, envelope.reply_to,
            )  # fmt: skip
            await _reply(bus, envelope, {"error": "internal_error", "message": "Internal error"})

    async def _answer_remote_offer(self, envelope: Envelope, bus: Bus) -> None:
        payload = envelope.payload if isinstance(envelope.payload, dict) else {}
        assert self.registry is not None
        stream = self.registry.get(envelope.stream)
        sdp = payload.get("sdp")
        session_id = payload.get("sessionId")
        relay = payload.get("relay")
        if not isinstance(sdp, str) or not isinstance(relay, str):
            message = f'offer from node "{envelope.reply_to}" lacks a string "sdp" and "relay"'
            log.warning('node "%s": %s', self.node_id, message)
            await _reply(bus, envelope, {"error": "invalid_offer", "message": message})
            return
        if stream is None:
            await _reply(
                bus, envelope, {"error": "stream_not_found", "message": "Stream not found"}
            )
            return
        if stream.unavailable is not None:
            await _reply(
                bus, envelope, {"error": "stream_unavailable", "message": stream.unavailable}
            )
            return
        if self.draining:
            # The socket's node places the stream again; this record already says draining.
            message = f'node "{self.node_id}" is shutting down'
            await _reply(bus, envelope, {"error": "draining", "message": message})
            return
        try:
            quality, tile = protocol.quality_fields(payload, stream.id)
        except SignalingError as exc:
            await _reply(bus, envelope, {"error": "invalid_offer", "message": exc.message})
            return
        offer = Offer(
            stream.id,
            sdp,
            session_id if isinstance(session_id, str) else None,
            quality=quality,
            tile=tile,
        )
        replica_of = payload.get("replicaOf")
        if isinstance(replica_of, str) and replica_of:
            upstream = payload.get("upstream")
            depth = payload.get("depth")
            try:
                await self.replicate(
                    stream,
                    replica_of,
                    envelope.epoch,
                    upstream if isinstance(upstream, str) else "",
                    depth if isinstance(depth, int) and depth > 0 else 1,
                )
            except ClusterError as exc:
                await _reply(bus, envelope, {"error": "relay_failed", "message": str(exc)})
                return
            self._counts["replica_offers"] += 1
            remote = await self._remote_socket(envelope)
            remote.start_session(stream, offer, envelope.epoch, relay)
            self._replica_offered(stream)
            await _reply(bus, envelope, {"epoch": envelope.epoch})
            return
        try:
            lease = await self.claim(stream)
        except OwnedElsewhere as exc:
            await _reply(
                bus,
                envelope,
                {"error": "owned_elsewhere", "message": str(exc), "owner": exc.node_id,
                 "epoch": exc.epoch},
            )  # fmt: skip
            return
        except RedisUnavailable as exc:
            await _reply(bus, envelope, {"error": "cluster_unavailable", "message": str(exc)})
            return
        except LeaseLost as exc:  # given up as it was claimed: a new offer claims it again
            await _reply(bus, envelope, {"error": "relay_failed", "message": str(exc)})
            return
        if envelope.epoch and envelope.epoch != lease.epoch:
            self._counts["stale_dropped"] += 1
            await _reply(
                bus,
                envelope,
                {"error": "stale", "message": f"epoch {envelope.epoch} is not {lease.epoch}"},
            )
            return
        if self._full(stream):
            choice = await self.overflow(stream, prefer=envelope.reply_to)
            if choice is not None:
                await _reply(
                    bus,
                    envelope,
                    {"error": "full", "replica": choice.node, "upstream": choice.upstream,
                     "depth": choice.depth, "epoch": lease.epoch},
                )  # fmt: skip
                return
        self._counts["remote_offers"] += 1
        remote = await self._remote_socket(envelope)
        # Started before the reply: a socket that closed meanwhile cannot leave it orphaned,
        # and the relayed session accepts the owner's messages before it knows the epoch.
        remote.start_session(stream, offer, lease.epoch, relay)
        await _reply(bus, envelope, {"epoch": lease.epoch})

    async def _remote_socket(self, envelope: Envelope) -> RemoteSocket:
        """The remote socket an offer came from, running (made if new)."""
        key = (envelope.reply_to, envelope.socket)
        remote = self._remote.get(key)
        if remote is None or remote.closing:
            remote = RemoteSocket(self, envelope.reply_to, envelope.socket)
            self._remote[key] = remote
            self._crossing.set()
            assert self._nursery is not None
            self._nursery.start_soon(remote.run)
        # Also when another offer of the same socket created it a moment ago: it may not run yet.
        await remote.ready.wait()
        return remote

    def _forget_remote(self, remote: RemoteSocket) -> None:
        if self._remote.get(remote.key) is remote:
            del self._remote[remote.key]

    # --- failures of other nodes ------------------------------------------------------------

    async def _watch_nodes(self) -> None:
        """While sessions cross nodes, notice the nodes that died: their process ended (Redis
        dropped their liveness connection; checked every ``WATCH_INTERVAL``) or their record
        expired."""
        assert self._redis is not None
        redis = self._redis
        while True:
            await self._crossing.wait()
            await trio.sleep(WATCH_INTERVAL)
            if not self._relayed and not self._remote:
                self._crossing = trio.Event()
                continue
            involved = {s.owner for s in self._relayed.values() if s.owner} | {
                r.node_id for r in self._remote.values()
            }
            try:
                records = await live_nodes(redis)
                gone = await gone_nodes(redis, records, expected=involved)
            except RedisUnavailable as exc:
                log.info("%s; node liveness not checked", exc)
                continue
            for record in records:
                if record.node_id in gone:
                    self._seen_gone(record)
            now = trio.current_time()
            for node_id, (_, seen, _) in list(self._gone_since.items()):  # forget old deaths
                if now - seen > GONE_MEMORY:
                    del self._gone_since[node_id]
            for session in list(self._relayed.values()):
                if session.owner in gone:
                    session.owner_gone(f'node "{session.owner}" serving this stream stopped')
            for remote in list(self._remote.values()):
                if remote.node_id in gone:
                    remote.close(f'the socket\'s node "{remote.node_id}" stopped')

    def statistics(self) -> RoutingStatistics:
        bus = self._closed_buses
        if self._bus is not None:
            bus = _sum_bus(bus, self._bus.statistics())
        return RoutingStatistics(
            **self._counts,
            owned_streams=tuple(sorted(s for s in self._owned if self.owns(s))),
            relayed_sessions=len(self._relayed),
            remote_sockets=len(self._remote),
            messages_out=tuple(sorted(self._messages_out.items())),
            messages_in=tuple(sorted(self._messages_in.items())),
            message_errors=tuple(sorted(self._message_errors.items())),
            bus=bus,
            replicas=tuple(sorted(s for s, r in self._replicas.items() if not r.ended)),
            relay_connections=self.relay.stats.connections if self.relay else 0,
            relay_refused=self.relay.stats.refused if self.relay else 0,
            relay_skipped_frames=self.relay.stats.skipped_frames if self.relay else 0,
            relay_reconnects=self._replica_stats.reconnects,
            relay_resume_skipped_frames=self._replica_stats.resume_skipped_frames,
            relay_upstream_refused=self._replica_stats.refused,
            replica_cooldowns=len(self._cooldowns),
        )


def _sum_bus(total: BusStatistics | None, more: BusStatistics) -> BusStatistics:
    """Counters of two buses added (the inbox queue: the newer one's)."""
    if total is None:
        return more
    added = {
        field.name: getattr(total, field.name) + getattr(more, field.name)
        for field in dataclasses.fields(BusStatistics)
    }
    added["inbox_queued"] = more.inbox_queued
    return BusStatistics(**added)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


async def _reply(bus: Bus, request: Envelope, payload: dict[str, Any]) -> None:
    with contextlib.suppress(ClusterError):  # the requester is gone, or Redis: it times out
        await bus.reply(request, payload)


class RoutedSession:
    """A stream not owned here when its offer came: served here after claiming it, or
    relayed to its owner node. Same interface as :class:`StreamSession`."""

    def __init__(self, node: ClusterNode, stream: Stream, offer: Offer, socket: SocketEnd) -> None:
        self.stream = stream
        self.offer = offer
        self.socket = socket
        self.owner = ""
        self.epoch = 0
        #: names this offer on the bus (see ``_RemoteSession.relay``)
        self.relay_id = secrets.token_hex(8)
        self._node = node
        self._phase = SessionPhase.NEGOTIATING
        self._inner: Session | None = None
        self._cancel_scope = trio.CancelScope()
        self._end_reason = "socket closed"
        self._owner_ended = False
        limit = node._config.limits.max_pending_candidates
        self._candidates_in, self._candidates_out = trio.open_memory_channel[IceCandidate](limit)
        #: the page's quality requests not relayed yet, merged into one (the latest fields win)
        self._quality: QualityRequest | None = None
        self._quality_asked = trio.Event()

    @property
    def phase(self) -> SessionPhase:
        return self._inner.phase if self._inner is not None else self._phase

    @property
    def session_id(self) -> str | None:
        return self.offer.session_id

    def end(self, reason: str) -> None:
        if not self._cancel_scope.cancel_called:
            self._end_reason = reason
        if self._inner is not None:
            self._inner.end(reason)
        self._cancel_scope.cancel()

    def add_candidate(self, candidate: IceCandidate) -> None:
        if self._inner is not None:
            self._inner.add_candidate(candidate)
            return
        queue_candidate(self._candidates_in, candidate, self.stream.id)

    def request_quality(self, request: QualityRequest) -> None:
        """Served here: the local session switches. Relayed: sent on to the owner's session
        (which answers through the relay, errors included).

        Raises:
            SignalingError: the local session's.
        """
        if isinstance(self._inner, StreamSession):
            self._inner.request_quality(request)
            return
        earlier = self._quality
        if earlier is not None:
            request = QualityRequest(
                request.stream_id,
                request.quality if request.quality is not None else earlier.quality,
                request.tile if request.tile is not None else earlier.tile,
                request.session_id,
            )
        self._quality = request
        self._quality_asked.set()

    async def run(self) -> None:
        label = f"{self.socket.label} {self.stream.id}"
        try:
            with self._cancel_scope:
                await self._route(label)
        except RedisUnavailable as exc:
            # Not final either: Redis slow or restarting for a moment must not make a wall's
            # tiles give up for good (the page re-offers after its backoff).
            self._end_reason = str(exc)
            self._error(
                ErrorCode.CLUSTER_UNAVAILABLE,
                f"Unavailable: {exc}; send a new offer to play it again",
            )
        except (OwnerGone, OwnerChanging) as exc:
            # The owner died and its record has not expired yet, or the stream is moving (a
            # drain, a restarted node waiting out its old lease). Not final: the page re-offers
            # after its backoff, and the stream is placed again once it has settled.
            # stream_unavailable would make the page give the tile up.
            self._end_reason = str(exc)
            self._error(ErrorCode.PEER_FAILED, f"{exc}; send a new offer to play it again")
        except ClusterError as exc:  # messages between the nodes lost, or the owner changed
            self._end_reason = str(exc)
            self._error(
                ErrorCode.RELAY_FAILED,
                f"Signaling with the node serving this stream failed: {exc}; send a new offer",
            )
        except Exception as exc:  # a bug: this stream's session fails, the socket carries on
            log.exception("%s: relayed session failed", label)
            self._end_reason = f"internal error: {type(exc).__name__}"
            self._error(ErrorCode.INTERNAL_ERROR, "Internal server error in this stream's session")
        finally:
            self._phase = SessionPhase.ENDED
            self._candidates_in.close()
            self._node._relaying(self, False)
            if self.owner and not self._owner_ended:
                with (
                    trio.CancelScope(shield=True),
                    trio.move_on_after(CLOSE_NOTICE_TIMEOUT),
                    contextlib.suppress(ClusterError),
                ):
                    await self._node.send(
                        self.owner, "close", socket=self.socket.socket_id,
                        stream=self.stream.id, epoch=self.epoch,
                        payload={"relay": self.relay_id},
                    )  # fmt: skip
            if self._inner is None:
                log.info("%s: relayed session ended (%s)", label, self._end_reason)

    async def _route(self, label: str) -> None:
        for _ in range(2):  # a second try when the owner named another, or an old epoch
            node_id, epoch = await self._node.resolve(self.stream)
            replica_of, upstream, depth = "", "", 1
            if node_id == self._node.node_id:
                # Owned here (the offer came when it was not yet, or this node is full).
                choice = None
                if self._node._full(self.stream):
                    choice = await self._node.overflow(self.stream, prefer=None)
                if choice is None:
                    await self._serve_here()
                    return
                node_id, replica_of = choice.node, self._node.node_id
                upstream, depth = choice.upstream, choice.depth
            answer = await self._offer(node_id, epoch, replica_of, upstream, depth)
            if answer.get("error") == "full" and not replica_of:
                # The owner serves as many viewers as it should: a replica serves this one,
                # fed by the owner or by another replica (the owner chose both).
                replica, epoch = answer.get("replica"), int(answer.get("epoch", epoch))
                upstream, depth = answer.get("upstream") or node_id, answer.get("depth", 1)
                if not isinstance(replica, str) or not replica:
                    raise ClusterError(f'node "{node_id}" is full and named no replica')
                if not isinstance(upstream, str) or not isinstance(depth, int):
                    raise ClusterError(f'node "{node_id}" named a replica\'s upstream badly')
                self._node._relaying(self, False)
                if replica == self._node.node_id:
                    await self._node.replicate(self.stream, node_id, epoch, upstream, depth)
                    self._node._counts["replica_offers"] += 1
                    await self._serve_here()
                    return
                replica_of, node_id = node_id, replica
                answer = await self._offer(node_id, epoch, replica_of, upstream, depth)
            error = answer.get("error")
            if error in ("owned_elsewhere", "stale", "draining"):
                self._node._relaying(self, False)
                self.owner = ""
                continue
            if error is not None:
                self._owner_ended = True
                code = {
                    "stream_not_found": ErrorCode.STREAM_NOT_FOUND,
                    "relay_failed": ErrorCode.RELAY_FAILED,
                    "cluster_unavailable": ErrorCode.CLUSTER_UNAVAILABLE,
                }.get(str(error), ErrorCode.STREAM_UNAVAILABLE)
                self._error(code, str(answer.get("message", error)))
                return
            self.epoch = int(answer.get("epoch", 0))
            self._node._counts["relayed_offers"] += 1
            role = f'replica of node "{replica_of}"' if replica_of else "owner"
            log.info('%s: relayed to node "%s", %s (epoch %d)', label, node_id, role, self.epoch)
            await self._relay_candidates()
            return
        raise OwnerChanging(f'stream "{self.stream.id}" changed owners during its offer; try again')

    async def _serve_here(self) -> None:
        """Serve the offer with a session of this node (the owner, or a replica)."""
        self._inner = self._node.open_local(self.stream, self.offer, self.socket)
        if self._quality is not None and isinstance(self._inner, StreamSession):
            with contextlib.suppress(SignalingError):  # asked for before routing
                self._inner.request_quality(self._quality)
        with self._candidates_out:
            while True:
                try:
                    self._inner.add_candidate(self._candidates_out.receive_nowait())
                except trio.WouldBlock:
                    break
        await self._inner.run()

    async def _offer(
        self, node_id: str, epoch: int, replica_of: str, upstream: str = "", depth: int = 1
    ) -> dict[str, Any]:
        """Send the offer to ``node_id`` (the owner, or a replica of ``replica_of`` fed by
        ``upstream`` at ``depth``); its answer."""
        self.owner, self.epoch = node_id, epoch
        self._node._relaying(self, True)
        payload: dict[str, Any] = {
            "sdp": self.offer.sdp,
            "sessionId": self.offer.session_id,
            "relay": self.relay_id,
            # Where the viewer starts (the serving session chooses its quality from them).
            "quality": self.offer.quality,
            "tile": protocol.tile_json(self.offer.tile) if self.offer.tile else None,
        }
        if replica_of:
            payload["replicaOf"] = replica_of
            payload["upstream"] = upstream or replica_of
            payload["depth"] = depth
        reply = await self._node.request(
            node_id, "offer", socket=self.socket.socket_id, stream=self.stream.id,
            epoch=epoch, payload=payload,
        )  # fmt: skip
        return reply.payload if isinstance(reply.payload, dict) else {}

    async def _relay_candidates(self) -> None:
        """Relay the page's ICE candidates and quality requests to the owner until the session
        ends. Either one's failure is raised as itself, not in a group, so :meth:`run` reports
        a lost relay message as ``relay_failed``."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._relay_quality_requests)
                await self._relay_trickle()
        except BaseExceptionGroup as group:
            only = group.exceptions[0] if len(group.exceptions) == 1 else None
            if only is None or isinstance(only, trio.Cancelled):
                raise
            raise only from None

    async def _relay_quality_requests(self) -> None:
        while True:
            await self._quality_asked.wait()
            self._quality_asked = trio.Event()
            request, self._quality = self._quality, None
            if request is None:
                continue
            payload = {
                "quality": request.quality,
                "tile": protocol.tile_json(request.tile) if request.tile else None,
                "sessionId": request.session_id,
                "relay": self.relay_id,
            }
            await self._node.send(
                self.owner, "quality", socket=self.socket.socket_id, stream=self.stream.id,
                epoch=self.epoch, payload=payload,
            )  # fmt: skip

    async def _relay_trickle(self) -> None:
        async with self._candidates_out:
            async for candidate in self._candidates_out:
                payload = {
                    "candidate": candidate.candidate,
                    "sdpMid": candidate.sdp_mid,
                    "sdpMLineIndex": candidate.sdp_mline_index,
                    "sessionId": candidate.session_id,
                    "relay": self.relay_id,
                }
                await self._node.send(
                    self.owner, "ice", socket=self.socket.socket_id, stream=self.stream.id,
                    epoch=self.epoch, payload=payload,
                )  # fmt: skip
        await trio.sleep_forever()  # until the owner ends it, or the socket does

    def accepts(self, envelope: Envelope) -> bool:
        """From the owner, about this offer (its relay id), in this session's epoch (any
        while the epoch is not known yet)."""
        return (
            envelope.reply_to == self.owner
            and (not self.epoch or envelope.epoch == self.epoch)
            and isinstance(envelope.payload, dict)
            and envelope.payload.get("relay") == self.relay_id
        )

    def from_owner(self, envelope: Envelope) -> None:
        if envelope.kind == "ended":
            self._owner_ended = True
            self.end(f'the owner node "{self.owner}" ended the session')
            return
        text = envelope.payload.get("text")
        if not isinstance(text, str):
            return
        with contextlib.suppress(ValueError):
            if json.loads(text).get("type") == "answer":
                self._phase = SessionPhase.CONNECTING
        self.socket.post(text)

    def owner_gone(self, reason: str) -> None:
        self._owner_ended = True
        self._error(ErrorCode.PEER_FAILED, f"{reason}; send a new offer to play it again")
        self.end(reason)

    def _error(self, code: ErrorCode, message: str) -> None:
        self.socket.post_error(code, message, self.stream.id, self.session_id)


@dataclass(frozen=True)
class _RemoteSession:
    """A session this node serves for a remote socket, and what names it on the bus."""

    session: StreamSession
    epoch: int
    #: chosen by the socket's node per offer: messages about an older offer of the same
    #: stream on the same socket (a close racing a new offer) do not touch this one.
    relay: str


class RemoteSocket:
    """A browser socket on another node, watching streams this node owns (the owner side)."""

    def __init__(self, node: ClusterNode, node_id: str, socket_id: str) -> None:
        self.node_id = node_id
        self.socket_id = socket_id
        self.key = (node_id, socket_id)
        self.closing = False
        self.ready = trio.Event()
        self._node = node
        self._sessions: dict[str, _RemoteSession] = {}
        self._outbox_in, self._outbox_out = trio.open_memory_channel[tuple[str, str, int, Any]](
            REMOTE_OUTBOX
        )
        self._nursery: trio.Nursery | None = None
        self._label = f'node "{node_id}" socket #{socket_id}'

    async def run(self) -> None:
        self._node._remote_started(True)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write)
                self.ready.set()
        finally:
            self.closing = True
            self._node._forget_remote(self)
            self._node._remote_started(False)

    def watching(self, stream_ids: list[str]) -> int:
        """How many of ``stream_ids`` this socket watches here."""
        return sum(stream_id in self._sessions for stream_id in stream_ids)

    def start_session(self, stream: Stream, offer: Offer, epoch: int, relay: str) -> None:
        old = self._sessions.get(stream.id)
        if old is not None:
            old.session.end("replaced by a new offer")
        post = functools.partial(self._post, "client", stream.id, epoch, relay)

        def post_error(
            code: ErrorCode, message: str, stream_id: str | None, session_id: str | None = None
        ) -> None:
            post(protocol.error(code, message, stream_id, session_id))

        # The same session a socket of this node gets: only its post goes over the bus.
        session = self._node._local.open_session(
            stream, offer, SocketEnd(self.socket_id, self._label, post, post_error)
        )
        entry = self._sessions[stream.id] = _RemoteSession(session, epoch, relay)
        assert self._nursery is not None
        self._nursery.start_soon(self._run_session, entry)

    async def _run_session(self, entry: _RemoteSession) -> None:
        stream_id = entry.session.stream.id
        try:
            await entry.session.run()
        finally:
            self._post("ended", stream_id, entry.epoch, entry.relay, "session ended")
            if self._sessions.get(stream_id) is entry:
                del self._sessions[stream_id]
            if not self._sessions:
                self.closing = True
                self._node._forget_remote(self)
                self._outbox_in.close()

    def deliver(self, envelope: Envelope) -> None:
        """``ice``, ``quality`` or ``close`` from the socket's node (its epoch already
        checked)."""
        entry = self._sessions.get(envelope.stream)
        payload = envelope.payload if isinstance(envelope.payload, dict) else {}
        if entry is None or payload.get("relay") != entry.relay:
            self._node._counts["stale_dropped"] += 1
            return
        if envelope.kind == "close":
            entry.session.end("client closed the stream")
            return
        if envelope.kind == "quality":
            try:
                quality, tile = protocol.quality_fields(payload, envelope.stream)
                entry.session.request_quality(
                    QualityRequest(
                        envelope.stream, quality, tile, _str_or_none(payload.get("sessionId"))
                    )
                )
            except SignalingError as exc:
                message = protocol.error(
                    exc.code, exc.message, envelope.stream, entry.session.session_id
                )
                self._post("client", envelope.stream, entry.epoch, entry.relay, message)
            return
        candidate = IceCandidate(
            envelope.stream,
            _str_or_none(payload.get("candidate")),
            _str_or_none(payload.get("sdpMid")),
            index if isinstance(index := payload.get("sdpMLineIndex"), int) else None,
            _str_or_none(payload.get("sessionId")),
        )
        try:
            entry.session.add_candidate(candidate)
        except SignalingError as exc:
            message = protocol.error(
                exc.code, exc.message, envelope.stream, entry.session.session_id
            )
            self._post("client", envelope.stream, entry.epoch, entry.relay, message)

    def end_stream(self, stream_id: str, reason: str) -> None:
        """The stream's lease was lost: its session here ends, its page is told to re-offer."""
        entry = self._sessions.get(stream_id)
        if entry is not None:
            message = protocol.error(
                ErrorCode.PEER_FAILED, f"{reason}; send a new offer", stream_id,
                entry.session.session_id,
            )  # fmt: skip
            self._post("client", stream_id, entry.epoch, entry.relay, message)
            entry.session.end(reason)

    def close(self, reason: str) -> None:
        self.closing = True
        self._node._forget_remote(self)
        for entry in list(self._sessions.values()):
            entry.session.end(reason)
        if not self._sessions:
            self._outbox_in.close()

    def _post(self, kind: str, stream_id: str, epoch: int, relay: str, text: str) -> None:
        try:
            self._outbox_in.send_nowait((kind, stream_id, epoch, {"relay": relay, "text": text}))
        except trio.WouldBlock:
            self.close("its node is not taking its messages")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    async def _write(self) -> None:
        async with self._outbox_out:
            async for kind, stream_id, epoch, payload in self._outbox_out:
                try:
                    await self._node.send(
                        self.node_id, kind, socket=self.socket_id, stream=stream_id,
                        epoch=epoch, payload=payload,
                    )  # fmt: skip
                except ClusterError as exc:
                    log.info("%s: %s; its sessions end", self._label, exc)
                    self.close(str(exc))
                    return
