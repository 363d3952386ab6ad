"""A still picture of a stream: one keyframe decoded and encoded as JPEG, nothing continuous.

The keyframe comes from the fan-out's GOP cache (the stream is running) or is the first one a
just-started source publishes. Decoding happens only when someone asks, in a worker thread, and
the JPEG is kept until the next keyframe replaces it.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
from aiortc.codecs.h264 import H264PayloadDescriptor

from .frames import EncodedFrame


class SnapshotError(Exception):
    """The keyframe could not be decoded."""


def jpeg_from_keyframe(frame: EncodedFrame, quality: int = 5) -> tuple[bytes, int, int]:
    """Decode one H.264 keyframe and encode it as JPEG; returns (jpeg, width, height).

    Args:
        quality: FFmpeg's MJPEG scale, 2 (best) to 31.

    Raises:
        SnapshotError: the frame did not decode to a picture.

    Blocking: run it in a worker thread.
    """
    annexb = b"".join(H264PayloadDescriptor.parse(payload)[1] for payload in frame.payloads)
    decoder = av.CodecContext.create("h264", "r")
    try:
        pictures = decoder.decode(av.Packet(annexb)) + decoder.decode(None)
    except av.FFmpegError as exc:
        raise SnapshotError(f"the keyframe did not decode: {exc}") from None
    if not pictures:
        raise SnapshotError("the keyframe did not decode to a picture")
    picture: Any = pictures[0]
    encoder: Any = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height = picture.width, picture.height
    encoder.pix_fmt = "yuvj420p"
    encoder.time_base = Fraction(1, 25)
    encoder.qmin = encoder.qmax = quality
    packets = encoder.encode(picture.reformat(format="yuvj420p")) + encoder.encode(None)
    return b"".join(bytes(p) for p in packets), picture.width, picture.height
