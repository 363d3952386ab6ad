"""Video over the signaling socket in real Chromium: WebRTC made unable to connect, every tile
of the page plays through Media Source Extensions on its one socket."""

from __future__ import annotations

from playwright.sync_api import Browser

from mediastream.fallback import FallbackSession

from support.browser import PageWatch, in_browser, open_sockets, wait_until_decoding_more
from support.servers import Camera, StartServer, make_config
from support.turn import free_udp_port, running_turn_server

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


AUDIO_SAMPLE = """() => {
    const video = document.getElementById('video');
    const stats = window.msViewer.engine.getFallbackStats();
    return {pill: document.getElementById('state').textContent, codecs: stats && stats.codecs,
            audioBytes: video.webkitAudioDecodedByteCount, time: video.currentTime};
}"""


async def test_the_fallback_plays_the_cameras_aac_or_opus_sound_in_chromium(
    start_server: StartServer, camera: Camera
) -> None:
    streams = [
        {"id": "door-aac", "source": camera.url("/h264-aac")},
        {"id": "door-opus", "source": camera.url("/h264-opus")},
    ]
    server = await start_server(make_config(streams))

    def scenario(browser: Browser) -> dict[str, tuple[dict[str, object], dict[str, object]]]:
        samples = {}
        for stream_id in ("door-aac", "door-opus"):
            page = browser.new_page()
            watch = PageWatch(page)
            page.goto(f"{server.url}/static/viewer.html?stream={stream_id}&fallback=always")
            try:
                page.wait_for_function(
                    "() => document.getElementById('state').textContent === 'live (fallback)'",
                    timeout=30_000,
                )
            except Exception:
                raise AssertionError(
                    f"{stream_id}: {page.evaluate(AUDIO_SAMPLE)} "
                    f"{page.inner_text('#detail')!r}, errors: {watch.errors}"
                ) from None
            first = page.evaluate(AUDIO_SAMPLE)
            # Sound is decoded (the element is muted, as autoplay wants, but still decodes).
            page.wait_for_function(
                """(first) => {
                    const video = document.getElementById('video');
                    return video.webkitAudioDecodedByteCount > first.audioBytes + 10000
                        && video.currentTime > first.time + 2;
                }""",
                arg=first,
                timeout=20_000,
            )
            samples[stream_id] = (first, page.evaluate(AUDIO_SAMPLE))
            assert watch.errors == []
            page.close()
        return samples

    samples = await in_browser(scenario)
    aac, opus = samples["door-aac"][1], samples["door-opus"][1]
    # The camera's AAC as it came (mp4a), and its Opus: one SourceBuffer for both tracks.
    assert str(aac["codecs"]).startswith("avc1.") and str(aac["codecs"]).endswith(",mp4a.40.2")
    assert str(opus["codecs"]).endswith(",opus"), opus
    assert server.services.statistics().open_peer_connections == 0


async def test_tiles_go_back_to_webrtc_by_themselves_once_the_turn_server_is_up(
    start_server: StartServer,
) -> None:
    """Relay-only ICE through a TURN server that is down when the page starts: the tiles play
    through the fallback; the TURN server comes up; each tile's background retry connects
    through it and the tile is live over WebRTC again, its fallback ended on the server."""
    turn_port = free_udp_port()
    secret = "turn-secret-for-tests"
    config = make_config(
        FOUR_STREAMS[:2],
        webrtc={"ice_servers": [{"urls": [f"turn:127.0.0.1:{turn_port}"], "secret": secret}]},
    )
    server = await start_server(config)
    page_url = (
        f"{server.url}/static/test-multi-stream.html"
        "?relay=1&fallbackAfterMs=6000&webrtcRetryMs=2000"
    )

    def scenario(browser: Browser) -> list[dict[str, object]]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(page_url)
        page.click("#connect-all")
        page.wait_for_function(
            """() => document.querySelectorAll('.stream-card .pill').length === 2
                && [...document.querySelectorAll('.stream-card .pill')].every(
                    (pill) => pill.textContent === 'live (fallback)')""",
            timeout=45_000,
        )
        # A second background attempt has begun: the first failed while TURN was down.
        page.wait_for_function(
            """() => [...window.msTestPage.engines.values()].every(
                (e) => e.getFallbackStats() && e.getFallbackStats().webrtcAttempts >= 2)""",
            timeout=30_000,
        )
        # Every pill text the tiles show from now on, to see none but the two live ones.
        page.evaluate(
            """() => { window.pillHistory = [];
                new MutationObserver(() => window.pillHistory.push(
                    [...document.querySelectorAll('.stream-card .pill')].map((p) => p.textContent)
                )).observe(document.getElementById('cards'),
                           {subtree: true, childList: true, characterData: true}); }"""
        )
        with running_turn_server(secret, port=turn_port):
            try:
                page.wait_for_function(
                    """() => [...window.msTestPage.engines.values()].every((e) =>
                        e.transport === 'webrtc' && e.state === 'live'
                        && e.pc && e.pc.connectionState === 'connected')""",
                    timeout=120_000,
                )
            except Exception:
                engines = page.evaluate(
                    """() => [...window.msTestPage.engines.values()].map((e) => [e.state,
                        e.transport, e.getFallbackStats(), e.pc && e.pc.connectionState])"""
                )
                raise AssertionError(
                    f"{engines}\n{page.inner_text('#activity-log')}\nerrors: {watch.errors}"
                ) from None
            page.wait_for_function(
                """() => [...document.querySelectorAll('.stream-card .pill')].every(
                    (pill) => pill.textContent === 'live')"""
            )
            wait_until_decoding_more(page, ".stream-card video")
            pairs = page.evaluate(
                """async () => Promise.all([...window.msTestPage.engines.values()].map(
                    async (e) => {
                        const report = await e.pc.getStats();
                        let pair = null;
                        report.forEach((s) => {
                            if (s.type === 'candidate-pair' && s.nominated
                                && s.state === 'succeeded') pair = s;
                        });
                        const video = document.querySelector(
                            `.stream-card[data-stream-id="${e.streamId}"] video`);
                        return {local: report.get(pair.localCandidateId).candidateType,
                                srcObject: video.srcObject !== null,
                                src: video.getAttribute('src')};
                    }))"""
            )
            history = page.evaluate("() => window.pillHistory")
        assert open_sockets(server.url)["open"] == 1  # the browser's one (shared) socket
        # Straight from live (fallback) to live: no black 'connecting' in between.
        assert all(pill in ("live (fallback)", "live") for pills in history for pill in pills), (
            history
        )
        return pairs  # type: ignore[no-any-return]

    pairs = await in_browser(scenario)
    assert pairs == [{"local": "relay", "srcObject": True, "src": None}] * 2
    hub = server.services.hub
    assert hub.statistics().fallback_returns == 2
    assert not [
        s for c in hub._connections for s in c.fallbacks.values() if isinstance(s, FallbackSession)
    ]
    assert server.services.statistics().open_peer_connections == 2
