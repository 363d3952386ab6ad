"""fMP4 for the socket fallback: real libx264 frames, packetized as sources do, remuxed by hand
and opened again by FFmpeg (PyAV), which decodes every frame at the right size."""

from __future__ import annotations

import dataclasses
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

from mediastream.fallback import BinaryKind, frame_binary, parse_binary
from mediastream.media.fmp4 import (
    AudioTrack,
    Fmp4Error,
    Fmp4Remuxer,
    decode_time,
    depacketize_h264,
    end_time,
    init_segment,
    media_fragment,
    shift_decode_time,
)
from mediastream.media.frames import (
    VIDEO_CLOCK_RATE,
    EncodedFrame,
    H264AccessUnitNormalizer,
    split_annexb,
    sps_picture_size,
)
from mediastream.webrtc.aiortc_compat import packetize_h264

WIDTH, HEIGHT = 320, 180


def encoded_frames(count: int, gop: int = 10) -> list[EncodedFrame]:
    """``count`` frames of a moving test picture from libx264, as a source publishes them."""
    encoder: Any = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height, encoder.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    encoder.time_base = Fraction(1, 25)
    encoder.gop_size = gop
    encoder.options = {"tune": "zerolatency", "preset": "ultrafast", "bframes": "0"}
    normalizer = H264AccessUnitNormalizer()
    frames: list[EncodedFrame] = []
    for index in range(count):
        picture = av.VideoFrame(WIDTH, HEIGHT, "yuv420p")
        for plane in picture.planes:
            plane.update(bytes([(index * 7 + 16) % 256]) * plane.buffer_size)
        picture.pts = index
        for packet in encoder.encode(picture):
            normalized = normalizer.normalize(split_annexb(bytes(packet)))
            assert normalized is not None
            nal_units, keyframe = normalized
            frames.append(
                EncodedFrame(
                    kind="video",
                    timestamp=len(frames) * VIDEO_CLOCK_RATE // 25,
                    keyframe=keyframe,
                    payloads=tuple(packetize_h264(nal_units)),
                    size=sum(map(len, nal_units)),
                )
            )
    return frames


def decode_file(path: Path) -> list[Any]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        return list(container.decode(stream))


def test_init_and_fragments_decode_as_the_frames_that_went_in(tmp_path: Path) -> None:
    frames = encoded_frames(30)
    assert frames[0].keyframe
    remuxer = Fmp4Remuxer()
    init = remuxer.init_for(frames[0], WIDTH, HEIGHT)
    assert init.codec.startswith("avc1.")
    path = tmp_path / "out.mp4"
    path.write_bytes(init.data + b"".join(remuxer.fragment(frame) for frame in frames))
    pictures = decode_file(path)
    assert len(pictures) == 30
    assert {(p.width, p.height) for p in pictures} == {(WIDTH, HEIGHT)}
    # Timestamps survive: the fragments' tfdt is the frame's 90 kHz timestamp.
    assert [p.pts for p in pictures[:3]] == [f.timestamp for f in frames[:3]]


def test_a_viewer_joining_at_a_later_keyframe_decodes_from_there(tmp_path: Path) -> None:
    frames = encoded_frames(25, gop=10)
    remuxer = Fmp4Remuxer()
    for frame in frames[:10]:
        remuxer.fragment(frame)  # another viewer's earlier frames
    assert frames[10].keyframe
    path = tmp_path / "late.mp4"
    init = remuxer.init_for(frames[10], WIDTH, HEIGHT)
    path.write_bytes(init.data + b"".join(remuxer.fragment(f) for f in frames[10:]))
    assert len(decode_file(path)) == 15


def test_each_fragment_is_built_once_for_all_viewers() -> None:
    frames = encoded_frames(5)
    remuxer = Fmp4Remuxer()
    first = [remuxer.fragment(frame) for frame in frames]
    second = [remuxer.fragment(frame) for frame in frames]
    assert first == second and all(a is b for a, b in zip(first, second, strict=True))
    assert remuxer.fragments_built == 5


def test_the_fragment_cache_is_bounded() -> None:
    frames = encoded_frames(6)
    remuxer = Fmp4Remuxer(max_cached=2)
    for frame in frames:
        remuxer.fragment(frame)
    remuxer.fragment(frames[0])  # evicted: built again
    assert remuxer.fragments_built == 7


def test_the_init_segment_changes_only_with_the_parameter_sets() -> None:
    frames = encoded_frames(21, gop=10)
    remuxer = Fmp4Remuxer()
    first = remuxer.init_for(frames[0], WIDTH, HEIGHT)
    assert remuxer.init_for(frames[10], WIDTH, HEIGHT) is first
    # The size is the SPS's: a source's figure that disagrees does not count.
    assert remuxer.init_for(frames[20], WIDTH * 2, HEIGHT) is first
    nal_units = [
        b"\x68\xce\x3c\x80" if n[0] & 0x1F == 8 else n  # another PPS
        for n in depacketize_h264(frames[20].payloads)
    ]
    changed = dataclasses.replace(frames[20], payloads=tuple(packetize_h264(nal_units)))
    assert remuxer.init_for(changed, WIDTH, HEIGHT) is not first


def test_a_fragment_moved_in_time_decodes_at_its_new_time_and_the_shared_one_is_kept(
    tmp_path: Path,
) -> None:
    frames = encoded_frames(10)
    remuxer = Fmp4Remuxer()
    init = remuxer.init_for(frames[0], WIDTH, HEIGHT)
    shared = [remuxer.fragment(frame) for frame in frames]
    moved = [shift_decode_time(fragment, 90_000) for fragment in shared]
    assert [decode_time(f) for f in moved] == [f.timestamp + 90_000 for f in frames]
    assert [decode_time(f) for f in shared] == [f.timestamp for f in frames]  # not touched
    # Each sample ends where the next begins: a fragment placed at end_time continues it.
    assert [end_time(f) for f in moved[:-1]] == [decode_time(f) for f in moved[1:]]
    path = tmp_path / "moved.mp4"
    path.write_bytes(init.data + b"".join(moved))
    pictures = decode_file(path)
    assert [p.pts for p in pictures[:2]] == [f.timestamp + 90_000 for f in frames[:2]]
    with pytest.raises(Fmp4Error, match="falls before 0"):
        shift_decode_time(shared[0], -1)
    with pytest.raises(Fmp4Error, match="no tfdt"):
        shift_decode_time(init.data, 1)


def test_an_old_frame_built_late_does_not_stretch_the_next_frames_duration() -> None:
    frames = encoded_frames(30)
    remuxer = Fmp4Remuxer(max_cached=4)
    for frame in frames:
        remuxer.fragment(frame)
    remuxer.fragment(frames[0])  # a viewer moved here starts with the cached GOP: built again
    newer = dataclasses.replace(frames[-1], timestamp=frames[-1].timestamp + 3600)
    fragment = remuxer.fragment(newer)
    trun = fragment.index(b"trun")
    (duration,) = struct.unpack_from("!I", fragment, trun + 4 + 4 + 4 + 4)
    assert duration == 3600  # not a second (the gap from frame 0)


def test_a_fragment_is_a_moof_then_an_mdat_whose_offset_points_at_the_sample() -> None:
    frame = encoded_frames(1)[0]
    data = media_fragment(frame, sequence=7, duration=3600)
    moof_size, moof_type = struct.unpack_from("!I4s", data, 0)
    assert moof_type == b"moof"
    assert data[moof_size + 4 : moof_size + 8] == b"mdat"
    trun = data.index(b"trun")
    (data_offset,) = struct.unpack_from("!i", data, trun + 4 + 4 + 4)
    assert data_offset == moof_size + 8
    (first_nal_length,) = struct.unpack_from("!I", data, data_offset)
    assert 0 < first_nal_length < len(data)


def test_depacketizing_undoes_single_stap_a_and_fu_a_packetization() -> None:
    small = [b"\x67" + bytes(10), b"\x68" + bytes(4)]
    large = b"\x65" + bytes(range(256)) * 20  # larger than one RTP payload: FU-A
    nal_units = [*small, large]
    assert depacketize_h264(packetize_h264(nal_units)) == nal_units


@pytest.mark.parametrize(
    ("payloads", "message"),
    [
        ([b""], "empty RTP payload"),
        ([b"\x7c\x05abc"], "FU-A continuation without its start"),
        ([b"\x7c\x85abc"], "FU-A without its end"),
        ([b"\x18\x00\x09ab"], "STAP-A unit overruns"),
        ([b"\x1d\x00"], "NAL type 29 is not supported"),
    ],
)
def test_bad_payloads_are_named(payloads: list[bytes], message: str) -> None:
    with pytest.raises(Fmp4Error, match=message):
        depacketize_h264(payloads)


def test_a_frame_without_a_picture_or_an_sps_is_refused() -> None:
    with pytest.raises(Fmp4Error, match="SPS shorter"):
        init_segment(b"\x67", b"\x68", WIDTH, HEIGHT)
    headers_only = EncodedFrame("video", 0, False, (b"\x67" + bytes(4),), 5)
    with pytest.raises(Fmp4Error, match="without a picture"):
        media_fragment(headers_only, 1, 3600)
    with pytest.raises(Fmp4Error, match="without SPS and PPS"):
        Fmp4Remuxer().init_for(headers_only, WIDTH, HEIGHT)


def encoded_audio(codec: str, seconds: float) -> tuple[AudioTrack, list[EncodedFrame]]:
    """``seconds`` of a 440 Hz tone encoded by FFmpeg (libopus at 48 kHz, or its AAC-LC
    encoder at 44.1 kHz), as audio frames on their clock (as a source publishes them)."""
    rate = 48000 if codec == "opus" else 44100
    encoder: Any = av.CodecContext.create("libopus" if codec == "opus" else "aac", "w")
    encoder.sample_rate, encoder.layout = rate, "stereo"
    encoder.format = av.AudioFormat("s16" if codec == "opus" else "fltp")
    encoder.time_base = Fraction(1, rate)
    encoder.open()
    size = 960 if codec == "opus" else 1024
    frames: list[EncodedFrame] = []
    first: int | None = None  # the encoder's priming starts before 0; timelines start at 0
    for index in range(int(seconds * rate / size)):
        samples = av.AudioFrame(encoder.format.name, "stereo", size)
        samples.sample_rate, samples.pts = rate, index * size
        for plane in samples.planes:
            plane.update(bytes(plane.buffer_size))
        for packet in encoder.encode(samples):
            first = int(packet.pts) if first is None else first
            timestamp = int(packet.pts) - first
            frames.append(EncodedFrame("audio", timestamp, True, (bytes(packet),), packet.size))
    track = AudioTrack(codec, rate, 2, bytes(encoder.extradata or b""))
    return track, frames


@pytest.mark.parametrize(("codec", "mse_codec"), [("opus", "opus"), ("aac", "mp4a.40.2")])
def test_an_audio_track_goes_in_beside_the_video_and_both_decode(
    tmp_path: Path, codec: str, mse_codec: str
) -> None:
    video = encoded_frames(50)  # two seconds
    track, audio = encoded_audio(codec, 2.0)
    remuxer = Fmp4Remuxer()
    init = remuxer.init_for(video[0], WIDTH, HEIGHT, track)
    assert init.codecs == f"{init.codec},{mse_codec}"
    assert remuxer.init_for(video[0], WIDTH, HEIGHT) is not init  # the video-only variant
    assert remuxer.init_for(video[0], WIDTH, HEIGHT, track) is init
    # Interleaved by time, as the fan-out delivers them.
    frames = sorted(
        video + audio,
        key=lambda f: f.timestamp / (VIDEO_CLOCK_RATE if f.kind == "video" else track.clock_rate),
    )
    fragments = [remuxer.fragment(f, track.clock_rate) for f in frames]
    path = tmp_path / f"av-{codec}.mp4"
    path.write_bytes(init.data + b"".join(fragments))
    with av.open(str(path)) as container:
        assert [s.codec_context.name for s in container.streams] == ["h264", codec]
        sound = container.streams.audio[0]
        assert sound.codec_context.sample_rate == (48000 if codec == "opus" else 44100)
        assert sound.codec_context.channels == 2
        decoded = list(container.decode(sound))
    assert len(decoded) >= len(audio) - 2  # AAC's first packet primes the decoder
    # On the same timeline as the video: the audio's times are its frames' times.
    assert [f.pts for f in decoded[-3:]] == [f.timestamp for f in audio[-3:]]
    assert len(decode_file(path)) == 50


def test_an_audio_track_that_mse_cannot_take_is_refused_by_name() -> None:
    with pytest.raises(Fmp4Error, match="'PCMU' can't go into fMP4"):
        AudioTrack("PCMU", 8000)
    with pytest.raises(Fmp4Error, match="without its AudioSpecificConfig"):
        AudioTrack("aac", 44100)
    with pytest.raises(Fmp4Error, match="empty audio frame"):
        Fmp4Remuxer().fragment(EncodedFrame("audio", 0, True, (b"",), 0), 48000)


def test_binary_framing_round_trips_and_names_what_is_wrong() -> None:
    message = frame_binary(BinaryKind.FRAGMENT, "cam-é", b"\x00\x01payload")
    assert message[0] == 0x12
    assert parse_binary(message) == (BinaryKind.FRAGMENT, "cam-é", b"\x00\x01payload")
    with pytest.raises(ValueError, match="shorter than its header"):
        parse_binary(b"\x11\x00")
    with pytest.raises(ValueError, match="version 2"):
        parse_binary(b"\x21\x00\x00")
    with pytest.raises(ValueError, match="overruns"):
        parse_binary(b"\x11\x00\x09abc")


@pytest.mark.parametrize(
    ("size", "options"),
    [
        ((320, 180), {}),  # 180 rows: cropped from 192
        ((640, 360), {"profile": "high"}),  # a High profile SPS: chroma format and more first
        ((1280, 720), {"profile": "main"}),
        ((176, 144), {"profile": "high", "x264-params": "cqm=jvt"}),  # scaling matrices
    ],
)
def test_the_picture_size_is_read_from_the_sps(
    size: tuple[int, int], options: dict[str, str]
) -> None:
    encoder: Any = av.CodecContext.create("libx264", "w")
    encoder.width, encoder.height = size
    encoder.pix_fmt, encoder.time_base = "yuv420p", Fraction(1, 25)
    encoder.options = {"preset": "ultrafast", **options}
    picture = av.VideoFrame(*size, "yuv420p")
    picture.pts = 0
    packets = [*encoder.encode(picture), *encoder.encode(None)]
    [sps] = [n for p in packets for n in split_annexb(bytes(p)) if n[0] & 0x1F == 7]
    assert sps_picture_size(sps) == size
    assert sps_picture_size(sps[:3]) is None


def test_an_init_segment_takes_its_size_from_the_sps_when_the_source_gave_none() -> None:
    frames = encoded_frames(1)
    init = Fmp4Remuxer().init_for(frames[0], 0, 0)  # an RTSP camera's SDP without a size
    tkhd = init.data.index(b"tkhd")
    assert struct.unpack_from("!II", init.data, tkhd + 80) == (WIDTH << 16, HEIGHT << 16)
