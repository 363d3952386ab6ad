"""Per-tile quality in real Chromium: a camera wall of two-quality streams (the GStreamer camera's
1280x720 main and 320x180 sub mounts) decodes the sub stream in every tile; a tile made full
screen (double-click) plays main on the same peer connection (no new offer), and returns to sub
when put back (Escape); decoding never stops and no decode error is reported. The page's socket
is the browser's shared one (a SharedWorker's), so offers and sockets are counted on the
server."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Browser, Page

from support.browser import (
    ALL_VIDEOS_PLAYING,
    PageWatch,
    in_browser,
    messages_received,
    open_sockets,
    wait_until_decoding_more,
)
from support.servers import Camera, StartServer, make_config, mount_playing

TILES = 16
MAIN_WIDTH, SUB_WIDTH = 1280, 320

VIDEO_WIDTHS = """() => Object.fromEntries([...document.querySelectorAll('.tile')].map(
    (t) => [t.dataset.streamId, t.querySelector('video').videoWidth]))"""

INBOUND = """async (streamId) => {
    const pc = window.msDashboard.tiles.get(streamId).engine.pc;
    for (const stat of (await pc.getStats()).values()) {
        if (stat.type === 'inbound-rtp' && stat.kind === 'video') {
            return {frames: stat.framesDecoded, plis: stat.pliCount, freezes: stat.freezeCount,
                    ssrc: stat.ssrc};
        }
    }
    return null;
}"""


def wall(camera: Camera) -> list[dict[str, Any]]:
    return [
        {
            "id": f"cam-{n:02d}",
            "name": f"Camera {n}",
            "qualities": [
                {"name": "main", "source": camera.url("/h264-720")},
                {"name": "sub", "source": camera.url("/h264-180")},
            ],
        }
        for n in range(1, TILES + 1)
    ]


def tile_width_is(page: Page, stream_id: str, width: int) -> None:
    page.wait_for_function(
        f"document.querySelector('.tile[data-stream-id=\"{stream_id}\"] video').videoWidth"
        f" === {width}",
        timeout=20_000,
    )


async def test_a_wall_decodes_sub_everywhere_and_main_in_the_full_screen_tile(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(make_config(wall(camera)))

    def scenario(browser: Browser) -> None:
        # The 4x4 layout in 1280x720: sixteen tiles of about 315x160, all on one page; a
        # 320x180 sub stream covers each.
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html?layout=4")
        page.wait_for_function(f"document.querySelectorAll('.tile').length === {TILES}")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=40_000)
        for stream_id in page.evaluate(VIDEO_WIDTHS):
            tile_width_is(page, stream_id, SUB_WIDTH)
        assert set(page.evaluate(VIDEO_WIDTHS).values()) == {SUB_WIDTH}
        page.wait_for_function(
            "[...document.querySelectorAll('.tile')].every((t) => t.dataset.quality === 'sub')"
        )
        offered = messages_received(server.url, "offer")
        assert offered >= TILES
        before = page.evaluate(INBOUND, "cam-05")

        page.dblclick(".tile[data-stream-id='cam-05']")  # full screen
        page.wait_for_function(
            "document.fullscreenElement && document.fullscreenElement.dataset.streamId === 'cam-05'"
        )
        tile_width_is(page, "cam-05", MAIN_WIDTH)
        page.wait_for_function(
            "document.querySelector('.tile[data-stream-id=\"cam-05\"]').dataset.quality === 'main'"
        )
        assert "main" in page.inner_text(".tile[data-stream-id='cam-05'] .quality")
        wait_until_decoding_more(page, ".tile[data-stream-id='cam-05'] video")
        during = page.evaluate(INBOUND, "cam-05")
        others = {k: v for k, v in page.evaluate(VIDEO_WIDTHS).items() if k != "cam-05"}
        assert set(others.values()) == {SUB_WIDTH}

        page.keyboard.press("Escape")  # back into the grid: sub again
        page.wait_for_function("document.fullscreenElement === null")
        tile_width_is(page, "cam-05", SUB_WIDTH)
        wait_until_decoding_more(page, ".tile[data-stream-id='cam-05'] video")
        after = page.evaluate(INBOUND, "cam-05")

        # The same RTP stream all along, no new offer, decoding on, no recovery asked for.
        assert messages_received(server.url, "offer") == offered
        assert before["ssrc"] == during["ssrc"] == after["ssrc"]
        assert before["frames"] < during["frames"] < after["frames"]
        # At most one hitch per switch: Chromium's software decoder re-initialises for the new
        # resolution at the keyframe (a "freeze" is a frame shown >150 ms after the previous).
        assert after["plis"] - before["plis"] <= 2
        assert after["freezes"] - before["freezes"] <= 2
        assert watch.errors == []
        assert open_sockets(server.url)["open"] == 1

    async with mount_playing(camera, "/h264-180"):  # sixteen sessions join it at once
        await in_browser(scenario)
