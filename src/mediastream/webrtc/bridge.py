"""The bridge to aiortc: the only module that touches asyncio.

aiortc runs on asyncio; MediaStream runs on Trio. trio-asyncio's loop (opened around the whole
server, see ``server.py``) hosts aiortc, and every aiortc coroutine is called from Trio through
:func:`trio_asyncio.aio_as_trio`. Nothing else in the code base imports asyncio.

What this module adds to stock aiortc, and why:

- **H.264 only, decided before the offer is applied.** aiortc fixes the negotiated codecs
  inside ``setRemoteDescription``; the transceiver's codec preferences must be set before it,
  or VP8 is negotiated and the browser can't decode the H.264 it receives.
- **Packetize once per source, send directly.** Frames carry RTP payloads cut when they were
  read; once DTLS is up, each viewer's :class:`~mediastream.webrtc.rtp_sender.DirectRtpSender`
  becomes its subscriber's transport, so the fan-out sends a live viewer's frames
  synchronously as it publishes them. aiortc's sender task only waits; its RTCP and NACK
  handling stay. (The aiortc internals this needs are all in ``aiortc_compat``.)
- **Bounded per-viewer queues.** A viewer that is catching up, still connecting or whose
  socket is full is drained from its :class:`Subscriber` queue by its track (paced); aiortc's
  own relay keeps unbounded queues (or silently drops frames and corrupts H.264).
- **mDNS candidates are skipped** (configurable): aioice resolves ``.local`` names with a fixed
  one-second timeout per peer connection, while the browser's connectivity checks reveal its
  address anyway.
- **Closing is explicit, shielded and owned to its end**: cancellation does not close an
  aiortc peer, and a close cut off half-way leaks it (its UDP sockets stay open, and an ICE
  task waits forever until the garbage collector destroys it). So a session waits a bounded
  time for its peer's close, but the close itself runs to its end in the factory's closer
  (:meth:`PeerConnectionFactory.run`), which outlives every session.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import trio
import trio_asyncio
from aiortc import (
    RTCConfiguration,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcrtpparameters import RTCRtpSendParameters
from aiortc.sdp import candidate_from_sdp

from ..changes import ChangeSignal
from ..config import WebRTCConfig
from ..errors import ErrorCode, SignalingError
from ..ice import ice_servers as ice_servers_for
from ..media.fanout import CatchUpPacer, Subscriber
from ..media.frames import EncodedFrame
from ..protocol import IceCandidate
from .aiortc_compat import (
    forget_unoffered_transceivers,
    media_sections,
    on_bandwidth_estimate,
    on_sender_started,
    reject_stopped_sections,
)
from .rtp_sender import DirectRtpSender

log = logging.getLogger(__name__)

CLOSE_TIMEOUT: Final = 5.0  # seconds a session waits for its peer connection's close
#: Seconds one close may take in all before it is given up (it is then logged as an error).
CLOSE_LIMIT: Final = 120.0
#: Seconds the closes still running at shutdown are given once the closer is cancelled.
SHUTDOWN_CLOSE_TIMEOUT: Final = 5.0
#: Closes that outlive their session's wait are reported in one WARNING per interval (seconds).
CLOSE_OVERRUN_LOG_INTERVAL: Final = 60.0
_MDNS_CANDIDATE: Final = re.compile(r"^a=candidate:\S+ \d+ \S+ \d+ \S+\.local \d+ .*$", re.M)
_CANDIDATE_SHAPE: Final = re.compile(
    r"^(candidate:)?\S{1,64} \d{1,5} (udp|tcp|UDP|TCP) \d{1,10} \S{1,255} \d{1,5} typ "
    r"(host|srflx|prflx|relay)( .*)?$"
)

#: What aiortc's SDP parsing raises on offers it can't make sense of (found by fuzzing: it
#: assumes fields it never checks for, such as a DTLS setup role).
_MALFORMED_SDP: Final = (
    ValueError,
    AssertionError,
    IndexError,
    KeyError,
    AttributeError,
    TypeError,
    InvalidStateError,
)

#: Connection states after which a peer connection never carries media again.
FINAL_STATES: Final = frozenset({"failed", "closed"})


@dataclass(frozen=True, slots=True)
class PeerStatistics:
    #: peer connections held by their sessions
    open_peer_connections: int
    peer_connections_opened: int
    #: closes still running after their session's wait (:data:`CLOSE_TIMEOUT`) ended
    closing_in_background: int = 0
    #: closes that outlived their session's wait, since the start
    close_overruns: int = 0


class PeerConnectionFactory:
    """Makes the server's peer connections, closes them and counts them.

    :meth:`run` must be running (in the server's lifetime nursery) while peer connections are
    open: it owns the closes that outlive their sessions.

    Args:
        config: ICE servers and candidate policy.
        changes: notified whenever a peer connection opens or closes.
        catchup_rate: bytes per second at most while a viewer catches up on a cached GOP.
        close_wait: seconds a session waits for its peer connection's close before it goes on
            (the close itself goes on to its end).
        on_close_overrun: called for each close that outlives that wait (a metric).
    """

    def __init__(
        self,
        config: WebRTCConfig,
        changes: ChangeSignal | None = None,
        *,
        catchup_rate: float = 20e6 / 8,
        close_wait: float = CLOSE_TIMEOUT,
        on_close_overrun: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self._catchup_rate = catchup_rate
        self._changes = changes or ChangeSignal()
        self._close_wait = close_wait
        self._on_close_overrun = on_close_overrun
        self._open = 0
        self._opened = 0
        self._close_overruns = 0
        self._closing_in_background = 0
        self._overrun_report = OverrunReport(CLOSE_OVERRUN_LOG_INTERVAL)
        self._closer: trio.Nursery | None = None
        #: the cancel scope of every close running in the closer (their deadlines at shutdown)
        self._closing: set[trio.CancelScope] = set()

    def statistics(self) -> PeerStatistics:
        return PeerStatistics(
            open_peer_connections=self._open,
            peer_connections_opened=self._opened,
            closing_in_background=self._closing_in_background,
            close_overruns=self._close_overruns,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the peer connections' closes until cancelled, then give the closes still running
        :data:`SHUTDOWN_CLOSE_TIMEOUT` to finish (each is shielded from the cancellation, so a
        server shutting down still closes its peers' sockets, and its shutdown stays bounded).
        """
        try:
            async with trio.open_nursery() as closer:
                self._closer = closer
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    self._closer = None
                    deadline = trio.current_time() + SHUTDOWN_CLOSE_TIMEOUT
                    for scope in self._closing:
                        scope.deadline = min(scope.deadline, deadline)
        finally:
            self._closer = None

    @asynccontextmanager
    async def open(self, label: str) -> AsyncIterator[PeerConnection]:
        """A new peer connection, closed on exit however the block ends.

        Resource handling: on exit the close is handed to the closer (:meth:`run`) and waited
        for in a shielded ``finally``, at most ``close_wait`` seconds, so a cancelled session
        still releases its sockets and threads, and a slow close never holds its session up
        nor is cut off half-way.

        Raises:
            RuntimeError: :meth:`run` is not running.
        """
        if self._closer is None:
            raise RuntimeError("PeerConnectionFactory.run must be running to open peers")
        ice_servers = [
            RTCIceServer(urls=s["urls"], username=s.get("username"), credential=s.get("credential"))
            for s in ice_servers_for(self._config.ice_servers, label="mediastream", now=time.time())
        ]

        async def create() -> RTCPeerConnection:
            # Created inside the asyncio loop: aiortc binds to the running loop on creation.
            return RTCPeerConnection(RTCConfiguration(iceServers=ice_servers))

        pc = await trio_asyncio.aio_as_trio(create)()
        self._open += 1
        self._opened += 1
        self._changes.notify()
        peer = PeerConnection(
            pc,
            label,
            ignore_mdns=self._config.ignore_mdns_candidates,
            catchup_rate=self._catchup_rate,
        )
        try:
            yield peer
        finally:
            with trio.CancelScope(shield=True):
                closing = _Closing(peer)
                closer = self._running_closer()  # may have ended while the session ran
                if closer is None:
                    # Past the closer's end (a shutdown past its deadline): close here, bounded.
                    await self._close_to_the_end(closing, limit=self._close_wait)
                else:
                    closer.start_soon(self._close_to_the_end, closing)
                    with trio.move_on_after(self._close_wait):
                        await closing.done.wait()
                if not closing.done.is_set():
                    closing.overran = True
                    self._close_overran(label)
            self._open -= 1
            self._changes.notify()

    def _running_closer(self) -> trio.Nursery | None:
        return self._closer

    async def _close_to_the_end(self, closing: _Closing, *, limit: float = CLOSE_LIMIT) -> None:
        """Close the peer completely (shielded; bounded by ``limit``, or by the shutdown's
        deadline), then set ``closing.done``."""
        peer = closing.peer
        started = trio.current_time()
        with trio.CancelScope(shield=True, deadline=started + limit) as scope:
            self._closing.add(scope)
            try:
                await peer._close()
            except Exception:
                log.exception("%s: closing the peer connection failed", peer.label)
            finally:
                self._closing.discard(scope)
                closing.done.set()
                if closing.overran:
                    self._closing_in_background -= 1
                    self._changes.notify()
        if scope.cancelled_caught:
            log.error(
                "%s: peer connection close given up after %.0f s (its sockets may stay open)",
                peer.label,
                trio.current_time() - started,
            )

    def _close_overran(self, label: str) -> None:
        self._close_overruns += 1
        self._closing_in_background += 1
        if self._on_close_overrun is not None:
            self._on_close_overrun()
        report = self._overrun_report.add(label, trio.current_time())
        if report is not None:
            log.warning(
                "%s: peer connection still closing after %.0f s; it goes on closing in the "
                "background%s",
                label,
                self._close_wait,
                f" ({report.others} more such closes in the last {report.seconds:.0f} s)"
                if report.others
                else "",
            )


@dataclass(slots=True)
class _Closing:
    """One peer connection's close, handed from its session to the closer."""

    peer: PeerConnection
    done: trio.Event = field(default_factory=trio.Event)
    #: the session stopped waiting for it (it is counted as closing in the background)
    overran: bool = False


@dataclass(frozen=True, slots=True)
class OverrunSummary:
    """What one WARNING about slow closes reports."""

    label: str
    #: closes that overran since the previous report, besides ``label``'s
    others: int
    #: seconds since the previous report
    seconds: float


class OverrunReport:
    """Aggregates slow closes into one report per ``interval`` seconds: the first close after
    a quiet interval is reported at once, the others are counted into the next report."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last_report: float | None = None
        self._unreported = 0

    def add(self, label: str, now: float) -> OverrunSummary | None:
        """One more slow close at ``now``; returns the report to log, if one is due."""
        if self._last_report is not None and now - self._last_report < self._interval:
            self._unreported += 1
            return None
        summary = OverrunSummary(
            label, self._unreported, 0.0 if self._last_report is None else now - self._last_report
        )
        self._last_report = now
        self._unreported = 0
        return summary


class PeerConnection:
    """One aiortc peer connection, seen from Trio. Made by :meth:`PeerConnectionFactory.open`."""

    def __init__(
        self, pc: RTCPeerConnection, label: str, *, ignore_mdns: bool, catchup_rate: float
    ) -> None:
        self._pc = pc
        self.label = label
        self._ignore_mdns = ignore_mdns
        self._catchup_rate = catchup_rate
        self._state_changed = trio.Event()
        self._tracks: list[SubscriberTrack] = []
        self._answering: asyncio.Future[str] | None = None

        @pc.on("connectionstatechange")
        def _on_state_change() -> None:
            self._state_changed.set()
            self._state_changed = trio.Event()

    @property
    def connection_state(self) -> str:
        return str(self._pc.connectionState)

    async def wait_state_change(self) -> str:
        """Wait for the next connection state change; returns the new state."""
        await self._state_changed.wait()
        return self.connection_state

    async def answer(
        self,
        offer_sdp: str,
        video: Subscriber,
        audio: Subscriber | None = None,
        audio_codec: str | None = None,
        *,
        on_first_frame: Callable[[], None] | None = None,
        on_bandwidth_estimate: Callable[[int], None] | None = None,
    ) -> str:
        """Apply the browser's offer, send ``video`` as H.264 (and ``audio`` in ``audio_codec``),
        and return the answer SDP.

        ``on_bandwidth_estimate`` is called with each bandwidth estimate (REMB, bits per
        second) the browser reports for the video.

        Raises:
            SignalingError: ``invalid_sdp`` or ``unsupported_codec``, saying what was wrong.
        """
        if self._ignore_mdns:
            offer_sdp = _MDNS_CANDIDATE.sub("", offer_sdp).replace("\r\n\r\n", "\r\n")
        self._tracks = [
            SubscriberTrack(
                video,
                "video",
                self._catchup_rate,
                on_first_frame=on_first_frame,
                on_bandwidth_estimate=on_bandwidth_estimate,
            )
        ]
        if audio is not None and audio_codec is not None:
            self._tracks.append(SubscriberTrack(audio, "audio", self._catchup_rate))
        try:
            return str(
                await trio_asyncio.aio_as_trio(self._answer_to_the_end)(
                    offer_sdp, self._tracks, audio_codec
                )
            )
        except OperationError as exc:
            raise SignalingError(
                ErrorCode.UNSUPPORTED_CODEC,
                f"The offer has no video the server can send (it needs H.264): {exc}",
            ) from None
        except _MALFORMED_SDP as exc:
            raise SignalingError(
                ErrorCode.INVALID_SDP, f"Invalid SDP offer: {_describe(exc)}"
            ) from None

    async def _answer_to_the_end(
        self, offer_sdp: str, tracks: list[SubscriberTrack], audio_codec: str | None
    ) -> str:
        # Cut off inside ICE gathering, aioice loses the UDP sockets it was opening (nothing
        # closes them, not even close()): a session cancelled mid-answer leaked them. So the
        # answer runs to its end in asyncio, and _close waits for it before closing.
        self._answering = asyncio.ensure_future(self._answer(offer_sdp, tracks, audio_codec))
        return await asyncio.shield(self._answering)

    async def _answer(
        self, offer_sdp: str, tracks: list[SubscriberTrack], audio_codec: str | None
    ) -> str:
        wanted = {"video": ("video/h264", "video/rtx"), "audio": (f"audio/{audio_codec}".lower(),)}
        transceivers = []
        for track in tracks:
            sender = self._pc.addTrack(track)
            track.attach(sender)
            transceiver = next(t for t in self._pc.getTransceivers() if t.sender is sender)
            capabilities = RTCRtpSender.getCapabilities(track.kind)
            transceiver.setCodecPreferences(
                [c for c in capabilities.codecs if c.mimeType.lower() in wanted[track.kind]]
            )
            transceivers.append(transceiver)
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        if transceivers[0].mid is None:
            raise ValueError("the offer has no video section for the stream")
        answer = await self._pc.createAnswer()
        await self._pc.setLocalDescription(answer)
        return str(self._pc.localDescription.sdp)

    def shared_track(
        self, video: Subscriber, *, on_first_frame: Callable[[], None] | None = None
    ) -> SubscriberTrack:
        """A held track for one stream of a shared connection: it sends nothing until
        :meth:`SubscriberTrack.release` (the browser applied the answer that added it)."""
        return SubscriberTrack(
            video, "video", self._catchup_rate, on_first_frame=on_first_frame, held=True
        )

    async def answer_shared(
        self, offer_sdp: str, additions: list[tuple[str, str, SubscriberTrack | None]]
    ) -> str:
        """Answer one offer of a page's shared connection (the first or a renegotiation).

        Args:
            offer_sdp: the whole connection's offer.
            additions: the m-lines new in this offer, in offer order: (mid, kind, track), the
                track None for an m-line the server refused (answered inactive).

        Raises:
            SignalingError: ``invalid_sdp`` or ``unsupported_codec``, saying what was wrong.
        """
        if self._ignore_mdns:
            offer_sdp = _MDNS_CANDIDATE.sub("", offer_sdp).replace("\r\n\r\n", "\r\n")
        self._tracks.extend(track for _, _, track in additions if track is not None)
        try:
            return str(
                await trio_asyncio.aio_as_trio(self._answer_shared_to_the_end)(offer_sdp, additions)
            )
        except OperationError as exc:
            raise SignalingError(
                ErrorCode.UNSUPPORTED_CODEC,
                f"The offer has no video the server can send (it needs H.264): {exc}",
            ) from None
        except _MALFORMED_SDP as exc:
            raise SignalingError(
                ErrorCode.INVALID_SDP, f"Invalid SDP offer: {_describe(exc)}"
            ) from None

    async def _answer_shared_to_the_end(
        self, offer_sdp: str, additions: list[tuple[str, str, SubscriberTrack | None]]
    ) -> str:
        # As _answer_to_the_end: never cut off half-way (and _close waits for it). One offer at
        # a time (the session negotiates them in turn), so the previous one has ended.
        self._answering = asyncio.ensure_future(self._answer_shared(offer_sdp, additions))
        return await asyncio.shield(self._answering)

    async def _answer_shared(
        self, offer_sdp: str, additions: list[tuple[str, str, SubscriberTrack | None]]
    ) -> str:
        sections = media_sections(offer_sdp)
        offered = {s.mid for s in sections if s.mid is not None}
        stopped = {s.mid for s in sections if s.rejected}
        for transceiver in self._pc.getTransceivers():
            gone = transceiver.mid is not None and transceiver.mid not in offered
            if (transceiver.mid in stopped or gone) and not transceiver.stopped:
                await transceiver.stop()
        forget_unoffered_transceivers(self._pc, offered)
        expected = []
        for mid, kind, track in additions:
            # addTransceiver, not addTrack: addTrack would reuse a dead transceiver.
            if track is None:
                transceiver = self._pc.addTransceiver(kind, direction="inactive")
            else:
                transceiver = self._pc.addTransceiver(track, direction="sendonly")
                track.attach(transceiver.sender)
                capabilities = RTCRtpSender.getCapabilities("video")
                transceiver.setCodecPreferences(
                    [
                        c
                        for c in capabilities.codecs
                        if c.mimeType.lower() in ("video/h264", "video/rtx")
                    ]
                )
            expected.append((mid, transceiver))
        await self._pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        for mid, transceiver in expected:
            if transceiver.mid != mid:
                raise ValueError(
                    f"m-line {mid} was paired with transceiver {transceiver.mid} (the offer's new "
                    "m-lines must be audio or video, in the order listed)"
                )
        answer = await self._pc.createAnswer()
        await self._pc.setLocalDescription(answer)
        return reject_stopped_sections(str(self._pc.localDescription.sdp), offer_sdp)

    async def add_ice_candidate(self, ice: IceCandidate) -> bool:
        """Apply one browser candidate; returns False when it was skipped on purpose.

        Raises:
            SignalingError: ``invalid_candidate`` for a candidate aiortc can't parse.
        """
        if ice.candidate is None:
            if self._ignore_mdns:
                # The browser's reachable address may only ever show up through its own
                # connectivity checks (its host candidates are mDNS names we skip). Telling
                # aioice "no more candidates" would let it declare failure before those checks
                # arrive; without it, a dead peer is caught by the negotiation timeout.
                return False
            await trio_asyncio.aio_as_trio(self._pc.addIceCandidate)(None)
            return True
        text = ice.candidate.strip()
        if not _CANDIDATE_SHAPE.match(text):
            raise SignalingError(
                ErrorCode.INVALID_CANDIDATE, f"Not an ICE candidate: {text[:80]!r}"
            )
        try:
            candidate = candidate_from_sdp(text.removeprefix("candidate:"))
        except (ValueError, AssertionError, IndexError) as exc:
            raise SignalingError(
                ErrorCode.INVALID_CANDIDATE, f"Bad ICE candidate: {_describe(exc)}"
            ) from None
        if self._ignore_mdns and candidate.ip.endswith(".local"):
            return False
        candidate.sdpMid = ice.sdp_mid
        candidate.sdpMLineIndex = ice.sdp_mline_index
        await trio_asyncio.aio_as_trio(self._pc.addIceCandidate)(candidate)
        return True

    async def _close(self) -> None:
        for track in self._tracks:
            track.stop()
        await trio_asyncio.aio_as_trio(self._close_after_answer)()

    async def _close_after_answer(self) -> None:
        if self._answering is not None:
            # Its outcome was the session's business (or the session is gone): only wait.
            await asyncio.wait([self._answering])
            if not self._answering.cancelled():
                self._answering.exception()  # retrieved: asyncio must not report it
        await self._pc.close()


class SubscriberTrack(MediaStreamTrack):
    """A track that drains one viewer's :class:`Subscriber` queue (video or audio).

    aiortc's sender loop only ever waits in :meth:`recv`: frames go out through a
    :class:`DirectRtpSender`. While the viewer's queue holds frames (a replayed GOP, frames
    published while it connected, frames held back while its socket was full) this track
    sends them, paced and only while the socket is ready; once the queue is empty the sender
    becomes the subscriber's transport and the fan-out sends each frame as it publishes it.
    The track never ends on its own: a source that restarts keeps the same track (a track
    that ends stops aiortc's sender for good).
    """

    def __init__(
        self,
        subscriber: Subscriber,
        kind: str,
        catchup_rate: float,
        *,
        on_first_frame: Callable[[], None] | None = None,
        held: bool = False,
        on_bandwidth_estimate: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__()
        self.kind = kind
        self._subscriber = subscriber
        self._on_first_frame = on_first_frame
        #: sends nothing until released: on a renegotiated connection DTLS is up already, and
        #: a keyframe sent before the browser applied the answer is lost (~2 s to a picture)
        self._held = held
        self._on_bandwidth_estimate = on_bandwidth_estimate
        self._pacer = CatchUpPacer(catchup_rate)
        self._waiter: asyncio.Future[None] | None = None
        self._direct: DirectRtpSender | None = None
        subscriber.set_wakeup(self._wake)

    def attach(self, sender: RTCRtpSender) -> None:
        """Take over ``sender``'s sending once aiortc starts it (DTLS is up)."""

        def started(parameters: RTCRtpSendParameters) -> None:
            self._direct = DirectRtpSender(sender, parameters, self._subscriber.timestamps)
            self._wake()

        on_sender_started(sender, started)
        if self._on_bandwidth_estimate is not None:
            on_bandwidth_estimate(sender, self._on_bandwidth_estimate)

    def release(self) -> None:
        """Start sending (the held GOP first): the browser has applied the answer."""
        self._held = False
        self._wake()

    def _wake(self) -> None:
        # Called from Trio (the fan-out) or asyncio, in the same thread.
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def recv(self) -> Any:
        while self._direct is None or self._held:
            if self.readyState != "live":
                raise MediaStreamError
            await self._wait()
        subscriber = self._subscriber
        loop = asyncio.get_running_loop()
        while True:
            # Draining the queue: paced, and only while the socket takes more. A spent budget
            # or a full socket waits for the next frame published (no timers: see CatchUpPacer).
            while subscriber.queued_frames and self.ready() and self._pacer.ready(loop.time()):
                frame = subscriber.get_nowait()
                assert frame is not None
                if subscriber.queued_frames:
                    self._pacer.spend(frame.size)
                self.send(frame)
            if subscriber.closed or self.readyState != "live":
                raise MediaStreamError
            if not subscriber.queued_frames:
                # Live: from now on the fan-out sends each frame as it publishes it. The
                # transport is dropped (and this track woken) if sending fails.
                subscriber.set_transport(self)
            await self._wait()

    # Transport (for the subscriber), once the sender has started.
    def ready(self) -> bool:
        assert self._direct is not None
        return self._direct.ready()

    def send(self, frame: EncodedFrame) -> None:
        assert self._direct is not None
        self._direct.send(frame)
        if self._on_first_frame is not None:
            self._on_first_frame()
            self._on_first_frame = None

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def stop(self) -> None:
        super().stop()
        self._subscriber.set_transport(None)
        self._subscriber.set_wakeup(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_AUDIO_SECTION: Final = re.compile(r"^m=audio [1-9]\d* .*?(?=^m=|\Z)", re.M | re.S)


def offer_accepts_audio(offer_sdp: str, codec: str) -> bool:
    """Whether the offer has an active audio section that lists ``codec`` (e.g. "PCMU")."""
    section = _AUDIO_SECTION.search(offer_sdp)
    if section is None or re.search(r"^a=inactive", section.group(), re.M):
        return False
    return (
        re.search(rf"^a=rtpmap:\d+ {re.escape(codec)}/", section.group(), re.M | re.I) is not None
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text[:200] if text else type(exc).__name__
