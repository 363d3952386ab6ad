"""Configuration: the example file loads, defaults hold, and mistakes name file and key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mediastream.config import (
    Config,
    SourceSpec,
    StreamConfig,
    default_config,
    load_config,
    parse_source,
    stream_from_dict,
    stream_to_dict,
)
from mediastream.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "docs" / "mediastream.example.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mediastream.toml"
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    return caught.value


def test_example_file_loads_and_its_settings_are_the_defaults() -> None:
    config = load_config(EXAMPLE)
    defaults = Config()
    # data_dir is resolved against the file's folder; everything else is as written.
    assert config.server.data_dir == str(EXAMPLE.parent / "data")
    server = dataclasses.replace(config.server, data_dir=defaults.server.data_dir)
    assert dataclasses.replace(config, server=server, streams=()) == defaults
    assert [s.id for s in config.streams] == ["front-door", "test-card", "gate"]
    assert config.streams[0].source.kind == "rtsp"
    assert config.streams[1].on_demand is False


def test_example_file_sets_every_key() -> None:
    text = EXAMPLE.read_text()
    sections = {name: type(getattr(Config(), name)) for name in Config.__dataclass_fields__}
    keys = [
        f"{s}.{k}" for s, t in sections.items() if s != "streams" for k in t.__dataclass_fields__
    ]
    keys += [f"streams.{k}" for k in StreamConfig.__dataclass_fields__]
    missing = [key for key in keys if not re.search(rf"^{key.split('.')[1]} = ", text, re.M)]
    assert missing == []


def test_no_config_means_three_on_demand_demo_patterns() -> None:
    config = default_config()
    assert len(config.streams) == 3
    assert all(s.source.kind == "pattern" and s.on_demand for s in config.streams)
    assert config.server.port == 8107


def test_minimal_stream_gets_defaults(tmp_path: Path) -> None:
    config = load_config(
        write(tmp_path, '[[streams]]\nid = "cam"\nsource = "rtsp://10.0.0.2/live"\n')
    )
    (stream,) = config.streams
    assert stream.display_name == "cam"
    assert stream.rtsp_transport == "auto"
    assert stream.on_demand is True


@pytest.mark.parametrize("transport", ["auto", "tcp", "udp"])
def test_every_rtsp_transport_setting_is_accepted(transport: str) -> None:
    stream = stream_from_dict({"id": "c", "source": "rtsp://h/", "rtsp_transport": transport})
    assert stream.rtsp_transport == transport


def test_a_bad_rtsp_transport_lists_the_choices() -> None:
    with pytest.raises(ConfigError) as caught:
        stream_from_dict({"id": "c", "source": "rtsp://h/", "rtsp_transport": "http"})
    assert "must be one of 'auto', 'tcp', 'udp'" in str(caught.value)


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    error = config_error(tmp_path, "[sever]\nport = 1\n")
    assert error.key == "sever"
    assert "unknown key" in str(error)


def test_unknown_nested_key_is_named_with_its_full_path(tmp_path: Path) -> None:
    error = config_error(tmp_path, "[media]\non_demand_grace_s = 3\n")
    assert error.key == "media.on_demand_grace_s"
    assert "on_demand_grace" in str(error)  # the known keys are listed


def test_unknown_stream_key_is_named_with_its_index(tmp_path: Path) -> None:
    error = config_error(
        tmp_path,
        '[[streams]]\nid = "a"\nsource = "rtsp://h/"\n[[streams]]\nid = "b"\nsource = "rtsp://h/"\n'
        "ondemand = true\n",
    )
    assert error.key == "streams[1].ondemand"


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[server]\nport = "80"\n', "server.port", "must be an integer"),
        ("[server]\nport = 70000\n", "server.port", "0-65535"),
        ('[server]\nlog_level = "loud"\n', "server.log_level", "must be one of"),
        ("[media]\nread_timeout = 0\n", "media.read_timeout", "greater than 0"),
        ("[media]\non_demand_grace = -1\n", "media.on_demand_grace", "0 or more"),
        ("[media]\nretry_max_delay = 0.5\n", "media.retry_max_delay", "retry_initial_delay"),
        (
            "[webrtc]\nignore_mdns_candidates = 1\n",
            "webrtc.ignore_mdns_candidates",
            "true or false",
        ),
        ('[[webrtc.ice_servers]]\nurls = ["http://x"]\n', "webrtc.ice_servers[0].urls", "stun:"),
        ('[[webrtc.ice_servers]]\nusername = "u"\n', "webrtc.ice_servers[0].urls", "missing"),
        ('[[streams]]\nsource = "rtsp://h/"\n', "streams[0].id", "missing"),
        ('[[streams]]\nid = "a"\n', "streams[0].source", "missing"),
        ('[[streams]]\nid = "a b"\nsource = "rtsp://h/"\n', "streams[0].id", "not a valid id"),
        (
            '[[streams]]\nid = "a"\nsource = "rtsp://h/"\nrtsp_transport = "http"\n',
            "streams[0].rtsp_transport",
            "must be one of",
        ),
        (
            '[[streams]]\nid = "a"\nsource = "rtsp://h/"\n[[streams]]\nid = "a"\nsource = "rtsp://h/"\n',
            "streams[1].id",
            "duplicate",
        ),
        (
            '[[streams]]\nid = "a"\nsource = "http://h/x"\n',
            "streams[0].source",
            "unsupported source scheme",
        ),
        (
            '[[streams]]\nid = "a"\nsource = "pattern:nosuch"\n',
            "streams[0].source",
            "unknown pattern",
        ),
        (
            '[[streams]]\nid = "a"\nsource = "pattern:testsrc?fps=x"\n',
            "streams[0].source",
            "bad value",
        ),
        (
            '[[streams]]\nid = "a"\nsource = "pattern:testsrc?size=641x360"\n',
            "streams[0].source",
            "even",
        ),
        ('[[streams]]\nid = "a"\nsource = "missing.mp4"\n', "streams[0].source", "file not found"),
        ("streams = 3\n", "streams", "array of tables"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    error = config_error(tmp_path, text)
    assert error.key == key
    assert fragment in str(error)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    error = config_error(tmp_path, "[server\n")
    assert "not valid TOML" in str(error)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_relative_file_source_resolves_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "clip.mp4").write_bytes(b"")
    config = load_config(write(tmp_path, '[[streams]]\nid = "f"\nsource = "clip.mp4"\n'))
    assert config.streams[0].source == SourceSpec(kind="file", location=str(tmp_path / "clip.mp4"))


def test_source_errors_never_repeat_credentials() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_source("rtsp://admin:hunter2@/x", key="streams[0].source")
    assert "hunter2" not in str(caught.value)


def test_pattern_options_are_parsed() -> None:
    spec = parse_source("pattern:life?size=320x240&fps=10", key="k")
    assert spec.kind == "pattern" and spec.location == "life"
    assert spec.option_map == {"size": "320x240", "fps": "10"}


def test_the_configuration_reference_shows_the_example_file_as_it_is() -> None:
    reference = (EXAMPLE.parent / "configuration.md").read_text()
    embedded = reference.split("```toml\n", 1)[1].rsplit("```", 1)[0]
    assert embedded == EXAMPLE.read_text()


def test_a_stream_may_list_qualities_best_first_with_a_default() -> None:
    stream = stream_from_dict(
        {
            "id": "gate",
            "qualities": [
                {"name": "main", "source": "rtsp://u:p@cam/101"},
                {"name": "sub", "source": "rtsp://u:p@cam/102"},
            ],
            "default_quality": "sub",
        }
    )
    assert [q.name for q in stream.quality_list] == ["main", "sub"]
    assert stream.default_quality_name == "sub"
    assert stream.source.location == "rtsp://u:p@cam/102"  # the default quality's
    assert stream_from_dict(stream_to_dict(stream)) == stream


def test_a_plain_source_is_one_implicit_quality_named_main() -> None:
    stream = stream_from_dict({"id": "a", "source": "rtsp://cam/1"})
    assert [(q.name, q.source) for q in stream.quality_list] == [("main", stream.source)]
    assert stream.default_quality_name == "main"
    assert "qualities" not in stream_to_dict(stream)


@pytest.mark.parametrize(
    ("item", "key", "fragment"),
    [
        (
            {"source": "rtsp://h/1", "qualities": [{"name": "m", "source": "rtsp://h/1"}]},
            "s.qualities",
            "not both",
        ),
        ({"qualities": []}, "s.qualities", "non-empty array"),
        ({"qualities": ["rtsp://h/1"]}, "s.qualities[0]", "table"),
        ({"qualities": [{"name": "m"}]}, "s.qualities[0].source", "missing"),
        ({"qualities": [{"source": "rtsp://h/1"}]}, "s.qualities[0].name", "missing"),
        (
            {"qualities": [{"name": "m", "source": "rtsp://h/1", "size": "hd"}]},
            "s.qualities[0].size",
            "unknown key",
        ),
        ({"qualities": [{"name": "auto", "source": "rtsp://h/1"}]}, "s.qualities[0].name", "auto"),
        ({"qualities": [{"name": "a b", "source": "rtsp://h/1"}]}, "s.qualities[0].name", "valid"),
        (
            {"qualities": [{"name": "m", "source": "rtsp://h/1"}, {"name": "m", "source": "x"}]},
            "s.qualities[1].name",
            "duplicate",
        ),
        ({"qualities": [{"name": "m", "source": "http://h/1"}]}, "s.qualities[0].source", "scheme"),
        (
            {"qualities": [{"name": "m", "source": "rtsp://h/1"}], "default_quality": "hd"},
            "s.default_quality",
            "one of the qualities (m)",
        ),
        (
            {"source": "rtsp://h/1", "default_quality": "sub"},
            "s.default_quality",
            "needs qualities",
        ),
    ],
)
def test_bad_qualities_name_the_key(item: dict[str, object], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        stream_from_dict({"id": "a", **item}, key="s")
    assert caught.value.key == key
    assert fragment in str(caught.value)
