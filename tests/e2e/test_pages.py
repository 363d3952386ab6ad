"""The three pages and the migration example, in real headless Chromium, against the real
server: one WebSocket per page, every video decoding, state and stats shown."""

from __future__ import annotations

import time

import trio
from playwright.sync_api import Browser, Page

from support.browser import (
    ALL_VIDEOS_PLAYING,
    PageWatch,
    get_json,
    in_browser,
    open_sockets,
    wait_until_decoding_more,
)
from support.servers import DEMO_STREAMS, Camera, RestartableServer, StartServer, make_config
from support.turn import running_turn_server


async def test_multi_stream_page_flow_over_exactly_one_websocket(start_server: StartServer) -> None:
    server = await start_server()

    def scenario(browser: Browser) -> dict[str, object]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/test-multi-stream.html")
        assert page.inner_text("#ws-status") == "waiting"
        assert page.locator(".stream-card").count() == 0
        assert {s["state"] for s in get_json(f"{server.url}/api/streams")["streams"]} == {"stopped"}

        page.click("#connect-all")
        page.wait_for_function(
            "document.querySelectorAll('.stream-card').length === 3", timeout=10_000
        )
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".stream-card video", timeout=20_000)
        assert page.inner_text("#ws-status") == "connected"
        wait_until_decoding_more(page, ".stream-card video")
        # WebRTC's own counters agree: every stream's framesDecoded is rising.
        decoded = page.evaluate(
            """async () => {
                const counts = {};
                for (const [id, engine] of window.msTestPage.engines) {
                    const report = await engine.pc.getStats();
                    report.forEach((s) => {
                        if (s.type === 'inbound-rtp') counts[id] = s.framesDecoded;
                    });
                }
                return counts;
            }"""
        )
        assert sorted(decoded) == ["demo-1", "demo-2", "demo-3"]
        assert all(count > 10 for count in decoded.values())
        # Live stats on every card (the engine reports them every second).
        page.wait_for_function(
            """() => [...document.querySelectorAll('.stream-card')].every((card) =>
                card.querySelector('.stat-bitrate').textContent.endsWith('bps')
                && parseInt(card.querySelector('.stat-packets').textContent) > 0
                && card.querySelector('.stat-ice').textContent === 'connected')""",
            timeout=10_000,
        )
        log = page.inner_text("#activity-log")
        assert "WebSocket connected" in log and "demo-2: live" in log
        # The on-demand sources started by themselves.
        assert {s["state"] for s in get_json(f"{server.url}/api/streams")["streams"]} == {"live"}
        assert page.inner_text("#streams-active") == "3"
        screenshot = page.screenshot()
        # One socket for the page (held by the browser's shared worker, so the server counts it).
        assert open_sockets(server.url) == {"open": 1, "opened": 1}

        page.click("#disconnect-all")
        page.wait_for_function("document.querySelectorAll('.stream-card').length === 0")
        page.wait_for_function("document.getElementById('ws-status').dataset.state === 'closed'")
        assert page.evaluate("WebSocketManager.getInstance().ws") is None
        assert watch.errors == []
        return {"screenshot": screenshot}

    result = await in_browser(scenario)
    assert result["screenshot"]
    with trio.fail_after(10):
        await server.services.changes.wait_until(
            lambda: (
                (s := server.services.statistics()).open_sockets == 0
                and s.open_peer_connections == 0
            )
        )


def _wall_config(count: int):  # type: ignore[no-untyped-def]
    patterns = ["testsrc2", "testsrc", "smptebars", "cellauto", "rgbtestsrc", "life"]
    options = "size=320x180&fps=15&kbps=150&gop=30"
    return make_config(
        [
            {
                "id": f"cam-{n:02d}",
                "name": f"Camera {n}",
                "source": f"pattern:{patterns[n % len(patterns)]}?{options}",
            }
            for n in range(1, count + 1)
        ]
    )


async def test_dashboard_plays_twelve_streams_over_one_websocket(start_server: StartServer) -> None:
    server = await start_server(_wall_config(12))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function("document.querySelectorAll('.tile').length === 12")
        page.wait_for_function(
            "[...document.querySelectorAll('.tile')].every((t) => t.dataset.state === 'live')",
            timeout=30_000,
        )
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=20_000)
        wait_until_decoding_more(page, ".tile video")
        assert page.evaluate("WebSocketManager.getInstance().streamHandlers.size") == 12
        assert open_sockets(server.url)["open"] == 1
        assert page.inner_text("#summary") == "12 of 12 live"
        # (Layouts, full screen and tile order: tests/e2e/test_wall.py.)
        assert watch.errors == []

    await in_browser(scenario)
    assert server.services.statistics().sessions_per_socket in ((), (12,))


async def test_dashboard_stops_hidden_tiles_and_resumes_them(start_server: StartServer) -> None:
    server = await start_server(_wall_config(16))

    def sessions() -> int:
        return int(get_json(f"{server.url}/api/stats")["sessions"])

    def state_of(page: Page, stream_id: str) -> str | None:
        return page.locator(f".tile[data-stream-id='{stream_id}']").get_attribute("data-state")

    def wait_live(page: Page, stream_id: str) -> None:
        page.wait_for_function(
            f"document.querySelector('.tile[data-stream-id=\"{stream_id}\"]').dataset.state"
            " === 'live'",
            timeout=20_000,
        )

    def scenario(browser: Browser) -> None:
        # Room for about one row of tiles in the layout that scrolls: the rows below are off
        # screen.
        page = browser.new_page(viewport={"width": 1300, "height": 300})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html?layout=scroll")
        page.wait_for_function("document.querySelectorAll('.tile').length === 16")
        wait_live(page, "cam-01")
        assert 0 < sessions() < 16
        assert state_of(page, "cam-16") == "idle"
        # Scrolling the last tile into view starts it; the first one, now out of view, stops.
        page.locator(".tile[data-stream-id='cam-16']").scroll_into_view_if_needed()
        wait_live(page, "cam-16")
        page.wait_for_function(
            "document.querySelector('.tile[data-stream-id=\"cam-01\"]').dataset.state === 'paused'"
        )
        # A hidden tab stops everything; showing it again resumes what is on screen.
        set_tab_hidden(page, True)
        page.wait_for_function("WebSocketManager.getInstance().streamHandlers.size === 0")
        set_tab_hidden(page, False)
        wait_live(page, "cam-16")
        assert state_of(page, "cam-01") == "paused"
        assert watch.errors == []

    await in_browser(scenario)


def set_tab_hidden(page: Page, hidden: bool) -> None:
    """What switching to another tab (and back) tells the page."""
    page.evaluate(
        """(hidden) => {
            Object.defineProperty(document, 'visibilityState',
                {value: hidden ? 'hidden' : 'visible', configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));
        }""",
        hidden,
    )


async def test_dashboard_recovers_by_itself_when_the_server_restarts(
    start_server: StartServer,
) -> None:
    restartable = await RestartableServer.start(start_server, DEMO_STREAMS)
    token = trio.lowlevel.current_trio_token()

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        watch = PageWatch(page)
        page.goto(f"{restartable.url}/static/dashboard.html")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=20_000)
        trio.from_thread.run(restartable.restart, trio_token=token)
        page.wait_for_function(
            "[...document.querySelectorAll('.tile')].some((t) => t.dataset.state !== 'live')",
            timeout=10_000,
        )
        page.wait_for_function(
            "[...document.querySelectorAll('.tile')].every((t) => t.dataset.state === 'live')",
            timeout=30_000,
        )
        wait_until_decoding_more(page, ".tile video")
        # The socket that replaced the first one, and no other.
        assert open_sockets(restartable.url) == {"open": 1, "opened": 1}
        assert watch.errors == []

    await in_browser(scenario)
    assert restartable.current.services.statistics().open_peer_connections in (0, 3)


async def test_viewer_page_plays_the_chosen_stream_and_switches(start_server: StartServer) -> None:
    server = await start_server()

    def scenario(browser: Browser) -> None:
        page = browser.new_page()
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/viewer.html?stream=demo-2")
        assert page.locator("#stream-select").input_value() == "demo-2"
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg="#video", timeout=20_000)
        page.wait_for_function("document.getElementById('stats').textContent.includes('fps')")
        page.select_option("#stream-select", "demo-3")
        page.wait_for_function(
            "document.getElementById('state').dataset.state === 'live'", timeout=20_000
        )
        wait_until_decoding_more(page, "#video")
        assert "stream=demo-3" in page.url
        # Switching may close the idle socket and open one again.
        assert open_sockets(server.url)["opened"] <= 2
        assert watch.errors == []

    await in_browser(scenario)


async def test_an_old_per_stream_page_works_by_adding_the_manager_script(
    start_server: StartServer,
) -> None:
    streams = [
        {"id": f"cam-{n}", "source": "pattern:testsrc?size=320x180&fps=15&kbps=150&gop=30"}
        for n in range(1, 7)
    ]
    server = await start_server(make_config(streams))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        watch = PageWatch(page)
        ids = ",".join(s["id"] for s in streams)
        page.goto(f"{server.url}/static/examples/legacy-page.html?streams={ids}")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=30_000)
        assert page.evaluate("WebSocketManager.getInstance().streamHandlers.size") == 6
        assert page.evaluate("engines.length") == 6
        assert open_sockets(server.url)["open"] == 1
        assert watch.errors == []

    await in_browser(scenario)


async def test_the_viewer_page_plays_the_camera_sound_too(
    start_server: StartServer, camera: Camera
) -> None:
    # An AAC camera: Chromium can't take AAC over WebRTC, so it hears Opus, encoded once.
    config = make_config([{"id": "door", "source": camera.url("/h264-aac")}])
    server = await start_server(config)

    def scenario(browser: Browser) -> None:
        page = browser.new_page()
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/viewer.html?stream=door")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg="#video", timeout=20_000)
        page.wait_for_function(
            """async () => {
                const report = await window.msViewer.engine.pc.getStats();
                let audio = null;
                report.forEach((s) => {
                    if (s.type === 'inbound-rtp' && s.kind === 'audio') audio = s;
                });
                if (!audio || audio.packetsReceived < 50) return false;
                const codec = report.get(audio.codecId);
                return codec && codec.mimeType === 'audio/opus' && audio.totalSamplesReceived > 0;
            }""",
            timeout=20_000,
        )
        tracks = page.evaluate(
            "document.getElementById('video').srcObject.getTracks().map((t) => t.kind).sort()"
        )
        assert tracks == ["audio", "video"]
        assert watch.errors == []

    await in_browser(scenario)


JITTER_SAMPLE = """async () => {
    const report = await window.msViewer.engine.pc.getStats();
    let video = null;
    report.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') video = s; });
    return video && {delay: video.jitterBufferDelay, emitted: video.jitterBufferEmittedCount,
                     decoded: video.framesDecoded, keyFrames: video.keyFramesDecoded};
}"""


#: the late joiner joins this many frames into the camera's 250-frame (10 s) GOP: a busy
#: machine took over 2 s to load and connect the page (it joined 53 frames into a 4 s GOP and
#: its picture came from the next keyframe), so 9 s are left for it
JOIN_AT_GOP_FRAME = 20


async def test_a_late_joiner_in_chromium_sees_a_picture_at_once_and_is_as_live_as_the_first(
    start_server: StartServer, camera: Camera
) -> None:
    config = make_config([{"id": "cam", "source": camera.url("/h264-gop10"), "on_demand": False}])
    server = await start_server(config)
    stream = server.services.registry.get("cam")
    assert stream is not None

    def join(browser: Browser) -> Page:
        page = browser.new_page()
        page.goto(f"{server.url}/static/viewer.html?stream=cam")
        return page

    def scenario(browser: Browser) -> dict[str, float]:
        first = join(browser)
        first.wait_for_function(ALL_VIDEOS_PLAYING, arg="#video", timeout=20_000)
        # Join the second viewer into a 10 s GOP, early enough that a picture from the next
        # keyframe (9 s or more away) can't be mistaken for one from the cache, however long
        # the page takes to load and connect on a busy machine.
        trio.from_thread.run(wait_gop, JOIN_AT_GOP_FRAME, trio_token=token)
        gop_when_joining = stream.fanout.statistics().gop_frames
        late = join(browser)
        # The first picture, not ten frames: ten take longer the busier the machine, and the
        # question is only where the picture came from.
        late.wait_for_function(
            "(selector) => document.querySelector(selector).videoWidth > 0",
            arg="#video",
            timeout=20_000,
        )
        gop_at_picture = stream.fanout.statistics().gop_frames
        late.wait_for_function(ALL_VIDEOS_PLAYING, arg="#video", timeout=20_000)
        # Both settled: compare their jitter-buffer delay over the same 2 s window.
        late.wait_for_timeout(3000)
        a1, b1 = first.evaluate(JITTER_SAMPLE), late.evaluate(JITTER_SAMPLE)
        late.wait_for_timeout(2000)
        a2, b2 = first.evaluate(JITTER_SAMPLE), late.evaluate(JITTER_SAMPLE)
        return {
            "gop_when_joining": gop_when_joining,
            "gop_at_picture": gop_at_picture,
            "first_delay": (a2["delay"] - a1["delay"]) / (a2["emitted"] - a1["emitted"]),
            "late_delay": (b2["delay"] - b1["delay"]) / (b2["emitted"] - b1["emitted"]),
        }

    async def wait_gop(frames: int) -> None:
        published = trio.Event()
        with trio.fail_after(20), stream.open_viewer() as probe:
            while stream.fanout.statistics().gop_frames < frames:
                probe.set_wakeup(published.set)
                await published.wait()
                published = trio.Event()
                while probe.get_nowait() is not None:
                    pass

    token = trio.lowlevel.current_trio_token()
    result = await in_browser(scenario)
    assert result["gop_when_joining"] >= JOIN_AT_GOP_FRAME  # the cache holds a keyframe
    # It showed a picture while the GOP it joined was still the current one:
    # its picture came from the cached keyframe, not from waiting for the next one.
    assert result["gop_at_picture"] > result["gop_when_joining"]
    # And a few seconds on it is no further behind live than the viewer who joined first.
    print("late joiner:", result)
    assert result["late_delay"] <= result["first_delay"] + 0.05, result


async def test_the_dashboard_with_a_token_shows_and_plays_only_what_it_grants(
    start_server: StartServer,
) -> None:
    from mediastream.auth import Authenticator
    from mediastream.config import SecurityConfig

    secret = "e2e-secret-" + "z" * 32
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": secret}))
    granted = Authenticator(SecurityConfig(jwt_secret=secret)).issue(["demo-1", "demo-3"], 600)

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{server.url}/static/dashboard.html?token={granted}")
        page.wait_for_function("document.querySelectorAll('.tile').length === 2")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=20_000)
        ids = page.eval_on_selector_all(".tile", "tiles => tiles.map((t) => t.dataset.streamId)")
        assert ids == ["demo-1", "demo-3"]
        assert "token=" not in page.url  # not left in the address bar
        # The token went with the socket (the server refuses one without it), held by the
        # browser's shared worker.
        assert page.evaluate("WebSocketManager.getInstance().getMetrics().shared") is True
        # Without a token the page says what is missing.
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function("document.body.textContent.includes('needs an access token')")

    await in_browser(scenario)


async def test_the_dashboard_management_view_adds_stops_and_deletes_streams(
    start_server: StartServer,
) -> None:
    server = await start_server()

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function("document.querySelectorAll('.tile').length === 3")
        page.click("#manage-toggle")
        page.wait_for_selector("#stream-table tr[data-stream-id='demo-1']")
        page.fill("#add-stream input[name=id]", "added")
        page.fill("#add-stream input[name=name]", "Added camera")
        page.fill("#add-stream input[name=source]", "pattern:testsrc?size=320x180&fps=25")
        page.click("#add-stream button[type=submit]")
        page.wait_for_selector(".tile[data-stream-id='added'][data-state='live']", timeout=20_000)
        page.wait_for_selector("#stream-table tr[data-stream-id='added']")
        page.click("#stream-table tr[data-stream-id='added'] button:text('stop')")
        page.wait_for_selector(".tile[data-stream-id='added'][data-state='error']", timeout=10_000)
        page.click("#stream-table tr[data-stream-id='added'] button:text('delete')")
        page.wait_for_function("!document.querySelector(\".tile[data-stream-id='added']\")")
        assert "added" not in [s["id"] for s in get_json(f"{server.url}/api/streams")["streams"]]
        assert watch.errors == []

    await in_browser(scenario)


async def test_relay_only_chromium_plays_through_a_real_turn_server(
    start_server: StartServer,
) -> None:
    with running_turn_server() as turn:
        config = make_config(
            DEMO_STREAMS, webrtc={"ice_servers": [{"urls": [turn.url], "secret": turn.secret}]}
        )
        server = await start_server(config)

        def scenario(browser: Browser) -> dict[str, str]:
            page = browser.new_page()
            watch = PageWatch(page)
            page.goto(f"{server.url}/static/viewer.html?stream=demo-1&relay=1")
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="#video", timeout=30_000)
            pair = page.evaluate(
                """async () => {
                    const pc = window.msViewer.engine.pc;
                    const report = await pc.getStats();
                    let pair = null;
                    report.forEach((s) => {
                        if (s.type === 'candidate-pair' && s.nominated
                            && s.state === 'succeeded') pair = s;
                    });
                    const local = report.get(pair.localCandidateId);
                    const configuration = pc.getConfiguration();
                    return {local: local.candidateType,
                            policy: configuration.iceTransportPolicy,
                            username: configuration.iceServers[0].username || ''};
                }"""
            )
            assert watch.errors == []
            return pair

        result = await in_browser(scenario)
    assert result["policy"] == "relay"
    assert result["local"] == "relay"  # the media came through coturn
    expiry, _, label = result["username"].partition(":")
    assert label == "viewer" and int(expiry) > time.time()  # time-limited credentials
