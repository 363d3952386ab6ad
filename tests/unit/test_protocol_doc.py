"""Every example in docs/protocol.md is valid: client ones parse with the server's own parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mediastream.protocol import CLIENT_MESSAGE_TYPES, parse_client_message

DOC = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text()
BLOCKS = re.findall(r"```json (client|server)\n(.*?)\n```", DOC, re.S)


def test_the_document_has_examples_of_every_message_type() -> None:
    types = {(side, json.loads(text)["type"]) for side, text in BLOCKS}
    assert {t for side, t in types if side == "client"} == set(CLIENT_MESSAGE_TYPES)
    server_types = {"welcome", "answer", "state", "error", "pong", "auth", "quality"}
    assert {t for side, t in types if side == "server"} == server_types


@pytest.mark.parametrize("text", [t for side, t in BLOCKS if side == "client"])
def test_client_examples_parse(text: str) -> None:
    parse_client_message(text, max_sdp_bytes=48 * 1024)


@pytest.mark.parametrize("text", [t for side, t in BLOCKS if side == "server"])
def test_server_examples_have_the_envelope(text: str) -> None:
    message = json.loads(text)
    assert {"type", "streamId", "payload"} <= message.keys()
