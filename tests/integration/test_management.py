"""The management API: add, edit, stop, start, delete streams while they play; changes persist."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import trio

from mediastream.auth import Authenticator
from mediastream.config import SecurityConfig

from support.http import HttpResponse, request
from support.servers import DEMO_STREAMS, StartServer, make_config
from support.viewer import SignalingFailed, open_viewer

PATTERN = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=25"


async def call(url: str, method: str, body: Any = None, token: str | None = None) -> HttpResponse:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return await request(url, method=method, headers=headers, body=data)


async def test_streams_are_added_edited_stopped_started_and_deleted_while_viewers_watch(
    start_server: StartServer,
) -> None:
    server = await start_server()
    api = server.url + "/api/streams"
    created = await call(api, "POST", {"id": "lobby", "name": "Lobby", "source": PATTERN})
    assert created.status == 201
    assert created.json()["origin"] == "api" and created.json()["name"] == "Lobby"
    assert "lobby" in [s["id"] for s in (await call(api, "GET")).json()["streams"]]

    async with open_viewer(server.ws_url) as viewer:
        played = await viewer.play("lobby")
        await played.wait_frames(10)

        # A new name, and then a new source: the viewer stays connected throughout.
        renamed = await call(f"{api}/lobby", "PATCH", {"name": "Main lobby"})
        assert renamed.json()["name"] == "Main lobby"
        assert renamed.json()["source"] == created.json()["source"]  # kept as it was
        replaced = await call(
            f"{api}/lobby", "PUT", {"source": "pattern:smptebars?size=320x180&fps=25&kbps=300"}
        )
        assert replaced.status == 200 and replaced.json()["name"] == "lobby"
        await played.wait_frames(25)
        assert sum(1 for m in viewer.messages if m["type"] == "answer") == 1

        stopped = await call(f"{api}/lobby/stop", "POST")
        assert stopped.json()["enabled"] is False
        error = await viewer.wait_for(lambda m: m["type"] == "error" and m["streamId"] == "lobby")
        assert error["code"] == "stream_unavailable"
        with pytest.raises(SignalingFailed) as refused:
            await viewer.play("lobby")
        assert refused.value.code == "stream_unavailable"

        started = await call(f"{api}/lobby/start", "POST")
        assert started.json()["enabled"] is True
        again = await viewer.play("lobby")
        await again.wait_frames(10)

        assert (await call(f"{api}/lobby", "DELETE")).status == 204
        gone = await viewer.wait_for(
            lambda m: (
                m["type"] == "error" and m["streamId"] == "lobby" and "deleted" in m["payload"]
            )
        )
        assert gone["code"] == "stream_unavailable"
    after = await call(f"{api}/lobby", "GET")
    assert after.status == 404, after.body
    with trio.fail_after(10):
        await server.services.changes.wait_until(
            lambda: server.services.statistics().open_peer_connections == 0
        )


async def test_api_changes_survive_a_real_restart(
    start_server: StartServer, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(DEMO_STREAMS, server={"port": port, "data_dir": str(tmp_path / "data")})
    first = await start_server(config)
    api = first.url + "/api/streams"
    assert (
        await call(api, "POST", {"id": "yard", "source": PATTERN, "on_demand": False})
    ).status == 201
    assert (await call(f"{api}/demo-2", "DELETE")).status == 204
    assert (await call(f"{api}/demo-3/stop", "POST")).status == 200
    assert (await call(f"{api}/demo-1", "PATCH", {"name": "Renamed"})).status == 200
    first.request_shutdown()
    await first.wait_stopped()

    second = await start_server(config)
    streams = {
        s["id"]: s for s in (await call(second.url + "/api/streams", "GET")).json()["streams"]
    }
    assert sorted(streams) == ["demo-1", "demo-3", "yard"]
    assert streams["yard"]["origin"] == "api" and streams["yard"]["onDemand"] is False
    assert streams["demo-3"]["enabled"] is False and streams["demo-3"]["origin"] == "config"
    assert streams["demo-1"]["name"] == "Renamed" and streams["demo-1"]["origin"] == "api"
    async with open_viewer(second.ws_url) as viewer:
        await (await viewer.play("yard")).wait_frames(5)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field", "fragment"),
    [
        ("POST", "", {"id": "x"}, 400, "source", "missing required key"),
        ("POST", "", {"id": "bad id", "source": PATTERN}, 400, "id", "not a valid id"),
        ("POST", "", {"id": "x", "source": PATTERN, "colour": "red"}, 400, "colour", "unknown key"),
        ("POST", "", {"id": "x", "source": "pattern:nosuch"}, 400, "source", "unknown pattern"),
        (
            "POST",
            "",
            {"id": "x", "source": PATTERN, "onDemand": "yes"},
            400,
            "on_demand",
            "true or false",
        ),
        (
            "POST",
            "",
            {"id": "x", "source": "ftp://cam/x"},
            400,
            "source",
            "unsupported source scheme",
        ),
        ("POST", "", b"{not json", 400, None, "JSON object"),
        ("POST", "", ["a list"], 400, None, "JSON object"),
        ("POST", "", {"id": "demo-1", "source": PATTERN}, 409, "id", "exists already"),
        ("PUT", "/demo-1", {"id": "other", "source": PATTERN}, 400, "id", "is not the stream"),
        ("PUT", "/nope", {"source": PATTERN}, 404, None, "not found"),
        ("DELETE", "/nope", None, 404, None, "not found"),
        ("POST", "/nope/start", None, 404, None, "not found"),
    ],
)
async def test_bad_requests_name_the_field(
    start_server: StartServer,
    method: str,
    path: str,
    body: Any,
    status: int,
    field: str | None,
    fragment: str,
) -> None:
    server = await start_server()
    response = await call(f"{server.url}/api/streams{path}", method, body)
    assert response.status == status
    assert fragment in response.json()["error"]
    assert response.json().get("field") == field
    # Nothing changed.
    listed = (await call(f"{server.url}/api/streams", "GET")).json()["streams"]
    assert [s["id"] for s in listed] == ["demo-1", "demo-2", "demo-3"]


async def test_changing_streams_needs_an_admin_token(start_server: StartServer) -> None:
    secret = "management-secret-" + "m" * 32
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": secret}))
    authenticator = Authenticator(SecurityConfig(jwt_secret=secret))
    viewer_token = authenticator.issue(["*"], 60)
    admin_token = authenticator.issue(["*"], 60, admin=True)
    body = {"id": "new", "source": PATTERN}
    api = server.url + "/api/streams"
    assert (await call(api, "POST", body)).status == 401
    assert (await call(api, "POST", body, token=viewer_token)).status == 403
    assert (await call(f"{api}/demo-1", "DELETE", token=viewer_token)).status == 403
    assert (await call(f"{api}/demo-1/stop", "POST", token=viewer_token)).status == 403
    assert (await call(api, "POST", body, token=admin_token)).status == 201
