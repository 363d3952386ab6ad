"""A viewer in its own process (run inside a network namespace): plays one stream and reports.

    ip netns exec NS .venv/bin/python tests/support/slow_viewer.py WS_URL STREAM_ID

It plays ``STREAM_ID`` with a real aiortc peer (H.264 really decoded) and prints one JSON
object per line, a few times a second, until its standard input closes::

    {"state": "connected", "frames": 41, "keyframes": 3, "access_units": 44, "gaps": 0,
     "corrupt": 0, "decode_errors": 0, "before_keyframe": 0}

- ``frames``: pictures decoded; ``access_units`` and ``keyframes``: what reached the decoder.
- ``gaps``: access units whose H.264 ``frame_num`` does not follow the previous reference
  picture's, so a picture they depend on never arrived: the picture is wrong until the next
  IDR. FFmpeg hides such gaps (it conceals them without flagging a frame), so they are found
  here, in the slice headers. A sender that drops whole GOP tails and resumes at an IDR makes
  none; one that loses single frames does.
- ``corrupt``: decoded frames FFmpeg flagged (concealed errors, missing references);
  ``decode_errors``: frames aiortc's decoder rejected, and FFmpeg error lines.
- ``before_keyframe``: access units received before the first IDR (a start mid-GOP).
"""

from __future__ import annotations

import json
import logging
import queue
import sys
from pathlib import Path
from typing import Any

import av
import trio
import trio_asyncio
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

sys.path.insert(0, str(Path(__file__).parents[1]))

from support.viewer import Viewer, open_viewer

REPORT_INTERVAL = 0.25  # seconds between two status lines
NAL_SLICE, NAL_IDR, NAL_SPS = 1, 5, 7
# Profiles whose SPS carries chroma format and bit depths before log2_max_frame_num.
HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


class Bits:
    def __init__(self, rbsp: bytes) -> None:
        self._data = rbsp
        self._position = 0

    def bits(self, count: int) -> int:
        value = 0
        for _ in range(count):
            byte = self._data[self._position // 8]
            value = (value << 1) | ((byte >> (7 - self._position % 8)) & 1)
            self._position += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.bits(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.bits(zeros)


def rbsp(nal: bytes, length: int = 64) -> bytes:
    """The start of a NAL unit's payload, emulation prevention bytes removed."""
    return nal[1 : length + 1].replace(b"\x00\x00\x03", b"\x00\x00")


def nal_units(access_unit: bytes) -> list[bytes]:
    units = []
    for chunk in access_unit.split(b"\x00\x00\x01")[1:]:
        chunk = chunk.rstrip(b"\x00")
        if chunk:
            units.append(chunk)
    return units


class FrameNumChecker:
    """Finds missing reference pictures from ``frame_num`` (H.264 7.4.3)."""

    def __init__(self) -> None:
        self.access_units = 0
        self.keyframes = 0
        self.gaps = 0
        self.before_keyframe = 0
        self._log2_max_frame_num: int | None = None
        self._separate_colour_plane = False
        self._previous_reference: int | None = None  # frame_num of the last reference picture

    def check(self, access_unit: bytes) -> None:
        self.access_units += 1
        for nal in nal_units(access_unit):
            kind = nal[0] & 0x1F
            if kind == NAL_SPS:
                self._read_sps(rbsp(nal))
            elif kind in (NAL_SLICE, NAL_IDR):
                self._read_slice(nal, kind)
                return  # the first slice speaks for the picture

    def _read_sps(self, data: bytes) -> None:
        bits = Bits(data)
        profile = bits.bits(8)
        bits.bits(16)  # constraint flags, level
        bits.ue()  # seq_parameter_set_id
        self._separate_colour_plane = False
        if profile in HIGH_PROFILES:
            if bits.ue() == 3:  # chroma_format_idc
                self._separate_colour_plane = bits.bits(1) == 1
            bits.ue()  # bit_depth_luma_minus8
            bits.ue()  # bit_depth_chroma_minus8
            bits.bits(1)  # qpprime_y_zero_transform_bypass_flag
            if bits.bits(1):
                raise ValueError("SPS with scaling matrices: not handled by this checker")
        self._log2_max_frame_num = bits.ue() + 4

    def _read_slice(self, nal: bytes, kind: int) -> None:
        if kind == NAL_IDR:
            self.keyframes += 1
            self._previous_reference = 0
            return
        if self._previous_reference is None or self._log2_max_frame_num is None:
            self.before_keyframe += 1
            return
        bits = Bits(rbsp(nal))
        bits.ue()  # first_mb_in_slice
        bits.ue()  # slice_type
        bits.ue()  # pic_parameter_set_id
        if self._separate_colour_plane:
            bits.bits(2)
        frame_num = bits.bits(self._log2_max_frame_num)
        following = (self._previous_reference + 1) % (1 << self._log2_max_frame_num)
        if frame_num not in (self._previous_reference, following):
            self.gaps += 1
        if nal[0] >> 5:  # nal_ref_idc: a reference picture
            self._previous_reference = frame_num


class CheckingQueue(queue.Queue):  # type: ignore[type-arg]
    """aiortc's receiver hands every depacketized frame to its decoder through this queue
    (the same seam as ``support.viewer``'s ``capture``)."""

    def __init__(self, checker: FrameNumChecker) -> None:
        super().__init__()
        self._checker = checker

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is not None:
            self._checker.check(bytes(item[1].data))
        super().put(item, block, timeout)


class ErrorCounter(logging.Handler):
    """Counts aiortc's "failed to decode" warnings and FFmpeg's error lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        from_ffmpeg = record.name.startswith("libav") and record.levelno >= logging.ERROR
        if from_ffmpeg or "failed to decode" in record.getMessage():
            self.count += 1


ERRORS = ErrorCounter()


async def play(viewer: Viewer, stream_id: str) -> None:
    async def create() -> RTCPeerConnection:
        return RTCPeerConnection(RTCConfiguration(iceServers=[]))  # no STUN: no internet

    pc = await trio_asyncio.aio_as_trio(create)()
    checker = FrameNumChecker()
    status: dict[str, Any] = {"frames": 0, "corrupt": 0, "ended": False}

    def print_status() -> None:
        status.update(
            state=pc.connectionState,
            access_units=checker.access_units,
            keyframes=checker.keyframes,
            gaps=checker.gaps,
            before_keyframe=checker.before_keyframe,
            decode_errors=ERRORS.count,
        )
        print(json.dumps(status), flush=True)

    async def report() -> None:
        while True:
            print_status()
            await trio.sleep(REPORT_INTERVAL)

    try:
        transceiver = pc.addTransceiver("video", direction="recvonly")
        transceiver.receiver._RTCRtpReceiver__decoder_queue = CheckingQueue(checker)
        offer = await trio_asyncio.aio_as_trio(pc.createOffer)()
        await trio_asyncio.aio_as_trio(pc.setLocalDescription)(offer)
        start = len(viewer.messages)
        payload = {"sdp": pc.localDescription.sdp, "type": "offer", "streamId": stream_id}
        await viewer.send({"type": "offer", "streamId": stream_id, "payload": payload})
        reply = await viewer.wait_for(
            lambda m: m.get("streamId") == stream_id and m.get("type") in ("answer", "error"),
            after=start,
            timeout=30,
        )
        if reply["type"] != "answer":
            raise RuntimeError(f"the server refused the offer: {reply}")
        await trio_asyncio.aio_as_trio(pc.setRemoteDescription)(
            RTCSessionDescription(sdp=reply["payload"], type="answer")
        )
        track = transceiver.receiver.track
        async with trio.open_nursery() as nursery:
            nursery.start_soon(report)
            try:
                while True:
                    frame = await trio_asyncio.aio_as_trio(track.recv)()
                    status["frames"] += 1
                    status["corrupt"] += frame.is_corrupt
            except MediaStreamError:
                status["ended"] = True
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            print_status()
            await trio_asyncio.aio_as_trio(pc.close)()


async def main(ws_url: str, stream_id: str) -> None:
    logging.getLogger().addHandler(ERRORS)
    av.logging.set_level(av.logging.ERROR)  # FFmpeg's own error lines, as Python log records
    async with (
        trio_asyncio.open_loop(),
        open_viewer(ws_url) as viewer,
        trio.open_nursery() as nursery,
    ):

        async def until_stdin_closes() -> None:
            await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            nursery.cancel_scope.cancel()

        nursery.start_soon(until_stdin_closes)
        await play(viewer, stream_id)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main, sys.argv[1], sys.argv[2])
