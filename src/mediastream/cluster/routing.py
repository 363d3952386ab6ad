"""A cluster node: its record, its inbox, the streams it owns, and routing over one socket.

Task tree (started in the server's lifetime nursery with ``nursery.start(node.run, port)``)::

    ClusterNode.run                    the Redis pool; ready once the node record is written
    ├── run_node_registration          ms:node:{id}, rewritten every 2 s
    ├── inbox                          open_redis_bus (its receive pump) and the dispatcher,
    │                                  subscribed again after Redis comes back
    ├── watch nodes                    every 2 s while anything crosses nodes: ends relayed
    │                                  sessions whose owner's record expired, reaps remote
    │                                  sockets whose node's record expired
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
- ``client`` owner → socket node: one protocol message for the browser (payload: its text);
  ``ended`` owner → socket node: that stream's session is over.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import secrets
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import trio

from .. import protocol
from ..config import Config
from ..errors import ErrorCode, SignalingError
from ..protocol import IceCandidate, Offer, QualityRequest
from ..registry import Stream, StreamRegistry
from ..session import SessionPhase, StreamSession, queue_candidate
from ..signaling import LocalRouter, Session, SocketEnd
from . import node_identity
from .bus import Bus
from .envelope import Envelope
from .errors import ClusterError, OwnedElsewhere, RedisUnavailable
from .leases import (
    NODE_RENEW_INTERVAL,
    LeaseState,
    NodeRecord,
    StreamLease,
    current_owner,
    hold_stream_lease,
    live_nodes,
    owner_key,
    run_node_registration,
)
from .placement import choose_owner
from .redis_bus import open_redis_bus
from .redis_client import Redis, open_redis

log = logging.getLogger(__name__)

#: how long a freshly claimed stream waits for its first viewer before it is released.
CLAIM_GRACE: Final = 15.0  # seconds
#: messages for one remote socket's browser queued before that socket is dropped.
REMOTE_OUTBOX: Final = 256
#: how long a route waits for the inbox when Redis has not answered yet.
BUS_WAIT: Final = 2.0  # seconds
#: a bounded wait for telling an owner that a relayed session closed.
CLOSE_NOTICE_TIMEOUT: Final = 1.0  # seconds

_T = TypeVar("_T")


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
    owned_streams: tuple[str, ...]
    relayed_sessions: int
    remote_sockets: int


class ClusterNode:
    """Routing and ownership for one node (a :class:`Router` and an :class:`IngestGate`)."""

    def __init__(self, config: Config, local: LocalRouter) -> None:
        self._config = config
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
        self._relayed: dict[tuple[str, str], RoutedSession] = {}
        #: sessions of this node's sockets on streams it owns, ended if the lease is lost
        self._local_sessions: weakref.WeakKeyDictionary[Session, SocketEnd] = (
            weakref.WeakKeyDictionary()
        )
        self._remote: dict[tuple[str, str], RemoteSocket] = {}
        self._crossing = trio.Event()  # something crosses nodes: the node watcher has work
        self._counts = dict.fromkeys(
            ("local_offers", "routed_offers", "relayed_offers", "remote_offers",
             "redis_commands", "stale_dropped"),
            0,
        )  # fmt: skip

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
        self.node_id, public_url = node_identity(self._config.cluster, port)
        try:
            async with open_redis(self._config.cluster.redis_url) as redis:
                with self._stop_scope:
                    async with trio.open_nursery() as nursery:
                        self._redis = redis
                        self._nursery = nursery
                        record = NodeRecord(self.node_id, public_url)
                        await nursery.start(run_node_registration, redis, record)
                        nursery.start_soon(self._keep_inbox, redis)
                        nursery.start_soon(self._watch_nodes)
                        # Ready once the inbox listens: another node relaying an offer here
                        # right after start-up found nobody subscribed ("node is gone").
                        with trio.move_on_after(BUS_WAIT):
                            await self._bus_ready.wait()
                        log.info('cluster node "%s" (%s) started', self.node_id, public_url)
                        self._started.set()
                        task_status.started()
        finally:
            self._stopped.set()

    def stop(self) -> None:
        """Leave the cluster: release every lease, delete the record (see :meth:`run`)."""
        self._stop_scope.cancel()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

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

    async def _redis_call(self, call: Callable[[], Awaitable[_T]]) -> _T:
        self._counts["redis_commands"] += 1
        return await call()

    # --- IngestGate -------------------------------------------------------------------------

    def may_ingest(self, stream_id: str) -> bool:
        lease = self._owned.get(stream_id)
        if lease is None:
            return False
        try:
            lease.check()
        except ClusterError:
            return False
        return True

    def guard_ingest(self, stream_id: str, scope: trio.CancelScope) -> None:
        lease = self._owned.get(stream_id)
        if lease is None:
            scope.cancel()
        else:
            lease.cancel_on_loss(scope)

    # --- ownership --------------------------------------------------------------------------

    def owns(self, stream_id: str) -> bool:
        lease = self._owned.get(stream_id)
        return lease is not None and lease.state is LeaseState.HELD

    async def claim(self, stream: Stream) -> StreamLease:
        """Own ``stream`` (claim its lease unless held); its ingest may then start.

        Raises:
            OwnedElsewhere: another node holds it.
            RedisUnavailable
        """
        lock = self._claims.setdefault(stream.id, trio.Lock())
        async with lock:
            lease = self._owned.get(stream.id)
            if lease is not None and lease.state is LeaseState.HELD:
                return lease
            assert self._nursery is not None and self._redis is not None
            self._counts["redis_commands"] += 1
            claimed: StreamLease = await self._nursery.start(self._own, stream)
            return claimed

    async def _own(self, stream: Stream, *, task_status: trio.TaskStatus[StreamLease]) -> None:
        assert self._redis is not None
        lease: StreamLease | None = None
        try:
            async with trio.open_nursery() as holder:
                lease = await holder.start(
                    functools.partial(hold_stream_lease, self._redis, stream.id, self.node_id)
                )
                assert lease is not None
                held = lease
                self._owned[stream.id] = held
                stream.changes.notify()  # the supervisor may start the ingest now
                task_status.started(held)
                holder.start_soon(self._end_sessions_on_loss, stream, held)
                # Released when idle: no viewer came within the grace, or all have left and the
                # source has stopped (the supervisor's own grace).
                with trio.move_on_after(CLAIM_GRACE):
                    await stream.changes.wait_until(lambda: stream.viewers > 0)
                await stream.changes.wait_until(
                    lambda: (
                        held.state is not LeaseState.HELD
                        or (stream.viewers == 0 and not stream.source_running)
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
            stream.changes.notify()

    async def _end_sessions_on_loss(self, stream: Stream, lease: StreamLease) -> None:
        await lease.lost.wait()
        reason = f'node "{self.node_id}" lost the stream ({lease.loss_reason})'
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

    # --- Router (the socket's node) ---------------------------------------------------------

    def open_session(self, stream: Stream, offer: Offer, socket: SocketEnd) -> Session:
        if self.owns(stream.id):
            self._counts["local_offers"] += 1
            return self.open_local(stream, offer, socket)
        self._counts["routed_offers"] += 1
        return RoutedSession(self, stream, offer, socket)

    def open_local(self, stream: Stream, offer: Offer, socket: SocketEnd) -> Session:
        """A session served here, on a stream this node owns."""
        session = self._local.open_session(stream, offer, socket)
        self._local_sessions[session] = socket
        return session

    async def resolve(self, stream: Stream) -> tuple[str, int]:
        """Where ``stream`` is served: ``(this node's id, epoch)`` once claimed here, else the
        owner's (or the placed node's, epoch 0) id.

        Raises:
            RedisUnavailable
        """
        if self.owns(stream.id):
            return self.node_id, self._owned[stream.id].epoch
        await self._started.wait()  # a socket can open while the node is still starting
        assert self._redis is not None
        redis = self._redis
        while True:
            owner = await self._redis_call(lambda: current_owner(redis, stream.id))
            if owner is None or owner.node_id == self.node_id:
                break
            nodes = await self._redis_call(lambda: live_nodes(redis))
            if owner.node_id in {node.node_id for node in nodes}:
                return owner.node_id, owner.epoch
            # The owner's record expired (it died); its lease outlives it by design (an owner
            # frozen past it must stop first). Wait until Redis lets the stream go.
            remaining = await self._redis_call(lambda: redis.pttl(owner_key(stream.id)))
            log.info(
                'stream "%s": owner node "%s" is gone; its lease expires in %d ms',
                stream.id, owner.node_id, remaining,
            )  # fmt: skip
            await trio.sleep(max(remaining, 50) / 1000)
        nodes = await self._redis_call(lambda: live_nodes(redis))
        chosen = choose_owner(stream.id, nodes)
        if chosen is not None and chosen.node_id != self.node_id:
            return chosen.node_id, 0
        try:
            lease = await self.claim(stream)
        except OwnedElsewhere as exc:
            return exc.node_id, exc.epoch
        return self.node_id, lease.epoch

    async def send(self, node_id: str, kind: str, **fields: Any) -> None:
        bus = await self._wait_bus()
        self._counts["redis_commands"] += 1
        await bus.send(node_id, kind, **fields)

    async def request(self, node_id: str, kind: str, **fields: Any) -> Envelope:
        bus = await self._wait_bus()
        self._counts["redis_commands"] += 1
        return await bus.request(node_id, kind, **fields)

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
        if kind == "offer":
            handlers.start_soon(self._serve_remote_offer, envelope, bus)
        elif kind in ("ice", "close", "quality"):
            remote = self._remote.get((envelope.reply_to, envelope.socket))
            lease = self._owned.get(envelope.stream)
            if remote is None or lease is None or envelope.epoch != lease.epoch:
                self._counts["stale_dropped"] += 1
                return
            remote.deliver(envelope)
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
            await _reply(bus, envelope, {"error": "stream_unavailable", "message": str(exc)})
            return
        if envelope.epoch and envelope.epoch != lease.epoch:
            self._counts["stale_dropped"] += 1
            await _reply(
                bus,
                envelope,
                {"error": "stale", "message": f"epoch {envelope.epoch} is not {lease.epoch}"},
            )
            return
        self._counts["remote_offers"] += 1
        key = (envelope.reply_to, envelope.socket)
        remote = self._remote.get(key)
        if remote is None or remote.closing:
            remote = RemoteSocket(self, envelope.reply_to, envelope.socket)
            self._remote[key] = remote
            self._crossing.set()
            assert self._nursery is not None
            self._nursery.start_soon(remote.run)
            await remote.ready.wait()
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
        # Started before the reply: a socket that closed meanwhile cannot leave it orphaned,
        # and the relayed session accepts the owner's messages before it knows the epoch.
        remote.start_session(stream, offer, lease.epoch, relay)
        await _reply(bus, envelope, {"epoch": lease.epoch})

    def _forget_remote(self, remote: RemoteSocket) -> None:
        if self._remote.get(remote.key) is remote:
            del self._remote[remote.key]

    # --- failures of other nodes ------------------------------------------------------------

    async def _watch_nodes(self) -> None:
        """While sessions cross nodes, notice the nodes that died (their record expired)."""
        assert self._redis is not None
        redis = self._redis
        while True:
            await self._crossing.wait()
            await trio.sleep(NODE_RENEW_INTERVAL)
            if not self._relayed and not self._remote:
                self._crossing = trio.Event()
                continue
            try:
                live = {node.node_id for node in await live_nodes(redis)}
            except RedisUnavailable as exc:
                log.info("%s; node liveness not checked", exc)
                continue
            for session in list(self._relayed.values()):
                if session.owner and session.owner not in live:
                    session.owner_gone(f'node "{session.owner}" serving this stream stopped')
            for remote in list(self._remote.values()):
                if remote.node_id not in live:
                    remote.close(f'the socket\'s node "{remote.node_id}" stopped')

    def statistics(self) -> RoutingStatistics:
        return RoutingStatistics(
            **self._counts,
            owned_streams=tuple(sorted(s for s in self._owned if self.owns(s))),
            relayed_sessions=len(self._relayed),
            remote_sockets=len(self._remote),
        )


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
        except ClusterError as exc:
            self._end_reason = str(exc)
            self._error(ErrorCode.STREAM_UNAVAILABLE, f"Unavailable: {exc}")
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
            if node_id == self._node.node_id:
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
                return
            self.owner, self.epoch = node_id, epoch
            self._node._relaying(self, True)
            payload = {
                "sdp": self.offer.sdp,
                "sessionId": self.offer.session_id,
                "relay": self.relay_id,
                # Where the viewer starts (the owner's session chooses its quality from them).
                "quality": self.offer.quality,
                "tile": protocol.tile_json(self.offer.tile) if self.offer.tile else None,
            }
            reply = await self._node.request(
                node_id, "offer", socket=self.socket.socket_id, stream=self.stream.id,
                epoch=epoch, payload=payload,
            )  # fmt: skip
            answer = reply.payload if isinstance(reply.payload, dict) else {}
            error = answer.get("error")
            if error in ("owned_elsewhere", "stale"):
                self._node._relaying(self, False)
                self.owner = ""
                continue
            if error is not None:
                self._owner_ended = True
                code = (
                    ErrorCode.STREAM_NOT_FOUND
                    if error == "stream_not_found"
                    else (ErrorCode.STREAM_UNAVAILABLE)
                )
                self._error(code, str(answer.get("message", error)))
                return
            self.epoch = int(answer.get("epoch", 0))
            self._node._counts["relayed_offers"] += 1
            log.info('%s: relayed to node "%s" (epoch %d)', label, node_id, self.epoch)
            await self._relay_candidates()
            return
        raise ClusterError(f'stream "{self.stream.id}" changed owners during its offer; try again')

    async def _relay_candidates(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._relay_quality_requests)
            await self._relay_trickle()

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
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write)
                self.ready.set()
        finally:
            self.closing = True
            self._node._forget_remote(self)

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
