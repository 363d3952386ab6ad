"""The shared stream store's record: read back as written, and a bad one named, not guessed."""

from __future__ import annotations

import json

import pytest

from mediastream.cluster.errors import ClusterError
from mediastream.cluster.stream_store import StreamRecord

RECORD = StreamRecord(
    id="lobby",
    version=1764750000123,
    definition={"id": "lobby", "source": "rtsp://user:secret@cam/1", "on_demand": True},
    deleted=False,
    enabled=True,
    node="node-a",
)


def test_a_record_reads_back_as_written() -> None:
    assert StreamRecord.from_json(RECORD.to_json()) == RECORD


def test_the_body_the_write_script_completes_is_the_record_without_its_version() -> None:
    # The script prepends '{"version":N,' to the body: the result must be the record.
    completed = '{"version":' + str(RECORD.version) + "," + RECORD.body_json()
    assert StreamRecord.from_json(completed) == RECORD
    assert "version" not in json.loads("{" + RECORD.body_json())


def test_a_configuration_file_stream_and_a_tombstone_have_no_definition() -> None:
    tombstone = StreamRecord("old", 7, None, True, True, "node-b")
    assert StreamRecord.from_json(tombstone.to_json()).stored().deleted


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("not json", "bad stream record"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({**json.loads(RECORD.to_json()), "version": "7"}), "version"),
        (json.dumps({**json.loads(RECORD.to_json()), "definition": "x"}), "definition"),
        (json.dumps({**json.loads(RECORD.to_json()), "deleted": 0}), "deleted"),
        (json.dumps({k: v for k, v in json.loads(RECORD.to_json()).items() if k != "id"}), "id"),
    ],
)
def test_a_bad_record_is_refused_naming_what_is_wrong(text: str, named: str) -> None:
    with pytest.raises(ClusterError, match=named):
        StreamRecord.from_json(text)
