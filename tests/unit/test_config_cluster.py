"""The ``[cluster]`` section: absent means one process and no Redis; mistakes name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mediastream.cluster import node_identity
from mediastream.config import ClusterConfig, Config, load_config
from mediastream.errors import ConfigError


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "mediastream.toml"
    path.write_text(text)
    return load_config(path)


def test_no_cluster_section_means_a_single_process() -> None:
    assert Config().cluster == ClusterConfig()
    assert not Config().cluster.enabled


def test_a_cluster_section_is_read(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        '[cluster]\nredis_url = "redis://10.0.0.2:6379/0"\nnode_id = "edge-1"\n'
        'public_url = "http://10.0.0.5:8107"\n',
    )
    assert config.cluster.enabled
    assert node_identity(config.cluster, 8107) == ("edge-1", "http://10.0.0.5:8107")


def test_node_identity_defaults_to_host_name_and_port() -> None:
    cluster = ClusterConfig(redis_url="redis://127.0.0.1:6379")
    node_id, public_url = node_identity(cluster, 8111)
    assert node_id.endswith("-8111") and public_url.endswith(":8111")


def test_workers_differ_by_id_and_share_the_public_url() -> None:
    cluster = ClusterConfig(redis_url="redis://127.0.0.1:6379")
    (first, url), (second, same) = (node_identity(cluster, 8111, k) for k in (0, 1))
    assert first.endswith("-8111-w0") and second.endswith("-8111-w1")
    assert url == same and url.endswith(":8111")
    named = ClusterConfig(redis_url="redis://r", node_id="edge-1")
    assert node_identity(named, 8111, 3)[0] == "edge-1-w3"


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('redis_addr = "x"', "cluster.redis_addr", "unknown key"),
        ('redis_url = "http://10.0.0.2"', "cluster.redis_url", "not a redis://"),
        ('redis_url = "redis://r"\nnode_id = "a b"', "cluster.node_id", "not a valid node id"),
        ('redis_url = "redis://r"\npublic_url = "10.0.0.5:8107"', "cluster.public_url", "no path"),
        ('redis_url = "redis://r"\npublic_url = "http://h/ws"', "cluster.public_url", "no path"),
        ('node_id = "edge-1"', "cluster.redis_url", "need cluster.redis_url"),
        ("redis_url = 6379", "cluster.redis_url", "must be a string"),
        ('redis_url = "redis://r"\ndrain_timeout = 0', "cluster.drain_timeout", "greater than 0"),
        (
            'redis_url = "redis://r"\nmax_viewers_per_node = -1',
            "cluster.max_viewers_per_node",
            "0 (no replicas) or more",
        ),
        ('redis_url = "redis://r"\nrelay_port = 70000', "cluster.relay_port", "0-65535"),
        (
            'redis_url = "redis://r"\nmax_load_per_node = -0.5',
            "cluster.max_load_per_node",
            "share of one core",
        ),
        (
            'redis_url = "redis://r"\nmax_load_per_node = nan',
            "cluster.max_load_per_node",
            "share of one core",
        ),
        (
            'redis_url = "redis://r"\nmax_relays_per_node = -1',
            "cluster.max_relays_per_node",
            "0 (no limit) or more",
        ),
        ('redis_url = "redis://r"\nrelay_secret = "short"', "cluster.relay_secret", "at least 16"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"[cluster]\n{text}\n")
    assert caught.value.key == key
    assert reason in str(caught.value)


def test_a_single_process_never_loads_a_redis_client() -> None:
    # In a fresh interpreter: this test run itself has imported the cluster package.
    probe = "import sys, mediastream.app, mediastream.cli; print('coredis' in sys.modules)"
    paths = [str(Path(__file__).parents[2] / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert result.stdout.strip() == "False"
