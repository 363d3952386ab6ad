"""The camera wall of a two-node cluster in real Chromium: its tiles come from both nodes over
one socket, and the management view names each stream's owner and lists the nodes."""

from __future__ import annotations

from playwright.sync_api import Browser

from mediastream.cluster.placement import stream_ids_placed_on

from support.browser import ALL_VIDEOS_PLAYING, PageWatch, get_json, in_browser, open_sockets
from support.redis import RedisServer
from support.servers import StartServer, make_config

PATTERN = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=25"
NODES = ("node-a", "node-b")


def placed_on(node_id: str) -> str:
    """A stream id that placement gives to ``node_id`` when both nodes serve, idle."""
    return stream_ids_placed_on(node_id, NODES, 1, "wall")[0]


async def test_the_wall_of_a_cluster_plays_tiles_of_both_nodes_and_names_their_owners(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    on_a, on_b = placed_on("node-a"), placed_on("node-b")
    streams = [{"id": s, "source": PATTERN, "on_demand": True} for s in (on_a, on_b)]
    a, b = [
        await start_server(
            make_config(streams, cluster={"redis_url": redis_server.url, "node_id": node_id})
        )
        for node_id in NODES
    ]
    for node in (a, b):
        assert node.services.cluster is not None
        await node.services.cluster._started.wait()

    def scenario(browser: Browser) -> None:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.goto(f"{a.url}/static/dashboard.html")
        page.wait_for_function("document.querySelectorAll('.tile').length === 2")
        page.wait_for_function(ALL_VIDEOS_PLAYING, arg=".tile video", timeout=30_000)
        # One socket, to node A (held by the browser's shared worker), for tiles owned by A and B.
        assert open_sockets(a.url)["open"] == 1 and open_sockets(b.url)["open"] == 0
        owners = {s["id"]: s["owner"]["node"] for s in get_json(f"{a.url}/api/streams")["streams"]}
        assert owners == {on_a: "node-a", on_b: "node-b"}

        page.click("#manage-toggle")
        for stream_id, node_id in owners.items():
            page.wait_for_selector(
                f"#stream-table tr[data-stream-id='{stream_id}'] td.owner:text('{node_id}')"
            )
        page.wait_for_selector("#node-table:not([hidden]) tr[data-node-id='node-b']")
        rows = page.locator("#node-table tbody tr").all_inner_texts()
        assert len(rows) == 2
        assert "node-a (this node)" in rows[0] and on_a in rows[0]
        assert "serving" in rows[1] and on_b in rows[1]
        assert watch.errors == []

    await in_browser(scenario)
