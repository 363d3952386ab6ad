"""A page's one peer connection, carrying every stream of the page (opt-in on the page).

The browser stays the offerer: it adds a receiving transceiver per stream and removes one by
stopping it, and sends the whole connection's offer each time (``offer`` to the connection's
``~`` id, with ``payload.streams`` mapping each m-line's mid to its stream). A server-made
re-offer would renumber the H.264 payload type and break the streams already playing.

Task tree of a shared connection (a cancel scope inside its socket's nursery)::

    SharedPeerSession.run                cancel scope: ``end()`` (``close`` to its id), the
    │                                    socket closing, the peer failing
    └── async with peer                  one aiortc peer: one ICE and DTLS for the page
        └── nursery
            ├── apply trickled ICE candidates
            ├── negotiate the page's offers, one at a time
            ├── watch the peer: connected in time, then until it fails
            └── _Member.run × N          one per stream: its counted viewer (GOP cache at
                                         join) and its state changes, until the page removes
                                         its m-line or the stream ends

A stream added by an offer starts sending only once the page says it applied the answer
(``applied``): on a connection whose DTLS is up, a keyframe sent before that is lost.
A stream that fails (refused, unavailable) gets an ``error`` naming it (top-level ``stream``)
while the others play on; its m-line stays inactive until the page removes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

from . import protocol
from .errors import ErrorCode, SignalingError
from .media.fanout import Subscriber
from .metrics import Metrics
from .protocol import IceCandidate, PeerOffer
from .registry import Stream
from .session import Post, queue_candidate, serve_reporting_failure, watch_peer
from .webrtc.aiortc_compat import media_sections
from .webrtc.bridge import PeerConnection, PeerConnectionFactory, SubscriberTrack

log = logging.getLogger(__name__)

REASON_SOCKET_CLOSED: Final = "socket closed"

#: Admits one more stream into a shared connection (access, rate, socket's stream limit).
Admit = Callable[[str], Stream]
#: Reports an error: code, message, the stream it is about (None: the whole connection).
PostPeerError = Callable[[ErrorCode, str, str | None], None]


class SharedPeerSession:
    """One page's shared peer connection on one socket.

    Args:
        peer_id: the page's ``~`` id of the connection.
        admit: checks and finds a stream the page adds (raises :class:`SignalingError`).
        post: queues a message to the client; never blocks.
        post_error: reports an error about one stream of the connection, or all of it.
    """

    def __init__(
        self,
        peer_id: str,
        *,
        peers: PeerConnectionFactory,
        admit: Admit,
        post: Post,
        post_error: PostPeerError,
        negotiation_timeout: float,
        max_pending_candidates: int,
        client: str,
        metrics: Metrics | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._peers = peers
        self._admit = admit
        self._post = post
        self._post_error = post_error
        self._negotiation_timeout = negotiation_timeout
        self._metrics = metrics
        self._label = f"{client} {peer_id}"
        #: the streams sent, by mid
        self.members: dict[str, _Member] = {}
        #: every mid the aiortc peer has a transceiver for (members, refused, removed)
        self._known_mids: set[str] = set()
        self._offers_in, self._offers_out = trio.open_memory_channel[PeerOffer](1)
        self._candidates_in, self._candidates_out = trio.open_memory_channel[IceCandidate](
            max_pending_candidates
        )
        #: set when the page says it applied the answer being waited for
        self._applied: trio.Event | None = None
        self._negotiating = False
        self._cancel_scope = trio.CancelScope()
        self._end_reason = REASON_SOCKET_CLOSED
        self._ended = False

    @property
    def stream_count(self) -> int:
        return len(self.members)

    def end(self, reason: str) -> None:
        """End the connection and every stream on it now. Idempotent."""
        if not self._ended and not self._cancel_scope.cancel_called:
            self._end_reason = reason
        self._cancel_scope.cancel()

    def offer(self, offer: PeerOffer) -> None:
        """Take the page's next offer.

        Raises:
            SignalingError: ``negotiation_in_progress`` while the last one is not applied yet
                (the page must negotiate one offer at a time).
        """
        if self._negotiating:
            raise SignalingError(
                ErrorCode.NEGOTIATION_IN_PROGRESS,
                "This shared peer connection is still negotiating its last offer; send the "
                "next one after applying its answer",
                stream_id=self.peer_id,
            )
        try:
            self._offers_in.send_nowait(offer)
        except trio.WouldBlock:
            raise SignalingError(
                ErrorCode.NEGOTIATION_IN_PROGRESS,
                "This shared peer connection is not ready for an offer yet",
                stream_id=self.peer_id,
            ) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # ending
        self._negotiating = True

    def applied(self) -> None:
        """The page applied the last answer: the streams it added start sending, and the page
        may send its next offer at once (it waits in the channel until this one is done)."""
        if self._applied is not None:
            self._applied.set()
            self._negotiating = False

    def add_candidate(self, candidate: IceCandidate) -> None:
        queue_candidate(self._candidates_in, candidate, self.peer_id)

    async def run(self) -> None:
        """Serve the connection until it ends, however it ends; never raises except Cancelled."""
        log.info("%s: shared peer connection started", self._label)
        try:
            failure = await serve_reporting_failure(
                self._serve,
                self._cancel_scope,
                lambda code, message: self._post_error(code, message, None),
                self._label,
                "shared peer connection",
            )
            if failure is not None:
                self._end_reason = failure
        finally:
            self._ended = True
            self._candidates_in.close()
            self._offers_in.close()
            log.info("%s: shared peer connection ended (%s)", self._label, self._end_reason)

    async def _serve(self) -> None:
        async with self._peers.open(self._label) as peer, trio.open_nursery() as nursery:
            nursery.start_soon(self._apply_candidates, peer)
            nursery.start_soon(self._negotiate_offers, peer, nursery)
            failure = await self._watch_peer(peer)
            nursery.cancel_scope.cancel()
        raise failure

    async def _negotiate_offers(self, peer: PeerConnection, nursery: trio.Nursery) -> None:
        async with self._offers_out:
            async for offer in self._offers_out:
                try:
                    await self._negotiate(peer, nursery, offer)
                except SignalingError as exc:
                    # The page's connection and ours no longer agree: it starts a new one.
                    self._post_error(exc.code, exc.message, None)
                    self.end(f"{exc.code}: {exc.message}")
                    return
                finally:
                    self._negotiating = False

    async def _negotiate(
        self, peer: PeerConnection, nursery: trio.Nursery, offer: PeerOffer
    ) -> None:
        started = trio.current_time()
        sections = media_sections(offer.sdp)
        live = {s.mid for s in sections if s.mid is not None and not s.rejected}
        for mid in [mid for mid in self.members if mid not in live]:
            self.members.pop(mid).end("the page removed the stream")
        additions: list[tuple[str, str, SubscriberTrack | None]] = []
        added: list[SubscriberTrack] = []
        for section in sections:
            if section.mid is None or section.rejected or section.mid in self._known_mids:
                continue
            self._known_mids.add(section.mid)
            if section.kind == "application":
                continue  # a data channel: aiortc answers it by itself
            if section.inactive and section.mid not in offer.streams:
                # The page's anchor: the first m-line, never removed, so the BUNDLE transport
                # stays put (Chromium gathers a new one when the first m-line is stopped).
                additions.append((section.mid, section.kind, None))
                continue
            track = await self._add_member(peer, nursery, section.mid, section.kind, offer)
            additions.append((section.mid, section.kind, track))
            if track is not None:
                added.append(track)
        answer_sdp = await peer.answer_shared(offer.sdp, additions)
        self._applied = trio.Event()
        self._post(protocol.encode("answer", self.peer_id, answer_sdp))
        if self._metrics is not None:
            self._metrics.offer_to_answer.observe(trio.current_time() - started)
        with trio.move_on_after(self._negotiation_timeout):
            await self._applied.wait()
        self._applied = None
        # Sent even without the page's word after the timeout (an older page, a lost message):
        # a late first picture beats none.
        for track in added:
            track.release()

    async def _add_member(
        self,
        peer: PeerConnection,
        nursery: trio.Nursery,
        mid: str,
        kind: str,
        offer: PeerOffer,
    ) -> SubscriberTrack | None:
        """The track for a new m-line, or None when it is refused (the page is told why)."""
        stream_id = offer.streams.get(mid)
        if kind != "video" or stream_id is None:
            self._post_error(
                ErrorCode.INVALID_MESSAGE,
                f"m-line {mid} ({kind}) names no stream in payload.streams; it stays inactive",
                None,
            )
            return None
        try:
            stream = self._admit(stream_id)
            # A cluster node that does not read the stream becomes a replica of it (or claims
            # it) first: the shared connection is served by the socket's node.
            await stream.serve_locally()
        except SignalingError as exc:
            self._post_error(exc.code, exc.message, stream_id)
            return None
        member = _Member(stream, mid, self)
        self.members[mid] = member
        subscriber = await nursery.start(member.run)
        member.track = peer.shared_track(subscriber, on_first_frame=member.first_frame)
        return member.track

    async def _apply_candidates(self, peer: PeerConnection) -> None:
        async with self._candidates_out:
            async for candidate in self._candidates_out:
                try:
                    await peer.add_ice_candidate(candidate)
                except SignalingError as exc:
                    self._post_error(exc.code, exc.message, None)

    async def _watch_peer(self, peer: PeerConnection) -> SignalingError:
        """Wait until the peer fails or never connects in time; return why."""
        return await watch_peer(
            peer,
            what="shared peer connection",
            stream_id=self.peer_id,
            connect_within=self._negotiation_timeout,
            connected=lambda: log.info("%s: peer connected", self._label),
        )


class _Member:
    """One stream on a shared connection: its viewer and its state messages."""

    def __init__(self, stream: Stream, mid: str, owner: SharedPeerSession) -> None:
        self.stream = stream
        self.mid = mid
        self._owner = owner
        self.track: SubscriberTrack | None = None
        self._cancel_scope = trio.CancelScope()
        self._reason = REASON_SOCKET_CLOSED
        self._started = trio.current_time()
        self._label = f"{owner._label} {stream.id} (mid {mid})"

    def end(self, reason: str) -> None:
        if not self._cancel_scope.cancel_called:
            self._reason = reason
        self._cancel_scope.cancel()

    def first_frame(self) -> None:
        metrics = self._owner._metrics
        if metrics is not None:
            metrics.offer_to_first_frame.observe(trio.current_time() - self._started)

    async def run(
        self, task_status: trio.TaskStatus[Subscriber] = trio.TASK_STATUS_IGNORED
    ) -> None:
        log.info("%s: stream added", self._label)
        try:
            with self._cancel_scope, self.stream.open_viewer(end=self._unavailable) as subscriber:
                task_status.started(subscriber)
                await self._forward_states()
        finally:
            if self.track is not None:
                self.track.stop()
            if self._owner.members.get(self.mid) is self:
                del self._owner.members[self.mid]
            # Ended with its connection: the connection's reason is the stream's.
            reason = self._reason if self._cancel_scope.cancel_called else self._owner._end_reason
            log.info("%s: stream removed (%s)", self._label, reason)

    def _unavailable(self, code: ErrorCode, message: str) -> None:
        self._owner._post_error(code, message, self.stream.id)
        self.end(message)

    async def _forward_states(self) -> None:
        last: tuple[str, str | None] | None = None
        while True:
            current = (str(self.stream.state), self.stream.detail)
            if current != last:
                last = current
                self._owner._post(
                    protocol.state(
                        self._owner.peer_id, current[0], current[1], member=self.stream.id
                    )
                )
            await self.stream.wait_changed()
