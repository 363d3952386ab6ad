"""The fallback's quality in real Chromium: a viewer forced onto video over the socket starts on
the sub quality it asked for (the GStreamer camera's 320x180 mount), and ``setQuality('main')``
brings main's 1280x720 into the same <video> element, through a new init segment appended to
the same MediaSource, with no new fallback or offer and the picture decoding on."""

from __future__ import annotations

from playwright.sync_api import Browser

from support.browser import PageWatch, in_browser, messages_received, wait_until_decoding_more
from support.servers import Camera, StartServer, make_config

MAIN_WIDTH, SUB_WIDTH = 1280, 320

PLAYING = """() => {
    const video = document.querySelector('#video');
    return {width: video.videoWidth, src: video.src, time: video.currentTime,
            transport: window.msViewer.engine.transport, quality: window.msViewer.engine.quality};
}"""


async def test_a_fallback_tile_starts_on_sub_and_set_quality_brings_main_into_the_same_video(
    start_server: StartServer, camera: Camera
) -> None:
    server = await start_server(
        make_config(
            [
                {
                    "id": "gate",
                    "qualities": [
                        {"name": "main", "source": camera.url("/h264-720")},
                        {"name": "sub", "source": camera.url("/h264-180")},
                    ],
                }
            ]
        )
    )

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/viewer.html?stream=gate&fallback=always&quality=sub")
        page.wait_for_function(
            f"document.querySelector('#video').videoWidth === {SUB_WIDTH}", timeout=30_000
        )
        wait_until_decoding_more(page, "#video")
        page.evaluate("() => { window.fallbackVideo = document.querySelector('#video'); }")
        before = page.evaluate(PLAYING)
        assert (before["transport"], before["quality"]) == ("fallback", "sub")

        page.evaluate("() => window.msViewer.engine.setQuality('main')")
        page.wait_for_function(
            f"document.querySelector('#video').videoWidth === {MAIN_WIDTH}", timeout=30_000
        )
        wait_until_decoding_more(page, "#video")
        page.wait_for_function("window.msViewer.engine.quality === 'main'")
        after = page.evaluate(PLAYING)
        assert page.evaluate("() => document.querySelector('#video') === window.fallbackVideo")
        # The same MediaSource (its object URL) took the new init segment: no new fallback.
        assert after["src"] == before["src"] and after["transport"] == "fallback"
        assert after["time"] > before["time"]
        assert messages_received(server.url, "fallback") == 1
        assert messages_received(server.url, "offer") == 0
        assert watch.errors == []

    await in_browser(scenario)
