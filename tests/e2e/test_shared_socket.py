"""One signaling socket per browser, in real headless Chromium: several tabs of one browser
context signal through the socket of one shared worker (web/static/js/shared-socket-worker.js),
each tab keeping its own peer connections. What the server sees is the measure: its count of
open sockets and sessions (``server.services.statistics()``, the figures of ``/api/stats``)."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import trio
from playwright.sync_api import Browser, Page
from playwright.sync_api import Error as PlaywrightError

from mediastream.server import RunningServer

from support.browser import ALL_VIDEOS_PLAYING, PageWatch, in_browser, wait_until_decoding_more
from support.servers import DEMO_STREAMS, StartServer, make_config

SMALL = "size=320x180&fps=15&kbps=150&gop=30"
PATTERNS = ["testsrc2", "testsrc", "smptebars", "cellauto", "rgbtestsrc", "life"]
METRICS = "WebSocketManager.getInstance().getMetrics()"


def _cameras(count: int) -> list[dict[str, Any]]:
    return [
        {"id": f"cam-{n:02d}", "source": f"pattern:{PATTERNS[n % len(PATTERNS)]}?{SMALL}"}
        for n in range(1, count + 1)
    ]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _open_tab(browser_context: Any, base: str, stream_ids: list[str]) -> tuple[Page, PageWatch]:
    """A tab of the page written for the per-stream engine: one engine per stream it names."""
    page = browser_context.new_page()
    watch = PageWatch(page)
    page.goto(f"{base}/static/examples/legacy-page.html?streams={','.join(stream_ids)}")
    return page, watch


class ServerWatch:
    """Waits, from a browser scenario's thread, on the server's own counts (no polling)."""

    def __init__(self, server: Callable[[], RunningServer]) -> None:
        self._server = server
        self._token = trio.lowlevel.current_trio_token()

    def wait(self, condition: Callable[[Any], bool], timeout: float) -> None:
        async def waiting() -> None:
            server = self._server()
            with trio.fail_after(timeout):
                await server.services.changes.wait_until(
                    lambda: condition(server.services.statistics())
                )

        trio.from_thread.run(waiting, trio_token=self._token)

    def statistics(self) -> Any:
        async def read() -> Any:
            return self._server().services.statistics()

        return trio.from_thread.run(read, trio_token=self._token)

    def run(self, function: Callable[[], Any]) -> None:
        trio.from_thread.run(function, trio_token=self._token)


async def test_three_tabs_share_one_socket_end_their_sessions_when_closed_and_recover_a_restart(
    start_server: StartServer,
) -> None:
    port = _free_port()
    config = make_config(_cameras(18), server={"port": port})
    servers: list[RunningServer] = [await start_server(config)]
    watch_server = ServerWatch(lambda: servers[-1])

    async def restart() -> None:
        servers[-1].request_shutdown()
        await servers[-1].wait_stopped()
        servers.append(await start_server(config))

    def scenario(browser: Browser) -> None:
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        base = f"http://127.0.0.1:{port}"
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
        watch_server.run(restart)
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
        await servers[-1].services.changes.wait_until(
            lambda: servers[-1].services.statistics().open_sockets == 0
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
    server = await start_server(make_config(_cameras(6)))
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
