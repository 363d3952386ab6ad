"""The camera wall's layouts in real headless Chromium (web/static/js/pages/wall.js): each fills
the viewport, the stats overlay stays on one line at every tile size, a tile goes full screen on
double-click and back on Escape, and the layout and tile order survive a reload."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Browser, Page

from support.browser import ALL_VIDEOS_PLAYING, PageWatch, in_browser
from support.servers import StartServer, make_config

SMALL = "size=320x180&fps=15&kbps=150&gop=30"
PATTERNS = ["testsrc2", "testsrc", "smptebars", "cellauto", "rgbtestsrc", "life"]
VIEWPORT = {"width": 1600, "height": 1000}

# Where each visible tile is, the wall's box and grid, the viewport, and how tall each part of
# each overlay is against its line height (a wrapped line is twice as tall).
GEOMETRY = """() => {
    const wall = document.getElementById('wall');
    const box = (e) => { const r = e.getBoundingClientRect();
        return {left: r.left, top: r.top, right: r.right, bottom: r.bottom,
                width: r.width, height: r.height}; };
    const tiles = [...wall.querySelectorAll('.tile')].filter((t) => !t.hidden);
    const style = getComputedStyle(wall);
    return {
        viewport: {width: innerWidth, height: innerHeight},
        header: box(document.querySelector('header.bar')),
        wall: box(wall),
        gap: parseFloat(style.rowGap),
        cols: Number(style.getPropertyValue('--cols')),
        rows: Number(style.getPropertyValue('--rows')),
        tiles: tiles.map((t) => ({id: t.dataset.streamId, ...box(t)})),
        overlays: tiles.map((t) => {
            const overlay = t.querySelector('.overlay');
            const line = parseFloat(getComputedStyle(overlay).lineHeight);
            return {line, parts: [...overlay.children].map((c) => c.getBoundingClientRect().height),
                    text: t.querySelector('.bitrate').textContent,
                    overflows: overlay.scrollHeight > overlay.clientHeight + 1};
        }),
    };
}"""


def _cameras(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"cam-{n:02d}",
            "name": f"Camera {n} at the loading dock, north side",  # long: it must not wrap
            "source": f"pattern:{PATTERNS[n % len(PATTERNS)]}?{SMALL}",
        }
        for n in range(1, count + 1)
    ]


def _check_fills_viewport(
    geometry: dict[str, Any], cols: int | None, rows: int | None, shown: int
) -> None:
    """``cols``/``rows`` None: "fit all", whose grid is the page's choice (as wide as it must)."""
    viewport, wall, gap = geometry["viewport"], geometry["wall"], geometry["gap"]
    if cols is None or rows is None:
        cols, rows = geometry["cols"], geometry["rows"]
        assert cols * rows >= shown and cols * (rows - 1) < shown, (cols, rows)
    # The wall takes the whole window under the bar.
    assert wall["left"] <= 8 and wall["right"] >= viewport["width"] - 8, geometry["wall"]
    assert wall["top"] <= geometry["header"]["bottom"] + 8, (wall, geometry["header"])
    assert wall["bottom"] >= viewport["height"] - 8, (wall, viewport)
    assert (geometry["cols"], geometry["rows"]) == (cols, rows)
    tiles = geometry["tiles"]
    assert len(tiles) == shown
    cell_width = (wall["width"] - (cols - 1) * gap) / cols
    cell_height = (wall["height"] - (rows - 1) * gap) / rows
    for tile in tiles:
        assert abs(tile["width"] - cell_width) <= 2 and abs(tile["height"] - cell_height) <= 2, (
            tile,
            cell_width,
            cell_height,
        )
    # The first tile in the top left corner, the grid's last cell ends in the bottom right.
    first = min(tiles, key=lambda t: (t["top"], t["left"]))
    assert abs(first["left"] - wall["left"]) <= 2 and abs(first["top"] - wall["top"]) <= 2
    if shown == cols * rows:
        last = max(tiles, key=lambda t: (t["bottom"], t["right"]))
        assert abs(last["right"] - wall["right"]) <= 2 and abs(last["bottom"] - wall["bottom"]) <= 2
    # The stats overlay: every part one line high, nothing spilling out.
    for overlay in geometry["overlays"]:
        assert all(height <= overlay["line"] * 1.3 + 4 for height in overlay["parts"]), overlay
        assert not overlay["overflows"], overlay


def _order(page: Page) -> list[str]:
    return page.evaluate(  # type: ignore[no-any-return]
        """() => [...document.querySelectorAll('#wall .tile')]
            .sort((a, b) => Number(a.style.order) - Number(b.style.order))
            .map((t) => t.dataset.streamId)"""
    )


def _wait_stats_shown(page: Page) -> None:
    page.wait_for_function(
        """() => [...document.querySelectorAll('#wall .tile')].filter((t) => !t.hidden)
            .every((t) => t.querySelector('.bitrate').textContent.includes('fps'))""",
        timeout=20_000,
    )


async def test_each_layout_fills_the_viewport_with_one_line_overlays(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(_cameras(12)))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport=VIEWPORT)
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function("document.querySelectorAll('.tile').length === 12")
        for layout, cols, rows, shown in [
            ("fit", None, None, 12),
            ("1", 1, 1, 1),
            ("2", 2, 2, 4),
            ("3", 3, 3, 9),
            ("4", 4, 4, 12),
        ]:
            page.select_option("#wall-layout", layout)
            page.wait_for_function(
                "(n) => [...document.querySelectorAll('#wall .tile')].filter((t) => !t.hidden)"
                ".every((t) => t.dataset.state === 'live') && document.querySelectorAll("
                "'#wall .tile:not([hidden])').length === n",
                arg=shown,
                timeout=30_000,
            )
            page.wait_for_function(ALL_VIDEOS_PLAYING, arg="#wall .tile:not([hidden]) video")
            _wait_stats_shown(page)
            _check_fills_viewport(page.evaluate(GEOMETRY), cols, rows, shown)
        # Pages: 2x2 shows four at a time, the others stop (the server frees them).
        page.select_option("#wall-layout", "2")
        assert page.inner_text("#wall-page") == "1 / 3"
        page.click("#wall-next")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#wall .tile:not([hidden])')]"
            ".map((t) => t.dataset.streamId).join() === 'cam-05,cam-06,cam-07,cam-08'"
        )
        page.wait_for_function("WebSocketManager.getInstance().streamHandlers.size === 4")
        assert watch.errors == []

    await in_browser(scenario)


async def test_double_click_goes_full_screen_and_escape_comes_back(
    start_server: StartServer,
) -> None:
    server = await start_server(make_config(_cameras(4)))

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport=VIEWPORT)
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=30_000)
        page.dblclick(".tile[data-stream-id='cam-03']")
        page.wait_for_function(
            "document.fullscreenElement && document.fullscreenElement.dataset.streamId === 'cam-03'"
        )
        size = page.evaluate(
            "(() => { const r = document.fullscreenElement.getBoundingClientRect();"
            " return [r.width, r.height, screen.width, screen.height]; })()"
        )
        assert size[0] == size[2] and size[1] == size[3], size  # the whole screen
        page.keyboard.press("Escape")
        page.wait_for_function("document.fullscreenElement === null")
        _check_fills_viewport(page.evaluate(GEOMETRY), 2, 2, 4)
        assert watch.errors == []

    await in_browser(scenario)


async def test_layout_and_tile_order_survive_a_reload(start_server: StartServer) -> None:
    server = await start_server(make_config(_cameras(6)))

    def scenario(browser: Browser) -> None:
        context = browser.new_context(viewport=VIEWPORT)  # one localStorage across the reload
        page = context.new_page()
        watch = PageWatch(page)
        page.goto(f"{server.url}/static/dashboard.html")
        page.wait_for_function("document.querySelectorAll('.tile').length === 6")
        assert _order(page) == [f"cam-{n:02d}" for n in range(1, 7)]
        page.select_option("#wall-layout", "3")
        # Drag the fifth tile onto the first; then move the second one later with its button.
        page.drag_and_drop(".tile[data-stream-id='cam-05']", ".tile[data-stream-id='cam-01']")
        assert _order(page) == ["cam-05", "cam-01", "cam-02", "cam-03", "cam-04", "cam-06"]
        page.hover(".tile[data-stream-id='cam-01']")
        page.click(".tile[data-stream-id='cam-01'] .tile-actions button[title='Move later']")
        expected = ["cam-05", "cam-02", "cam-01", "cam-03", "cam-04", "cam-06"]
        assert _order(page) == expected

        page.reload()
        page.wait_for_function("document.querySelectorAll('.tile').length === 6")
        assert page.input_value("#wall-layout") == "3"
        assert _order(page) == expected
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=30_000)
        _wait_stats_shown(page)
        geometry = page.evaluate(GEOMETRY)
        _check_fills_viewport(geometry, 3, 3, 6)
        # Shown in that order: row by row.
        by_place = sorted(geometry["tiles"], key=lambda t: (round(t["top"]), t["left"]))
        assert [t["id"] for t in by_place] == expected
        assert watch.errors == []
        context.close()

    await in_browser(scenario)
