"""``cluster.relay_tls_cert/key/ca``: all three or none, each file checked when the
configuration is loaded (not at the first replica); every mistake names the key and says
what is wrong with the file. Certificates made with the ``openssl`` command line."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from mediastream.cluster.relay_tls import load_relay_tls
from mediastream.config import Config, load_config
from mediastream.errors import ConfigError

from support.certs import (
    CertificateAuthority,
    NodeCertificate,
    make_ca,
    make_node_certificate,
)


@pytest.fixture(scope="module")
def cluster_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return make_ca(tmp_path_factory.mktemp("ca"), "cluster-ca")


@pytest.fixture(scope="module")
def node(
    cluster_ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> NodeCertificate:
    return make_node_certificate(tmp_path_factory.mktemp("node"), "node-a", cluster_ca)


def load(tmp_path: Path, **keys: str | Path) -> Config:
    text = '[cluster]\nredis_url = "redis://r"\nmax_viewers_per_node = 2\n'
    text += "".join(f'{name} = "{value}"\n' for name, value in keys.items())
    path = tmp_path / "mediastream.toml"
    path.write_text(text)
    return load_config(path)


def refused(tmp_path: Path, **keys: str | Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, **keys)
    return caught.value


def files(node: NodeCertificate, **changed: Path) -> dict[str, Path]:
    return {"relay_tls_cert": node.cert, "relay_tls_key": node.key, "relay_tls_ca": node.ca} | {
        f"relay_tls_{name}": path for name, path in changed.items()
    }


def test_without_the_keys_the_relay_is_plain(tmp_path: Path) -> None:
    config = load(tmp_path)
    assert load_relay_tls(config.cluster) is None


def test_the_three_files_make_mutual_tls_of_1_2_or_later(
    tmp_path: Path, node: NodeCertificate
) -> None:
    config = load(tmp_path, **files(node))
    tls = load_relay_tls(config.cluster)
    assert tls is not None
    for context in (tls.server, tls.client):
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.server.cert_store_stats()["x509_ca"] == 1


def test_relative_paths_are_relative_to_the_configuration_file(
    tmp_path: Path, node: NodeCertificate
) -> None:
    for path in (node.cert, node.key, node.ca):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    config = load(
        tmp_path,
        relay_tls_cert=node.cert.name,
        relay_tls_key=node.key.name,
        relay_tls_ca=node.ca.name,
    )
    assert config.cluster.relay_tls_cert == str(tmp_path / node.cert.name)
    assert load_relay_tls(config.cluster) is not None


@pytest.mark.parametrize("missing", ["cert", "key", "ca"])
def test_one_key_of_the_three_missing_is_named(
    tmp_path: Path, node: NodeCertificate, missing: str
) -> None:
    keys = files(node)
    del keys[f"relay_tls_{missing}"]
    error = refused(tmp_path, **keys)
    assert error.key == f"cluster.relay_tls_{missing}"
    assert "relay_tls_cert, relay_tls_key and relay_tls_ca (or none of them)" in str(error)


def test_a_missing_file_is_named_with_its_key(tmp_path: Path, node: NodeCertificate) -> None:
    error = refused(tmp_path, **files(node, ca=tmp_path / "nope.pem"))
    assert error.key == "cluster.relay_tls_ca"
    assert f"file not found: {tmp_path / 'nope.pem'}" in str(error)


def test_a_folder_given_for_a_file_is_named_as_one(tmp_path: Path, node: NodeCertificate) -> None:
    # (An unreadable file cannot be tested here: the tests run as root, which reads any file.)
    key = tmp_path / "keys"
    key.mkdir()
    error = refused(tmp_path, **files(node, key=key))
    assert error.key == "cluster.relay_tls_key"
    assert f"{key} is a folder, not a file" in str(error)


@pytest.mark.parametrize(
    ("which", "content", "reason"),
    [
        ("cert", b"not a certificate\n", "is not a PEM certificate"),
        ("ca", b"not a certificate\n", "is not a PEM certificate"),
        (
            "cert",
            b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
            "holds a damaged PEM certificate",
        ),
        ("key", b"not a key\n", "is not a PEM private key"),
        (
            "key",
            b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
            "is not a usable PEM private key",
        ),
    ],
)
def test_a_file_that_is_not_what_its_key_needs_is_named(
    tmp_path: Path, node: NodeCertificate, which: str, content: bytes, reason: str
) -> None:
    bad = tmp_path / f"bad-{which}.pem"
    bad.write_bytes(content)
    error = refused(tmp_path, **files(node, **{which: bad}))
    assert error.key == f"cluster.relay_tls_{which}"
    assert f"{bad} {reason}" in str(error)


def test_the_key_of_another_certificate_is_refused(
    tmp_path: Path, node: NodeCertificate, cluster_ca: CertificateAuthority
) -> None:
    other = make_node_certificate(tmp_path, "node-b", cluster_ca)
    error = refused(tmp_path, **files(node, key=other.key))
    assert error.key == "cluster.relay_tls_key"
    assert f"{other.key} is not the key of the certificate {node.cert}" in str(error)


def test_an_encrypted_key_is_refused_without_asking_for_a_password(
    tmp_path: Path, node: NodeCertificate
) -> None:
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(
        ["openssl", "pkcs8", "-topk8", "-in", str(node.key), "-out", str(encrypted),
         "-passout", "pass:hunter2"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    error = refused(tmp_path, **files(node, key=encrypted))
    assert error.key == "cluster.relay_tls_key"
    assert f"{encrypted} is encrypted" in str(error)


def test_a_certificate_another_ca_signed_is_refused_at_load(
    tmp_path: Path, node: NodeCertificate
) -> None:
    stranger = make_node_certificate(tmp_path, "stranger", make_ca(tmp_path, "other-ca"))
    error = refused(tmp_path, **files(node, cert=stranger.cert, key=stranger.key))
    assert error.key == "cluster.relay_tls_cert"
    assert f"{stranger.cert} does not verify against the CA {node.ca}" in str(error)
    assert "unable to get local issuer certificate" in str(error)


def test_a_certificate_for_server_use_only_is_refused(
    tmp_path: Path, cluster_ca: CertificateAuthority, node: NodeCertificate
) -> None:
    server_only = make_node_certificate(tmp_path, "server-only", cluster_ca, usage="serverAuth")
    error = refused(tmp_path, **files(node, cert=server_only.cert, key=server_only.key))
    assert error.key == "cluster.relay_tls_cert"
    assert "is not for both TLS server and client use" in str(error)
