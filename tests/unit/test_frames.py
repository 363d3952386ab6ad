"""H.264 bitstream handling: splitting, and keyframes a late joiner can decode."""

from __future__ import annotations

from fractions import Fraction

import pytest

from mediastream.media.frames import (
    H264AccessUnitNormalizer,
    is_b_slice,
    join_annexb,
    nal_type,
    split_annexb,
    sps_forbids_b_slices,
)

SPS = bytes([0x67, 0x42, 0xC0, 0x1E, 0x95])
PPS = bytes([0x68, 0xCE, 0x3C, 0x80])
AUD = bytes([0x09, 0x10])
IDR = bytes([0x65, 0x88, 0x84, 0x21])
SLICE = bytes([0x41, 0x9A, 0x02, 0x11])
SEI = bytes([0x06, 0x05, 0x01, 0x80])


def types(units: list[bytes]) -> list[int]:
    return [nal_type(u) for u in units]


def test_split_handles_three_and_four_byte_start_codes() -> None:
    data = b"\x00\x00\x00\x01" + SPS + b"\x00\x00\x01" + PPS + b"\x00\x00\x00\x01" + IDR
    assert split_annexb(data) == [SPS, PPS, IDR]


def test_split_drops_trailing_zero_padding() -> None:
    assert split_annexb(b"\x00\x00\x01" + IDR + b"\x00\x00") == [IDR]


def test_split_of_garbage_without_start_code_is_empty() -> None:
    assert split_annexb(b"\x12\x34\x56") == []


def test_join_then_split_round_trips() -> None:
    assert split_annexb(join_annexb([SPS, PPS, IDR])) == [SPS, PPS, IDR]


def test_idr_without_parameter_sets_gets_those_seen_before() -> None:
    normalizer = H264AccessUnitNormalizer()
    assert normalizer.normalize([AUD, SPS, PPS, IDR]) == ([SPS, PPS, IDR], True)
    assert normalizer.normalize([AUD, SLICE]) == ([SLICE], False)
    # The camera sends the next IDR bare: a late joiner starting there needs SPS/PPS.
    assert normalizer.normalize([AUD, IDR]) == ([SPS, PPS, IDR], True)


def test_parameter_sets_from_extradata_are_used() -> None:
    normalizer = H264AccessUnitNormalizer(join_annexb([SPS, PPS]))
    units, keyframe = normalizer.normalize([IDR]) or ([], False)
    assert types(units) == [7, 8, 5] and keyframe


def test_idr_with_no_parameter_sets_anywhere_is_not_a_usable_keyframe() -> None:
    assert H264AccessUnitNormalizer().normalize([IDR]) == ([IDR], False)


def test_header_only_packets_are_merged_into_the_next_picture() -> None:
    normalizer = H264AccessUnitNormalizer()
    assert normalizer.normalize([SPS, PPS]) is None
    assert normalizer.normalize([SEI]) is None
    assert normalizer.normalize([IDR]) == ([SPS, PPS, SEI, IDR], True)


def test_held_back_headers_are_bounded() -> None:
    normalizer = H264AccessUnitNormalizer()
    for _ in range(100):
        assert normalizer.normalize([SEI]) is None
    units, _ = normalizer.normalize([SLICE]) or ([], False)
    assert len(units) <= 9


def _encoded_slices(options: dict[str, str]) -> list[bytes]:
    import av

    from mediastream.media.frames import split_annexb

    encoder = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = 320, 180, "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.options = options
    units: list[bytes] = []
    with av.open("testsrc2=size=320x180:rate=25", format="lavfi") as pattern:
        for index, picture in enumerate(pattern.decode(video=0)):
            if index == 30:
                break
            picture = picture.reformat(format="yuv420p")
            picture.pts, picture.pict_type = index, av.video.frame.PictureType.NONE
            units += [bytes(p) for p in encoder.encode(picture)]
    units += [bytes(p) for p in encoder.encode(None)]
    return [nal for unit in units for nal in split_annexb(unit)]


def test_b_slices_are_recognised_from_the_slice_header() -> None:
    with_b = _encoded_slices({"preset": "veryfast", "bf": "2", "b_strategy": "0"})
    without_b = _encoded_slices({"preset": "ultrafast", "tune": "zerolatency"})
    assert sum(map(is_b_slice, with_b)) >= 10
    assert not any(map(is_b_slice, without_b))
    assert not is_b_slice(SPS) and not is_b_slice(b"\x41")


def test_only_a_baseline_sps_rules_out_b_slices() -> None:
    # The parameter sets of real encodes: with B-frames; without, in a profile that allows
    # them; and baseline (x264's ultrafast picks it: no CABAC, no B-frames).
    with_b = _encoded_slices({"preset": "veryfast", "bf": "2", "b_strategy": "0"})
    high = _encoded_slices({"preset": "veryfast", "tune": "zerolatency"})
    baseline = _encoded_slices({"preset": "ultrafast", "tune": "zerolatency"})

    def sps_of(units: list[bytes]) -> bytes:
        return next(unit for unit in units if nal_type(unit) == 7)

    assert not any(map(is_b_slice, high))
    assert not sps_forbids_b_slices(sps_of(with_b))
    assert not sps_forbids_b_slices(sps_of(high))  # no B-frames, but its profile allows them
    assert sps_forbids_b_slices(sps_of(baseline))
    assert sps_forbids_b_slices(SPS)  # 0x42 = 66, constrained baseline
    assert not sps_forbids_b_slices(b"\x67")


MAIN_SPS = bytes([0x67, 0x4D, 0x40, 0x1E, 0x95])  # profile_idc 77: B slices allowed
#: A slice header saying first_mb_in_slice 0, slice_type 1 (B): bits 1 010...
B_SLICE = bytes([0x01, 0xA8, 0x00, 0x80])


def _passthrough() -> object:
    from types import SimpleNamespace

    from mediastream.config import parse_source
    from mediastream.media.sources.video import make_video_converter

    context = SimpleNamespace(name="h264", extradata=None, width=640, height=360)
    stream = SimpleNamespace(codec_context=context, time_base=Fraction(1, 90_000))
    return make_video_converter(stream, parse_source("rtsp://cam/1", key="source"), False)  # type: ignore[arg-type]


def _convert(converter: object, number: int, nal_units: list[bytes]) -> list[object]:
    import av

    packet = av.Packet(join_annexb(nal_units))
    packet.pts, packet.time_base = number * 3600, Fraction(1, 90_000)
    return list(converter.convert(packet))  # type: ignore[attr-defined]


def test_b_slices_go_unread_only_while_every_sps_was_baseline() -> None:
    from mediastream.media.sources.reader import NeedsTranscoding

    converter = _passthrough()
    assert is_b_slice(B_SLICE)
    assert len(_convert(converter, 0, [SPS, PPS, IDR])) == 1
    # Baseline has no B slices: this header is not read (a real Baseline stream has none).
    assert len(_convert(converter, 1, [B_SLICE])) == 1
    # The camera switches to Main: from now on every slice header is read again.
    assert len(_convert(converter, 2, [MAIN_SPS, PPS, IDR])) == 1
    with pytest.raises(NeedsTranscoding, match="B-frames"):
        _convert(converter, 3, [B_SLICE])


def test_b_slices_are_looked_for_before_any_sps_is_seen() -> None:
    from mediastream.media.sources.reader import NeedsTranscoding

    with pytest.raises(NeedsTranscoding, match="B-frames"):
        _convert(_passthrough(), 0, [B_SLICE])
