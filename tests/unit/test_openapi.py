"""The OpenAPI description (``src/mediastream/openapi.json``) says what the routes do.

Every HTTP route the app registers is described (but the pages, the redirects to them and the
signaling socket), and nothing else is; the description's vocabularies are the code's. Whether
the live server answers as described is ``tests/integration/test_api_fuzz.py``'s job.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from mediastream.api.pages import DEFAULT_STATIC_DIR
from mediastream.api.services import Services
from mediastream.api.streams import API_KEYS
from mediastream.app import create_app
from mediastream.config import StreamConfig
from mediastream.errors import ErrorCode
from mediastream.media.sources import SourceState

DESCRIPTION_FILE = Path(__file__).parents[2] / "src" / "mediastream" / "openapi.json"
DESCRIPTION: dict[str, Any] = json.loads(DESCRIPTION_FILE.read_text(encoding="utf-8"))
SCHEMAS: dict[str, Any] = DESCRIPTION["components"]["schemas"]
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: Routes left out of the description on purpose: pages and scripts (and the redirects to
#: them) are for browsers, and the socket has its own reference (docs/protocol.md).
UNDESCRIBED = {"/", "/favicon.ico", "/static/{filename}", "/ws"}


def routes() -> set[tuple[str, str]]:
    # Building the route table reads nothing of the services but the static folder.
    services = cast(Services, SimpleNamespace(static_dir=DEFAULT_STATIC_DIR))
    app = create_app(services)
    found = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        # Quart adds HEAD to every GET and answers OPTIONS itself.
        found |= {(path, m) for m in rule.methods or () if m not in ("HEAD", "OPTIONS")}
    return found


def described() -> set[tuple[str, str]]:
    return {
        (path, method.upper())
        for path, item in DESCRIPTION["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def test_every_route_is_described_and_every_description_is_a_route() -> None:
    registered = {(path, method) for path, method in routes() if path not in UNDESCRIBED}
    assert described() == registered
    assert any(path.startswith("/api/") for path, _ in registered)


def test_it_is_an_openapi_3_1_description_whose_references_all_resolve() -> None:
    assert DESCRIPTION["openapi"].startswith("3.1.")
    for reference in references(DESCRIPTION):
        node: Any = DESCRIPTION
        for part in reference.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, f"{reference} does not resolve"
            node = node[part]


def test_every_operation_has_an_id_and_documents_its_errors() -> None:
    ids = []
    for path, item in DESCRIPTION["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            ids.append(operation["operationId"])
            statuses = set(operation["responses"])
            if operation.get("security") != []:
                assert "401" in statuses, f"{method.upper()} {path}: no 401"
            if "{stream_id}" in path:
                assert "404" in statuses, f"{method.upper()} {path}: no 404"
            if "requestBody" in operation:
                assert "400" in statuses, f"{method.upper()} {path}: no 400"
    assert len(ids) == len(set(ids))


def test_stream_definitions_take_the_configuration_keys_and_their_api_spellings() -> None:
    properties = set(SCHEMAS["StreamFields"]["properties"])
    config_keys = {field.name for field in dataclasses.fields(StreamConfig)}
    assert properties == config_keys | set(API_KEYS)
    assert SCHEMAS["StreamId"]["pattern"] == r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def test_the_descriptions_choices_are_the_codes() -> None:
    transports = typing.get_args(typing.get_type_hints(StreamConfig)["rtsp_transport"])
    assert set(SCHEMAS["RtspTransport"]["enum"]) == set(transports)
    assert set(SCHEMAS["Stream"]["properties"]["state"]["enum"]) == {str(s) for s in SourceState}
    assert set(SCHEMAS["Error"]["properties"]["code"]["enum"]) <= {str(c) for c in ErrorCode}


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)
