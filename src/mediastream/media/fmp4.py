"""Fragmented MP4 (ISO BMFF) for Media Source Extensions: H.264 access units remuxed, never
decoded.

A viewer that can't reach WebRTC gets the stream's video as an *init segment* (``ftyp`` +
``moov`` whose ``avcC`` carries the stream's SPS/PPS) and then one *media fragment* (``moof`` +
``mdat``) per frame, which a browser's ``SourceBuffer`` appends in order.

The boxes are written here by hand (ISO/IEC 14496-12 and 14496-15): an H.264 track needs a
dozen fixed boxes, and a frame's fragment is a pure function of the frame, so one
:class:`Fmp4Remuxer` per stream quality builds each fragment once and every fallback viewer
of it sends the same bytes (a viewer moved from another quality sends a copy whose decode time
is shifted onto its own timeline: :func:`shift_decode_time`).

Audio, where the browser takes it, is a second track (track 2) in the same init segment, its
frames in fragments of their own, on the stream's timeline like the video (the source places
both tracks on one clock; each ``tfdt`` is in its track's timescale):

- Opus as "Encapsulation of Opus in ISO Base Media File Format" (``Opus`` sample entry with a
  ``dOps`` box), codec string ``opus``;
- AAC as ISO/IEC 14496-14 (``mp4a`` sample entry with an ``esds`` box carrying the
  AudioSpecificConfig), codec string ``mp4a.40.<object type>``.

G.711 (PCMU/PCMA) has no codec string Media Source Extensions take in Chromium: such a stream's
fallback is video only.
"""

from __future__ import annotations

import collections
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .frames import NAL_PPS, NAL_SPS, VIDEO_CLOCK_RATE, EncodedFrame, nal_type, sps_picture_size

FU_A: Final = 28
STAP_A: Final = 24
#: fragments kept for reuse by the stream's other fallback viewers (a few GOPs of frames).
FRAGMENT_CACHE_FRAMES: Final = 256
DEFAULT_FRAME_TICKS: Final = VIDEO_CLOCK_RATE // 25  # duration assumed before two frames are seen
TRACK_ID: Final = 1
AUDIO_TRACK_ID: Final = 2
#: sample_flags (ISO/IEC 14496-12 8.8.3.1): a sync sample; and a non-sync one that depends on
#: others.
SYNC_SAMPLE_FLAGS: Final = 0x02000000
NON_SYNC_SAMPLE_FLAGS: Final = 0x01010000


class Fmp4Error(ValueError):
    """A frame could not be remuxed (not H.264 as RFC 6184 packetizes it, or empty audio)."""


#: Audio codecs (as sources publish them, see ``SourceInfo.audio_codec``) that have an MSE
#: codec string, mapped to it; anything else (G.711) stays out of the fallback.
MSE_AUDIO_CODECS: Final = {"opus": "opus", "aac": "mp4a.40.2"}


@dataclass(frozen=True, slots=True)
class AudioTrack:
    """The audio track of an init segment.

    Attributes:
        codec: ``"opus"`` or ``"aac"`` (the keys of :data:`MSE_AUDIO_CODECS`).
        clock_rate: the track's timescale, the clock of its frames' timestamps (48000 for Opus).
        channels: output channels (Opus: 1 or 2).
        config: AAC's AudioSpecificConfig (ISO/IEC 14496-3 1.6.2.1); empty for Opus.
    """

    codec: str
    clock_rate: int
    channels: int = 2
    config: bytes = b""

    def __post_init__(self) -> None:
        if self.codec not in MSE_AUDIO_CODECS:
            raise Fmp4Error(
                f"audio codec {self.codec!r} can't go into fMP4 for Media Source Extensions; "
                f"expected one of {', '.join(MSE_AUDIO_CODECS)}"
            )
        if self.codec == "aac" and len(self.config) < 2:
            raise Fmp4Error("AAC track without its AudioSpecificConfig")
        if self.clock_rate <= 0 or not 1 <= self.channels <= (2 if self.codec == "opus" else 8):
            raise Fmp4Error(f"{self.codec}: bad rate {self.clock_rate} or channels {self.channels}")

    @property
    def mse_codec(self) -> str:
        """The RFC 6381 codec string (``opus``, ``mp4a.40.2``…)."""
        if self.codec == "aac":
            return f"mp4a.40.{self.config[0] >> 3}"  # the audio object type's 5 bits
        return MSE_AUDIO_CODECS[self.codec]


def depacketize_h264(payloads: Iterable[bytes]) -> list[bytes]:
    """The NAL units of one access unit from its RTP payloads (RFC 6184: single NAL unit,
    STAP-A, FU-A), without start codes.

    Raises:
        Fmp4Error: an empty payload, a packetization mode this server never produces, or an
            FU-A that does not start where it should.
    """
    nal_units: list[bytes] = []
    fragmented: bytearray | None = None
    for payload in payloads:
        if not payload:
            raise Fmp4Error("empty RTP payload")
        kind = payload[0] & 0x1F
        if 1 <= kind <= 23:
            nal_units.append(bytes(payload))
        elif kind == STAP_A:
            position = 1
            while position + 2 <= len(payload):
                (size,) = struct.unpack_from("!H", payload, position)
                position += 2
                if size == 0 or position + size > len(payload):
                    raise Fmp4Error("STAP-A unit overruns its payload")
                nal_units.append(bytes(payload[position : position + size]))
                position += size
        elif kind == FU_A:
            if len(payload) < 3:
                raise Fmp4Error("FU-A payload shorter than its headers")
            start, end = payload[1] & 0x80, payload[1] & 0x40
            if start:
                fragmented = bytearray([(payload[0] & 0xE0) | (payload[1] & 0x1F)])
            elif fragmented is None:
                raise Fmp4Error("FU-A continuation without its start")
            fragmented += payload[2:]
            if end:
                nal_units.append(bytes(fragmented))
                fragmented = None
        else:
            raise Fmp4Error(f"RTP payload of NAL type {kind} is not supported")
    if fragmented is not None:
        raise Fmp4Error("FU-A without its end")
    return nal_units


def parameter_sets(frame: EncodedFrame) -> tuple[bytes, bytes] | None:
    """The (SPS, PPS) a keyframe carries (the fan-out's keyframes always carry both)."""
    sps = pps = None
    for nal in depacketize_h264(frame.payloads):
        if nal_type(nal) == NAL_SPS:
            sps = nal
        elif nal_type(nal) == NAL_PPS:
            pps = nal
    return (sps, pps) if sps is not None and pps is not None else None


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack("!I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack("!I", (version << 24) | flags), *parts)


_MATRIX: Final = struct.pack("!9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


@dataclass(frozen=True, slots=True)
class InitSegment:
    """An init segment and what it was made from: the video's parameter sets, and its audio
    track if it has one."""

    data: bytes
    sps: bytes
    pps: bytes
    audio: AudioTrack | None = None

    @property
    def codec(self) -> str:
        """The RFC 6381 codec string for ``MediaSource.isTypeSupported`` (``avc1.PPCCLL``)."""
        return "avc1." + self.sps[1:4].hex()

    @property
    def codecs(self) -> str:
        """Every track's codec string, as a ``codecs=`` parameter lists them."""
        return self.codec if self.audio is None else f"{self.codec},{self.audio.mse_codec}"


def _audio_sample_entry(audio: AudioTrack) -> bytes:
    """``Opus`` + ``dOps``, or ``mp4a`` + ``esds``: an AudioSampleEntry (ISO/IEC 14496-12)."""
    # 48000 for Opus whatever it was encoded from; the rate fits 16.16 fixed point below 65536.
    rate = 48000 if audio.codec == "opus" else audio.clock_rate
    fields = (
        bytes(6)
        + struct.pack("!H", 1)  # data_reference_index
        + bytes(8)
        + struct.pack("!HHHH", audio.channels, 16, 0, 0)  # channelcount, samplesize
        + struct.pack("!I", (rate & 0xFFFF) << 16)
    )
    if audio.codec == "opus":
        # OpusSpecificBox: big endian, unlike Ogg's OpusHead. Pre-skip 0: a live stream joined
        # mid-way has no encoder delay to hide.
        dops = _box(b"dOps", struct.pack("!BBHIhB", 0, audio.channels, 0, audio.clock_rate, 0, 0))
        return _box(b"Opus", fields, dops)
    return _box(b"mp4a", fields, _full_box(b"esds", 0, 0, _es_descriptor(audio.config)))


def _descriptor(tag: int, body: bytes) -> bytes:
    """An MPEG-4 descriptor (ISO/IEC 14496-1 8.3.3): tag, size in 7-bit groups, body."""
    size = len(body)
    encoded = [size & 0x7F]
    size >>= 7
    while size:
        encoded.insert(0, 0x80 | (size & 0x7F))
        size >>= 7
    return bytes([tag, *encoded]) + body


def _es_descriptor(audio_specific_config: bytes) -> bytes:
    decoder_config = _descriptor(
        0x04,  # DecoderConfigDescriptor
        bytes([0x40, 0x15])  # objectTypeIndication: MPEG-4 audio; streamType 5 (audio) << 2 | 1
        + bytes(3)  # bufferSizeDB
        + struct.pack("!II", 0, 0)  # maxBitrate, avgBitrate: unknown
        + _descriptor(0x05, audio_specific_config),  # DecoderSpecificInfo
    )
    sl_config = _descriptor(0x06, b"\x02")  # SLConfigDescriptor: predefined 2 (MP4 files)
    return _descriptor(0x03, struct.pack("!HB", AUDIO_TRACK_ID, 0) + decoder_config + sl_config)


#: a fragmented track's sample tables are empty (the samples are in the fragments), and its
#: data is in this file: the same boxes for the video and the audio track.
_EMPTY_SAMPLE_TABLES: Final = (
    _full_box(b"stts", 0, 0, struct.pack("!I", 0)),
    _full_box(b"stsc", 0, 0, struct.pack("!I", 0)),
    _full_box(b"stsz", 0, 0, struct.pack("!II", 0, 0)),
    _full_box(b"stco", 0, 0, struct.pack("!I", 0)),
)
_DATA_INFORMATION: Final = _box(
    b"dinf", _full_box(b"dref", 0, 0, struct.pack("!I", 1), _full_box(b"url ", 0, 1))
)


def _audio_trak(audio: AudioTrack) -> bytes:
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack("!I", 1), _audio_sample_entry(audio)),
        *_EMPTY_SAMPLE_TABLES,
    )
    minf = _box(
        b"minf",
        _full_box(b"smhd", 0, 0, bytes(4)),
        _DATA_INFORMATION,
        stbl,
    )
    mdia = _box(
        b"mdia",
        _full_box(b"mdhd", 0, 0, struct.pack("!IIIIHH", 0, 0, audio.clock_rate, 0, 0x55C4, 0)),
        _full_box(b"hdlr", 0, 0, bytes(4), b"soun", bytes(12), b"MediaStream\x00"),
        minf,
    )
    tkhd = _full_box(
        b"tkhd",
        0,
        0x3,  # enabled, in movie
        struct.pack("!IIIII", 0, 0, AUDIO_TRACK_ID, 0, 0),
        bytes(8),
        struct.pack("!hhhH", 0, 1, 0x0100, 0),  # layer, alternate group, volume 1.0
        _MATRIX,
        struct.pack("!II", 0, 0),
    )
    return _box(b"trak", tkhd, mdia)


def init_segment(
    sps: bytes, pps: bytes, width: int, height: int, audio: AudioTrack | None = None
) -> InitSegment:
    """``ftyp`` + ``moov`` for one H.264 track at the 90 kHz RTP clock (and ``audio`` as track
    2, at its own clock), for fragments to follow."""
    if len(sps) < 4:
        raise Fmp4Error("SPS shorter than its profile and level")
    avcc = _box(
        b"avcC",
        bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]),  # 4-byte lengths, one SPS
        struct.pack("!H", len(sps)),
        sps,
        b"\x01",
        struct.pack("!H", len(pps)),
        pps,
    )
    avc1 = _box(
        b"avc1",
        bytes(6),
        struct.pack("!H", 1),  # data_reference_index
        bytes(16),
        struct.pack("!HH", width, height),
        struct.pack("!II", 0x00480000, 0x00480000),  # 72 dpi
        bytes(4),
        struct.pack("!H", 1),  # frame_count
        bytes(32),  # compressor name
        struct.pack("!Hh", 0x0018, -1),  # depth, pre_defined
        avcc,
    )
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack("!I", 1), avc1),
        *_EMPTY_SAMPLE_TABLES,
    )
    minf = _box(
        b"minf",
        _full_box(b"vmhd", 0, 1, bytes(8)),
        _DATA_INFORMATION,
        stbl,
    )
    mdia = _box(
        b"mdia",
        _full_box(b"mdhd", 0, 0, struct.pack("!IIIIHH", 0, 0, VIDEO_CLOCK_RATE, 0, 0x55C4, 0)),
        _full_box(b"hdlr", 0, 0, bytes(4), b"vide", bytes(12), b"MediaStream\x00"),
        minf,
    )
    tkhd = _full_box(
        b"tkhd",
        0,
        0x3,  # enabled, in movie
        struct.pack("!IIIII", 0, 0, TRACK_ID, 0, 0),
        bytes(8),
        struct.pack("!hhhH", 0, 0, 0, 0),
        _MATRIX,
        struct.pack("!II", width << 16, height << 16),
    )
    mvhd = _full_box(
        b"mvhd",
        0,
        0,
        struct.pack("!IIII", 0, 0, 1000, 0),
        struct.pack("!IH", 0x10000, 0x0100),
        bytes(10),
        _MATRIX,
        bytes(24),
        struct.pack("!I", (AUDIO_TRACK_ID if audio else TRACK_ID) + 1),  # next_track_ID
    )
    trex = _full_box(b"trex", 0, 0, struct.pack("!IIIII", TRACK_ID, 1, 0, 0, 0))
    traks = [_box(b"trak", tkhd, mdia)]
    if audio is not None:
        traks.append(_audio_trak(audio))
        trex += _full_box(b"trex", 0, 0, struct.pack("!IIIII", AUDIO_TRACK_ID, 1, 0, 0, 0))
    moov = _box(b"moov", mvhd, *traks, _box(b"mvex", trex))
    ftyp = _box(b"ftyp", b"isom", struct.pack("!I", 0x200), b"isom", b"iso6", b"avc1", b"mp41")
    return InitSegment(ftyp + moov, sps, pps, audio)


def media_fragment(frame: EncodedFrame, sequence: int, duration: int) -> bytes:
    """``moof`` + ``mdat`` carrying one access unit (AVCC, parameter sets left to the init).

    Raises:
        Fmp4Error: the frame's payloads are not RFC 6184 H.264.
    """
    nal_units = [
        nal for nal in depacketize_h264(frame.payloads) if nal_type(nal) not in (NAL_SPS, NAL_PPS)
    ]
    if not nal_units:
        raise Fmp4Error("access unit without a picture")
    sample = b"".join(struct.pack("!I", len(nal)) + nal for nal in nal_units)
    flags = SYNC_SAMPLE_FLAGS if frame.keyframe else NON_SYNC_SAMPLE_FLAGS
    return _fragment(TRACK_ID, frame.timestamp, sample, sequence, duration, flags)


def audio_fragment(frame: EncodedFrame, sequence: int, duration: int) -> bytes:
    """``moof`` + ``mdat`` carrying one audio frame (an Opus packet, a raw AAC access unit) on
    track 2; ``frame.timestamp`` and ``duration`` are in the track's clock.

    Raises:
        Fmp4Error: the frame is empty.
    """
    sample = b"".join(frame.payloads)
    if not sample:
        raise Fmp4Error("empty audio frame")
    return _fragment(AUDIO_TRACK_ID, frame.timestamp, sample, sequence, duration, SYNC_SAMPLE_FLAGS)


#: where a fragment's ``tfdt`` decode time (8 bytes) starts: after moof's header, mfhd, traf's
#: header, tfhd and tfdt's own header (the layout :func:`_fragment` writes)
_TFDT_AT: Final = 8 + 16 + 8 + 16 + 12


def decode_time(fragment: bytes) -> int:
    """A fragment's ``tfdt`` (as :func:`media_fragment` and :func:`audio_fragment` build it)."""
    if fragment[_TFDT_AT - 8 : _TFDT_AT - 4] != b"tfdt":
        raise Fmp4Error("not a fragment of this remuxer's layout (no tfdt where expected)")
    (value,) = struct.unpack_from("!Q", fragment, _TFDT_AT)
    return int(value)


def end_time(fragment: bytes) -> int:
    """Where a fragment's one sample ends: its ``tfdt`` plus the sample's duration (in its
    track's clock), which is where the track's next fragment continues it with no gap."""
    start = decode_time(fragment)
    trun = _TFDT_AT + 8
    if fragment[trun + 4 : trun + 8] != b"trun":
        raise Fmp4Error("not a fragment of this remuxer's layout (no trun where expected)")
    # trun: size, type, version and flags, sample_count, data_offset, then the duration
    (duration,) = struct.unpack_from("!I", fragment, trun + 20)
    return start + int(duration)


def shift_decode_time(fragment: bytes, ticks: int) -> bytes:
    """``fragment`` with its ``tfdt`` moved by ``ticks`` (of its track's clock): a copy, as the
    fragment's bytes are shared by the stream's other fallback viewers.

    Raises:
        Fmp4Error: not a fragment this module built, or moved before 0.
    """
    if ticks == 0:
        return fragment
    shifted = decode_time(fragment) + ticks
    if shifted < 0:
        raise Fmp4Error(f"decode time moved by {ticks} ticks falls before 0")
    data = bytearray(fragment)
    struct.pack_into("!Q", data, _TFDT_AT, shifted)
    return bytes(data)


def _fragment(
    track_id: int, decode_time: int, sample: bytes, sequence: int, duration: int, flags: int
) -> bytes:
    def moof(data_offset: int) -> bytes:
        trun = _full_box(
            b"trun",
            0,
            0x000001 | 0x000100 | 0x000200 | 0x000400,  # offset, duration, size, flags
            struct.pack("!Ii", 1, data_offset),
            struct.pack("!III", duration, len(sample), flags),
        )
        traf = _box(
            b"traf",
            _full_box(b"tfhd", 0, 0x020000, struct.pack("!I", track_id)),  # default-base-is-moof
            _full_box(b"tfdt", 1, 0, struct.pack("!Q", decode_time)),
            trun,
        )
        return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack("!I", sequence)), traf)

    size = len(moof(0))
    return moof(size + 8) + _box(b"mdat", sample)


class Fmp4Remuxer:
    """One stream's fMP4: each frame's fragment built once, whatever the number of viewers.

    Viewers ask for fragments of the same shared frames in publish order; the fragment of a
    frame is kept (bounded, oldest first out) for the other viewers. Video and audio frames
    share the fragments' sequence numbers; each track keeps its own last timestamp, from which
    a frame's duration is inferred.
    """

    def __init__(self, max_cached: int = FRAGMENT_CACHE_FRAMES) -> None:
        self._max_cached = max_cached
        #: id(frame) → (frame, fragment); the frame is held so that its id is not reused.
        self._fragments: collections.OrderedDict[int, tuple[EncodedFrame, bytes]] = (
            collections.OrderedDict()
        )
        #: the current init segment with and without audio (viewers may take either)
        self._inits: dict[AudioTrack | None, InitSegment] = {}
        self._init_size: tuple[int, int] | None = None
        self._sequence = 0
        #: per track: the last timestamp seen, and the last duration inferred
        self._last_timestamp: dict[str, int] = {}
        self._last_duration: dict[str, int] = {"video": DEFAULT_FRAME_TICKS}
        self.fragments_built = 0

    def init_for(
        self, keyframe: EncodedFrame, width: int, height: int, audio: AudioTrack | None = None
    ) -> InitSegment:
        """The init segment matching ``keyframe``'s parameter sets (rebuilt when they change),
        with ``audio`` as its second track if given.

        Raises:
            Fmp4Error: the keyframe carries no SPS and PPS.
        """
        sets = parameter_sets(keyframe)
        if sets is None:
            raise Fmp4Error("keyframe without SPS and PPS")
        # The SPS says what the picture is; a source's own figures may be missing (0x0 from
        # an RTSP camera whose SDP has no size), and browsers refuse a 0x0 track.
        width, height = sps_picture_size(sets[0]) or (width, height)
        if self._init_size != (width, height) or any(
            (init.sps, init.pps) != sets for init in self._inits.values()
        ):
            self._inits.clear()
            self._init_size = (width, height)
        current = self._inits.get(audio)
        if current is None:
            self._inits[audio] = current = init_segment(*sets, width, height, audio)
        return current

    def fragment(self, frame: EncodedFrame, audio_clock_rate: int = 0) -> bytes:
        """The media fragment of ``frame`` (built at the first viewer's request); an audio
        frame needs its track's clock rate (for the duration of a first frame).

        Raises:
            Fmp4Error: the frame is not RFC 6184 H.264, or an empty audio frame.
        """
        cached = self._fragments.get(id(frame))
        if cached is not None and cached[0] is frame:
            return cached[1]
        kind = frame.kind
        default = DEFAULT_FRAME_TICKS if kind == "video" else audio_clock_rate // 50  # 20 ms
        maximum = VIDEO_CLOCK_RATE if kind == "video" else audio_clock_rate
        last = self._last_timestamp.get(kind)
        if last is None or frame.timestamp > last:
            if last is not None:
                # A longer gap (a source restart) counts as one second at most.
                self._last_duration[kind] = min(frame.timestamp - last, maximum)
            # An older frame built late (a viewer moved here starts with the cached GOP, whose
            # fragments may have been dropped from the cache) takes the last duration and
            # leaves the newest timestamp alone, so the next live frame's is not a second.
            self._last_timestamp[kind] = frame.timestamp
        duration = self._last_duration.get(kind, default)
        self._sequence += 1
        if kind == "video":
            data = media_fragment(frame, self._sequence, duration)
        else:
            data = audio_fragment(frame, self._sequence, duration)
        self.fragments_built += 1
        self._fragments[id(frame)] = (frame, data)
        while len(self._fragments) > self._max_cached:
            self._fragments.popitem(last=False)
        return data
