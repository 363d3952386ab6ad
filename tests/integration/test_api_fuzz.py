"""The HTTP API, fuzzed against its OpenAPI description by a tool nobody here wrote.

schemathesis reads ``src/mediastream/openapi.json`` and sends a live server what it makes of
it: the description's examples, boundary and invalid values of every parameter and body,
random ones, methods the description doesn't list, and chains of calls (add a stream, read it,
change it, stop it, delete it, read it again). Every answer must be described (status code,
content type, body schema, headers), and none may be a server error, but the snapshot's 502
and 503, which say the camera can't give a picture. Its command line runs in a process of its
own against a server of this test's Trio run, started the way ``conftest.py`` starts them.

Runs: open mode (everyone is admin), then tokens: no token (every ``/api`` answer a 401), a
viewer's token as the ``token`` query parameter, an admin's as a bearer header. Generation is
deterministic and the cache of earlier failures is off, so a CI run is reproducible. For a
longer run: ``MEDIASTREAM_API_FUZZ_EXAMPLES=500`` (examples per operation and phase).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import trio

from mediastream.auth import Authenticator
from mediastream.config import SecurityConfig

from support.http import HttpResponse, request
from support.redis import RedisServer
from support.servers import DEMO_STREAMS, StartServer, make_config

DESCRIPTION = Path(__file__).parents[2] / "src" / "mediastream" / "openapi.json"
#: teaches schemathesis the WHEP bodies' media types
HOOKS = Path(__file__).parents[1] / "support" / "schemathesis_hooks.py"
EXAMPLES = int(os.environ.get("MEDIASTREAM_API_FUZZ_EXAMPLES", "25"))
RUN_TIMEOUT = 300  # seconds for one schemathesis run; a CI run takes a small part of it
SECRET = "api-fuzz-secret-" + "f" * 32
PATTERN = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=25"

#: schemathesis's configuration, the same for every run (the auth part is added per run).
SETTINGS = """
workers = 1
color = false
# A snapshot of a stopped stream waits up to 15 s for its source's first keyframe.
request-timeout = 30
# Hypothesis's timing of data generation: the CI machine's cores are shared.
suppress-health-check = ["too_slow"]

[generation]
deterministic = true
max-examples = {examples}
# Tokens come from [auth] below, never made up: a made-up `token` parameter would win over the
# run's real one and turn every answer into a 401.
with-security-parameters = false

[cache]
# Reproducible: no failures remembered from earlier runs, nothing written beside the tests.
enabled = false

[checks]
# The description can't say which sources exist on the server or that a body's `id` must be
# the path's: definitions that fit the schema are often rightly refused with a 400.
positive_data_acceptance.enabled = false
# Open mode ignores tokens by design (docs/security.md): set per run.
ignored_auth.enabled = {ignored_auth}

[[operations]]
include-operation-id = "getSnapshot"
# 502 (the keyframe didn't decode) and 503 (stopped, nothing cached, no keyframe in time) are
# the described answers when a camera can't give a picture, not failures of the server.
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "502", "503"]

[[operations]]
include-operation-id = "whepOffer"
# 503 (the stream is stopped, the server full) and 504 (no answer in time) are described
# answers of a WHEP offer, not failures of the server.
checks.not_a_server_error.expected-statuses = ["2xx", "3xx", "4xx", "503", "504"]
"""


async def test_the_api_answers_as_described_in_open_mode(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(make_config(DEMO_STREAMS))
    answers = await run_schemathesis(server.url, tmp_path, "open")
    assert len(answers) > 100
    assert (await request(server.url + "/healthz")).status == 200


async def test_the_api_answers_as_described_with_tokens(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": SECRET}))
    authenticator = Authenticator(SecurityConfig(jwt_secret=SECRET))
    viewer = authenticator.issue(["demo-1", "demo-3"], 600)
    admin = authenticator.issue(["*"], 600, admin=True)

    anonymous = await run_schemathesis(server.url, tmp_path, "no-token")
    # Quart answers OPTIONS itself (with the Allow header schemathesis checks), and a method the
    # description doesn't list with a 405, before any route runs: everything else is a 401.
    statuses = collections.Counter(
        status for method, path, status in anonymous if method != "OPTIONS" and path != "/healthz"
    )
    assert set(statuses) <= {401, 405} and statuses[401] > 50, statuses
    # The viewer's run comes before the admin's, which deletes and stops streams.
    assert len(await run_schemathesis(server.url, tmp_path, "viewer", token=viewer)) > 100
    assert len(await run_schemathesis(server.url, tmp_path, "admin", bearer=admin)) > 100
    assert (await request(server.url + "/healthz")).status == 200


#: A cluster node's run leaves out what only its stream's owner can serve: a snapshot or a
#: WHEP offer on a node that does not own the stream waits for frames that never come there
#: (docs/cluster.md, known limits), 15 s or more per call.
CLUSTER_SETTINGS = """
[[operations]]
include-operation-id = "getSnapshot"
enabled = false

[[operations]]
include-operation-id = "whepOffer"
enabled = false
"""


async def test_a_cluster_node_answers_as_described(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Owners in /api/streams, /api/cluster and the store's answers, from a node of a cluster
    # (one node, a real Redis): changes go through the shared store.
    config = make_config(DEMO_STREAMS, cluster={"redis_url": redis_server.url, "node_id": "n1"})
    server = await start_server(config)
    answers = await run_schemathesis(server.url, tmp_path, "open", extra=CLUSTER_SETTINGS)
    assert len(answers) > 100
    assert any(path == "/api/cluster" and status == 200 for _, path, status in answers)
    assert (await request(server.url + "/healthz")).status == 200


async def test_the_description_is_served_to_token_holders(start_server: StartServer) -> None:
    server = await start_server(make_config(DEMO_STREAMS, security={"jwt_secret": SECRET}))
    viewer = Authenticator(SecurityConfig(jwt_secret=SECRET)).issue(["demo-1"], 60)
    url = server.url + "/api/openapi.json"
    refused = await request(url)
    assert (refused.status, refused.json()["code"]) == (401, "unauthorized")
    served = await request(url, headers={"Authorization": f"Bearer {viewer}"})
    assert served.status == 200 and served.headers["content-type"] == "application/json"
    assert served.json() == json.loads(DESCRIPTION.read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "body",
    [
        b"L\xc4\xc6\x99>",  # not UTF-8: what schemathesis sent the first time (it was a 500)
        b"[" * 100_000,  # nested deeper than Python's JSON parser goes
    ],
)
async def test_bodies_that_are_not_json_get_a_described_400(
    start_server: StartServer, body: bytes
) -> None:
    # Both were 500s. The fuzzer finds the first again in every run; the second it can't make
    # (its values are small), and it is the same fault in the same line.
    server = await start_server()
    for method, path in [("POST", ""), ("PUT", "/demo-1"), ("PATCH", "/demo-1")]:
        answer = await call(f"{server.url}/api/streams{path}", method, body)
        assert (answer.status, answer.headers["content-type"]) == (400, "application/json")
        assert answer.json()["code"] == "invalid_config", answer.body


async def test_concurrent_changes_of_one_stream_get_described_answers(
    start_server: StartServer,
) -> None:
    # What one schemathesis worker can't do: the same stream changed by several calls at once.
    # Before the changes were serialized, the second of two DELETEs was a 500 (KeyError).
    server = await start_server()
    api = server.url + "/api/streams"
    for round_ in range(3):
        stream = f"{api}/race-{round_}"
        assert (await call(api, "POST", {"id": f"race-{round_}", "source": PATTERN})).status == 201
        changes = [
            (stream, "DELETE", None),
            (stream, "DELETE", None),
            (f"{stream}/stop", "POST", None),
            (stream, "PUT", {"source": PATTERN}),
            (stream, "PATCH", {"name": "Renamed"}),
        ]
        statuses = sorted(answer.status for answer in await call_at_once(changes))
        assert statuses.count(204) == 1 and set(statuses) <= {200, 204, 404}, statuses

        new = {"id": f"race-{round_}-new", "source": PATTERN}
        added = await call_at_once([(api, "POST", new)] * 3)
        assert sorted(answer.status for answer in added) == [201, 409, 409]


async def run_schemathesis(
    url: str,
    tmp_path: Path,
    name: str,
    *,
    token: str | None = None,
    bearer: str | None = None,
    extra: str = "",
) -> list[tuple[str, str, int]]:
    """Run schemathesis against ``url``; fail with its report if it found anything.

    Returns:
        the method, path and response status of every request it made.
    """
    settings = SETTINGS.format(examples=EXAMPLES, ignored_auth=str(name != "open").lower())
    if token is None and bearer is None and name != "open":
        # Every answer is the same 401: its examples and boundary values show it for each
        # operation; random data and chains of calls would only repeat it.
        settings += "\n[phases]\nfuzzing.enabled = false\nstateful.enabled = false\n"
    if token is not None:
        settings += '\n[auth.openapi.token]\napi_key = "${MEDIASTREAM_FUZZ_TOKEN}"\n'
    if bearer is not None:
        settings += '\n[auth.openapi.bearer]\nbearer = "${MEDIASTREAM_FUZZ_TOKEN}"\n'
    settings += extra
    config = tmp_path / f"schemathesis-{name}.toml"
    config.write_text(settings, encoding="utf-8")
    report = tmp_path / f"schemathesis-{name}.ndjson"
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        str(DESCRIPTION),
        "--url",
        url,
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
    ]
    env = {
        **os.environ,
        "MEDIASTREAM_FUZZ_TOKEN": token or bearer or "",
        "SCHEMATHESIS_HOOKS": str(HOOKS),
    }
    with trio.fail_after(RUN_TIMEOUT):
        result = await trio.run_process(
            command,
            cwd=tmp_path,
            env=env,
            capture_stdout=True,
            stderr=subprocess.STDOUT,
            check=False,
        )
    output = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"schemathesis ({name}) found failures:\n{output}"
    return answered(report)


def answered(report: Path) -> list[tuple[str, str, int]]:
    """Every request of a schemathesis NDJSON report, as (method, path, response status)."""
    answers = []
    for line in report.read_text(encoding="utf-8").splitlines():
        event = json.loads(line)
        recorder = event.get("ScenarioFinished", {}).get("recorder", {})
        for interaction in recorder.get("interactions", {}).values():
            if interaction.get("response") is not None:
                sent = interaction["request"]
                status = interaction["response"]["status_code"]
                answers.append((sent["method"], urlsplit(sent["uri"]).path, status))
    return answers


async def call_at_once(calls: list[tuple[str, str, Any]]) -> list[HttpResponse]:
    """Send every (url, method, body) at once, each on a connection of its own."""
    answers: list[HttpResponse] = []

    async def send(url: str, method: str, body: Any) -> None:
        answers.append(await call(url, method, body))

    async with trio.open_nursery() as nursery:
        for url, method, body in calls:
            nursery.start_soon(send, url, method, body)
    return answers


async def call(url: str, method: str, body: Any = None) -> HttpResponse:
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    return await request(
        url, method=method, headers={"Content-Type": "application/json"}, body=data
    )
