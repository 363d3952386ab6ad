"""A cluster's CA and its nodes' certificates, made with the ``openssl`` command line (as
docs/cluster.md tells operators to), for the relay's mutual TLS."""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: what docs/cluster.md gives a node certificate: a node is a TLS server and a TLS client.
BOTH_USES = "serverAuth,clientAuth"


@dataclass(frozen=True)
class CertificateAuthority:
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeCertificate:
    cert: Path
    key: Path
    #: the CA the node trusts (its ``relay_tls_ca``)
    ca: Path

    def cluster_keys(self) -> dict[str, str]:
        """The ``[cluster]`` keys of a node with this certificate."""
        return {
            "relay_tls_cert": str(self.cert),
            "relay_tls_key": str(self.key),
            "relay_tls_ca": str(self.ca),
        }


def _openssl(*arguments: str | Path) -> None:
    subprocess.run(["openssl", *map(str, arguments)], check=True, capture_output=True)


def make_ca(directory: Path, name: str) -> CertificateAuthority:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
    )  # fmt: skip
    return CertificateAuthority(cert, key)


def make_node_certificate(
    directory: Path,
    name: str,
    ca: CertificateAuthority,
    *,
    trusted: CertificateAuthority | None = None,
    usage: str = BOTH_USES,
) -> NodeCertificate:
    """A key and a certificate for ``name`` signed by ``ca``; the node trusts ``trusted``
    (default: ``ca``)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, request = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(f"extendedKeyUsage = {usage}\n")
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", key, "-out", request, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca.cert, "-CAkey", ca.key, "-set_serial",
        str(secrets.randbits(62) + 1), "-days", "2", "-out", cert,
        "-extfile", extensions,
    )  # fmt: skip
    return NodeCertificate(cert, key, (trusted or ca).cert)
