"""One browser tab's signaling socket, carrying every stream of the page.

Task tree of a socket (the WebSocket handler's task)::

    SignalingConnection.run      nursery: closing the socket cancels all of it
    ├── writer                   drains the bounded outbox into the socket
    ├── reader                   parses each message once and routes it by streamId
    └── Session.run × N          one per stream: a StreamSession (``session.py``), or in a
                                 cluster a session relayed to the stream's owner node
                                 (``cluster/routing.py``), chosen by the Router

The :class:`Router` is the one seam between a socket and where its streams are served. One
process has :class:`LocalRouter`: every offer becomes a :class:`StreamSession` here. A cluster
node has ``cluster.routing.ClusterNode``, which returns a local session for a stream this
node owns (no Redis touched) and a relayed one, with the same interface, for any other.

A bad message gets an ``error`` for its stream and changes nothing else: the socket, its other
streams and the server carry on. Abuse is different: a client that floods messages beyond
``limits.max_messages_per_second``, or stops reading its own messages (the outbox fills up), is
cut off with close code 1008.

Admission happens before the socket is accepted (:meth:`SignalingHub.admit`): a missing or bad
token, or too many sockets from one address, is refused with an HTTP status the browser sees.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import trio

from . import __version__, protocol
from .auth import Authenticator, AuthError, Grant
from .changes import ChangeSignal
from .config import Config, LimitsConfig, WebRTCConfig
from .errors import ErrorCode, SignalingError
from .fallback import FallbackSession, Remuxers
from .ice import ice_servers
from .limits import TokenBucket
from .metrics import Metrics
from .protocol import (
    Auth,
    Close,
    Fallback,
    IceCandidate,
    Offer,
    PeerApplied,
    PeerOffer,
    Ping,
    QualityRequest,
)
from .quality_follower import check_quality
from .registry import Stream, StreamRegistry
from .session import Post, PostError, SessionPhase, StreamSession
from .shared_peer import SharedPeerSession
from .webrtc.bridge import PeerConnectionFactory

log = logging.getLogger(__name__)

#: Message classes by their wire type (``IceCandidate`` is ``ice``).
_WIRE_NAMES: Final = {"icecandidate": "ice"}
OUTBOX_MESSAGES: Final = 256  # queued server messages before a non-reading client is cut off
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_GOING_AWAY: Final = 1001


class Refused(Exception):
    """A socket refused at the upgrade: answered with an HTTP ``status``."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


class MessageSocket(Protocol):
    """The part of a WebSocket a connection needs (Quart's ``websocket`` has it)."""

    async def receive(self) -> str | bytes | None: ...

    async def send(self, data: str | bytes) -> None: ...

    async def close(self, code: int, reason: str = "") -> None: ...


class Session(Protocol):
    """One stream's session on a socket, served here or relayed to another node."""

    stream: Stream

    @property
    def phase(self) -> SessionPhase: ...

    @property
    def session_id(self) -> str | None: ...

    async def run(self) -> None: ...

    def end(self, reason: str) -> None: ...

    def add_candidate(self, candidate: IceCandidate) -> None: ...


@runtime_checkable
class SwitchesQuality(Protocol):
    """A session that takes the page's ``quality`` messages (a WebRTC session: a stream's local
    session, or the cluster's session routed to its owner)."""

    def request_quality(self, request: QualityRequest) -> None: ...


@dataclass(frozen=True, slots=True)
class SocketEnd:
    """What a session needs of the socket it belongs to."""

    #: this socket's id on this node (``connectionId`` in the welcome)
    socket_id: str
    label: str
    post: Post
    post_error: PostError


class Router(Protocol):
    """Turns an offer into the session that serves it: here, or on the stream's owner node."""

    def open_session(self, stream: Stream, offer: Offer, socket: SocketEnd) -> Session: ...


class LocalRouter:
    """Every stream served in this process (one process, and a cluster node's own streams)."""

    def __init__(
        self,
        peers: PeerConnectionFactory,
        webrtc: WebRTCConfig,
        limits: LimitsConfig,
        metrics: Metrics | None,
    ) -> None:
        #: makes the pages' shared peer connections (served in this process only)
        self.peers = peers
        self._peers = peers
        self._webrtc = webrtc
        self._limits = limits
        self._metrics = metrics

    def open_session(self, stream: Stream, offer: Offer, socket: SocketEnd) -> StreamSession:
        return StreamSession(
            stream,
            offer,
            peers=self._peers,
            post=socket.post,
            post_error=socket.post_error,
            metrics=self._metrics,
            negotiation_timeout=self._webrtc.negotiation_timeout,
            max_pending_candidates=self._limits.max_pending_candidates,
            client=socket.label,
        )


@dataclass(frozen=True, slots=True)
class ConnectionContext:
    """What one socket's connection needs from the server, and nothing more."""

    limits: LimitsConfig
    webrtc: WebRTCConfig
    #: the stream a message names, or None
    find_stream: Callable[[str], Stream | None]
    #: makes each offer's session, local or relayed
    router: Router
    authenticator: Authenticator
    #: notified when the socket's sessions change
    changes: ChangeSignal
    metrics: Metrics | None
    #: each stream's fMP4 remuxer for the sockets' fallback viewers
    remuxers: Remuxers
    #: makes the pages' shared peer connections (None: this server does not offer them)
    peers: PeerConnectionFactory | None = None


@dataclass(frozen=True, slots=True)
class SocketStatistics:
    open_sockets: int
    sockets_opened: int
    open_sessions: int
    sessions_per_socket: tuple[int, ...]
    #: fallbacks their page ended because its WebRTC connection shows a picture again
    fallback_returns: int = 0


class SignalingHub:
    """Every open signaling socket, for statistics and for closing them all at shutdown."""

    def __init__(
        self,
        config: Config,
        registry: StreamRegistry,
        peers: PeerConnectionFactory,
        changes: ChangeSignal | None = None,
        authenticator: Authenticator | None = None,
        metrics: Metrics | None = None,
        router: Router | None = None,
    ) -> None:
        self.config = config
        self.changes = changes or ChangeSignal()
        self.authenticator = authenticator or Authenticator(config.security)
        #: each stream's fMP4 remuxer, shared by its fallback viewers on every socket
        self.remuxers = Remuxers()
        self._context = ConnectionContext(
            limits=config.limits,
            webrtc=config.webrtc,
            find_stream=registry.get,
            router=router or LocalRouter(peers, config.webrtc, config.limits, metrics),
            authenticator=self.authenticator,
            changes=self.changes,
            metrics=metrics,
            remuxers=self.remuxers,
            peers=peers,
        )
        self._connections: set[SignalingConnection] = set()
        self._per_client: dict[str, int] = {}
        self._opened = 0
        self._fallback_returns_of_closed = 0

    def statistics(self) -> SocketStatistics:
        per_socket = tuple(c.stream_count for c in self._connections)
        return SocketStatistics(
            open_sockets=len(self._connections),
            sockets_opened=self._opened,
            open_sessions=sum(per_socket),
            sessions_per_socket=per_socket,
            fallback_returns=self._fallback_returns_of_closed
            + sum(c.fallback_returns for c in self._connections),
        )

    def admit(self, client: str, token: str | None) -> Grant:
        """Decide, before accepting it, whether a socket from ``client`` may open.

        Raises:
            Refused: 401 for a missing, invalid or expired token; 429 for an address that
                already holds ``limits.max_sockets_per_client`` sockets.
        """
        try:
            grant = self.authenticator.verify(token)
        except AuthError as exc:
            raise Refused(401, exc.code, exc.message) from None
        limit = self.config.limits.max_sockets_per_client
        if self._per_client.get(client, 0) >= limit:
            raise Refused(
                429, ErrorCode.RATE_LIMITED, f"This address already has {limit} sockets open"
            )
        return grant

    async def serve(self, socket: MessageSocket, client: str, grant: Grant) -> None:
        """Serve one admitted socket until the client leaves or the server shuts down."""
        connection = SignalingConnection(self._context, socket, client, grant)
        self._connections.add(connection)
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._opened += 1
        self.changes.notify()
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self._fallback_returns_of_closed += connection.fallback_returns
            self._per_client[client] -= 1
            if not self._per_client[client]:
                del self._per_client[client]
            self.changes.notify()

    def shutdown(self) -> None:
        """Close every socket (with code 1001) and so every session and peer connection."""
        for connection in list(self._connections):
            connection.shutdown()


class SignalingConnection:
    """One socket: reads, routes and answers messages; owns the socket's sessions.

    Each stream has at most one WebRTC session (``sessions``) and at most one fallback
    (``fallbacks``) here; the two run side by side while a page retries WebRTC during a
    fallback.
    """

    def __init__(
        self, context: ConnectionContext, socket: MessageSocket, client: str, grant: Grant
    ) -> None:
        self._context = context
        self._socket = socket
        self._limits = context.limits
        self.grant = grant
        now = trio.current_time()
        self._messages = TokenBucket(
            self._limits.max_messages_per_second, self._limits.max_messages_per_second, now
        )
        self._offers = TokenBucket(
            self._limits.max_offers_per_second, 2 * self._limits.max_offers_per_second, now
        )
        self.connection_id = secrets.token_hex(4)
        self.label = f"{client} #{self.connection_id}"
        #: each stream's WebRTC session (an offer's)
        self.sessions: dict[str, Session] = {}
        #: each stream's video over this socket (a ``fallback``'s)
        self.fallbacks: dict[str, FallbackSession] = {}
        #: the pages' shared peer connections, by their ``~`` id
        self.shared_peers: dict[str, SharedPeerSession] = {}
        self.fallback_returns = 0
        self._outbox_in, self._outbox_out = trio.open_memory_channel[str | _BinaryMessage](
            OUTBOX_MESSAGES
        )
        self._cancel_scope = trio.CancelScope()
        self._close: tuple[int, str] | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        log.info("%s: socket opened", self.label)
        try:
            with self._cancel_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write_loop)
                    self.post(protocol.welcome(self._welcome_payload()))
                    await self._read_loop()
            if self._close is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await self._socket.close(*self._close)
        finally:
            reason = self._close[1] if self._close else "client closed the socket"
            log.info("%s: socket closed (%s)", self.label, reason)

    def post(self, message: str) -> None:
        """Queue a message for the client without waiting."""
        try:
            self._outbox_in.send_nowait(message)
        except trio.WouldBlock:
            self._cut_off(CLOSE_POLICY_VIOLATION, "client is not reading its messages")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the socket is closing; nobody is left to tell

    def shutdown(self) -> None:
        self._cut_off(CLOSE_GOING_AWAY, "server shutting down")

    def _cut_off(self, code: int, reason: str) -> None:
        if self._close is None:
            self._close = (code, reason)
            ending: list[Session | FallbackSession | SharedPeerSession] = [
                *self.sessions.values(),
                *self.fallbacks.values(),
                *self.shared_peers.values(),
            ]
            for session in ending:
                session.end(reason)
        self._cancel_scope.cancel()

    async def send_binary(self, data: bytes) -> None:
        """Queue a binary message and wait until it has been written to the socket.

        Each fallback stream has at most one message in the outbox this way, so its backlog
        stays in its own bounded queue (see ``fallback.py``).
        """
        message = _BinaryMessage(data, trio.Event())
        try:
            self._outbox_in.send_nowait(message)
        except trio.WouldBlock:
            self._cut_off(CLOSE_POLICY_VIOLATION, "client is not reading its messages")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        await message.written.wait()

    async def _write_loop(self) -> None:
        async with self._outbox_out:
            async for message in self._outbox_out:
                if isinstance(message, _BinaryMessage):
                    await self._socket.send(message.data)
                    message.written.set()
                else:
                    await self._socket.send(message)

    async def _read_loop(self) -> None:
        while True:
            data = await self._socket.receive()
            if not self._messages.try_take(trio.current_time()):
                limit = self._limits.max_messages_per_second
                self._cut_off(CLOSE_POLICY_VIOLATION, f"more than {limit:g} messages a second")
                return
            try:
                self._handle(data)
            except SignalingError as exc:
                self.post_error(exc.code, exc.message, exc.stream_id)
            except Exception:
                # A bug, found by a message nobody foresaw: that message fails, the socket
                # and its streams carry on.
                log.exception("%s: failed to handle a message", self.label)
                self.post_error(ErrorCode.INTERNAL_ERROR, "Internal server error", None)

    def post_error(
        self, code: ErrorCode, message: str, stream_id: str | None, session_id: str | None = None
    ) -> None:
        """Tell the client that something about one stream (or the socket) went wrong."""
        if self._context.metrics is not None:
            self._context.metrics.errors.labels(code=str(code)).inc()
        self.post(protocol.error(code, message, stream_id, session_id))

    def _handle(self, data: str | bytes | None) -> None:
        if not data:  # Quart hands over an empty binary message as None
            raise SignalingError(ErrorCode.INVALID_JSON, "Message is empty")
        size = len(data) if isinstance(data, bytes) else len(data.encode())
        if size > self._limits.max_message_bytes:
            raise SignalingError(
                ErrorCode.MESSAGE_TOO_LARGE,
                f"Message is {size} bytes; the limit is {self._limits.max_message_bytes}",
            )
        try:
            message = protocol.parse_client_message(data, max_sdp_bytes=self._limits.max_sdp_bytes)
        except SignalingError:
            self._count("invalid")
            raise
        self._count(type(message).__name__.lower())
        if isinstance(message, Offer):
            self._on_offer(message)
        elif isinstance(message, PeerOffer):
            self._on_peer_offer(message)
        elif isinstance(message, PeerApplied):
            self._shared_peer(message.peer_id).applied()
        elif isinstance(message, IceCandidate) and message.stream_id.startswith("~"):
            self._shared_peer(message.stream_id).add_candidate(message)
        elif isinstance(message, Close) and message.stream_id.startswith("~"):
            shared = self.shared_peers.get(message.stream_id)
            if shared is not None:  # closing twice is fine
                shared.end("client closed the shared peer connection")
        elif isinstance(message, IceCandidate):
            session = self.sessions.get(message.stream_id)
            if session is None:
                raise SignalingError(
                    ErrorCode.NO_SESSION,
                    "ICE candidate for a stream with no session here; send an offer first",
                    stream_id=message.stream_id,
                )
            session.add_candidate(message)
        elif isinstance(message, Fallback):
            self._on_fallback(message)
        elif isinstance(message, QualityRequest):
            self._on_quality(message)
        elif isinstance(message, Close):
            # Closing twice, or a stream that already ended, is fine.
            fallback = self.fallbacks.get(message.stream_id)
            if fallback is not None and message.fallback_only:
                if not fallback.ending:  # counted once, however often the page says so
                    self.fallback_returns += 1
                    if self._context.metrics is not None:
                        self._context.metrics.fallback_returns.inc()
                fallback.end("the page is back on WebRTC")
            elif fallback is not None:
                fallback.end("client closed the stream")
            session = self.sessions.get(message.stream_id)
            if session is not None and not message.fallback_only:
                session.end("client closed the stream")
        elif isinstance(message, Ping):
            self.post(protocol.pong(message.payload))
        elif isinstance(message, Auth):
            try:
                self.grant = self._context.authenticator.verify(message.token)
            except AuthError as exc:
                raise SignalingError(exc.code, exc.message) from None
            self.post(protocol.authenticated(self.grant.expires_at))

    def _count(self, message_type: str) -> None:
        if self._context.metrics is not None:
            self._context.metrics.messages.labels(
                type=_WIRE_NAMES.get(message_type, message_type)
            ).inc()

    def _on_quality(self, request: QualityRequest) -> None:
        session = self.sessions.get(request.stream_id)
        fallback = self.fallbacks.get(request.stream_id)
        if fallback is not None:
            # The fallback follows the page's wish, also while a WebRTC session beside it (the
            # page trying to go back) is asked the same: whichever shows the picture then
            # plays what the page wants. Asked first: a bad name is refused here, once, before
            # a routed session would relay it.
            fallback.request_quality(request)
            if session is None:
                return
        if session is None:
            raise SignalingError(
                ErrorCode.NO_SESSION,
                "quality for a stream with no session here; send an offer first",
                stream_id=request.stream_id,
            )
        if not isinstance(session, SwitchesQuality):
            raise SignalingError(
                ErrorCode.INVALID_MESSAGE,
                "This stream's session plays one quality, which can't be changed",
                stream_id=request.stream_id,
            )
        session.request_quality(request)

    def _on_offer(self, offer: Offer) -> None:
        stream = self._watchable_stream(offer.stream_id)
        existing = self.sessions.get(offer.stream_id)
        if existing is not None:
            if existing.phase is SessionPhase.NEGOTIATING:
                raise SignalingError(
                    ErrorCode.NEGOTIATION_IN_PROGRESS,
                    "An offer for this stream is already being answered on this socket",
                    stream_id=offer.stream_id,
                )
            existing.end("replaced by a new offer")
        else:
            self._check_stream_limit(offer.stream_id)
        # The stream's fallback, if any, plays on: the page ends it once WebRTC shows a picture.
        session = self._context.router.open_session(
            stream, offer, SocketEnd(self.connection_id, self.label, self.post, self.post_error)
        )
        self._start_session(session)

    @property
    def stream_count(self) -> int:
        """Streams watched on this socket: sessions, fallbacks, streams of shared peers."""
        return (
            len(self.sessions)
            + len(self.fallbacks)
            + sum(p.stream_count for p in self.shared_peers.values())
        )

    def _shared_peer(self, peer_id: str) -> SharedPeerSession:
        shared = self.shared_peers.get(peer_id)
        if shared is None:
            raise SignalingError(
                ErrorCode.NO_SESSION,
                "No shared peer connection with this id on this socket; send an offer first",
                stream_id=peer_id,
            )
        return shared

    def _on_peer_offer(self, offer: PeerOffer) -> None:
        shared = self.shared_peers.get(offer.peer_id)
        if shared is None:
            peers = self._context.peers
            if peers is None:
                raise SignalingError(
                    ErrorCode.INVALID_MESSAGE,
                    "This server does not offer shared peer connections",
                    stream_id=offer.peer_id,
                )
            shared = SharedPeerSession(
                offer.peer_id,
                peers=peers,
                admit=self._admit_to_shared_peer,
                post=self.post,
                post_error=lambda code, message, stream: self._post_peer_error(
                    offer.peer_id, code, message, stream
                ),
                negotiation_timeout=self._context.webrtc.negotiation_timeout,
                max_pending_candidates=self._limits.max_pending_candidates,
                client=self.label,
                metrics=self._context.metrics,
            )
            self.shared_peers[offer.peer_id] = shared
            self._context.changes.notify()
            assert self._nursery is not None
            self._nursery.start_soon(self._run_shared_peer, shared)
        shared.offer(offer)

    def _admit_to_shared_peer(self, stream_id: str) -> Stream:
        """A stream a page adds to its shared peer connection, checked as an offer's is."""
        stream = self._watchable_stream(stream_id)
        if self.stream_count >= self._limits.max_streams_per_socket:
            raise SignalingError(
                ErrorCode.TOO_MANY_STREAMS,
                f"This socket already has {self.stream_count} streams, the limit",
                stream_id=stream_id,
            )
        return stream

    def _post_peer_error(
        self, peer_id: str, code: ErrorCode, message: str, stream_id: str | None
    ) -> None:
        if self._context.metrics is not None:
            self._context.metrics.errors.labels(code=str(code)).inc()
        self.post(protocol.error(code, message, peer_id, member=stream_id))

    async def _run_shared_peer(self, shared: SharedPeerSession) -> None:
        try:
            await shared.run()
        finally:
            if self.shared_peers.get(shared.peer_id) is shared:
                del self.shared_peers[shared.peer_id]
            self._context.changes.notify()

    def _on_fallback(self, request: Fallback) -> None:
        stream = self._watchable_stream(request.stream_id)
        self._check_stream_limit(request.stream_id)
        if request.quality is not None:
            check_quality(stream, request.quality)  # before anything playing is ended
        # The page gave up on the stream's peer connection (or asked for the socket at once).
        existing = self.sessions.get(request.stream_id)
        if existing is not None:
            existing.end("replaced by the fallback over the socket")
        previous = self.fallbacks.get(request.stream_id)
        if previous is not None:
            previous.end("replaced by a new fallback")
        self._start_session(
            FallbackSession(
                stream,
                send_binary=self.send_binary,
                post=self.post,
                post_error=self.post_error,
                client=self.label,
                remuxers=self._context.remuxers,
                audio_codecs=request.audio_codecs,
                request=request,
            )
        )

    def _check_stream_limit(self, stream_id: str) -> None:
        """Raises ``too_many_streams`` if ``stream_id`` would be one stream too many here."""
        streams = self.sessions.keys() | self.fallbacks.keys()
        count = len(streams) + sum(p.stream_count for p in self.shared_peers.values())
        if stream_id not in streams and count >= self._limits.max_streams_per_socket:
            raise SignalingError(
                ErrorCode.TOO_MANY_STREAMS,
                f"This socket already has {count} streams, the limit",
                stream_id=stream_id,
            )

    def _start_session(self, session: Session | FallbackSession) -> None:
        if isinstance(session, FallbackSession):
            self.fallbacks[session.stream.id] = session
        else:
            self.sessions[session.stream.id] = session
        self._context.changes.notify()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_session, session)

    def _watchable_stream(self, stream_id: str) -> Stream:
        """The stream a request for ``stream_id`` may watch (offer or fallback).

        Raises:
            SignalingError: expired token, stream not granted, offers too fast, no such
                stream, or the stream is unavailable.
        """
        if self._context.authenticator.expired(self.grant):
            raise SignalingError(
                ErrorCode.TOKEN_EXPIRED,
                "The access token has expired; send an auth message with a new one",
                stream_id=stream_id,
            )
        if not self.grant.allows(stream_id):
            # Not "not found": a token holder learns nothing about streams it may not see.
            raise SignalingError(
                ErrorCode.FORBIDDEN,
                "This access token does not grant this stream",
                stream_id=stream_id,
            )
        if not self._offers.try_take(trio.current_time()):
            raise SignalingError(
                ErrorCode.RATE_LIMITED,
                f"More than {self._limits.max_offers_per_second:g} offers a second on this socket",
                stream_id=stream_id,
            )
        stream = self._context.find_stream(stream_id)
        if stream is None:
            raise SignalingError(
                ErrorCode.STREAM_NOT_FOUND, "Stream not found", stream_id=stream_id
            )
        if stream.unavailable is not None:
            raise SignalingError(
                ErrorCode.STREAM_UNAVAILABLE,
                f"Unavailable: {stream.unavailable}",
                stream_id=stream_id,
            )
        return stream

    async def _run_session(self, session: Session | FallbackSession) -> None:
        try:
            await session.run()
        finally:
            held: dict[str, Any] = (
                self.fallbacks if isinstance(session, FallbackSession) else self.sessions
            )
            if held.get(session.stream.id) is session:
                del held[session.stream.id]
            self._context.changes.notify()

    def _welcome_payload(self) -> dict[str, Any]:
        return {
            "server": "mediastream",
            "version": __version__,
            "connectionId": self.connection_id,
            "iceServers": ice_servers(
                self._context.webrtc.ice_servers,
                label=self.grant.subject or "viewer",
                now=time.time(),
            ),
        }


@dataclass(frozen=True, slots=True)
class _BinaryMessage:
    """A binary message in the outbox; ``written`` is set once it is on the socket."""

    data: bytes
    written: trio.Event
