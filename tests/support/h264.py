"""Reading H.264 straight from a source with PyAV, to compare with what a viewer received."""

from __future__ import annotations

import time

import av

from mediastream.media.frames import nal_type, split_annexb

VCL_TYPES = {1, 5}


def slices_of(access_units: list[bytes]) -> list[bytes]:
    """The picture-carrying NAL units (slices) of Annex B access units."""
    return [
        nal for unit in access_units for nal in split_annexb(unit) if nal_type(nal) in VCL_TYPES
    ]


def file_slices(path: str) -> set[bytes]:
    """Every slice NAL unit of an H.264 file (AVCC converted to Annex B)."""
    units: list[bytes] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", stream)
        for packet in container.demux(stream):
            for out in bsf.filter(packet if packet.size else None):
                units.append(bytes(out))
    return set(slices_of(units))


def rtsp_slices(url: str, seconds: float) -> set[bytes]:
    """Slices read from an RTSP URL for ``seconds`` (blocking: run it in a thread)."""
    units: list[bytes] = []
    deadline = time.monotonic() + seconds
    with av.open(url, options={"rtsp_transport": "tcp"}, timeout=(5, 5)) as container:
        for packet in container.demux(container.streams.video[0]):
            units.append(bytes(packet))
            if time.monotonic() > deadline:
                break
    return set(slices_of(units))
