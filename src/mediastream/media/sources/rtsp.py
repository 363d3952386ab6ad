"""RTSP cameras: which lower transport to ask for, and what a camera's refusals mean.

Many cameras take RTP over TCP (interleaved in the RTSP connection) and over UDP; some take
only one and answer a SETUP for the other "461 Unsupported transport", which FFmpeg reports
as EPROTONOSUPPORT ("Protocol not supported"). "auto" asks for TCP first (it passes NAT and
firewalls and loses nothing) and, only on that refusal, for UDP at once, in a new RTSP
session; whichever worked is asked for first from then on. A camera that stays silent over
UDP is not a refusal: "auto" never guesses from timeouts. "tcp" and "udp" ask for that one
alone, and a refusal names the setting that would work.

Runs in the reader thread (PyAV blocks), no Trio here.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

import av
import av.container

from ...config import MediaConfig, SourceSpec, StreamConfig
from ...errors import SourceError
from ..source_contract import describe_source

log = logging.getLogger(__name__)

#: FFmpeg's error for RTSP "461 Unsupported transport".
RTSP_TRANSPORT_REFUSED: Final = errno.EPROTONOSUPPORT
RTSP_TRANSPORTS: Final = ("tcp", "udp")
#: seconds to wait before asking once more when the camera is busy right after a refusal
RTSP_BUSY_AFTER_REFUSAL_PAUSE: Final = 0.25


class RtspTransportMemory:
    """Which RTSP transport to ask a stream's camera for first ("auto" only).

    Written by the reader thread and read by the next one; one camera URL's knowledge: an
    edit that changes the URL starts afresh.
    """

    def __init__(self) -> None:
        self._location = ""
        self._first: str | None = None

    def first_choice(self, location: str) -> str | None:
        """The transport that last worked (or was left after a refusal), if any."""
        return self._first if location == self._location else None

    def remember(self, location: str, transport: str) -> bool:
        """Ask for ``transport`` first from now on; True if that is news."""
        news = self.first_choice(location) != transport
        self._location, self._first = location, transport
        return news


def rtsp_transport_order(setting: str, learned: str | None) -> tuple[str, ...]:
    """The transports to ask for, in order: a forced one alone; for "auto", what worked last
    (else TCP), then the other."""
    if setting != "auto":
        return (setting,)
    first = learned or "tcp"
    return (first, *(t for t in RTSP_TRANSPORTS if t != first))


def rtsp_refusal_reason(refused: Sequence[str], setting: str) -> str:
    """Why a camera can't be read when it refused every transport asked for, and the fix."""
    names = " and ".join(t.upper() for t in refused)
    reason = f"the camera refused RTSP over {names} (461 Unsupported transport)"
    if setting == "auto":
        return reason
    other = next(t for t in RTSP_TRANSPORTS if t != setting)
    return f'{reason}; set rtsp_transport = "{other}" (or "auto")'


def open_rtsp(
    config: StreamConfig,
    media: MediaConfig,
    memory: RtspTransportMemory,
    *,
    stop: threading.Event,
    label: str,
) -> tuple[av.container.InputContainer, str]:
    """Open an RTSP camera over the first transport it takes; returns it and that transport.

    Args:
        memory: what earlier attempts learned about this camera; updated here.
        stop: set when the attempt is stopped (cuts the pause before asking a busy camera
            again short).
        label: what log lines start with (the stream, its source without credentials).

    Raises:
        av.FFmpegError: anything but a refused transport.
        SourceError: the camera refused every transport the setting allows.
    """
    location, setting = config.source.location, config.rtsp_transport
    order = rtsp_transport_order(setting, memory.first_choice(location))
    refused: list[str] = []

    def open_over(transport: str) -> av.container.InputContainer:
        options = _rtsp_options(transport, media)
        timeouts = (media.open_timeout, media.read_timeout)
        try:
            return av.open(location, "r", options=options, timeout=timeouts)
        except av.error.HTTPServerError:
            if not refused or stop.wait(RTSP_BUSY_AFTER_REFUSAL_PAUSE):
                raise
        # GStreamer's RTSP servers answer "503 Service Unavailable" to a DESCRIBE that comes
        # while they still tear down the session they just refused (5 times in 12 on loopback,
        # for under 10 ms): ask once more after a pause rather than after a whole backoff.
        return av.open(location, "r", options=options, timeout=timeouts)

    for transport in order:
        try:
            container = open_over(transport)
        except av.FFmpegError as exc:
            if exc.errno != RTSP_TRANSPORT_REFUSED:
                raise
            refused.append(transport)
            if len(refused) < len(order) and memory.remember(location, order[len(refused)]):
                # Remembered before trying it: should it fail for another reason (a camera
                # still busy), the next attempt starts with it all the same.
                log.info(
                    "%s: %s; asking for RTSP over %s instead, and first from now on",
                    label,
                    rtsp_refusal_reason([transport], setting),
                    order[len(refused)].upper(),
                )
            continue
        if setting == "auto":
            memory.remember(location, transport)
        return container, transport
    reason = rtsp_refusal_reason(refused, setting)
    raise SourceError(f"cannot open {describe_source(config.source)}: {reason}")


def _rtsp_options(transport: str, media: MediaConfig) -> dict[str, str]:
    return {
        "rtsp_transport": transport,
        # FFmpeg's socket I/O timeout, in microseconds (``stimeout`` is gone since FFmpeg 5).
        "timeout": str(int(media.read_timeout * 1_000_000)),
        # Start fast: the codec parameters come from the camera's SDP, and probing the
        # stream would cost ~1 s of cold start (measured: 1.2 s open -> 0.12 s). Not
        # ``fflags=nobuffer``: that throws away the probed packets, first keyframe included.
        "analyzeduration": "0",
        "probesize": "32",
    }


def rtsp_status_reason(exc: av.FFmpegError, spec: SourceSpec) -> str | None:
    """The camera's RTSP answer, as what it means and what to do (FFmpeg knows these by their
    HTTP names and keeps only the class of a 5xx)."""
    if isinstance(exc, av.error.HTTPUnauthorizedError):
        if urlsplit(spec.location).username is None:
            return "the camera needs credentials (401); put user:password@ in the source URL"
        return "the camera refused the credentials (401); check the user and password in the URL"
    if isinstance(exc, av.error.HTTPForbiddenError):
        return "the camera refused access (403); check that this user may watch this stream"
    if isinstance(exc, av.error.HTTPNotFoundError):
        return "the camera has no stream at this path (404); check the path in the source URL"
    if isinstance(exc, av.error.HTTPServerError):
        return "the camera answered with a server error (5xx); it may be busy or restarting"
    return None
