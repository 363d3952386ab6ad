"""Video: H.264 passed through (NAL units tidied, never decoded), anything else encoded once.

Runs in the reader thread (PyAV), no Trio here. Each converter turns the source's packets
into EncodedFrames, cut into RTP payloads once for every viewer.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any, Final, Protocol

import av
import av.video

from ...config import SourceSpec
from ...webrtc.aiortc_compat import packetize_h264
from ..frames import (
    NAL_SPS,
    VIDEO_CLOCK_RATE,
    EncodedFrame,
    H264AccessUnitNormalizer,
    is_b_slice,
    nal_type,
    split_annexb,
    sps_forbids_b_slices,
)
from ..source_contract import SourceInfo
from .reader import NeedsTranscoding
from .timeline import DEFAULT_FPS, scale_timestamp

DEFAULT_TRANSCODE_KBPS: Final = 2000


class VideoConverter(Protocol):
    info: SourceInfo

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]: ...

    def flush(self) -> Iterator[EncodedFrame]: ...


def make_video_converter(
    stream: av.video.stream.VideoStream, spec: SourceSpec, transcode: bool
) -> VideoConverter:
    """Passthrough for H.264 (unless ``transcode``), an H.264 encoder for anything else."""
    codec = stream.codec_context.name
    if codec == "h264" and spec.kind != "pattern" and not transcode:
        return _H264Passthrough(stream)
    options = spec.option_map
    fps = int(options.get("fps", 0)) or _frame_rate(stream)
    if spec.kind == "pattern":
        label = "test pattern"
    elif codec == "h264":
        label = "h264 with B-frames"
    else:
        label = codec
    return _Transcoder(
        stream,
        source_codec=label,
        kbps=int(options.get("kbps", DEFAULT_TRANSCODE_KBPS)),
        fps=fps,
        gop=int(options.get("gop", 2 * fps)),
    )


def _frame_rate(stream: av.video.stream.VideoStream) -> int:
    rate = stream.average_rate or stream.guessed_rate
    return max(1, min(60, round(float(rate)))) if rate else DEFAULT_FPS


class _H264Passthrough:
    """H.264 in, the same H.264 out: NAL units tidied and packetized, never decoded."""

    def __init__(self, stream: av.video.stream.VideoStream) -> None:
        extradata = stream.codec_context.extradata or b""
        self._stream = stream
        self._bsf: av.bitstream.BitStreamFilterContext | None = None
        if extradata[:1] == b"\x01":
            # AVCC (MP4/MKV): length-prefixed NAL units; RTP needs Annex B start codes.
            self._bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream)
            extradata = b""
        self._normalizer = H264AccessUnitNormalizer(extradata)
        self._clock = _Clock(stream.time_base)
        # Whether a parameter set was seen yet, and whether every one so far forbade B slices.
        self._sps_seen = False
        self._only_baseline_sps = True
        ctx = stream.codec_context
        self.info = SourceInfo("h264", False, ctx.width or 0, ctx.height or 0)

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        packets = self._bsf.filter(packet) if self._bsf is not None else [packet]
        for unit in packets:
            if unit.size == 0:
                continue
            normalized = self._normalizer.normalize(split_annexb(bytes(unit)))
            if normalized is None:
                continue
            nal_units, keyframe = normalized
            if self._may_have_b_slices(nal_units) and any(map(is_b_slice, nal_units)):
                # Browsers show only the keyframes of passed-through H.264 with B-frames.
                raise NeedsTranscoding("the H.264 has B-frames")
            yield _frame(nal_units, self._clock.ticks(unit), keyframe)

    def _may_have_b_slices(self, nal_units: list[bytes]) -> bool:
        """False once the source's parameter sets all say Baseline, which has no B slices.

        Saves reading every slice header of such a source (most cameras): a profile that
        allows B slices, or none seen yet, and every slice header is read as before.
        """
        for nal in nal_units:
            if nal_type(nal) == NAL_SPS:
                self._sps_seen = True
                self._only_baseline_sps = self._only_baseline_sps and sps_forbids_b_slices(nal)
        return not (self._sps_seen and self._only_baseline_sps)

    def flush(self) -> Iterator[EncodedFrame]:
        if self._bsf is not None:
            for unit in self._bsf.filter(None):
                yield from self.convert(unit)


class _Transcoder:
    """Anything else to H.264 (baseline, no B-frames, IDR every ``gop`` frames), once per source."""

    def __init__(
        self,
        stream: av.video.stream.VideoStream,
        *,
        source_codec: str,
        kbps: int,
        fps: int,
        gop: int,
    ) -> None:
        ctx = stream.codec_context
        self._stream = stream
        self._width = (ctx.width or 640) // 2 * 2
        self._height = (ctx.height or 360) // 2 * 2
        self._encoder = _open_h264_encoder(self._width, self._height, kbps=kbps, fps=fps, gop=gop)
        self._normalizer = H264AccessUnitNormalizer()
        self._clock = _Clock(stream.time_base)
        self._last_ticks = -1
        self.info = SourceInfo(source_codec, True, self._width, self._height)

    def convert(self, packet: av.Packet[Any]) -> Iterator[EncodedFrame]:
        for picture in packet.decode():
            ticks = self._clock.ticks_of(picture.pts, picture.time_base)
            if ticks <= self._last_ticks:
                continue  # a duplicate or out-of-order picture would make time go backwards
            self._last_ticks = ticks
            yield from self._encode(picture, ticks)

    def flush(self) -> Iterator[EncodedFrame]:
        yield from self._emit(self._encoder.encode(None))

    def _encode(self, picture: av.VideoFrame, ticks: int) -> Iterator[EncodedFrame]:
        image = picture.reformat(width=self._width, height=self._height, format="yuv420p")
        image.pts = ticks
        image.time_base = Fraction(1, VIDEO_CLOCK_RATE)
        # Decoders mark pictures I/P/B; passed on, that would force x264's frame types.
        image.pict_type = av.video.frame.PictureType.NONE
        yield from self._emit(self._encoder.encode(image))

    def _emit(self, packets: list[av.Packet[Any]]) -> Iterator[EncodedFrame]:
        for packet in packets:
            normalized = self._normalizer.normalize(split_annexb(bytes(packet)))
            if normalized is not None:
                nal_units, keyframe = normalized
                yield _frame(nal_units, int(packet.pts or 0), keyframe)


def _open_h264_encoder(width: int, height: int, *, kbps: int, fps: int, gop: int) -> Any:
    encoder = av.CodecContext.create("libx264", "w")
    encoder.width = width
    encoder.height = height
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, VIDEO_CLOCK_RATE)
    encoder.framerate = Fraction(fps, 1)
    encoder.bit_rate = kbps * 1000
    encoder.gop_size = gop
    encoder.options = {
        "preset": "ultrafast",
        "tune": "zerolatency",  # no lookahead, no B-frames: one frame in, one frame out
        "profile": "baseline",
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0",
    }
    encoder.open()
    return encoder


class _Clock:
    """Source timestamps to 90 kHz ticks, tolerating packets without pts (some RTSP cameras)."""

    def __init__(self, time_base: Fraction | None) -> None:
        self._time_base = time_base or Fraction(1, VIDEO_CLOCK_RATE)
        self._last: int | None = None

    def ticks(self, packet: av.Packet[Any]) -> int:
        value = packet.pts if packet.pts is not None else packet.dts
        if value is None:
            # FFmpeg's RTSP demuxer leaves the very first packet (a keyframe) without pts.
            ticks = 0 if self._last is None else self._last + VIDEO_CLOCK_RATE // DEFAULT_FPS
        else:
            ticks = self.ticks_of(value, packet.time_base)
        self._last = ticks
        return ticks

    def ticks_of(self, value: int | None, time_base: Fraction | None) -> int:
        if value is None:
            return (self._last or 0) + VIDEO_CLOCK_RATE // DEFAULT_FPS
        return scale_timestamp(value, time_base or self._time_base, VIDEO_CLOCK_RATE)


def _frame(nal_units: list[bytes], ticks: int, keyframe: bool) -> EncodedFrame:
    return EncodedFrame(
        kind="video",
        timestamp=ticks,
        keyframe=keyframe,
        payloads=tuple(packetize_h264(nal_units)),
        size=sum(len(nal) for nal in nal_units),
    )
