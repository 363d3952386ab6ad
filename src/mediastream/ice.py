"""ICE servers as the pages and the server's peers get them, with TURN credentials made fresh.

A TURN server configured with a shared secret (coturn's ``use-auth-secret`` /
``static-auth-secret``) accepts time-limited credentials anyone holding the secret can make:
the username is ``<expiry unix time>:<label>`` and the password is the base64 of the
HMAC-SHA1 of that username, keyed with the secret (the "TURN REST API" scheme). The secret
itself never leaves the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Any

from .config import IceServerConfig


def turn_credentials(secret: str, label: str, ttl: float, now: float) -> tuple[str, str]:
    """(username, credential) valid until ``now + ttl``."""
    username = f"{int(now + ttl)}:{label}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers(
    servers: tuple[IceServerConfig, ...], *, label: str, now: float
) -> list[dict[str, Any]]:
    """The ICE servers in the browser's ``RTCIceServer`` shape, TURN credentials filled in."""
    result: list[dict[str, Any]] = []
    for server in servers:
        entry: dict[str, Any] = {"urls": list(server.urls)}
        if server.secret:
            entry["username"], entry["credential"] = turn_credentials(
                server.secret, label, server.credential_ttl, now
            )
        elif server.username is not None:
            entry["username"] = server.username
            entry["credential"] = server.credential or ""
        result.append(entry)
    return result
