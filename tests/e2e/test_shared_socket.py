"""One signaling socket per browser, in real headless Chromium: several tabs of one browser
context signal through the socket of one shared worker (web/static/js/shared-socket-worker.js),
each tab keeping its own peer connections. What the server sees is the measure: its count of
open sockets and sessions (``server.services.statistics()``, the figures of ``/api/stats``)."""

from __future__ import annotations

import contextlib
from typing import Any

import trio
from playwright.sync_api import Browser, Page
from playwright.sync_api import Error as PlaywrightError

from support.browser import (
    ALL_VIDEOS_PLAYING,
    PageWatch,
    ServerWatch,
    in_browser,
    wait_until_decoding_more,
)
from support.servers import (
    DEMO_STREAMS,
    RestartableServer,
    StartServer,
    make_config,
    pattern_cameras,
)

SMALL = "size=320x180&fps=15&kbps=150&gop=30"
METRICS = "WebSocketManager.getInstance().getMetrics()"


def _open_tab(browser_context: Any, base: str, stream_ids: list[str]) -> tuple[Page, PageWatch]:
    """A tab of the page written for the per-stream engine: one engine per stream it names."""
    page = browser_context.new_page()
    watch = PageWatch(page)
    page.goto(f"{base}/static/examples/legacy-page.html?streams={','.join(stream_ids)}")
    return page, watch


async def test_three_tabs_share_one_socket_end_their_sessions_when_closed_and_recover_a_restart(
    start_server: StartServer,
) -> None:
    restartable = await RestartableServer.start(start_server, pattern_cameras(18, SMALL))
    watch_server = ServerWatch(lambda: restartable.current)

    def scenario(browser: Browser) -> None:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        base = restartable.url
        ids = [f"cam-{n:02d}" for n in range(1, 19)]
        tabs = [_open_tab(context, base, ids[i * 6 : i * 6 + 6]) for i in range(3)]
        for page, _ in tabs:
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=40_000)
        for page, _ in tabs:
            wait_until_decoding_more(page, "video")
        # All 18 sessions on one socket: the worker's.
        watch_server.wait(lambda s: s.open_sessions == 18, timeout=10)
        statistics = watch_server.statistics()
        assert statistics.open_sockets == 1, statistics
        assert statistics.sessions_per_socket == (18,)
        for page, watch in tabs:
            metrics = page.evaluate(METRICS)
            assert metrics["shared"] is True and metrics["streamsActive"] == 6, metrics
            assert watch.sockets == []  # the page itself holds none
        tabs[0][0].wait_for_function(f"{METRICS}.tabs === 3 && {METRICS}.sockets === 1")

        # A closed tab: its six sessions end on the server, the other tabs play on.
        closed, _ = tabs.pop(0)
        closed.close()
        watch_server.wait(lambda s: s.open_sessions == 12, timeout=5)
        for page, _ in tabs:
            wait_until_decoding_more(page, "video")
        assert watch_server.statistics().open_sockets == 1

        # The server goes away and comes back on the same port: every tile comes back by itself.
        watch_server.run(restartable.restart)
        for page, _ in tabs:
            page.wait_for_function(
                "[...document.querySelectorAll('video')].some((v) => v.srcObject === null"
                " || v.srcObject.getVideoTracks().some((t) => t.readyState === 'ended'))"
                " || !WebSocketManager.getInstance().connected",
                timeout=10_000,
            )
        watch_server.wait(lambda s: s.open_sessions == 12, timeout=40)
        for page, _ in tabs:
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=40_000)
            wait_until_decoding_more(page, "video", timeout=30_000)
        assert watch_server.statistics().open_sockets == 1
        for _page, watch in tabs:
            assert watch.errors == [], watch.errors
        context.close()

    await in_browser(scenario)
    with trio.fail_after(10):
        await restartable.current.services.changes.wait_until(
            lambda: restartable.current.services.statistics().open_sockets == 0
        )


async def test_two_tabs_playing_the_same_stream_each_get_a_session(
    start_server: StartServer,
) -> None:
    server = await start_server()
    watch_server = ServerWatch(lambda: server)

    def scenario(browser: Browser) -> None:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        first, _ = _open_tab(context, server.url, ["demo-1", "demo-2"])
        second, _ = _open_tab(context, server.url, ["demo-1", "demo-3"])
        for page in (first, second):
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=30_000)
            wait_until_decoding_more(page, "video")
        # demo-1 twice: the server has one session per stream per socket, so the second
        # viewing rides a second socket of the worker; demo-2 and demo-3 share the first.
        watch_server.wait(lambda s: s.open_sessions == 4, timeout=10)
        assert sorted(watch_server.statistics().sessions_per_socket) == [1, 3]
        assert first.evaluate(f"{METRICS}.shared") is True
        second.close()
        watch_server.wait(lambda s: s.open_sessions == 2 and s.open_sockets == 1, timeout=5)
        wait_until_decoding_more(first, "video")
        context.close()

    await in_browser(scenario)


async def test_shared_false_keeps_a_socket_of_the_page_s_own(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/test-multi-stream.html")
        page.evaluate("WebSocketManager.getInstance().configure({shared: false})")
        page.click("#connect-all")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".stream-card video", timeout=30_000)
        assert len(watch.sockets) == 1  # in the page this time, where devtools show it
        metrics = page.evaluate(METRICS)
        assert metrics["shared"] is False and metrics["sockets"] == 1, metrics
        assert watch.errors == []

    await in_browser(scenario)


async def test_a_crashed_tab_ends_its_sessions_and_the_other_tab_plays_on(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(pattern_cameras(6, SMALL)))
    watch_server = ServerWatch(lambda: server)

    def scenario(browser: Browser) -> None:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        survivor, watch = _open_tab(context, server.url, ["cam-01", "cam-02", "cam-03"])
        doomed, _ = _open_tab(context, server.url, ["cam-04", "cam-05", "cam-06"])
        for page in (survivor, doomed):
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=30_000)
        watch_server.wait(lambda s: s.open_sessions == 6, timeout=10)
        # The navigation dies with the renderer.
        with doomed.expect_event("crash", timeout=10_000), contextlib.suppress(PlaywrightError):
            doomed.goto("chrome://crash", timeout=5_000)
        # Its lock is released with its renderer: its three sessions end. (Should the worker
        # have lived in that renderer, the survivor starts another and renegotiates its own.)
        watch_server.wait(lambda s: s.open_sessions == 3, timeout=5)
        survivor.wait_for_function(ALL_VIDEOS_PLAYING, arg="video", timeout=30_000)
        wait_until_decoding_more(survivor, "video")
        watch_server.wait(lambda s: s.open_sessions == 3 and s.open_sockets == 1, timeout=10)
        assert watch.errors == [], watch.errors
        context.close()

    await in_browser(scenario)
