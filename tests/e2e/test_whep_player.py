"""A WHEP player nobody here wrote plays a stream in real Chromium.

The player is ``whip-whep`` (npm, by the WHIP/WHEP RFC's author; a devDependency installed by
``npm ci`` in scripts/test.sh). Its ``whep.js`` is an ES module with no imports, so the test
page loads it as it is, with ``<script type="module">``: nothing is bundled. Page and module
are served by the test's own little HTTP server on another loopback port, so every WHEP request
the player makes crosses origins: CORS preflights, exposed headers and tokens included. (A page
Playwright made up for an invented origin counts as public to Chromium, which then refuses its
requests to a loopback address: Local Network Access.)
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser

from mediastream.auth import Authenticator
from mediastream.config import SecurityConfig

from support.browser import PageWatch, in_browser
from support.servers import DEMO_STREAMS, StartServer, make_config

WHEP_JS = Path(__file__).parents[2] / "node_modules" / "whip-whep" / "whep.js"
SECRET = "whep-e2e-secret-" + "x" * 32

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>whip-whep player</title>
<video muted autoplay playsinline></video>
<script type="module">
import { WHEPClient } from "/whep.js";

const video = document.querySelector("video");
let client = null;
// Every WHEP request the player makes, with its answer: [method, status, url].
window.calls = [];
const fetchForReal = window.fetch;
window.fetch = async (url, init) => {
    const response = await fetchForReal(url, init);
    window.calls.push([init?.method ?? "GET", response.status, String(url)]);
    return response;
};

window.play = async (endpoint, token) => {
    const pc = new RTCPeerConnection();
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => { video.srcObject = new MediaStream([event.track]); };
    client = new WHEPClient();
    await client.view(pc, endpoint, token);
    return client.resourceURL.href;
};
window.stop = () => client.stop();
window.ready = true;
</script>
"""


async def test_a_whep_player_from_npm_plays_trickles_and_deletes_its_session(
    start_server: StartServer,
) -> None:
    assert WHEP_JS.is_file(), f"{WHEP_JS} is missing: run `npm ci` (scripts/test.sh does)"
    with serving_the_player() as player_origin:
        config = make_config(
            DEMO_STREAMS, security={"jwt_secret": SECRET, "allowed_origins": [player_origin]}
        )
        server = await start_server(config)
        token = Authenticator(SecurityConfig(jwt_secret=SECRET)).issue(["demo-1"], 600)
        seen = await in_browser(play_and_delete, player_origin, f"{server.url}/whep/demo-1", token)
    assert seen["location"].startswith(f"{server.url}/whep/demo-1/")
    assert seen["size"] == [320, 180]
    # The offer answered, then the player's candidates trickled: RFC 8840 fragments taken.
    assert ["POST", 201] in seen["playing"]
    assert ["PATCH", 204] in seen["playing"]
    assert seen["deleted"] == ["DELETE", 200, seen["location"]]
    assert seen["errors"] == []
    # The DELETE is answered once the session's peer connection is closed.
    assert server.services.whep.open_sessions == 0
    assert server.services.peers.statistics().open_peer_connections == 0


def play_and_delete(browser: Browser, origin: str, endpoint: str, token: str) -> dict[str, Any]:
    page = browser.new_page()
    watch = PageWatch(page)
    page.goto(f"{origin}/")
    page.wait_for_function("window.ready === true")
    location = page.evaluate(
        "([endpoint, token]) => window.play(endpoint, token)",
        [endpoint, token],
    )
    page.wait_for_function(
        """() => {
                const video = document.querySelector('video');
                return video.currentTime > 1
                    && video.getVideoPlaybackQuality().totalVideoFrames > 10;
            }""",
        timeout=20_000,
    )
    size = page.evaluate(
        "() => [document.querySelector('video').videoWidth,"
        " document.querySelector('video').videoHeight]"
    )
    playing = page.evaluate("() => window.calls.map(([method, status]) => [method, status])")
    page.evaluate("() => window.stop()")  # closes the peer, then awaits the DELETE
    return {
        "location": location,
        "size": size,
        "playing": playing,
        "deleted": page.evaluate("() => window.calls.at(-1)"),
        "errors": watch.errors,
    }


@contextlib.contextmanager
def serving_the_player() -> Iterator[str]:
    """The test page and whep.js on a free loopback port; yields the page's origin."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/whep.js":
                body, kind = WHEP_JS.read_bytes(), "text/javascript"
            else:
                body, kind = PAGE.encode(), "text/html"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test reports what matters

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, name="player page", daemon=True)
        thread.start()
        try:
            yield f"http://localhost:{httpd.server_address[1]}"
        finally:
            httpd.shutdown()
            thread.join()
