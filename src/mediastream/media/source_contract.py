"""What a running source reports to its stream (frames, its state, what it found), and how a
source is named where people see it.

Kept apart from the ``sources`` package (which needs PyAV and aiortc) so that the control
plane — the registry, the metrics, the API — can speak of sources without importing a media
stack.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Protocol

from ..config import SourceSpec
from ..redact import redact_url
from .frames import EncodedFrame


class SourceState(enum.StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    LIVE = "live"
    RECONNECTING = "reconnecting"
    OFFLINE = "offline"


class SourceSink(Protocol):
    """Where a running source delivers (the stream it belongs to)."""

    def publish(self, frame: EncodedFrame) -> None: ...

    def source_state(self, state: SourceState, detail: str | None = None) -> None: ...

    def source_restarted(self) -> None: ...

    def source_opened(self, info: SourceInfo) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class SourceInfo:
    """What the reader found when it opened the source."""

    codec: str  # the source's own codec name, e.g. "h264", "mjpeg"
    transcoded: bool
    width: int
    height: int
    #: the RTP audio codec viewers get ("PCMU", "PCMA", "opus"), or None without audio.
    audio_codec: str | None = None
    audio_clock_rate: int = 0
    #: the source's own audio codec, e.g. "aac" (transcoded to Opus) or "pcm_mulaw".
    audio_source_codec: str | None = None
    audio_transcoded: bool = False
    #: the camera's own AAC, also published untranscoded (frames of kind "source_audio") for
    #: the socket fallback: its AudioSpecificConfig, sample rate and channels. Empty otherwise.
    source_audio_config: bytes = b""
    source_audio_clock_rate: int = 0
    source_audio_channels: int = 0
    #: the RTSP transport the camera is read over ("tcp" or "udp"); None for other sources.
    rtsp_transport: str | None = None


def describe_source(spec: SourceSpec) -> str:
    """The source as it may appear in logs, errors and APIs: credentials removed."""
    if spec.kind == "rtsp":
        return redact_url(spec.location)
    if spec.kind == "pattern":
        query = "&".join(f"{k}={v}" for k, v in spec.options)
        return f"pattern:{spec.location}" + (f"?{query}" if query else "")
    return f"file:{spec.location}"
