"""Encoded frames as they travel from a source to every viewer, and the H.264 bitstream rules.

A frame is packetized into RTP payloads **once, where it is read**; every viewer then sends the
same payloads with its own RTP header. Frames are immutable and shared: nobody may change one
after it is built.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

VIDEO_CLOCK_RATE: Final = 90_000  # Hz, the RTP clock of every video codec

NAL_SLICE: Final = 1
NAL_IDR: Final = 5
NAL_SEI: Final = 6
NAL_SPS: Final = 7
NAL_PPS: Final = 8
NAL_AUD: Final = 9
NAL_FILLER: Final = 12
#: profile_idc of H.264's Baseline profile (and Constrained Baseline): "only I and P slice
#: types may be present" (H.264 A.2.1), so such a stream has no B-frames.
PROFILE_IDC_BASELINE: Final = 66
_VCL_TYPES: Final = frozenset(range(1, 6))
#: NAL units the browser does not need: access unit delimiters and filler only cost bandwidth.
_DROPPED_TYPES: Final = frozenset({NAL_AUD, NAL_FILLER})


@dataclass(frozen=True, slots=True)
class EncodedFrame:
    """One encoded frame (a whole H.264 access unit, or one audio frame).

    Attributes:
        kind: ``"video"``, ``"audio"`` (what WebRTC viewers get), or ``"source_audio"``: the
            camera's own audio where viewers get it transcoded (AAC, whose Opus is the
            ``"audio"``), kept for the socket fallback, whose Media Source Extensions take AAC.
        timestamp: presentation time on the stream's continuous timeline, in RTP clock units
            (90 kHz for video; the sample rate for audio); it never goes backwards, even
            across source restarts.
        keyframe: a frame a decoder can start from (an IDR with its parameter sets).
        payloads: the RTP payloads, in order; the last one carries the marker bit.
        size: bytes of media in the frame.
    """

    kind: Literal["video", "audio", "source_audio"]
    timestamp: int
    keyframe: bool
    payloads: tuple[bytes, ...]
    size: int


def split_annexb(data: bytes) -> list[bytes]:
    """Split an Annex B byte stream (start-code delimited) into NAL units, without start codes."""
    nal_units: list[bytes] = []
    start = data.find(b"\x00\x00\x01")
    while start != -1:
        start += 3
        end = data.find(b"\x00\x00\x01", start)
        # A NAL unit never ends in a zero byte (its stop bit comes last), so trailing zeros
        # belong to the next 4-byte start code or to trailing_zero_8bits padding.
        nal = (data[start:] if end == -1 else data[start:end]).rstrip(b"\x00")
        if nal:
            nal_units.append(nal)
        start = end
    return nal_units


def nal_type(nal: bytes) -> int:
    return nal[0] & 0x1F


def is_b_slice(nal: bytes) -> bool:
    """Whether a coded slice NAL unit is a B slice (read from its header, RFC 6184 / H.264 7.3.3).

    Passed through, B-frames reach browsers out of display order and only the keyframes of
    such a stream are shown: these streams must be transcoded.
    """
    if nal_type(nal) not in (NAL_SLICE, NAL_IDR) or len(nal) < 2:
        return False
    reader = _BitReader(nal[1:9].replace(b"\x00\x00\x03", b"\x00\x00"))
    try:
        reader.unsigned_exp_golomb()  # first_mb_in_slice
        slice_type = reader.unsigned_exp_golomb()
    except IndexError:
        return False
    return slice_type % 5 == 1


def sps_forbids_b_slices(sps: bytes) -> bool:
    """Whether a sequence parameter set's profile allows no B slices (Baseline, H.264 A.2.1).

    profile_idc is the byte after the NAL header: an emulation prevention byte can only
    follow two zero bytes, so it is never in the way.
    """
    return len(sps) > 1 and sps[1] == PROFILE_IDC_BASELINE


#: profile_idc values whose SPS carries chroma format and bit depths (H.264 7.3.2.1.1)
_HIGH_PROFILES: Final = frozenset({100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135})


def sps_picture_size(sps: bytes) -> tuple[int, int] | None:
    """The picture's (width, height) in pixels, read from a sequence parameter set NAL unit
    (H.264 7.3.2.1.1 and 7.4.2.1.1, frame cropping applied); None if it can't be read.

    Containers need the size, and a camera's SDP often doesn't give it to FFmpeg.
    """
    if len(sps) < 4 or nal_type(sps) != NAL_SPS:
        return None
    reader = _BitReader(sps[1:].replace(b"\x00\x00\x03", b"\x00\x00"))
    try:
        profile_idc = reader.bits(8)
        reader.bits(16)  # constraint flags, level_idc
        reader.unsigned_exp_golomb()  # seq_parameter_set_id
        chroma_format_idc = 1
        if profile_idc in _HIGH_PROFILES:
            chroma_format_idc = reader.unsigned_exp_golomb()
            if chroma_format_idc == 3:
                reader.bit()  # separate_colour_plane_flag
            reader.unsigned_exp_golomb()  # bit_depth_luma_minus8
            reader.unsigned_exp_golomb()  # bit_depth_chroma_minus8
            reader.bit()  # qpprime_y_zero_transform_bypass_flag
            if reader.bit():  # seq_scaling_matrix_present_flag
                for index in range(8 if chroma_format_idc != 3 else 12):
                    if reader.bit():  # seq_scaling_list_present_flag
                        _skip_scaling_list(reader, 16 if index < 6 else 64)
        reader.unsigned_exp_golomb()  # log2_max_frame_num_minus4
        pic_order_cnt_type = reader.unsigned_exp_golomb()
        if pic_order_cnt_type == 0:
            reader.unsigned_exp_golomb()  # log2_max_pic_order_cnt_lsb_minus4
        elif pic_order_cnt_type == 1:
            reader.bit()  # delta_pic_order_always_zero_flag
            reader.signed_exp_golomb()  # offset_for_non_ref_pic
            reader.signed_exp_golomb()  # offset_for_top_to_bottom_field
            for _ in range(reader.unsigned_exp_golomb()):
                reader.signed_exp_golomb()  # offset_for_ref_frame
        reader.unsigned_exp_golomb()  # max_num_ref_frames
        reader.bit()  # gaps_in_frame_num_value_allowed_flag
        width_in_mbs = reader.unsigned_exp_golomb() + 1
        height_in_map_units = reader.unsigned_exp_golomb() + 1
        frame_mbs_only = reader.bit()
        if not frame_mbs_only:
            reader.bit()  # mb_adaptive_frame_field_flag
        reader.bit()  # direct_8x8_inference_flag
        crop = [0, 0, 0, 0]
        if reader.bit():  # frame_cropping_flag
            crop = [reader.unsigned_exp_golomb() for _ in range(4)]
    except IndexError:
        return None
    # Crop units (Table 6-1): in chroma samples, doubled vertically for field-coded pictures.
    sub_width, sub_height = {1: (2, 2), 2: (2, 1)}.get(chroma_format_idc, (1, 1))
    height_factor = 2 - frame_mbs_only
    width = width_in_mbs * 16 - sub_width * (crop[0] + crop[1])
    height = height_factor * height_in_map_units * 16 - sub_height * height_factor * (
        crop[2] + crop[3]
    )
    return (width, height) if width > 0 and height > 0 else None


def _skip_scaling_list(reader: _BitReader, size: int) -> None:
    last, next_scale = 8, 8
    for _ in range(size):
        if next_scale:
            next_scale = (last + reader.signed_exp_golomb() + 256) % 256
        last = next_scale or last


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def bit(self) -> int:
        byte = self._data[self._position // 8]
        value = (byte >> (7 - self._position % 8)) & 1
        self._position += 1
        return value

    def bits(self, count: int) -> int:
        value = 0
        for _ in range(count):
            value = (value << 1) | self.bit()
        return value

    def signed_exp_golomb(self) -> int:
        code = self.unsigned_exp_golomb()
        return (code + 1) // 2 if code % 2 else -(code // 2)

    def unsigned_exp_golomb(self) -> int:
        zeros = 0
        while self.bit() == 0:
            zeros += 1
            if zeros > 31:
                raise IndexError("not an Exp-Golomb code")
        value = 1
        for _ in range(zeros):
            value = (value << 1) | self.bit()
        return value - 1


def join_annexb(nal_units: Iterable[bytes]) -> bytes:
    return b"".join(b"\x00\x00\x00\x01" + nal for nal in nal_units)


class H264AccessUnitNormalizer:
    """Makes every keyframe self-contained, so a viewer can start decoding from it.

    Cameras often send SPS/PPS only once, or only out of band (RTSP ``sprop-parameter-sets``,
    an MP4 ``avcC`` box). Late joiners then can't decode anything. This keeps the newest
    parameter sets and puts them in front of every IDR that lacks them; it also drops access
    unit delimiters and filler, and merges parameter-set-only packets into the next frame.
    """

    def __init__(self, extradata_annexb: bytes | None = None) -> None:
        self._sps: bytes | None = None
        self._pps: bytes | None = None
        self._pending: list[bytes] = []
        if extradata_annexb:
            self._remember(split_annexb(extradata_annexb))

    def normalize(self, nal_units: Sequence[bytes]) -> tuple[list[bytes], bool] | None:
        """Return ``(nal_units, is_keyframe)`` for one access unit, or ``None`` to wait for more.

        ``None`` means the input held no picture (only parameter sets or SEI); those units are
        kept and prepended to the next picture.
        """
        units = [nal for nal in nal_units if nal and nal_type(nal) not in _DROPPED_TYPES]
        self._remember(units)
        if not any(nal_type(nal) in _VCL_TYPES for nal in units):
            self._pending.extend(units)
            del self._pending[:-8]  # bounded: a source sending only headers can't grow this
            return None
        units = self._pending + units
        self._pending = []
        types = {nal_type(nal) for nal in units}
        keyframe = NAL_IDR in types
        if keyframe:
            prefix = []
            if NAL_SPS not in types and self._sps is not None:
                prefix.append(self._sps)
            if NAL_PPS not in types and self._pps is not None:
                prefix.append(self._pps)
            units = prefix + units
            types = {nal_type(nal) for nal in units}
            keyframe = NAL_SPS in types and NAL_PPS in types
        return units, keyframe

    def _remember(self, units: Iterable[bytes]) -> None:
        for nal in units:
            kind = nal_type(nal)
            if kind == NAL_SPS:
                self._sps = nal
            elif kind == NAL_PPS:
                self._pps = nal
