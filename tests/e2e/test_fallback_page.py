"""Video over the signaling socket in real Chromium: WebRTC made unable to connect, every tile
of the page plays through Media Source Extensions on its one socket."""

from __future__ import annotations

from playwright.sync_api import Browser

from support.browser import PageWatch, in_browser, open_sockets, wait_until_decoding_more
from support.servers import StartServer, make_config

#: Chromium told to send WebRTC media only through a proxy (there is none). Chromium 156 still
#: connects over loopback with this flag alone, so the page also asks for relay-only ICE with
#: no TURN server configured: no candidate at all, as behind a UDP-blocking firewall.
NO_WEBRTC = ("--force-webrtc-ip-handling-policy=disable_non_proxied_udp",)
PAGE = "/static/test-multi-stream.html?relay=1&fallbackAfterMs=4000"
FOUR_STREAMS = [
    {"id": f"fb-{n}", "source": f"pattern:{p}?size=320x180&fps=25&kbps=300&gop=25"}
    for n, p in ((1, "testsrc2"), (2, "testsrc"), (3, "cellauto"), (4, "smptebars"))
]

PLAYHEAD = """() => [...document.querySelectorAll('.stream-card video')].map((v) => ({
    time: v.currentTime,
    behind: v.buffered.length ? v.buffered.end(v.buffered.length - 1) - v.currentTime : null,
    width: v.videoWidth,
}))"""


async def test_four_tiles_play_through_the_fallback_on_one_socket(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(FOUR_STREAMS))

    def scenario(browser: Browser) -> list[dict[str, float]]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(f"{server.url}{PAGE}")
        page.click("#connect-all")
        page.wait_for_function(
            "document.querySelectorAll('.stream-card').length === 4", timeout=10_000
        )
        try:
            page.wait_for_function(
                """() => [...document.querySelectorAll('.stream-card .pill')].every(
                    (pill) => pill.textContent === 'live (fallback)')""",
                timeout=45_000,
            )
        except Exception:
            raise AssertionError(
                f"{page.inner_text('#activity-log')}\nerrors: {watch.errors}"
            ) from None
        before = page.evaluate(PLAYHEAD)
        page.wait_for_function(
            """(before) => [...document.querySelectorAll('.stream-card video')].every(
                (v, i) => v.currentTime > before[i].time + 2)""",
            arg=before,
            timeout=20_000,
        )
        after = page.evaluate(PLAYHEAD)
        transports = page.evaluate(
            "() => [...window.msTestPage.engines.values()].map((e) => e.transport)"
        )
        assert transports == ["fallback"] * 4
        assert open_sockets(server.url)["open"] == 1
        return after  # type: ignore[no-any-return]

    playheads = await in_browser(scenario, flags=NO_WEBRTC)
    assert all(p["width"] == 320 for p in playheads), playheads
    # Near the live edge: the engine jumps when more than a second behind the newest frame.
    assert all(p["behind"] is not None and p["behind"] < 1.5 for p in playheads), playheads
    stats = server.services.statistics()
    assert stats.open_peer_connections == 0


async def test_tiles_go_back_to_webrtc_when_asked_and_it_works(start_server: StartServer) -> None:
    server = await start_server(make_config(FOUR_STREAMS))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/static/test-multi-stream.html?fallback=always")
        page.click("#connect-all")
        page.wait_for_function(
            """() => document.querySelectorAll('.stream-card .pill').length === 4
                && [...document.querySelectorAll('.stream-card .pill')].every(
                    (pill) => pill.textContent === 'live (fallback)')""",
            timeout=30_000,
        )
        page.evaluate("() => window.msTestPage.engines.forEach((e) => e.setFallback('auto'))")
        page.wait_for_function(
            """() => [...window.msTestPage.engines.values()].every((e) =>
                e.transport === 'webrtc' && e.state === 'live'
                && e.pc && e.pc.connectionState === 'connected')""",
            timeout=30_000,
        )
        page.wait_for_function(
            """() => [...document.querySelectorAll('.stream-card .pill')].every(
                (pill) => pill.textContent === 'live')"""
        )
        wait_until_decoding_more(page, ".stream-card video")
        assert open_sockets(server.url)["open"] == 1

    await in_browser(scenario)


async def test_a_tile_whose_fragments_are_held_back_does_not_delay_the_others(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(FOUR_STREAMS))

    def scenario(browser: Browser) -> list[dict[str, float]]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{server.url}/static/test-multi-stream.html?fallback=always")
        page.click("#connect-all")
        page.wait_for_function(
            """() => document.querySelectorAll('.stream-card .pill').length === 4
                && [...document.querySelectorAll('.stream-card .pill')].every(
                    (pill) => pill.textContent === 'live (fallback)')""",
            timeout=30_000,
        )
        assert page.evaluate("document.querySelector('.stream-card').dataset.streamId") == "fb-1"
        # fb-1's segments stop reaching its MediaSource (held in the page, as a stalled
        # decoder would hold them); the other three tiles must carry on meanwhile.
        page.evaluate(
            """() => {
                const handlers = window.msTestPage.manager.streamHandlers.get('fb-1');
                window.heldBack = { deliver: handlers.onMedia, segments: [] };
                handlers.onMedia = (segment) => window.heldBack.segments.push(segment);
            }"""
        )
        before = page.evaluate(PLAYHEAD)
        page.wait_for_function(
            """(before) => [...document.querySelectorAll('.stream-card video')].every(
                (v, i) => i === 0 || v.currentTime > before[i].time + 3)""",
            arg=before,
            timeout=20_000,
        )
        held = page.evaluate("() => window.heldBack.segments.length")
        assert held > 50  # three seconds and more of fb-1's frames waited meanwhile
        page.evaluate(
            """() => {
                const handlers = window.msTestPage.manager.streamHandlers.get('fb-1');
                handlers.onMedia = window.heldBack.deliver;
                for (const segment of window.heldBack.segments) handlers.onMedia(segment);
            }"""
        )
        # fb-1 catches up: it plays on, near the live edge again.
        released = page.evaluate(PLAYHEAD)
        page.wait_for_function(
            """(released) => {
                const v = document.querySelector('.stream-card video');
                return v.currentTime > released[0].time + 2 && v.buffered.length
                    && v.buffered.end(v.buffered.length - 1) - v.currentTime < 1.5;
            }""",
            arg=released,
            timeout=20_000,
        )
        return page.evaluate(PLAYHEAD)  # type: ignore[no-any-return]

    playheads = await in_browser(scenario)
    assert all(p["behind"] is not None and p["behind"] < 1.5 for p in playheads), playheads
