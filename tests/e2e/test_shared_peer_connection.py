"""One peer connection per page (``configure({ peerConnection: 'shared' })``) in real headless
Chromium: 16 tiles in one RTCPeerConnection all decode, the server holds one peer connection
for them, and tiles removed and added by renegotiation leave the others decoding."""

from __future__ import annotations

from typing import Any

from playwright.sync_api import Browser, Page

from support.browser import PageWatch, ServerWatch, get_json, in_browser
from support.servers import RestartableServer, StartServer, make_config, pattern_cameras

TILES = 16
SMALL = "size=160x90&fps=10&kbps=80&gop=20"

# Counts the page's RTCPeerConnections (every one made, and those not closed) and remembers
# every connectionState any of them reached.
COUNT_PEER_CONNECTIONS = """(() => {
    const Native = window.RTCPeerConnection;
    window.msPeers = {made: 0, closed: 0, states: []};
    window.RTCPeerConnection = class extends Native {
        constructor(...args) {
            super(...args);
            window.msPeers.made += 1;
            this.addEventListener('connectionstatechange',
                () => window.msPeers.states.push(this.connectionState));
        }
        close() {
            if (this.signalingState !== 'closed') window.msPeers.closed += 1;
            super.close();
        }
    };
})()"""

# Each tile's framesDecoded from its own receiver's stats, and its video's size.
TILE_FRAMES = """() => {
    const result = {};
    for (const [id, engine] of window.msTestPage.engines) {
        const stats = engine.getStats();
        const video = document.querySelector(`[data-stream-id="${id}"] video`);
        result[id] = {frames: stats ? stats.framesDecoded : 0,
                      width: video ? video.videoWidth : 0, state: engine.state};
    }
    return result;
}"""


def _wait_all_decoding(page: Page, ids: list[str], more_than: dict[str, int]) -> dict[str, Any]:
    """Every tile in ``ids`` shows a picture and has decoded more frames than ``more_than``."""
    page.wait_for_function(
        """([ids, before]) => {
            for (const id of ids) {
                const engine = window.msTestPage.engines.get(id);
                const stats = engine && engine.getStats();
                const video = document.querySelector(`[data-stream-id="${id}"] video`);
                if (!stats || !video || video.videoWidth === 0) return false;
                if (stats.framesDecoded <= (before[id] || 0) + 5) return false;
            }
            return true;
        }""",
        arg=[ids, more_than],
        timeout=60_000,
        polling=500,
    )
    frames: dict[str, Any] = page.evaluate(TILE_FRAMES)
    return frames


async def test_sixteen_tiles_share_one_peer_connection_through_add_and_remove(
    start_server: StartServer,
) -> None:
    streams = pattern_cameras(TILES + 1, SMALL)  # one more, added while others go
    server = await start_server(make_config(streams))

    def scenario(browser: Browser) -> dict[str, Any]:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        watch = PageWatch(page)
        page.add_init_script(COUNT_PEER_CONNECTIONS)
        page.goto(f"{server.url}/static/test-multi-stream.html?peerConnection=shared")
        ids = [s["id"] for s in streams[:TILES]]
        page.evaluate(
            "(ids) => { for (const id of ids) window.msTestPage.addCard({id, name: id}); }", ids
        )
        frames = _wait_all_decoding(page, ids, {})
        assert all(f["width"] > 0 for f in frames.values())
        peers = page.evaluate("window.msPeers")
        assert peers["made"] - peers["closed"] == 1, peers
        stats = get_json(f"{server.url}/api/stats")
        assert stats["peerConnections"]["open"] == 1, stats
        assert stats["sessions"] == TILES, stats
        assert stats["sockets"]["open"] == 1

        # Remove and add tiles ten times (each round: one out, one in, the page renegotiates);
        # every tile still on the page goes on decoding.
        spare = streams[TILES]["id"]
        for round_number in range(10):
            leaving = ids[round_number % len(ids)]
            page.evaluate("(id) => window.msTestPage.removeCard(id)", leaving)
            ids.remove(leaving)
            page.evaluate("(id) => window.msTestPage.addCard({id, name: id})", spare)
            ids.append(spare)
            spare = leaving
            before = {k: v["frames"] for k, v in page.evaluate(TILE_FRAMES).items()}
            _wait_all_decoding(page, ids, before)
        peers = page.evaluate("window.msPeers")
        assert peers["made"] - peers["closed"] == 1, peers
        assert "failed" not in peers["states"], peers
        # The removed streams' m-lines were recycled for the added ones (aiortc's m-line index
        # trap, see webrtc/aiortc_compat.py): the anchor, 16 tiles, at most one line in between.
        sections = page.evaluate(
            "() => SharedPeerConnection.current(WebSocketManager.getInstance())"
            ".pc.localDescription.sdp.split('\\nm=').length - 1"
        )
        assert sections <= 1 + TILES + 1, sections
        stats = get_json(f"{server.url}/api/stats")
        assert stats["peerConnections"]["open"] == 1, stats
        assert stats["peerConnections"]["opened"] == 1, stats
        assert stats["sessions"] == TILES, stats
        assert watch.errors == []
        return {"peers": peers, "stats": stats}

    await in_browser(scenario)


async def test_a_stream_refused_on_a_shared_connection_is_named_while_the_others_play(
    start_server: StartServer,
) -> None:
    streams = pattern_cameras(4, SMALL)
    server = await start_server(make_config(streams, limits={"max_streams_per_socket": 3}))

    def scenario(browser: Browser) -> None:
        page = browser.new_page()
        page.goto(f"{server.url}/static/test-multi-stream.html?peerConnection=shared")
        page.evaluate(
            """(ids) => {
                window.msErrors = [];
                for (const id of ids) {
                    window.msTestPage.addCard({id, name: id});
                    window.msTestPage.engines.get(id).on('error', (e) => window.msErrors.push(e));
                }
            }""",
            ["cam-01", "cam-02", "no-such-camera", "cam-03", "cam-04"],
        )
        page.wait_for_function("() => window.msErrors.length >= 2", timeout=30_000)
        errors = {e["streamId"]: e["code"] for e in page.evaluate("window.msErrors")}
        assert errors == {"no-such-camera": "stream_not_found", "cam-04": "too_many_streams"}
        playing = ["cam-01", "cam-02", "cam-03"]
        _wait_all_decoding(page, playing, {})
        states = page.evaluate(TILE_FRAMES)
        assert states["no-such-camera"]["state"] == "error"
        assert states["cam-04"]["state"] == "error"
        stats = get_json(f"{server.url}/api/stats")
        assert stats["peerConnections"]["open"] == 1 and stats["sessions"] == 3, stats
        # Removing the refused tiles renegotiates; the others play on.
        page.evaluate("() => ['no-such-camera', 'cam-04'].forEach(window.msTestPage.removeCard)")
        before = {k: v["frames"] for k, v in page.evaluate(TILE_FRAMES).items()}
        _wait_all_decoding(page, playing, before)

    await in_browser(scenario)


async def test_a_shared_connection_comes_back_after_a_server_restart_and_ends_with_its_tab(
    start_server: StartServer,
) -> None:
    restartable = await RestartableServer.start(start_server, pattern_cameras(4, SMALL))
    watch_server = ServerWatch(lambda: restartable.current)

    def scenario(browser: Browser) -> None:
        page = browser.new_page()
        watch = PageWatch(page)
        page.add_init_script(COUNT_PEER_CONNECTIONS)
        page.goto(f"{restartable.url}/static/test-multi-stream.html?peerConnection=shared")
        ids = [s["id"] for s in pattern_cameras(4, SMALL)]
        page.evaluate(
            "(ids) => { for (const id of ids) window.msTestPage.addCard({id, name: id}); }", ids
        )
        _wait_all_decoding(page, ids, {})
        watch_server.wait(lambda s: s.open_sessions == 4 and s.open_peer_connections == 1, 10)

        # The server goes away and comes back on the same port: the page makes a new shared
        # connection by itself, and every tile decodes on it.
        watch_server.run(restartable.restart)
        page.wait_for_function("() => !WebSocketManager.getInstance().connected", timeout=10_000)
        watch_server.wait(lambda s: s.open_sessions == 4 and s.open_peer_connections == 1, 40)
        before = {k: v["frames"] for k, v in page.evaluate(TILE_FRAMES).items()}
        _wait_all_decoding(page, ids, {k: 0 for k in before})
        peers = page.evaluate("window.msPeers")
        assert peers["made"] - peers["closed"] == 1, peers
        assert watch.errors == [], watch.errors

        # The tab goes: the shared worker ends its shared connection on the server.
        page.close()
        watch_server.wait(lambda s: s.open_sessions == 0 and s.open_peer_connections == 0, 10)

    await in_browser(scenario)
