"""One continuous media timeline per track, across source restarts."""

from __future__ import annotations

from fractions import Fraction
from typing import Final

from ..frames import VIDEO_CLOCK_RATE
from .rtsp import RtspTransportMemory

#: frames per second assumed where a source says nothing (patterns, packets without pts)
DEFAULT_FPS: Final = 25


def scale_timestamp(value: int, time_base: Fraction, clock_rate: int) -> int:
    """``math.floor(value * time_base * clock_rate)``, in integers: no Fraction per frame."""
    # Floor division rounds towards minus infinity as math.floor does, so negative timestamps
    # (FFmpeg's pre-roll) come out the same too. A Fraction's denominator is always positive.
    return value * time_base.numerator * clock_rate // time_base.denominator


class Timeline:
    """Maps each attempt's source timestamps onto one continuous, increasing timeline.

    Viewers keep their RTP stream across camera reconnects and file loops, so timestamps must
    never jump back; a gap in wall time becomes the same gap in media time. One timeline per
    track, in that track's RTP clock (90 kHz for video).
    """

    def __init__(self, clock_rate: int = VIDEO_CLOCK_RATE) -> None:
        self.clock_rate = clock_rate
        self._offset: int | None = None
        self._last_out: int | None = None
        self._last_wall = 0.0
        self._frame_gap = clock_rate // DEFAULT_FPS

    def new_attempt(self) -> None:
        self._offset = None

    def follow(self, timestamp: int, now: float) -> None:
        """A frame of this track was published at ``timestamp`` by something other than this
        node's source (a replica's relay, on the owner's timeline): this node's source, should
        it start (the replica promoted to owner), continues after it, as after a reconnect."""
        if self._last_out is None or timestamp > self._last_out:
            self._last_out = timestamp
            self._last_wall = now

    def place(self, source_ts: int, now: float, *, paced: bool) -> int:
        if self._offset is None:
            if self._last_out is None:
                base = 0
            elif paced:
                base = self._last_out + self._frame_gap
            else:
                base = self._last_out + max(
                    self._frame_gap, round((now - self._last_wall) * self.clock_rate)
                )
            self._offset = base - source_ts
        out = source_ts + self._offset
        if self._last_out is not None:
            if out <= self._last_out:
                out = self._last_out + 1
            else:
                self._frame_gap = min(out - self._last_out, self.clock_rate)
        self._last_out = out
        self._last_wall = now
        return out


class Timelines(dict[str, Timeline]):
    """A stream's timelines by track kind, kept across source restarts and edits.

    It also keeps the RTSP transport its camera was found to take, so that neither a
    reconnect nor the next start of an on-demand stream is refused again.
    """

    def __init__(self) -> None:
        super().__init__(video=Timeline())
        self.rtsp_transport = RtspTransportMemory()

    def open_tracks(self, audio_clock_rate: int, source_audio_clock_rate: int) -> None:
        """Timelines for the audio tracks a source (or a relay) carries (0: none): new ones,
        or anew for the camera's AAC when its rate changed (fallbacks started after that
        get an init segment with the new rate)."""
        if audio_clock_rate and "audio" not in self:
            self["audio"] = Timeline(audio_clock_rate)
        known = self.get("source_audio")
        if source_audio_clock_rate and (
            known is None or known.clock_rate != source_audio_clock_rate
        ):
            self["source_audio"] = Timeline(source_audio_clock_rate)
