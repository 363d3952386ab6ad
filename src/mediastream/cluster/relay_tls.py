"""Mutual TLS on the relay, for clusters whose network between nodes is not trusted.

Configured by ``cluster.relay_tls_cert``, ``relay_tls_key`` and ``relay_tls_ca`` (all three
or none): this node's certificate and key, and the CA that signed every node's certificate.
Whoever holds a certificate that CA signed is a node of the cluster, so the CA must be the
cluster's own, never a public one. Host names are not checked: nodes reach each other at
the addresses of their node records, which certificates rarely name; the CA is the
membership check, and the relay secret, still proved inside TLS, the second one.

On the wire a TLS relay first sends one record in clear, :data:`STARTTLS_RECORD` (the
relay's record framing, type 7, no body); the replica then starts the TLS handshake (TLS 1.2
or later, each side's certificate checked against the CA) and the relay protocol of
:mod:`.relay` runs inside it unchanged. The record in clear lets a node without TLS say at
once why it cannot relay ("expects TLS") instead of both sides waiting out the handshake
timeout, and lets a node with TLS refuse a relay without it before a frame crosses in clear.

Every file problem is found when the configuration is loaded (:func:`load_relay_tls`, which
also runs a handshake of the node's certificate with itself in memory): a node starts with
TLS that works, or does not start.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

import trio

from ..errors import ConfigError
from .errors import RelayError, RelayRefused

if TYPE_CHECKING:
    from ..config import ClusterConfig

#: the record type a TLS relay sends in clear before its handshake.
STARTTLS: Final = 7
STARTTLS_RECORD: Final = struct.pack("!IB", 1, STARTTLS)
#: what a node without TLS is told to set to relay with one that has it.
TLS_KEYS: Final = "cluster.relay_tls_cert, relay_tls_key and relay_tls_ca"
#: the likely cause of a replica failing the handshake, for the upstream's log.
_NO_TLS_HINT: Final = "(a node without cluster.relay_tls_*?)"
#: a peer closing mid-handshake: no TLS at all, or it refused the other side's certificate
#: (the alert saying so is not always sent before the connection closes).
_CLOSED_HINT: Final = "(a node without cluster.relay_tls_*, or of another CA?)"

_PEM_CERTIFICATE: Final = "-----BEGIN CERTIFICATE-----"
_HANDSHAKE_ROUNDS: Final = 8  # an in-memory TLS 1.2/1.3 handshake needs 2 or 3


@dataclass(frozen=True)
class RelayTLS:
    """The two sides' TLS contexts, built once from the configured files."""

    #: the upstream's (owner or replica): its certificate, and the replica's required
    #: (CERT_REQUIRED) against the CA
    server: ssl.SSLContext
    #: the replica's: its certificate, and the upstream's checked against the CA
    client: ssl.SSLContext


# --- the configuration ----------------------------------------------------------------------


class _EncryptedKey(Exception):
    """The private key asked for a password (a server starts unattended: it has none)."""


def _no_password() -> bytes:
    raise _EncryptedKey


def load_relay_tls(cluster: ClusterConfig) -> RelayTLS | None:
    """The contexts of ``cluster``'s relay TLS files, or None when none is set.

    Raises:
        ConfigError: naming the key (``cluster.relay_tls_key``) and what is wrong with its
            file: one key of the three missing, the file missing or unreadable, not PEM, a
            key that does not match the certificate or is encrypted, a certificate the CA did
            not sign, or one not meant for both TLS server and client use.
    """
    files = {
        "relay_tls_cert": cluster.relay_tls_cert,
        "relay_tls_key": cluster.relay_tls_key,
        "relay_tls_ca": cluster.relay_tls_ca,
    }
    if not any(files.values()):
        return None
    for name, path in files.items():
        if not path:
            raise ConfigError(
                f"mutual TLS on the relay needs {TLS_KEYS} (or none of them)",
                key=f"cluster.{name}",
            )
    cert, key, ca = cluster.relay_tls_cert, cluster.relay_tls_key, cluster.relay_tls_ca
    _check_certificates(cert, "cluster.relay_tls_cert")
    ca_text = _check_certificates(ca, "cluster.relay_tls_ca")
    key_text = _read(key, "cluster.relay_tls_key")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(
            f"{key} is not a PEM private key (no -----BEGIN … PRIVATE KEY----- line)",
            key="cluster.relay_tls_key",
        )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False  # the CA is the check (see the module doc)
    for context in (server, client):
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=ca_text)
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except _EncryptedKey:
            raise ConfigError(
                f"{key} is encrypted: give the key unencrypted (readable by the server's "
                "user only)",
                key="cluster.relay_tls_key",
            ) from None
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                reason = f"{key} is not the key of the certificate {cert} (cluster.relay_tls_cert)"
            else:
                reason = f"{key} is not a usable PEM private key ({exc.reason or exc})"
            raise ConfigError(reason, key="cluster.relay_tls_key") from None
    tls = RelayTLS(server, client)
    _handshake_with_itself(tls, cert, ca)
    return tls


def _read(path: str, key: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", key=key) from None
    return data.decode("ascii", errors="replace")


def _check_certificates(path: str, key: str) -> str:
    """The PEM text of ``path``, every certificate in it parsed."""
    text = _read(path, key)
    if _PEM_CERTIFICATE not in text:
        raise ConfigError(f"{path} is not a PEM certificate (no {_PEM_CERTIFICATE} line)", key=key)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as exc:
        raise ConfigError(f"{path} holds a damaged PEM certificate ({exc})", key=key) from None
    return text


def _handshake_with_itself(tls: RelayTLS, cert: str, ca: str) -> None:
    """A TLS handshake in memory, this node's certificate on both sides: what a relay between
    two nodes will check, checked at start (signed by the CA, in date, usable by both)."""
    server_in, server_out, client_in, client_out = (ssl.MemoryBIO() for _ in range(4))
    server = tls.server.wrap_bio(server_in, server_out, server_side=True)
    client = tls.client.wrap_bio(client_in, client_out, server_side=False)
    try:
        for _ in range(_HANDSHAKE_ROUNDS):
            finished = 0
            for side in (client, server):
                try:
                    side.do_handshake()
                    finished += 1
                except ssl.SSLWantReadError:
                    pass
            server_in.write(client_out.read())
            client_in.write(server_out.read())
            if finished == 2:
                return
    except ssl.SSLCertVerificationError as exc:
        if "purpose" in (exc.verify_message or ""):
            reason = (
                f"{cert} is not for both TLS server and client use (a node is both: give it "
                "extendedKeyUsage = serverAuth, clientAuth, or none)"
            )
        else:
            reason = f"{cert} does not verify against the CA {ca} ({exc.verify_message})"
        raise ConfigError(reason, key="cluster.relay_tls_cert") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{cert} cannot be used for TLS with the CA {ca} ({exc.reason or exc})",
            key="cluster.relay_tls_cert",
        ) from None
    raise AssertionError(f"a TLS handshake in memory did not end in {_HANDSHAKE_ROUNDS} rounds")


# --- the connections ------------------------------------------------------------------------


async def accept_tls(
    connection: trio.SocketStream, tls: RelayTLS
) -> trio.SSLStream[trio.SocketStream]:
    """The upstream's side: :data:`STARTTLS_RECORD` in clear, then the TLS handshake, the
    replica's certificate required and checked against the CA.

    Raises:
        RelayRefused: the handshake failed; says why, of the replica (no client certificate,
            one the CA did not sign, no TLS at all).

    Cancellation: the caller bounds it (the relay's handshake timeout).
    """
    stream = _ssl_stream(connection, tls.server, server_side=True)
    try:
        await connection.send_all(STARTTLS_RECORD)
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        raise RelayRefused(_client_failure(exc)) from None
    return stream


async def connect_tls(
    connection: trio.SocketStream, tls: RelayTLS, peer: str
) -> trio.SSLStream[trio.SocketStream]:
    """The replica's side: the relay's :data:`STARTTLS_RECORD`, then the TLS handshake with
    this node's certificate, the upstream's checked against the CA.

    Raises:
        RelayRefused: the relay does not use TLS (no frame may cross in clear), or its
            certificate is not the cluster's.
        RelayError: the connection broke.

    Cancellation: the caller bounds it (the relay's handshake timeout).
    """
    received = b""
    while len(received) < len(STARTTLS_RECORD):
        # No more than the record: what follows is the upstream's side of the TLS handshake.
        chunk = await connection.receive_some(len(STARTTLS_RECORD) - len(received))
        if not chunk:
            raise RelayError(f"{peer} closed the relay connection")
        received += chunk
    if received != STARTTLS_RECORD:
        raise RelayRefused(
            f"{peer} does not use TLS, and this node does ({TLS_KEYS}): no frame may cross in clear"
        )
    stream = _ssl_stream(connection, tls.client, server_side=False)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise RelayRefused(
                f"{peer} presented a certificate the cluster's CA did not sign "
                f"({cause.verify_message})"
            ) from None
        raise RelayError(f"{peer}: the TLS handshake failed ({_reason(cause)})") from None
    return stream


def _ssl_stream(
    connection: trio.SocketStream, context: ssl.SSLContext, *, server_side: bool
) -> trio.SSLStream[trio.SocketStream]:
    # https_compatible: closing never waits on the peer (a close_notify to a replica that
    # reads nothing would block); records carry their length, so a cut is still noticed.
    return trio.SSLStream(connection, context, server_side=server_side, https_compatible=True)


def _client_failure(exc: trio.BrokenResourceError) -> str:
    """Why a replica's TLS handshake failed, seen from the upstream."""
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"presented a certificate the cluster's CA did not sign ({cause.verify_message})"
    reason = cause.reason if isinstance(cause, ssl.SSLError) else None
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return f"did not present a client certificate {_NO_TLS_HINT}"
    if isinstance(cause, ssl.SSLEOFError) or cause is None:
        return f"closed the connection during the TLS handshake {_CLOSED_HINT}"
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
        return f"does not speak TLS {_NO_TLS_HINT}"
    if reason == "UNSUPPORTED_PROTOCOL":
        return "offered a TLS version older than 1.2"
    if reason in ("TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return "does not accept this node's certificate (another CA in its cluster.relay_tls_ca?)"
    return f"failed the TLS handshake ({_reason(cause)})"


def _reason(cause: BaseException | None) -> str:
    if isinstance(cause, ssl.SSLError) and cause.reason:
        return cause.reason.replace("_", " ").lower()
    return str(cause) if cause else "the connection closed"
