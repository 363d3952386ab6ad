"""WHEP viewers: a stream watched over plain HTTP requests instead of the signaling socket.

A WHEP player (``docs/protocol.md``, section "WHEP"; the WHEP draft on top of RFC 9725)
POSTs an SDP offer and gets the answer back; the session it opened is a resource it trickles
candidates to (PATCH) and ends (DELETE). The session itself is a :class:`StreamSession` like a
socket's: the same viewer, fan-out, GOP cache and peer connection; only its client differs
(an HTTP request that waits for the answer instead of a socket that gets messages).

Task tree (the hub is started in the app's lifetime nursery)::

    WhepHub.run                       nursery: shutdown cancels all of it
    └── StreamSession.run × N         one per WHEP session (see ``session.py``); ends on
                                      DELETE, peer failure or timeout, stream stopped or
                                      deleted, server shutdown

No HTTP here: ``api/whep.py`` turns the requests into calls and :class:`WhepRefused` into
statuses.
"""

from __future__ import annotations

import collections
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import trio

from .auth import Authenticator
from .changes import ChangeSignal
from .config import LimitsConfig, WebRTCConfig
from .errors import ErrorCode, SignalingError
from .limits import TokenBucket
from .metrics import Metrics
from .protocol import MAX_CANDIDATE_CHARS, IceCandidate, Offer
from .registry import Stream
from .session import SessionPhase, StreamSession
from .webrtc.bridge import PeerConnectionFactory

log = logging.getLogger(__name__)

#: WHEP sessions one server holds at most, all clients together.
MAX_SESSIONS: Final = 1024
#: Clients whose offer rate is remembered before the idle ones are forgotten.
MAX_TRACKED_CLIENTS: Final = 4096
#: Sessions that ended on their own whose DELETE still gets a 200 (a player closes its peer
#: connection before it sends DELETE, and the server may notice first).
MAX_ENDED_REMEMBERED: Final = 1024
#: How long a DELETE waits for the session's peer connection to be closed (seconds).
END_WAIT: Final = 5.0
_ICE_UFRAG: Final = re.compile(r"^a=ice-ufrag:(\S+)", re.M)
#: Codes of a session that failed before its answer, by the HTTP status they deserve.
_STATUS_OF_FAILURE: Final = {
    ErrorCode.INVALID_SDP: 400,
    ErrorCode.UNSUPPORTED_CODEC: 400,
    ErrorCode.STREAM_UNAVAILABLE: 503,
    ErrorCode.SERVER_SHUTDOWN: 503,
    ErrorCode.CLUSTER_UNAVAILABLE: 503,
    ErrorCode.RELAY_FAILED: 503,
}


class WhepRefused(Exception):
    """A WHEP request that can't be honoured: answered with ``status`` and ``code``."""

    def __init__(self, status: int, code: ErrorCode, message: str) -> None:
        self.status = status
        self.code = code
        self.message = message
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class TrickleFragment:
    """A parsed ``application/trickle-ice-sdpfrag`` body (RFC 8840)."""

    ice_ufrag: str | None
    ice_pwd: str | None
    #: the candidates, end-of-candidates as a candidate of None.
    candidates: tuple[IceCandidate, ...]


def parse_trickle_fragment(stream_id: str, text: str) -> TrickleFragment:
    """Parse a trickle fragment's ICE credentials and candidates.

    A candidate belongs to the ``a=mid`` of the ``m=`` section it follows; one before any
    section belongs to the first (the bundle's) media.

    Raises:
        WhepRefused: 400 naming the line that is not an ICE attribute the server takes.
    """
    ufrag = pwd = None
    mid: str | None = None
    candidates: list[IceCandidate] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("m="):
            mid = None
        elif line.startswith("a=mid:"):
            mid = line.removeprefix("a=mid:")
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line.removeprefix("a=ice-ufrag:")
        elif line.startswith("a=ice-pwd:"):
            pwd = line.removeprefix("a=ice-pwd:")
        elif line == "a=end-of-candidates":
            candidates.append(IceCandidate(stream_id, None, mid, None if mid else 0))
        elif line.startswith("a=candidate:"):
            candidate = line.removeprefix("a=")
            if len(candidate) > MAX_CANDIDATE_CHARS or len(candidate.split()) < 8:
                raise WhepRefused(
                    400,
                    ErrorCode.INVALID_CANDIDATE,
                    f"Line {number} is not an ICE candidate: {line[:80]!r}",
                )
            candidates.append(IceCandidate(stream_id, candidate, mid, None if mid else 0))
        elif not line.startswith(("a=", "v=", "o=", "s=", "t=", "c=")):
            raise WhepRefused(
                400,
                ErrorCode.INVALID_CANDIDATE,
                f"Line {number} is not an SDP line of a trickle fragment: {line[:80]!r}",
            )
    return TrickleFragment(ufrag, pwd, tuple(candidates))


class WhepSession:
    """One WHEP viewer: its resource id and ETag, and the :class:`StreamSession` it runs."""

    def __init__(
        self,
        stream: Stream,
        offer_sdp: str,
        *,
        client: str,
        peers: PeerConnectionFactory,
        webrtc: WebRTCConfig,
        limits: LimitsConfig,
        metrics: Metrics | None,
    ) -> None:
        self.id = secrets.token_urlsafe(16)
        #: names this session's ICE session (RFC 9725: a PATCH's ``If-Match``).
        self.etag = f'"{secrets.token_hex(8)}"'
        self.client = client
        match = _ICE_UFRAG.search(offer_sdp)
        self.remote_ufrag = match.group(1) if match else None
        self.finished = trio.Event()
        #: ended by the player's DELETE
        self.deleted = False
        self._metrics = metrics
        self._answer: str | None = None
        self._failure: SignalingError | None = None
        self._answered = trio.Event()
        self.session = StreamSession(
            stream,
            Offer(stream.id, offer_sdp, session_id=self.id),
            peers=peers,
            post=_nobody_listens,
            post_error=self._post_error,
            answered=self._on_answer,
            metrics=metrics,
            negotiation_timeout=webrtc.negotiation_timeout,
            max_pending_candidates=limits.max_pending_candidates,
            client=f"{client} WHEP",
        )

    @property
    def stream_id(self) -> str:
        return self.session.stream.id

    async def wait_answer(self) -> str:
        """The answer SDP, once the session has one.

        Raises:
            WhepRefused: the session failed (or ended) before answering.
        """
        await self._answered.wait()
        if self._answer is None:
            failure = self._failure or SignalingError(
                ErrorCode.INTERNAL_ERROR, "The session ended before it answered"
            )
            status = _STATUS_OF_FAILURE.get(failure.code, 500)
            raise WhepRefused(status, failure.code, failure.message)
        return self._answer

    async def run(self) -> None:
        try:
            await self.session.run()
        finally:
            self._answered.set()  # whoever waits for an answer gets the failure
            self.finished.set()

    def _on_answer(self, sdp: str) -> None:
        self._answer = sdp
        self._answered.set()

    def _post_error(
        self, code: ErrorCode, message: str, stream_id: str | None, session_id: str | None
    ) -> None:
        if self._metrics is not None:
            self._metrics.errors.labels(code=str(code)).inc()
        if not self._answered.is_set():
            self._failure = SignalingError(code, message, stream_id=stream_id)
            self._answered.set()
        else:
            # After the answer a WHEP player has no channel to hear it on; the session's end
            # (logged by the session with this reason) is what it sees.
            log.info("%s WHEP %s: %s: %s", self.client, self.stream_id, code, message)


def _nobody_listens(message: str) -> None:
    """Stream state messages: WHEP has no channel for them."""


class WhepHub:
    """Every WHEP session of the server: admits offers, finds sessions, ends them all at
    shutdown. Its sessions run in the nursery of :meth:`run`."""

    def __init__(
        self,
        *,
        limits: LimitsConfig,
        webrtc: WebRTCConfig,
        find_stream: Callable[[str], Stream | None],
        peers: PeerConnectionFactory,
        authenticator: Authenticator,
        changes: ChangeSignal,
        metrics: Metrics | None = None,
    ) -> None:
        self.limits = limits
        self.webrtc = webrtc
        self.authenticator = authenticator
        self._find_stream = find_stream
        self._peers = peers
        self._changes = changes
        self._metrics = metrics
        self._sessions: dict[str, WhepSession] = {}
        #: session id → stream id of sessions that ended before their DELETE, oldest first
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._per_client: dict[str, int] = {}
        self._offers: dict[str, TokenBucket] = {}
        self._nursery: trio.Nursery | None = None
        self._opened = 0

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the WHEP sessions until cancelled (with the app's lifetime)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def shutdown(self) -> None:
        """End every WHEP session (each closes its peer connection on the way out)."""
        for session in list(self._sessions.values()):
            session.session.end("server shutting down")

    def find(self, stream_id: str, session_id: str) -> WhepSession | None:
        session = self._sessions.get(session_id)
        return session if session is not None and session.stream_id == stream_id else None

    async def open_session(self, client: str, stream_id: str, offer_sdp: str) -> WhepSession:
        """Start a session for ``stream_id`` and wait until it has answered the offer.

        The caller has checked the token and its grant.

        Raises:
            WhepRefused: 404 for an unknown stream, 503 for an unavailable one, a full
                server, or (a cluster) a stream not read on this node while Redis is
                unreachable; 429 for a client over its rate or session limit, 400 for an
                offer the session can't answer (naming what is wrong), 504 when it takes too
                long.
        """
        stream = self._find_stream(stream_id)
        if stream is None:
            raise WhepRefused(404, ErrorCode.STREAM_NOT_FOUND, f'Stream "{stream_id}" not found')
        if stream.unavailable is not None:
            raise WhepRefused(
                503, ErrorCode.STREAM_UNAVAILABLE, f"Unavailable: {stream.unavailable}"
            )
        self._check_limits(client)
        session: WhepSession | None = None
        with trio.move_on_after(self.webrtc.negotiation_timeout):
            # A cluster node that neither owns nor replicates the stream claims it or
            # becomes a replica of it first: else no frame would come here.
            try:
                await stream.serve_locally()
            except SignalingError as exc:
                status = _STATUS_OF_FAILURE.get(exc.code, 500)
                raise WhepRefused(status, exc.code, exc.message) from None
            session = self._start_session(client, stream, offer_sdp)
            await session.wait_answer()
            return session
        if session is not None:
            session.session.end("no answer in time")
        raise WhepRefused(
            504,
            ErrorCode.NEGOTIATION_TIMEOUT,
            f"No answer within {self.webrtc.negotiation_timeout:g} s",
        )

    def _start_session(self, client: str, stream: Stream, offer_sdp: str) -> WhepSession:
        """A session of ``stream`` for ``client``, running.

        Raises:
            WhepRefused: 503, the server is shutting down.
        """
        if self._nursery is None:
            raise WhepRefused(503, ErrorCode.SERVER_SHUTDOWN, "The server is shutting down")
        session = WhepSession(
            stream,
            offer_sdp,
            client=client,
            peers=self._peers,
            webrtc=self.webrtc,
            limits=self.limits,
            metrics=self._metrics,
        )
        self._sessions[session.id] = session
        self._per_client[client] = self._per_client.get(client, 0) + 1
        self._opened += 1
        self._changes.notify()
        self._nursery.start_soon(self._run_session, session)
        return session

    def forget_ended(self, stream_id: str, session_id: str) -> bool:
        """Whether the session had ended on its own and was not deleted yet (now it is)."""
        if self._ended.get(session_id) != stream_id:
            return False
        del self._ended[session_id]
        return True

    async def end_session(self, session: WhepSession, reason: str) -> None:
        """End a session and wait (bounded) until its peer connection is closed."""
        session.deleted = True
        session.session.end(reason)
        with trio.move_on_after(END_WAIT):
            await session.finished.wait()

    def _check_limits(self, client: str) -> None:
        now = trio.current_time()
        bucket = self._offers.get(client)
        if bucket is None:
            if len(self._offers) >= MAX_TRACKED_CLIENTS:
                self._forget_idle_clients()
            rate = self.limits.max_offers_per_second
            bucket = self._offers[client] = TokenBucket(rate, 2 * rate, now)
        if not bucket.try_take(now):
            raise WhepRefused(
                429,
                ErrorCode.RATE_LIMITED,
                f"More than {self.limits.max_offers_per_second:g} offers a second "
                "from this address",
            )
        limit = self.limits.max_streams_per_socket
        if self._per_client.get(client, 0) >= limit:
            raise WhepRefused(
                429,
                ErrorCode.TOO_MANY_STREAMS,
                f"This address already has {limit} WHEP sessions, the limit",
            )
        if len(self._sessions) >= MAX_SESSIONS:
            raise WhepRefused(
                503, ErrorCode.TOO_MANY_STREAMS, f"The server has {MAX_SESSIONS} WHEP sessions"
            )

    def _forget_idle_clients(self) -> None:
        for client in list(self._offers):
            if client not in self._per_client:
                del self._offers[client]

    async def _run_session(self, session: WhepSession) -> None:
        try:
            await session.run()
        finally:
            del self._sessions[session.id]
            if not session.deleted:
                self._ended[session.id] = session.stream_id
                if len(self._ended) > MAX_ENDED_REMEMBERED:
                    self._ended.popitem(last=False)
            self._per_client[session.client] -= 1
            if not self._per_client[session.client]:
                del self._per_client[session.client]
            self._changes.notify()

    def add_candidates(self, session: WhepSession, fragment: TrickleFragment) -> None:
        """Hand a PATCH's candidates to the session.

        Raises:
            WhepRefused: 422 for an ICE restart (new credentials: not supported, RFC 9725
                §4.3.1), 429 when the session's candidate queue is full.
        """
        if fragment.ice_ufrag is not None and fragment.ice_ufrag != session.remote_ufrag:
            raise WhepRefused(
                422,
                ErrorCode.INVALID_CANDIDATE,
                "ICE restarts are not supported (new ice-ufrag); start a new session with POST",
            )
        if session.session.phase is SessionPhase.ENDED:
            raise WhepRefused(404, ErrorCode.NO_SESSION, "The session has ended")
        for candidate in fragment.candidates:
            try:
                session.session.add_candidate(candidate)
            except SignalingError as exc:
                raise WhepRefused(429, exc.code, exc.message) from None
