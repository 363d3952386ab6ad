"""``/whep/<streamId>``: WHEP (the WebRTC-HTTP egress protocol on RFC 9725), for players that
don't speak our socket. ``docs/protocol.md``, section "WHEP", is the reference.

    POST    /whep/<streamId>               application/sdp offer → 201, the answer, Location,
                                           ETag, ICE servers as ``Link: rel="ice-server"``
    PATCH   /whep/<streamId>/<sessionId>   application/trickle-ice-sdpfrag → 204 (an ICE
                                           restart → 422: not supported)
    DELETE  /whep/<streamId>/<sessionId>   → 200, the session and its peer connection gone
    OPTIONS either                         CORS preflight, ``Accept-Post`` / ``Accept-Patch``

Same tokens as the socket (``Authorization: Bearer``): missing or bad → 401 with
``WWW-Authenticate``, a token that doesn't grant the stream → 403.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any, Final

from quart import Blueprint, Response, request

from ..auth import AuthError, Grant, bearer_token
from ..errors import ErrorCode
from ..ice import ice_servers
from ..whep import WhepRefused, WhepSession, parse_trickle_fragment
from .access import json_error
from .services import Services
from .ws import origin_allowed

SDP: Final = "application/sdp"
TRICKLE_FRAGMENT: Final = "application/trickle-ice-sdpfrag"
#: Headers a player on another origin must be able to read.
EXPOSED_HEADERS: Final = "Location, Link, ETag, Accept-Post, Accept-Patch, WWW-Authenticate"
ALLOWED_HEADERS: Final = "Authorization, Content-Type, If-Match"
PREFLIGHT_MAX_AGE: Final = "600"  # seconds a browser may remember a preflight


def whep_blueprint(services: Services) -> Blueprint:
    """The WHEP routes, over ``services.whep``."""
    whep = Blueprint("whep", __name__)

    @whep.after_request
    async def cross_origin(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin is not None and origin_allowed(
            origin, request.scheme, request.host, services.allowed_origins
        ):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response.headers["Vary"] = "Origin"
        return response

    @whep.route("/whep/<stream_id>", methods=["POST", "OPTIONS"])
    async def endpoint(stream_id: str) -> Any:
        if request.method == "OPTIONS":
            response = _preflight("POST, OPTIONS")
            response.headers["Accept-Post"] = SDP
            return response
        grant = _authorize(services, stream_id)
        if isinstance(grant, Response):
            return grant
        if request.mimetype != SDP:
            return _unsupported_type(SDP)
        offer = await _body_text(services.whep.limits.max_sdp_bytes, "offer")
        if isinstance(offer, Response):
            return offer
        if not offer.startswith("v=0"):
            return json_error(
                400, ErrorCode.INVALID_SDP, 'The offer is not an SDP description ("v=0" first)'
            )
        client = request.remote_addr or "unknown"
        try:
            session = await services.whep.open_session(client, stream_id, offer)
            answer = await session.wait_answer()
        except WhepRefused as refused_offer:
            return _refusal(refused_offer)
        response = Response(answer, status=201, content_type=SDP)
        response.headers["Location"] = _location(session)
        response.headers["ETag"] = session.etag
        links = _ice_server_links(services, grant)
        if links:
            response.headers["Link"] = ", ".join(links)
        return response

    @whep.route("/whep/<stream_id>/<session_id>", methods=["PATCH", "DELETE", "OPTIONS"])
    async def resource(stream_id: str, session_id: str) -> Any:
        if request.method == "OPTIONS":
            response = _preflight("PATCH, DELETE, OPTIONS")
            response.headers["Accept-Patch"] = TRICKLE_FRAGMENT
            return response
        refused = _authorize(services, stream_id)
        if isinstance(refused, Response):
            return refused
        session = services.whep.find(stream_id, session_id)
        # A session that ended on its own (the player closed its peer connection first, the
        # stream stopped…) is still deleted once.
        ended = session is None and request.method == "DELETE"
        if ended and services.whep.forget_ended(stream_id, session_id):
            return Response("", status=200)
        if session is None:
            return json_error(404, ErrorCode.NO_SESSION, "No such WHEP session (it may have ended)")
        if request.method == "DELETE":
            await services.whep.end_session(session, "the player deleted the session")
            return Response("", status=200)
        if request.mimetype != TRICKLE_FRAGMENT:
            return _unsupported_type(TRICKLE_FRAGMENT)
        if_match = request.headers.get("If-Match")
        if if_match is not None and if_match.strip() not in ("*", session.etag):
            return json_error(
                412, ErrorCode.INVALID_CANDIDATE, f"If-Match {if_match} is not this ICE session"
            )
        fragment = await _body_text(services.whep.limits.max_message_bytes, "fragment")
        if isinstance(fragment, Response):
            return fragment
        try:
            services.whep.add_candidates(session, parse_trickle_fragment(stream_id, fragment))
        except WhepRefused as refused_patch:
            return _refusal(refused_patch)
        return Response("", status=204)

    return whep


def _authorize(services: Services, stream_id: str) -> Grant | Response:
    """The caller's grant for ``stream_id``, or the 401/403 to answer with."""
    token = bearer_token(request.headers.get("Authorization"))
    try:
        grant = services.whep.authenticator.verify(token)
    except AuthError as exc:
        response = json_error(401, exc.code, exc.message)
        error = "invalid_token" if token else "invalid_request"
        response.headers["WWW-Authenticate"] = f'Bearer realm="mediastream", error="{error}"'
        return response
    if not grant.allows(stream_id):
        return json_error(403, ErrorCode.FORBIDDEN, "This access token does not grant this stream")
    return grant


async def _body_text(limit: int, what: str) -> str | Response:
    """The request body as UTF-8 text, or the 400/413 to answer with."""
    too_large = json_error(
        413, ErrorCode.MESSAGE_TOO_LARGE, f"The {what} is larger than {limit} bytes"
    )
    if (request.content_length or 0) > limit:
        return too_large
    body = await request.get_data(cache=True, as_text=False, parse_form_data=False)
    if len(body) > limit:
        return too_large
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return json_error(
            400, ErrorCode.INVALID_SDP, f"The {what} is not UTF-8 text (byte {exc.start})"
        )


def _preflight(methods: str) -> Response:
    response = Response("", status=204)
    response.headers["Allow"] = methods
    response.headers["Access-Control-Allow-Methods"] = methods
    response.headers["Access-Control-Allow-Headers"] = ALLOWED_HEADERS
    response.headers["Access-Control-Max-Age"] = PREFLIGHT_MAX_AGE
    return response


def _unsupported_type(expected: str) -> Response:
    got = request.headers.get("Content-Type") or "none"
    response = json_error(
        415, ErrorCode.INVALID_MESSAGE, f"The body must be {expected}, not {got[:60]}"
    )
    response.headers["Accept-Post" if expected == SDP else "Accept-Patch"] = expected
    return response


def _refusal(refused: WhepRefused) -> Response:
    return json_error(refused.status, refused.code, refused.message)


def _location(session: WhepSession) -> str:
    return f"/whep/{urllib.parse.quote(session.stream_id, safe='')}/{session.id}"


def _ice_server_links(services: Services, grant: Grant) -> list[str]:
    """The ICE servers as RFC 9725 §4.6 ``Link`` values, TURN credentials included."""
    links: list[str] = []
    servers = ice_servers(
        services.whep.webrtc.ice_servers, label=grant.subject or "viewer", now=time.time()
    )
    for server in servers:
        attributes = ""
        if "username" in server:
            attributes = (
                f"; username={_quoted(server['username'])}"
                f"; credential={_quoted(server['credential'])}"
                '; credential-type="password"'
            )
        links.extend(f'<{url}>; rel="ice-server"{attributes}' for url in server["urls"])
    return links


def _quoted(value: str) -> str:
    """An RFC 9110 quoted-string."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
