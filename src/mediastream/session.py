"""One stream watched over one socket: a viewer, its peer connection, its negotiation.

Task tree of a session (a cancel scope inside its socket's nursery)::

    StreamSession.run                    cancel scope: ``end()``, the socket closing, or the
    │                                    stream stopped or deleted (it calls ``end``)
    └── with stream.open_viewer()        counted viewer, bounded frame queue, on the quality
        │                                the offer asked for (or the default)
        └── async with peer              closed shielded and bounded on the way out
            └── nursery
                ├── apply trickled ICE candidates
                ├── forward the stream's state changes to the client
                ├── follow the quality: choose (page's request, tile, network), switch the
                │   viewer on the same track, tell the page what it plays
                └── watch the peer: connected in time, then until it fails

Every way a session ends is logged once, with its reason.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from . import protocol
from .errors import ErrorCode, SignalingError
from .media.fanout import Subscriber, SubscriberStatistics
from .metrics import Metrics
from .protocol import IceCandidate, Offer, QualityRequest
from .quality_choice import NetworkVeto
from .quality_follower import QualityFollower
from .registry import Stream
from .webrtc.bridge import (
    FINAL_STATES,
    PeerConnection,
    PeerConnectionFactory,
    offer_accepts_audio,
)

log = logging.getLogger(__name__)

Post = Callable[[str], None]
PostError = Callable[[ErrorCode, str, str | None, str | None], None]


class SessionPhase(enum.Enum):
    NEGOTIATING = "negotiating"  # offer received, answer not sent yet
    CONNECTING = "connecting"  # answer sent, peer not connected yet
    CONNECTED = "connected"
    ENDED = "ended"


REASON_SOCKET_CLOSED: Final = "socket closed"
#: How long an offer asking for audio waits for a never-opened source to say what it carries.
AUDIO_PROBE_WAIT: Final = 3.0  # seconds


class StreamSession:
    """One stream's session on one socket.

    Args:
        stream: what is watched.
        offer: the browser's offer that opened the session.
        peers: makes (and counts) the peer connection.
        post: queues a message to the client; never blocks.
        negotiation_timeout: seconds from the offer to a connected peer.
        max_pending_candidates: candidates buffered before they can be applied.
        answered: takes the answer SDP instead of ``post`` (a client with no socket: WHEP).
    """

    def __init__(
        self,
        stream: Stream,
        offer: Offer,
        *,
        peers: PeerConnectionFactory,
        post: Post,
        post_error: PostError,
        negotiation_timeout: float,
        max_pending_candidates: int,
        client: str,
        metrics: Metrics | None = None,
        answered: Callable[[str], None] | None = None,
    ) -> None:
        self.stream = stream
        self.offer = offer
        self.phase = SessionPhase.NEGOTIATING
        self._peers = peers
        self._post = post
        self._post_error_to = post_error
        self._answered = answered
        self._metrics = metrics
        self._offered_at = trio.current_time()
        self._negotiation_timeout = negotiation_timeout
        self._label = f"{client} {stream.id}" + (
            f" [{offer.session_id}]" if offer.session_id else ""
        )
        self._cancel_scope = trio.CancelScope()
        self._end_reason = REASON_SOCKET_CLOSED
        self._candidates_in, self._candidates_out = trio.open_memory_channel[IceCandidate](
            max_pending_candidates
        )
        self._subscriber: Subscriber | None = None
        self._veto = NetworkVeto()
        self._quality = QualityFollower(
            stream,
            requested=offer.quality,
            tile=offer.tile,
            post=post,
            label=self._label,
            session_id=offer.session_id,
            veto=self._veto,
        )

    @property
    def session_id(self) -> str | None:
        return self.offer.session_id

    def subscriber_statistics(self) -> SubscriberStatistics | None:
        """This viewer's queue: frames delivered, dropped, queued (None before the offer)."""
        return self._subscriber.statistics() if self._subscriber is not None else None

    def end(self, reason: str) -> None:
        """End the session now (its peer connection closes on the way out). Idempotent."""
        if self.phase is not SessionPhase.ENDED and not self._cancel_scope.cancel_called:
            self._end_reason = reason
        self._cancel_scope.cancel()

    def request_quality(self, request: QualityRequest) -> None:
        """The page pins a quality, asks for ``auto`` and/or reports its tile; the session
        answers with a ``quality`` message saying what plays (now, or once switched).

        Raises:
            SignalingError: ``unknown_quality``, naming the stream's qualities.
        """
        if request.session_id not in (None, self.session_id):
            return  # about a session this one replaced
        self._quality.request(request)

    def _bandwidth_estimate(self, bitrate: int) -> None:
        # Called from aiortc's RTCP task (asyncio, in Trio's thread).
        self._veto.add(bitrate, trio.current_time())
        self._quality.look_again()

    def add_candidate(self, candidate: IceCandidate) -> None:
        """Queue a trickled candidate for this session's peer.

        Raises:
            SignalingError: ``too_many_candidates`` when the queue is full.
        """
        queue_candidate(self._candidates_in, candidate, self.stream.id)

    async def run(self) -> None:
        """Serve the session until it ends, however it ends; never raises except Cancelled."""
        log.info("%s: session started", self._label)
        try:
            failure = await serve_reporting_failure(
                self._serve, self._cancel_scope, self._post_error, self._label, "session"
            )
            if failure is not None:
                self._end_reason = failure
        finally:
            self.phase = SessionPhase.ENDED
            self._candidates_in.close()
            log.info("%s: session ended (%s)", self._label, self._end_reason)

    async def _serve(self) -> None:
        self._quality.check()
        start = self._quality.choose().name
        viewer = self.stream.open_viewer(end=self._stream_unavailable, quality=start)
        with viewer as subscriber, contextlib.ExitStack() as optional:
            self._subscriber = subscriber
            audio_codec = await self._audio_codec(start)
            audio = (
                optional.enter_context(self.stream.open_audio(quality=start))
                if audio_codec
                else None
            )
            async with self._peers.open(self._label) as peer:
                answer_sdp = await peer.answer(
                    self.offer.sdp,
                    subscriber,
                    audio,
                    audio_codec,
                    on_first_frame=self._first_frame,
                    on_bandwidth_estimate=self._bandwidth_estimate,
                )
                if self._answered is not None:
                    self._answered(answer_sdp)
                else:
                    self._post(protocol.answer(self.stream.id, answer_sdp, self.session_id))
                if self._metrics is not None:
                    elapsed = trio.current_time() - self._offered_at
                    self._metrics.offer_to_answer.observe(elapsed)
                self.phase = SessionPhase.CONNECTING
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._apply_candidates, peer)
                    nursery.start_soon(self._forward_states)
                    nursery.start_soon(self._quality.follow, subscriber, audio)
                    failure = await self._watch_peer(peer)
                    nursery.cancel_scope.cancel()
                # Raised out here: inside the nursery it would arrive wrapped in a group.
                raise failure

    async def _audio_codec(self, quality: str) -> str | None:
        """The audio codec to send, if the page asked for audio and the stream has it."""
        if not self.stream.config.audio or "m=audio" not in self.offer.sdp:
            return None
        info = self.stream.quality(quality).source_info
        if info is None:
            # An on-demand stream that never ran: whether it has audio is known once its
            # source opens, which this viewer has just set off.
            with trio.move_on_after(AUDIO_PROBE_WAIT):
                info = await self.stream.wait_source_info(quality)
        if info is None or info.audio_codec is None:
            return None
        return info.audio_codec if offer_accepts_audio(self.offer.sdp, info.audio_codec) else None

    async def _apply_candidates(self, peer: PeerConnection) -> None:
        async with self._candidates_out:
            async for candidate in self._candidates_out:
                if candidate.session_id not in (None, self.session_id):
                    continue  # a late candidate of a session this one replaced
                try:
                    await peer.add_ice_candidate(candidate)
                except SignalingError as exc:
                    self._post_error(exc.code, exc.message)

    def _stream_unavailable(self, code: ErrorCode, message: str) -> None:
        """The stream was stopped or deleted, or this node can't read it any more (a cluster):
        this session is over (its client told, unless it was ending anyway)."""
        if self._cancel_scope.cancel_called:
            return
        self._post_error(code, message)
        self.end(message)

    async def _forward_states(self) -> None:
        await forward_states(self.stream, self._subscriber, self._post, self.session_id)

    async def _watch_peer(self, peer: PeerConnection) -> SignalingError:
        """Wait until the peer fails or never connects in time; return why."""

        def connected() -> None:
            self.phase = SessionPhase.CONNECTED
            log.info("%s: peer connected", self._label)

        return await watch_peer(
            peer,
            what="peer connection",
            stream_id=self.stream.id,
            connect_within=self._negotiation_timeout,
            connected=connected,
        )

    def _first_frame(self) -> None:
        if self._metrics is not None:
            self._metrics.offer_to_first_frame.observe(trio.current_time() - self._offered_at)

    def _post_error(self, code: ErrorCode, message: str) -> None:
        self._post_error_to(code, message, self.stream.id, self.session_id)


async def forward_states(
    stream: Stream, viewer: Subscriber | None, post: Post, session_id: str | None = None
) -> None:
    """Tell the client the state of the quality ``viewer`` plays (its picture is that source's;
    the stream's leading state while it plays none), now and on every change."""
    last: tuple[str, str | None] | None = None
    while True:
        playing = stream.quality_of(viewer) if viewer is not None else None
        feed = stream.quality(playing) if playing is not None else None
        current = (
            (str(feed.state), feed.detail)
            if feed is not None
            else (str(stream.state), stream.detail)
        )
        if current != last:
            last = current
            post(protocol.state(stream.id, current[0], current[1], session_id))
        await stream.wait_changed()


async def serve_reporting_failure(
    serve: Callable[[], Awaitable[None]],
    cancel_scope: trio.CancelScope,
    post_error: Callable[[ErrorCode, str], None],
    label: str,
    what: str,
) -> str | None:
    """Run one session's ``serve`` in its ``cancel_scope``; a failure ends that session only.

    A :class:`SignalingError` is told to the client as it is; anything else is a bug, logged
    with its traceback and told as ``internal_error``. Only ``Cancelled`` propagates.

    Returns:
        Why the session failed (for its log line), or None when it ended without failing.
    """
    try:
        with cancel_scope:
            await serve()
    except SignalingError as exc:
        post_error(exc.code, exc.message)
        return f"{exc.code}: {exc.message}"
    except Exception as exc:
        log.exception("%s: session failed", label)
        post_error(ErrorCode.INTERNAL_ERROR, f"Internal server error in this stream's {what}")
        return f"internal error: {type(exc).__name__}"
    return None


def queue_candidate(
    queue: trio.MemorySendChannel[IceCandidate], candidate: IceCandidate, stream_id: str
) -> None:
    """Queue a trickled candidate on a session's bounded candidate queue.

    Raises:
        SignalingError: ``too_many_candidates`` when the queue is full.
    """
    try:
        queue.send_nowait(candidate)
    except trio.WouldBlock:
        raise SignalingError(
            ErrorCode.TOO_MANY_CANDIDATES,
            "Too many ICE candidates queued for this stream",
            stream_id=stream_id,
        ) from None
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass  # the session is ending; the candidate has nowhere to go


async def watch_peer(
    peer: PeerConnection,
    *,
    what: str,
    stream_id: str,
    connect_within: float,
    connected: Callable[[], None],
) -> SignalingError:
    """Wait until ``peer`` fails, or does not connect within ``connect_within`` seconds (the
    negotiation timeout: an error for the page, not a cancellation); return why,
    as the error for the page. ``what`` names the connection in it ("peer connection");
    ``connected`` is called once it connects."""
    with trio.move_on_after(connect_within) as deadline:
        while peer.connection_state != "connected":
            if peer.connection_state in FINAL_STATES:
                return SignalingError(
                    ErrorCode.PEER_FAILED,
                    f"The {what} {peer.connection_state} before connecting",
                    stream_id=stream_id,
                )
            await peer.wait_state_change()
    if deadline.cancelled_caught:
        return SignalingError(
            ErrorCode.NEGOTIATION_TIMEOUT,
            f"The {what} did not connect within {connect_within:.0f} s "
            f"(ICE state: {peer.connection_state})",
            stream_id=stream_id,
        )
    connected()
    while peer.connection_state not in FINAL_STATES:
        await peer.wait_state_change()
    return SignalingError(
        ErrorCode.PEER_FAILED,
        f"The {what} failed (ICE or DTLS lost)"
        if peer.connection_state == "failed"
        else f"The browser closed the {what}",
        stream_id=stream_id,
    )
