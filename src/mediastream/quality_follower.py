"""One viewer's quality, followed: what the page asked for, where its tile is, the choice made
from them (``quality_choice.py``), the switch on the same subscriber, and the page told.

A WebRTC session (``session.py``) and a fallback over the socket (``fallback.py``) both hold
one :class:`QualityFollower` and run :meth:`QualityFollower.follow` as a task of their own
nursery; only the WebRTC session has a network veto (its browser reports REMB estimates; the
fallback's TCP socket has its own back-pressure, see ``fallback.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Final

import trio

from . import protocol
from .config import AUTO_QUALITY
from .errors import ErrorCode, SignalingError
from .media.fanout import Subscriber
from .protocol import QualityRequest, Tile
from .quality_choice import Choice, NetworkVeto, QualityOption, choose_quality
from .registry import Stream

log = logging.getLogger(__name__)

#: How long a switch waits for the target quality's keyframe (its source may have to open
#: first) before the viewer stays where it is and the choice is made again.
SWITCH_WAIT: Final = 15.0  # seconds


def check_quality(stream: Stream, name: str) -> None:
    """Raises ``unknown_quality`` (naming the stream's qualities) unless ``name`` is one of
    ``stream``'s qualities or ``"auto"``."""
    names = [feed.name for feed in stream.qualities]
    if name != AUTO_QUALITY and name not in names:
        raise SignalingError(
            ErrorCode.UNKNOWN_QUALITY,
            f'Stream "{stream.id}" has no quality "{name}"; it has '
            f'{", ".join(names)} (or "{AUTO_QUALITY}")',
            stream_id=stream.id,
        )


class QualityFollower:
    """Keeps one viewer on the quality chosen for it, and tells the page what it plays.

    Args:
        stream: the stream watched.
        requested: what the page asked for first (a quality's name or ``"auto"``; None: auto).
        tile: the page's first tile report, if any.
        post: queues a message to the client; never blocks.
        label: for log lines.
        session_id: echoed in the ``quality`` messages (None: none).
        veto: the viewer's network veto (None: no bandwidth estimates, no veto).
    """

    def __init__(
        self,
        stream: Stream,
        *,
        requested: str | None,
        tile: Tile | None,
        post: Callable[[str], None],
        label: str,
        session_id: str | None = None,
        veto: NetworkVeto | None = None,
    ) -> None:
        self.stream = stream
        #: what the page asked for: a quality's name, or "auto"
        self.requested = requested or AUTO_QUALITY
        self.tile = tile
        self._post = post
        self._label = label
        self._session_id = session_id
        self._veto = veto
        #: cancelled to make the follower look again at once (a request, an estimate)
        self._wait = trio.CancelScope()
        #: cancelled when the page asks again while a switch waits for its keyframe
        self._switching = trio.CancelScope()
        self._reply_due = False
        self._look_again = False

    def check(self) -> None:
        """Raises ``unknown_quality`` if the first request names no quality of the stream."""
        check_quality(self.stream, self.requested)

    def request(self, request: QualityRequest) -> None:
        """The page pins a quality, asks for ``auto`` and/or reports its tile; answered with a
        ``quality`` message saying what plays (now, or once switched).

        Raises:
            SignalingError: ``unknown_quality``, naming the stream's qualities (nothing changes).
        """
        if request.quality is not None:
            check_quality(self.stream, request.quality)
            self.requested = request.quality
        if request.tile is not None:
            self.tile = request.tile
        self._reply_due = True
        self.look_again()
        self._switching.cancel()  # the choice is made again (the source keeps its grace)

    def look_again(self) -> None:
        """Choose again at once (a bandwidth estimate arrived, a request)."""
        self._look_again = True
        self._wait.cancel()

    def choose(self) -> Choice:
        options = [
            QualityOption(
                feed.name,
                feed.source_info.width if feed.source_info else 0,
                feed.source_info.height if feed.source_info else 0,
                feed.bitrate,
            )
            for feed in self.stream.qualities
        ]
        pinned = any(option.name == self.requested for option in options)
        return choose_quality(
            options,
            # A pinned quality an edit of the stream removed: the server chooses.
            requested=self.requested if pinned else AUTO_QUALITY,
            tile=self.tile,
            default=self.stream.quality().name,
            veto=self._veto,
        )

    async def follow(self, video: Subscriber, audio: Subscriber | None) -> None:
        """Keep the viewer (``video``, and ``audio`` moved with it) on the quality chosen.

        Looks again whenever the stream changes (a quality's size or bitrate learnt), the page
        sends a ``quality`` message, the viewer reports a bandwidth estimate, or the network
        veto's own timing is due. Returns when the viewer closes.
        """
        announced: tuple[str, str, str] | None = None
        while True:
            self._look_again = False
            playing = self.stream.quality_of(video)
            if playing is None:
                return  # the viewer is closing
            now = trio.current_time()
            if self._veto is not None:
                self._veto.update(self.stream.quality(playing).bitrate, now)
            choice = self.choose()
            if choice.name != playing:
                with trio.move_on_after(SWITCH_WAIT) as self._switching:
                    await self.stream.switch_viewer(video, audio, choice.name)
                playing = self.stream.quality_of(video) or playing
                if playing == choice.name:
                    log.info("%s: playing quality %s (%s)", self._label, playing, choice.reason)
            if self._look_again:
                continue  # asked again meanwhile: choose again before telling anything
            reason = choice.reason if playing == choice.name else "switching"
            if (playing, self.requested, reason) != announced or self._reply_due:
                announced, self._reply_due = (playing, self.requested, reason), False
                self._post(
                    protocol.quality(
                        self.stream.id,
                        playing,
                        requested=self.requested,
                        reason=reason,
                        qualities=self.qualities_json(),
                        session_id=self._session_id,
                    )
                )
            next_check = self._veto.next_check(now) if self._veto is not None else math.inf
            with trio.move_on_after(next_check) as self._wait:
                await self.stream.wait_changed()

    def qualities_json(self) -> list[dict[str, object]]:
        return [
            {
                "name": feed.name,
                "width": feed.source_info.width if feed.source_info else 0,
                "height": feed.source_info.height if feed.source_info else 0,
            }
            for feed in self.stream.qualities
        ]
