"""Audio: G.711 and Opus passed through, anything else (AAC…) encoded to Opus once per source.

AAC is also published as it came (frames of kind ``source_audio``), for the socket fallback:
browsers' Media Source Extensions take AAC, so it goes there without being transcoded.

Runs in the reader thread (PyAV), no Trio here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, Final, cast

import av
import av.audio

from ..frames import EncodedFrame
from .timeline import scale_timestamp

log = logging.getLogger(__name__)

#: Audio codecs browsers take as is: FFmpeg's name -> (RTP name, RTP clock rate).
_PASSTHROUGH_AUDIO: Final = {
    "pcm_mulaw": ("PCMU", 8000),
    "pcm_alaw": ("PCMA", 8000),
    "opus": ("opus", 48000),
}
OPUS_CLOCK_RATE: Final = 48000
OPUS_FRAME_SAMPLES: Final = 960  # 20 ms
G711_FRAME_SAMPLES: Final = 160  # 20 ms at 8 kHz


def make_audio_converter(
    stream: av.audio.stream.AudioStream,
) -> AudioPassthrough | AudioTranscoder | None:
    """The converter for the source's audio track; None (video only) when it can't be had."""
    codec = stream.codec_context.name
    if codec in _PASSTHROUGH_AUDIO:
        return AudioPassthrough(stream)
    try:
        return AudioTranscoder(stream)
    except (av.FFmpegError, ValueError) as exc:
        log.warning("audio %s can't be transcoded (%s); video only", codec, exc)
        return None


class AudioPassthrough:
    """G.711 and Opus go to browsers untouched (G.711 cut into 20 ms packets)."""

    transcoded = False
    source_config = b""
    source_clock_rate = 0
    source_channels = 0

    def __init__(self, stream: av.audio.stream.AudioStream) -> None:
        self.source_codec = stream.codec_context.name
        self.rtp_codec, self.clock_rate = _PASSTHROUGH_AUDIO[self.source_codec]
        self._time_base = stream.time_base or Fraction(1, self.clock_rate)
        self._next: int | None = None

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        data = bytes(packet)
        if not data:
            return
        if packet.pts is not None:
            ticks = scale_timestamp(packet.pts, self._time_base, self.clock_rate)
        else:
            ticks = self._next or 0
        if self.rtp_codec == "opus":
            yield _audio_frame(data, ticks)
            self._next = ticks + OPUS_FRAME_SAMPLES
            return
        for offset in range(0, len(data), G711_FRAME_SAMPLES):  # one byte per sample
            chunk = data[offset : offset + G711_FRAME_SAMPLES]
            yield _audio_frame(chunk, ticks + offset)
        self._next = ticks + len(data)


class AudioTranscoder:
    """Anything else (AAC…) to 48 kHz stereo Opus in 20 ms frames, once per source."""

    rtp_codec = "opus"
    clock_rate = OPUS_CLOCK_RATE
    transcoded = True

    def __init__(self, stream: av.audio.stream.AudioStream) -> None:
        self.source_codec = stream.codec_context.name
        self._resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=OPUS_CLOCK_RATE, frame_size=OPUS_FRAME_SAMPLES
        )
        encoder = av.CodecContext.create("libopus", "w")
        encoder.sample_rate = OPUS_CLOCK_RATE
        encoder.layout = "stereo"
        encoder.format = av.AudioFormat("s16")
        encoder.bit_rate = 64_000
        encoder.time_base = Fraction(1, OPUS_CLOCK_RATE)
        encoder.open()
        self._encoder: Any = encoder
        self._samples = 0
        # Raw AAC with its AudioSpecificConfig out of band (RTSP's mpeg4-generic, MP4 files)
        # goes to the fallback as is; ADTS (MPEG-TS) carries no extradata and is left out.
        extradata = stream.codec_context.extradata
        if self.source_codec == "aac" and extradata and stream.codec_context.sample_rate:
            self.source_config = bytes(extradata)
            self.source_clock_rate = int(stream.codec_context.sample_rate)
            self.source_channels = int(stream.codec_context.channels or 2)
        else:
            self.source_config, self.source_clock_rate, self.source_channels = b"", 0, 0
        self._source_time_base = stream.time_base or Fraction(1, self.source_clock_rate or 1)

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        if self.source_config and packet.pts is not None and packet.size:
            ticks = scale_timestamp(packet.pts, self._source_time_base, self.source_clock_rate)
            data = bytes(packet)
            yield EncodedFrame(
                kind="source_audio",
                timestamp=ticks,
                keyframe=True,
                payloads=(data,),
                size=len(data),
            )
        for decoded in cast("list[av.AudioFrame]", packet.decode()):
            for frame in self._resampler.resample(decoded):
                frame.pts = self._samples
                frame.time_base = Fraction(1, OPUS_CLOCK_RATE)
                self._samples += frame.samples
                for encoded in self._encoder.encode(frame):
                    yield _audio_frame(bytes(encoded), int(encoded.pts or 0))


def _audio_frame(data: bytes, ticks: int) -> EncodedFrame:
    return EncodedFrame(
        kind="audio", timestamp=ticks, keyframe=True, payloads=(data,), size=len(data)
    )
