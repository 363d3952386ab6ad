"""Reading H.264 straight from a source with PyAV, to compare with what a viewer received; and
checking a viewer's access units for a P-frame whose predecessor never arrived."""

from __future__ import annotations

import time

import av

from mediastream.media.frames import NAL_IDR, NAL_SLICE, NAL_SPS, _BitReader, nal_type, split_annexb

VCL_TYPES = {1, 5}
#: profile_idc values whose SPS carries chroma and bit depth fields before log2_max_frame_num
HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


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


def frame_num_breaks(access_units: list[bytes]) -> int:
    """P-frames whose frame_num does not follow the previous frame's (x264 makes every
    frame a reference frame, so frame_num goes up by one from each IDR): a frame lost on the
    way, or a resume that did not wait for a keyframe."""
    log2_max = None
    previous = None
    breaks = 0
    for unit in access_units:
        nal_units = split_annexb(unit)
        for nal in nal_units:
            if nal_type(nal) == NAL_SPS:
                reader = _BitReader(nal[4:].replace(b"\x00\x00\x03", b"\x00\x00"))
                reader.unsigned_exp_golomb()  # seq_parameter_set_id
                if nal[1] in HIGH_PROFILES:
                    if reader.unsigned_exp_golomb() == 3:  # chroma_format_idc
                        reader.bit()  # separate_colour_plane_flag
                    reader.unsigned_exp_golomb()  # bit_depth_luma_minus8
                    reader.unsigned_exp_golomb()  # bit_depth_chroma_minus8
                    reader.bit()  # qpprime_y_zero_transform_bypass_flag
                    assert not reader.bit(), "scaling matrices are not read here"
                log2_max = reader.unsigned_exp_golomb() + 4
        slice_nal = next((n for n in nal_units if nal_type(n) in (NAL_SLICE, NAL_IDR)), None)
        if slice_nal is None or log2_max is None:
            continue
        reader = _BitReader(slice_nal[1:32].replace(b"\x00\x00\x03", b"\x00\x00"))
        reader.unsigned_exp_golomb()  # first_mb_in_slice
        reader.unsigned_exp_golomb()  # slice_type
        reader.unsigned_exp_golomb()  # pic_parameter_set_id
        frame_num = reader.bits(log2_max)
        follows = previous is None or frame_num == (previous + 1) % (1 << log2_max)
        if nal_type(slice_nal) == NAL_SLICE and not follows:
            breaks += 1
        previous = frame_num
    return breaks
