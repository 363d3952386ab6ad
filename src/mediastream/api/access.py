"""Who the caller of an HTTP route is, and the JSON error bodies every route answers with."""

from __future__ import annotations

from typing import Any

from quart import Response, abort, jsonify, request

from ..auth import AuthError, Grant, bearer_token
from ..errors import ErrorCode
from .services import Services


def caller(services: Services) -> Grant:
    """The caller's grant; aborts with 401 when a token is needed and missing or bad.

    The token is the ``token`` query parameter or an ``Authorization: Bearer`` header.
    """
    token = request.args.get("token") or bearer_token(request.headers.get("Authorization"))
    try:
        return services.hub.authenticator.verify(token)
    except AuthError as exc:
        abort(json_error(401, exc.code, exc.message))


def require_admin(services: Services) -> None:
    """Aborts with 401 without a valid token, with 403 without an admin one."""
    if not caller(services).admin:
        abort(json_error(403, ErrorCode.FORBIDDEN, "This needs an admin token"))


def json_error(status: int, code: ErrorCode, message: str, *, field: str | None = None) -> Response:
    """``{"error": message, "code": code}`` (and the ``field`` at fault) with ``status``."""
    body: dict[str, Any] = {"error": message, "code": str(code)}
    if field is not None:
        body["field"] = field
    response = jsonify(body)
    response.status_code = status
    return response
