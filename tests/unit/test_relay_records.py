"""The relay's records: frames and the SourceInfo cross the wire unchanged; malformed or
oversized records are refused with an error saying what was wrong."""

from __future__ import annotations

import json

import pytest
import trio
import trio.testing

from mediastream.cluster.relay import (
    FRAME,
    IDLE,
    MAX_HANDSHAKE_RECORD,
    REBASE_STEP,
    UPSTREAM_SILENCE_LIMIT,
    RecordReader,
    RelayError,
    RelayServer,
    ReplicaStatistics,
    _receive,
    _Resumption,
    decode_frame,
    encode_frame,
    encode_record,
    info_from_json,
    info_to_json,
    relay_key,
)
from mediastream.config import MediaConfig, stream_from_dict
from mediastream.media.frames import EncodedFrame
from mediastream.media.source_contract import SourceInfo
from mediastream.registry import Stream


def test_a_frame_crosses_unchanged() -> None:
    frame = EncodedFrame("video", 2**40 + 7, True, (b"\x7c\x85abc", b"", b"\x7c\x45" * 700), 1407)
    record = encode_frame(frame)
    assert record[4] == FRAME
    assert decode_frame(record[5:]) == frame
    audio = EncodedFrame("source_audio", 960, False, (b"\x21\x10",), 2)
    assert decode_frame(encode_frame(audio)[5:]) == audio


def test_a_truncated_or_padded_frame_is_refused() -> None:
    body = encode_frame(EncodedFrame("video", 1, False, (b"abcdef",), 6))[5:]
    with pytest.raises(RelayError, match="runs past"):
        decode_frame(body[:-2])
    with pytest.raises(RelayError, match="stray bytes"):
        decode_frame(body + b"x")
    with pytest.raises(RelayError, match="malformed"):
        decode_frame(body[:5])


def test_the_source_info_crosses_unchanged() -> None:
    info = SourceInfo(
        "h264", False, 640, 360, audio_codec="opus", audio_clock_rate=48000,
        audio_source_codec="aac", audio_transcoded=True, source_audio_config=b"\x11\x90",
        source_audio_clock_rate=48000, source_audio_channels=2, rtsp_transport="tcp",
    )  # fmt: skip
    assert info_from_json(json.loads(info_to_json(info))) == info
    with pytest.raises(RelayError, match="does not fit"):
        info_from_json({"codec": "h264", "unknown_field": 1})


def test_the_key_is_the_secret_or_derived_from_the_redis_url() -> None:
    assert relay_key("a-long-enough-secret", "redis://x") == b"a-long-enough-secret"
    derived = relay_key("", "redis://:pw@10.0.0.2:6379/0")
    assert derived == relay_key("", "redis://:pw@10.0.0.2:6379/0")
    assert derived != relay_key("", "redis://:other@10.0.0.2:6379/0")


async def test_an_oversized_record_before_the_handshake_is_refused() -> None:
    left, right = trio.testing.memory_stream_pair()
    reader = RecordReader(right, "the peer")
    await left.send_all(encode_record(1, b"x" * MAX_HANDSHAKE_RECORD))
    with pytest.raises(RelayError, match="limit 4096"):
        await reader.read()


async def test_records_split_across_reads_are_put_together() -> None:
    left, right = trio.testing.memory_stream_pair()
    reader = RecordReader(right, "the peer")
    data = encode_record(3, b"hello") + encode_record(4, b"world")
    for byte in data:
        await left.send_all(bytes((byte,)))
    assert await reader.read() == (3, b"hello")
    assert await reader.read() == (4, b"world")
    await left.aclose()
    with pytest.raises(RelayError, match="closed"):
        await reader.read()


def video(timestamp: int, keyframe: bool = False) -> EncodedFrame:
    return EncodedFrame("video", timestamp, keyframe, (b"\x65" if keyframe else b"\x41",), 1)


async def received_by_a_replica(
    frames: list[EncodedFrame], resumption: _Resumption
) -> tuple[list[EncodedFrame], ReplicaStatistics]:
    """What a replica publishes of ``frames`` sent by its owner, after what it published
    before (``resumption``)."""
    stream = Stream(stream_from_dict({"id": "cam", "source": "pattern:testsrc"}), MediaConfig())
    published = stream.fanout.subscribe("video")
    audio = stream.fanout.subscribe("audio")
    owner, replica = trio.testing.memory_stream_pair()
    stats = ReplicaStatistics()
    await owner.send_all(b"".join(encode_frame(frame) for frame in frames))
    await owner.aclose()
    with pytest.raises(RelayError, match="closed"):
        await _receive(RecordReader(replica, "the owner"), stream.quality(), resumption, stats)
    out = []
    for subscriber in (published, audio):
        while (frame := subscriber.get_nowait()) is not None:
            out.append(frame)
    return out, stats


async def test_a_reconnected_replica_resumes_at_a_keyframe_newer_than_what_it_published() -> None:
    resumption = _Resumption(last={"video": 1000})
    sound = EncodedFrame("audio", 50, False, (b"a",), 1)
    frames = [video(900, True), video(940), sound, video(1040), video(1200, True), video(1240)]
    out, stats = await received_by_a_replica(frames, resumption)
    assert [(f.timestamp, f.keyframe) for f in out] == [(1200, True), (1240, False)]
    assert stats.resume_skipped_frames == 3  # the old keyframe and two P-frames
    assert resumption.last == {"video": 1240}


async def test_a_new_owners_timeline_continues_the_replicas() -> None:
    resumption = _Resumption(last={"video": 5000, "audio": 700}, rebase=True)
    sound = EncodedFrame("audio", 10, False, (b"a",), 1)
    frames = [video(10), video(20, True), sound, video(60)]
    out, _ = await received_by_a_replica(frames, resumption)
    assert [(f.kind, f.timestamp) for f in out] == [
        ("video", 5000 + REBASE_STEP),
        ("video", 5000 + REBASE_STEP + 40),
        ("audio", 701),
    ]
    assert not resumption.rebase


async def test_a_second_keyframe_behind_what_was_published_is_another_timeline_continued() -> None:
    # The upstream resent its cached keyframe (passed over), then a keyframe still behind: its
    # timeline went back (it is another source now). Rebased there, never stuck skipping.
    resumption = _Resumption(last={"video": 9000})
    frames = [video(8000, True), video(8040), video(100, True), video(140)]
    out, stats = await received_by_a_replica(frames, resumption)
    assert [(f.timestamp, f.keyframe) for f in out] == [
        (9000 + REBASE_STEP, True),
        (9000 + REBASE_STEP + 40, False),
    ]
    assert stats.resume_skipped_frames == 2


async def test_an_upstream_with_nothing_to_send_says_it_is_alive(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its camera down, the upstream sends IDLE records, so the replica's silence limit only
    ever catches an upstream that is frozen or gone (which sends nothing at all)."""
    stream = Stream(stream_from_dict({"id": "cam", "source": "pattern:testsrc"}), MediaConfig())
    server = RelayServer(b"k" * 32, "node-a", lambda _: stream, lambda _: True)
    upstream, replica = trio.testing.memory_stream_pair()
    reader = RecordReader(replica, "the upstream")
    async with trio.open_nursery() as nursery:
        with stream.open_viewer() as video:
            nursery.start_soon(server._send_frames, upstream, [video])
            with trio.fail_after(UPSTREAM_SILENCE_LIMIT):  # three within the limit
                kinds = [(await reader.read())[0] for _ in range(3)]
            nursery.cancel_scope.cancel()
    assert kinds == [IDLE, IDLE, IDLE]
    # And a replica reading them publishes nothing, and raises nothing, until real silence.
    silent, replica2 = trio.testing.memory_stream_pair()
    await silent.send_all(encode_record(IDLE, b"") * 2)
    with pytest.raises(RelayError, match="sent nothing for 5 s"):
        await _receive(
            RecordReader(replica2, "the upstream"), stream.quality(), _Resumption(),
            ReplicaStatistics(),
        )  # fmt: skip
