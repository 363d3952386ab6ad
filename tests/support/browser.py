"""Driving Debian's real Chromium with Playwright, from Trio tests.

The server runs in the test's Trio loop; each browser scenario is a plain function run in a
thread (Playwright's sync API), which may call back into Trio with ``trio.from_thread.run``.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from playwright.sync_api import Page, sync_playwright
from prometheus_client.parser import text_string_to_metric_families
from trio_asyncio._loop import _faked_policy

from mediastream.server import RunningServer

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

T = TypeVar("T")


def _in_browser(scenario: Callable[..., T], *args: Any, flags: tuple[str, ...] = ()) -> T:
    # trio-asyncio replaces asyncio's loop policy process-wide, and outside Trio it hands out
    # its own synchronous loop, which Playwright's sync API can't run on. This thread gets the
    # standard policy back (a thread-local switch trio-asyncio keeps for exactly this).
    _faked_policy.policy = asyncio.DefaultEventLoopPolicy()
    if not os.path.exists(CHROMIUM):
        raise RuntimeError(
            f"{CHROMIUM} is missing: install Debian's chromium (scripts/test.sh does)"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*CHROMIUM_FLAGS, *flags]
        )
        try:
            return scenario(browser, *args)
        finally:
            browser.close()


async def in_browser(scenario: Callable[..., T], *args: Any, flags: tuple[str, ...] = ()) -> T:
    """Run ``scenario(browser, *args)`` with a fresh headless Chromium, in its own thread;
    ``flags`` are added to Chromium's command line.

    A plain thread, not one of Trio's worker threads (trio-asyncio would take those for Trio
    itself). The scenario calls back into Trio with ``trio.from_thread.run(fn, trio_token=…)``.
    """
    token = trio.lowlevel.current_trio_token()
    outcome: dict[str, Any] = {}
    finished = trio.Event()

    def target() -> None:
        try:
            outcome["value"] = _in_browser(scenario, *args, flags=flags)
        except BaseException as error:  # handed over to the test's task below
            outcome["error"] = error
        finally:
            trio.from_thread.run_sync(finished.set, trio_token=token)

    threading.Thread(target=target, name="chromium scenario", daemon=True).start()
    await finished.wait()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


class PageWatch:
    """What a page did: its WebSockets, console errors and uncaught exceptions.

    ``sockets`` are the page's own: where the browser shares one signaling socket between tabs
    (the default in Chromium), it lives in a shared worker and the page has none; count the
    server's sockets instead (``open_sockets``).
    """

    def __init__(self, page: Page) -> None:
        self.sockets: list[Any] = []
        self.errors: list[str] = []
        page.on("websocket", lambda socket: self.sockets.append(socket))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: self.errors.append(message.text) if message.type == "error" else None,
        )


class ServerWatch:
    """Waits, from a browser scenario's thread, on the server's own counts (no polling).

    ``server`` is called for each wait, so that it names the server running now (one
    restarted meanwhile: ``ServerWatch(lambda: restartable.current)``).
    """

    def __init__(self, server: Callable[[], RunningServer]) -> None:
        self._server = server
        self._token = trio.lowlevel.current_trio_token()

    def wait(self, condition: Callable[[Any], bool], timeout: float) -> None:
        """Until ``condition(server.services.statistics())`` holds, within ``timeout`` s."""

        async def waiting() -> None:
            server = self._server()
            with trio.fail_after(timeout):
                await server.services.changes.wait_until(
                    lambda: condition(server.services.statistics())
                )

        trio.from_thread.run(waiting, trio_token=self._token)

    def statistics(self) -> Any:
        """The server's statistics now, read in the Trio thread."""

        async def read() -> Any:
            return self._server().services.statistics()

        return trio.from_thread.run(read, trio_token=self._token)

    def run(self, function: Callable[[], Any]) -> None:
        """Run ``function`` (an async function) in the test's Trio loop; return when it has."""
        trio.from_thread.run(function, trio_token=self._token)


def get_json(url: str) -> Any:
    """A blocking GET, for browser scenarios (which run in a thread)."""
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def open_sockets(base_url: str) -> dict[str, int]:
    """The server's WebSockets, ``{"open": n, "opened": n}`` (``/api/stats``; an open server)."""
    return get_json(f"{base_url}/api/stats")["sockets"]  # type: ignore[no-any-return]


def messages_received(base_url: str, message_type: str) -> int:
    """Signaling messages of one type the server received (``/metrics``): what the browser
    sent, wherever its socket lives (a page's, or the shared worker's that Playwright can't
    see)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "mediastream_signaling_messages_total"
                and sample.labels.get("type") == message_type
            ):
                return int(sample.value)
    return 0


ALL_VIDEOS_PLAYING = """(selector) => {
    const videos = [...document.querySelectorAll(selector)];
    return videos.length > 0 && videos.every(
        (v) => v.videoWidth > 0 && v.getVideoPlaybackQuality().totalVideoFrames > 10);
}"""

DECODED_FRAMES = """(selector) => [...document.querySelectorAll(selector)].map(
    (v) => v.getVideoPlaybackQuality().totalVideoFrames)"""


def wait_until_decoding_more(page: Page, selector: str, timeout: float = 15_000) -> None:
    """Every video matching ``selector`` decodes at least 10 more frames from now on."""
    before = page.evaluate(DECODED_FRAMES, selector)
    page.wait_for_function(
        """([selector, before]) => [...document.querySelectorAll(selector)].every(
            (v, i) => v.getVideoPlaybackQuality().totalVideoFrames >= before[i] + 10)""",
        arg=[selector, before],
        timeout=timeout,
    )
