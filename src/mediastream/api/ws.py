"""``/ws``: the signaling socket (``docs/protocol.md``), admitted here and served by the hub."""

from __future__ import annotations

import logging
from typing import Any, cast

from quart import Blueprint, websocket

from ..auth import bearer_token
from ..errors import ErrorCode
from ..signaling import MessageSocket, Refused
from .access import json_error
from .services import Services

log = logging.getLogger(__name__)


def signaling_blueprint(services: Services) -> Blueprint:
    """``/ws``: checks the page's origin and the caller's token, then hands the socket to
    ``services.hub`` for as long as it is open."""
    signaling = Blueprint("signaling", __name__)

    @signaling.websocket("/ws")
    async def signaling_socket() -> Any:
        # Decided before the socket is accepted: the browser then sees an HTTP status.
        client = websocket.remote_addr or "unknown"
        origin = websocket.headers.get("Origin")
        if not origin_allowed(origin, websocket.scheme, websocket.host, services.allowed_origins):
            log.warning("%s: socket refused: origin %s not allowed", client, origin)
            return json_error(403, ErrorCode.FORBIDDEN, f"Origin {origin} is not allowed")
        token = websocket.args.get("token") or bearer_token(websocket.headers.get("Authorization"))
        try:
            grant = services.hub.admit(client, token)
        except Refused as refused:
            log.warning("%s: socket refused: %s", client, refused.message)
            return json_error(refused.status, refused.code, refused.message)
        socket = cast(MessageSocket, websocket._get_current_object())  # type: ignore[attr-defined]
        await services.hub.serve(socket, client, grant)
        return None

    return signaling


def origin_allowed(origin: str | None, scheme: str, host: str, allowed: tuple[str, ...]) -> bool:
    """Whether a page from ``origin`` may open a socket on this server.

    No ``Origin`` header means no browser page (a tool, a test client): allowed, since it
    can't carry a visitor's cookies. Otherwise the origin must be this server's own, or one of
    ``security.allowed_origins``.
    """
    if origin is None or "*" in allowed:
        return True
    own = f"{'https' if scheme in ('https', 'wss') else 'http'}://{host}"
    return origin == own or origin in allowed
