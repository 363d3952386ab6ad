"""What the reader thread runs: open a source with PyAV and demux it into frames.

Runs in the reader thread (PyAV blocks, with FFmpeg's open and read timeouts), no Trio here:
frames leave through ``deliver`` (see ``reader.py``).
"""

from __future__ import annotations

import dataclasses

import av
import av.container

from ...config import MediaConfig, SourceSpec, StreamConfig
from ...errors import SourceAccessDenied, SourceError
from ...redact import redact_text
from ..source_contract import describe_source
from .audio import make_audio_converter
from .reader import Deliver, ReaderThread
from .rtsp import RtspTransportMemory, open_rtsp, rtsp_status_reason
from .timeline import DEFAULT_FPS
from .video import make_video_converter


def read_source(
    config: StreamConfig,
    media: MediaConfig,
    deliver: Deliver,
    *,
    transcode: bool,
    reader: ReaderThread,
    rtsp_memory: RtspTransportMemory,
) -> None:
    """Read until the source ends or ``reader.stop`` is set, handing what it finds (a
    SourceInfo, then frames) to ``deliver``.

    Raises:
        SourceError: the source could not be opened, or reading it failed.
        NeedsTranscoding: its H.264 has to be transcoded (the next attempt does).
    """
    spec = config.source
    stop = reader.stop
    rtsp_transport: str | None = None
    try:
        if spec.kind == "rtsp":
            container, rtsp_transport = open_rtsp(
                config, media, rtsp_memory, stop=stop, label=reader.label
            )
        else:
            container = _open(config, media)
    except av.FFmpegError as exc:
        reason = ffmpeg_reason(exc, f"no answer within {media.open_timeout:g} s", spec)
        denied = isinstance(exc, av.error.HTTPUnauthorizedError | av.error.HTTPForbiddenError)
        error = SourceAccessDenied if spec.kind == "rtsp" and denied else SourceError
        raise error(f"cannot open {describe_source(spec)}: {reason}") from None
    try:
        if not container.streams.video:
            raise SourceError(f"{describe_source(spec)} has no video track")
        video = container.streams.video[0]
        converter = make_video_converter(video, spec, transcode)
        audio = container.streams.audio[0] if config.audio and container.streams.audio else None
        audio_converter = make_audio_converter(audio) if audio is not None else None
        info = dataclasses.replace(converter.info, rtsp_transport=rtsp_transport)
        if audio_converter is not None:
            info = dataclasses.replace(
                info,
                audio_codec=audio_converter.rtp_codec,
                audio_clock_rate=audio_converter.clock_rate,
                audio_source_codec=audio_converter.source_codec,
                audio_transcoded=audio_converter.transcoded,
                source_audio_config=audio_converter.source_config,
                source_audio_clock_rate=audio_converter.source_clock_rate,
                source_audio_channels=audio_converter.source_channels,
            )
        deliver(info)
        streams = [video] if audio_converter is None else [video, audio]
        for packet in container.demux(*streams):
            if stop.is_set():
                return
            if packet.stream.index == video.index:
                frames = converter.convert(packet)
            else:
                assert audio_converter is not None  # only its stream is demuxed besides video
                frames = audio_converter.convert(packet)
            for frame in frames:
                deliver(frame)
        for frame in converter.flush():
            deliver(frame)
    except av.FFmpegError as exc:
        reason = ffmpeg_reason(exc, f"no data for {media.read_timeout:g} s (stalled)", spec)
        raise SourceError(f"reading {describe_source(spec)} failed: {reason}") from None
    finally:
        container.close()


def _open(config: StreamConfig, media: MediaConfig) -> av.container.InputContainer:
    """Open a file or a test pattern (RTSP cameras: :func:`rtsp.open_rtsp`)."""
    spec = config.source
    timeouts = (media.open_timeout, media.read_timeout)
    if spec.kind == "pattern":
        opts = spec.option_map
        size, fps = opts.get("size", "640x360"), opts.get("fps", DEFAULT_FPS)
        graph = f"{spec.location}=size={size}:rate={fps}"
        return av.open(graph, "r", format="lavfi", timeout=timeouts)
    return av.open(spec.location, "r", timeout=timeouts)


def ffmpeg_reason(exc: av.FFmpegError, timed_out: str, spec: SourceSpec) -> str:
    """What went wrong, for logs and the API: ``timed_out`` for FFmpeg's timeouts, the
    meaning of a camera's RTSP answer, else FFmpeg's message without the URL."""
    if isinstance(exc, av.ExitError):
        return timed_out  # PyAV's timeout interrupts FFmpeg, which reports an "exit"
    if spec.kind == "rtsp":
        reason = rtsp_status_reason(exc, spec)
        if reason is not None:
            return reason
    # FFmpeg errors carry the URL as ``filename``: leave it out, credentials and all.
    return redact_text(exc.strerror or type(exc).__name__)
