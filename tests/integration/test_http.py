"""The HTTP side: API, health, static files that never go stale, WebSocket compression."""

from __future__ import annotations

import base64
import os
import re

import trio

from support.http import get, request
from support.servers import StartServer, make_config


async def test_healthz(start_server: StartServer) -> None:
    server = await start_server()
    response = await get(server.url + "/healthz")
    assert (response.status, response.json()) == (200, {"status": "ok"})


async def test_stream_list_shows_every_stream_without_credentials(
    start_server: StartServer,
) -> None:
    config = make_config(
        [
            {"id": "door", "name": "Front door", "source": "rtsp://admin:hunter2@127.0.0.1:9/x"},
            {"id": "bars", "source": "pattern:smptebars?size=320x180"},
        ]
    )
    server = await start_server(config)
    response = await get(server.url + "/api/streams")
    assert response.status == 200
    assert b"hunter2" not in response.body and b"admin" not in response.body
    door, bars = response.json()["streams"]
    assert door["id"] == "door" and door["name"] == "Front door"
    assert door["source"] == "rtsp://***@127.0.0.1:9/x"
    assert (door["state"], door["viewers"], door["codec"], door["onDemand"]) == (
        "stopped",
        0,
        "h264",
        True,
    )
    assert bars["name"] == "bars"
    one = await get(server.url + "/api/streams/door")
    assert one.json()["source"] == door["source"]


async def test_unknown_stream_is_a_json_404(start_server: StartServer) -> None:
    server = await start_server()
    response = await get(server.url + "/api/streams/nope")
    assert response.status == 404
    assert response.json()["code"] == "stream_not_found"


async def test_pages_reference_scripts_by_content_version_and_are_revalidated(
    start_server: StartServer,
) -> None:
    server = await start_server()
    page = await get(server.url + "/static/dashboard.html")
    assert page.status == 200
    assert page.headers["cache-control"] == "no-cache"
    versions = re.findall(rb'src="/static/js/websocket-manager\.js\?v=([0-9a-f]{12})"', page.body)
    assert len(versions) == 1
    script = await get(server.url + "/static/js/websocket-manager.js")
    assert script.status == 200 and script.headers["cache-control"] == "no-cache"
    assert "javascript" in script.headers["content-type"]
    again = await get(
        server.url + "/static/js/websocket-manager.js",
        headers={"If-None-Match": script.headers["etag"]},
    )
    assert again.status == 304
    page_again = await get(
        server.url + "/static/dashboard.html", headers={"If-None-Match": page.headers["etag"]}
    )
    assert page_again.status == 304


async def test_static_files_outside_the_folder_are_not_served(start_server: StartServer) -> None:
    server = await start_server()
    for path in ("/static/../pyproject.toml", "/static/%2e%2e/pyproject.toml", "/static/nope.js"):
        assert (await get(server.url + path)).status == 404


async def test_root_leads_to_the_dashboard(start_server: StartServer) -> None:
    server = await start_server()
    response = await get(server.url + "/")
    assert response.status in (301, 302)
    assert response.headers["location"].endswith("/static/dashboard.html")


async def test_a_connection_close_response_ends_at_eof(start_server: StartServer) -> None:
    # Guards the Hypercorn/Quart-Trio keep-alive fix in server.py: without it this read hangs.
    server = await start_server()
    response = await request(
        server.url + "/healthz", headers={"Connection": "close"}, read_to_eof=True, timeout=5
    )
    assert response.status == 200
    assert response.json() == {"status": "ok"}


async def test_websocket_negotiates_permessage_deflate(start_server: StartServer) -> None:
    server = await start_server()
    key = base64.b64encode(os.urandom(16)).decode()
    host, port = server.url.removeprefix("http://").split(":")
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            await stream.send_all(
                (
                    f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                    "Sec-WebSocket-Version: 13\r\n"
                    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
                ).encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(4096)
    status_line, *header_lines = head.split(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    assert status_line.split()[1] == "101"
    assert headers["sec-websocket-extensions"].startswith("permessage-deflate")
