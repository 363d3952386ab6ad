"""What ``aiortc_compat`` relies on inside aiortc: if an upgrade moves it, this names it."""

from __future__ import annotations

import trio_asyncio

from mediastream.webrtc import aiortc_compat


async def test_aiortc_still_has_every_internal_the_direct_send_path_uses(aio_loop: None) -> None:
    missing = await trio_asyncio.aio_as_trio(aiortc_compat.missing_internals)()
    assert missing == [], (
        f"aiortc moved internals that webrtc/aiortc_compat.py uses: {', '.join(missing)}. "
        "Adapt aiortc_compat.py to the new aiortc, or keep the pinned version."
    )


def test_h264_is_cut_into_rtp_payloads_as_aiortc_cuts_it() -> None:
    small, large = b"\x65" + b"\x01" * 100, b"\x65" + b"\x02" * 3000
    [single] = aiortc_compat.packetize_h264([small])
    assert single == small  # one NAL unit that fits: sent as it is
    fragments = aiortc_compat.packetize_h264([large])
    assert len(fragments) == 3 and all(f[0] & 0x1F == 28 for f in fragments)  # FU-A
