"""The HTTP and WebSocket face of the server: a Quart-Trio app.

Routes:
    ``/ws``                       the signaling socket (``docs/protocol.md``)
    ``/static/…``                 pages and scripts from ``web/static``, never served stale
    ``/api/streams``              the streams the caller may watch: id, name, state, viewers…
    ``/api/streams/<id>``         one stream
    ``/api/stats``                sockets, sessions, peer connections, sources, tasks, threads
                                  (admin)
    ``/api/openapi.json``         the OpenAPI description of every route here but ``/ws`` and
                                  ``/static`` (``openapi.json`` beside this module)
    ``/healthz``                  liveness

With ``[security]`` configured, ``/ws`` and ``/api`` need an access token (``docs/security.md``):
the ``token`` query parameter or an ``Authorization: Bearer`` header. Pages and scripts are
public: they hold no secrets.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import json
import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import trio
from quart import Response, abort, jsonify, redirect, request, websocket
from quart.helpers import send_from_directory
from quart_trio import QuartTrio
from werkzeug.security import safe_join

from .auth import AuthError, Grant, bearer_token
from .changes import ChangeSignal
from .config import StreamConfig, stream_from_dict, stream_to_dict
from .errors import ConfigError, ErrorCode
from .media.snapshot import SnapshotError
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .registry import Stream, StreamRegistry, StreamStatistics
from .signaling import MessageSocket, Refused, SignalingHub
from .store import StreamStore
from .webrtc.bridge import PeerConnectionFactory

log = logging.getLogger(__name__)

#: How long a snapshot of a stopped stream waits for its source's first keyframe (seconds).
SNAPSHOT_WAIT: Final = 15.0
DEFAULT_STATIC_DIR: Final = Path(__file__).resolve().parents[2] / "web" / "static"
_ASSET_REFERENCE: Final = re.compile(r'(?P<attr>(?:src|href)=")(?P<path>/static/[^"?#]+)(?P<end>")')


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    open_sockets: int
    sockets_opened: int
    open_sessions: int
    sessions_per_socket: tuple[int, ...]
    open_peer_connections: int
    peer_connections_opened: int
    sources_running: int
    viewers: int
    tasks: int
    threads: int


@dataclass(frozen=True)
class Services:
    """What the routes need; built once per server by ``server.serve``."""

    registry: StreamRegistry
    peers: PeerConnectionFactory
    hub: SignalingHub
    static_dir: Path
    store: StreamStore
    #: notified on every socket, session, peer connection and source change.
    changes: ChangeSignal
    metrics: Metrics
    #: ``security.allowed_origins``
    allowed_origins: tuple[str, ...] = ()

    def statistics(self) -> ServerStatistics:
        """The server's moving parts, counted (call from inside the server's Trio run)."""
        sockets = self.hub.statistics()
        peers = self.peers.statistics()
        streams = self.registry.statistics()
        return ServerStatistics(
            open_sockets=sockets.open_sockets,
            sockets_opened=sockets.sockets_opened,
            open_sessions=sockets.open_sessions,
            sessions_per_socket=sockets.sessions_per_socket,
            open_peer_connections=peers.open_peer_connections,
            peer_connections_opened=peers.peer_connections_opened,
            sources_running=sum(s.source_running for s in streams),
            viewers=sum(s.viewers for s in streams),
            tasks=_count_tasks(),
            threads=threading.active_count(),
        )


def create_app(services: Services) -> QuartTrio:
    app = QuartTrio(__name__, static_folder=None)
    assets = _StaticAssets(services.static_dir)

    @app.route("/")
    async def index() -> Any:
        return redirect("/static/dashboard.html")

    @app.route("/favicon.ico")
    async def favicon() -> Any:
        return redirect("/static/favicon.svg")

    @app.route("/healthz")
    async def healthz() -> Any:
        return jsonify({"status": "ok"})

    def caller() -> Grant:
        """The caller's grant; aborts with 401 when a token is needed and missing or bad."""
        token = request.args.get("token") or bearer_token(request.headers.get("Authorization"))
        try:
            return services.hub.authenticator.verify(token)
        except AuthError as exc:
            abort(_json_error(401, exc.code, exc.message))

    @app.route("/api/streams")
    async def list_streams() -> Any:
        grant = caller()
        visible = [s for s in services.registry.statistics() if grant.allows(s.id)]
        return jsonify({"streams": [_stream_json(s) for s in visible]})

    @app.route("/api/streams/<stream_id>")
    async def get_stream(stream_id: str) -> Any:
        stream = stream_or_404(stream_id, caller())
        return jsonify(_stream_json(stream.statistics()))

    def stream_or_404(stream_id: str, grant: Grant | None = None) -> Stream:
        """The stream, or a 404 if there is none (or ``grant`` may not see it: the same answer,
        so a token can't probe for the names of streams it isn't allowed)."""
        stream = services.registry.get(stream_id)
        if stream is None or (grant is not None and not grant.allows(stream_id)):
            message = f'Stream "{stream_id}" not found'
            abort(_json_error(404, ErrorCode.STREAM_NOT_FOUND, message))
        return stream

    def require_admin() -> None:
        if not caller().admin:
            abort(_json_error(403, ErrorCode.FORBIDDEN, "This needs an admin token"))

    async def request_object() -> dict[str, Any]:
        # Parsed here, not by ``request.get_json``: that decodes the body as UTF-8 outside its
        # ``silent`` guard, so a body of other bytes was a 500 (found by the API fuzzer).
        try:
            body = json.loads(await request.get_data())
        except (ValueError, RecursionError):  # not UTF-8 (or -16/-32), not JSON, too deep
            body = None
        if not isinstance(body, dict):
            abort(_json_error(400, ErrorCode.INVALID_CONFIG, "The body must be a JSON object"))
        return {_API_KEYS.get(str(key), str(key)): value for key, value in body.items()}

    async def parse_definition(body: dict[str, Any], stream_id: str | None) -> StreamConfig:
        """A stream definition from an API body; aborts with 400 naming the bad field."""
        if stream_id is not None and body.setdefault("id", stream_id) != stream_id:
            message = f'The body\'s id "{body["id"]}" is not the stream "{stream_id}"'
            abort(_json_error(400, ErrorCode.INVALID_CONFIG, message, field="id"))
        try:
            # In a thread: a file source's existence is checked on disk.
            return await trio.to_thread.run_sync(functools.partial(stream_from_dict, body))
        except ConfigError as exc:
            abort(_json_error(400, ErrorCode.INVALID_CONFIG, exc.reason, field=exc.key))

    @app.route("/api/streams/<stream_id>/snapshot.jpg")
    async def snapshot(stream_id: str) -> Any:
        stream = stream_or_404(stream_id, caller())
        jpeg = None
        try:
            with trio.move_on_after(SNAPSHOT_WAIT):
                jpeg = await stream.snapshot(start_source=request.args.get("cached") != "1")
        except LookupError as exc:
            return _json_error(503, ErrorCode.STREAM_UNAVAILABLE, f"No picture: {exc}")
        except SnapshotError as exc:
            return _json_error(502, ErrorCode.STREAM_UNAVAILABLE, str(exc))
        if jpeg is None:
            message = f"No picture: the source sent no keyframe within {SNAPSHOT_WAIT:g} s"
            return _json_error(503, ErrorCode.STREAM_UNAVAILABLE, message)
        response = Response(jpeg, content_type="image/jpeg")
        response.headers["Cache-Control"] = "no-cache"
        return response

    # One change at a time: each checks the registry, saves to the store in a thread, then
    # changes the registry. Interleaved, two DELETEs of one stream both passed the check and
    # the second raised KeyError (a 500), and two POSTs of one id overwrote each other's
    # saved definition. The body is read before the lock: a slow client holds up no one.
    changing = trio.Lock()

    @app.route("/api/streams", methods=["POST"])
    async def add_stream() -> Any:
        require_admin()
        body = await request_object()
        async with changing:
            config = await parse_definition(body, None)
            if services.registry.get(config.id) is not None:
                message = f'A stream "{config.id}" exists already (PUT /api/streams/{config.id})'
                return _json_error(409, ErrorCode.STREAM_EXISTS, message, field="id")
            await trio.to_thread.run_sync(services.store.save, config.id, stream_to_dict(config))
            stream = services.registry.add(config)
        return jsonify(_stream_json(stream.statistics())), 201

    @app.route("/api/streams/<stream_id>", methods=["PUT", "PATCH"])
    async def change_stream(stream_id: str) -> Any:
        require_admin()
        stream_or_404(stream_id)
        body = await request_object()
        async with changing:
            stream = stream_or_404(stream_id)  # again: it may be gone by now
            if request.method == "PATCH":
                # Unmentioned fields keep their values (the source, credentials included).
                body = {**stream_to_dict(stream.config), **body}
            config = await parse_definition(body, stream_id)
            definition = stream_to_dict(config)
            await trio.to_thread.run_sync(
                functools.partial(
                    services.store.save, stream_id, definition, enabled=stream.enabled
                )
            )
            stream = services.registry.replace(config)
        return jsonify(_stream_json(stream.statistics()))

    @app.route("/api/streams/<stream_id>", methods=["DELETE"])
    async def delete_stream(stream_id: str) -> Any:
        require_admin()
        async with changing:
            stream_or_404(stream_id)
            await trio.to_thread.run_sync(services.store.delete, stream_id)
            services.registry.remove(stream_id)
        return "", 204

    # Two routes, not one ``<action>`` route: that one also took ``POST …/snapshot.jpg`` (an
    # HTML 404 instead of a 405) and made every ``Allow`` of that path list POST.
    @app.route("/api/streams/<stream_id>/start", methods=["POST"])
    async def start_stream(stream_id: str) -> Any:
        return await set_enabled(stream_id, True)

    @app.route("/api/streams/<stream_id>/stop", methods=["POST"])
    async def stop_stream(stream_id: str) -> Any:
        return await set_enabled(stream_id, False)

    async def set_enabled(stream_id: str, enabled: bool) -> Any:
        require_admin()
        async with changing:
            stream_or_404(stream_id)
            await trio.to_thread.run_sync(services.store.set_enabled, stream_id, enabled)
            stream = services.registry.set_enabled(stream_id, enabled)
        return jsonify(_stream_json(stream.statistics()))

    @app.route("/metrics")
    async def metrics() -> Any:
        require_admin()
        # Read in the event loop on purpose: the statistics it reads belong to this thread.
        return Response(services.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

    @app.route("/api/openapi.json")
    async def openapi() -> Any:
        caller()
        description = await trio.to_thread.run_sync(_openapi_description)
        return Response(description, content_type="application/json")

    @app.route("/api/stats")
    async def stats() -> Any:
        if not caller().admin:
            return _json_error(403, ErrorCode.FORBIDDEN, "This needs an admin token")
        s = services.statistics()
        return jsonify(
            {
                "sockets": {"open": s.open_sockets, "opened": s.sockets_opened},
                "sessions": s.open_sessions,
                "sessionsPerSocket": list(s.sessions_per_socket),
                "peerConnections": {
                    "open": s.open_peer_connections,
                    "opened": s.peer_connections_opened,
                },
                "sourcesRunning": s.sources_running,
                "viewers": s.viewers,
                "tasks": s.tasks,
                "threads": s.threads,
            }
        )

    @app.route("/static/<path:filename>")
    async def static(filename: str) -> Any:
        return await assets.send(filename)

    @app.websocket("/ws")
    async def signaling_socket() -> Any:
        # Decided before the socket is accepted: the browser then sees an HTTP status.
        client = websocket.remote_addr or "unknown"
        origin = websocket.headers.get("Origin")
        if not origin_allowed(origin, websocket.scheme, websocket.host, services.allowed_origins):
            log.warning("%s: socket refused: origin %s not allowed", client, origin)
            return _json_error(403, ErrorCode.FORBIDDEN, f"Origin {origin} is not allowed")
        token = websocket.args.get("token") or bearer_token(websocket.headers.get("Authorization"))
        try:
            grant = services.hub.admit(client, token)
        except Refused as refused:
            log.warning("%s: socket refused: %s", client, refused.message)
            return _json_error(refused.status, refused.code, refused.message)
        socket = cast(MessageSocket, websocket._get_current_object())  # type: ignore[attr-defined]
        await services.hub.serve(socket, client, grant)
        return None

    return app


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


#: The API's camelCase spellings of the configuration file's stream keys.
_API_KEYS: Final = {"onDemand": "on_demand", "rtspTransport": "rtsp_transport"}


def _json_error(
    status: int, code: ErrorCode, message: str, *, field: str | None = None
) -> Response:
    body: dict[str, Any] = {"error": message, "code": str(code)}
    if field is not None:
        body["field"] = field
    response = jsonify(body)
    response.status_code = status
    return response


class _StaticAssets:
    """Static files that a browser can never serve stale after an upgrade.

    Every response says ``Cache-Control: no-cache`` (the browser revalidates with its ETag and
    gets a cheap 304 when nothing changed), and the pages' references to ``/static/…`` carry a
    ``?v=<content hash>`` so a changed script is a new URL, even through caching proxies.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._hashes: dict[Path, tuple[float, str]] = {}

    async def send(self, filename: str) -> Response:
        path = await trio.to_thread.run_sync(self._resolve, filename)
        if path is None:
            abort(404)
        if path.suffix == ".html":
            body = await trio.to_thread.run_sync(self._versioned_page, path)
            response = Response(body, mimetype="text/html")
            response.set_etag(hashlib.sha256(body.encode()).hexdigest()[:32])
            await response.make_conditional(request)
        else:
            response = await send_from_directory(self._root, filename)
        # Quart's default is a 12-hour max-age: exactly the stale-script trap.
        response.headers["Cache-Control"] = "no-cache"
        return response

    def _resolve(self, filename: str) -> Path | None:
        joined = safe_join(str(self._root), filename)
        return Path(joined) if joined is not None and Path(joined).is_file() else None

    def _versioned_page(self, path: Path) -> str:
        def version(match: re.Match[str]) -> str:
            target = self._root / match["path"].removeprefix("/static/")
            digest = self._digest(target)
            suffix = f"?v={digest}" if digest else ""
            return f"{match['attr']}{match['path']}{suffix}{match['end']}"

        return _ASSET_REFERENCE.sub(version, path.read_text(encoding="utf-8"))

    def _digest(self, path: Path) -> str | None:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        cached = self._hashes.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
            self._hashes[path] = cached
        return cached[1]


def _stream_json(stats: StreamStatistics) -> dict[str, Any]:
    return {
        "id": stats.id,
        "name": stats.name,
        "state": str(stats.state),
        "detail": stats.detail,
        "lastError": stats.last_error,
        "viewers": stats.viewers,
        "codec": stats.codec,
        "source": stats.source,
        "onDemand": stats.on_demand,
        "rtspTransport": stats.rtsp_transport,
        "audio": stats.audio,
        "enabled": stats.enabled,
        "origin": stats.origin,
        "running": stats.source_running,
        "framesPublished": stats.fanout.published_frames,
        "bytesPublished": stats.fanout.published_bytes,
        "framesDropped": stats.fanout.dropped_frames,
        "encodersOpened": stats.encoders_opened,
    }


@functools.cache
def _openapi_description() -> bytes:
    """``openapi.json``, the OpenAPI 3.1 description of the routes (package data)."""
    return importlib.resources.files("mediastream").joinpath("openapi.json").read_bytes()


def _count_tasks() -> int:
    return len(task_names())


def task_names() -> list[str]:
    """Every task in this Trio run, by name (for statistics and leak hunting)."""

    def walk(task: trio.lowlevel.Task) -> list[str]:
        names = [task.name]
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names.extend(walk(child))
        return names

    root = trio.lowlevel.current_root_task()
    return walk(root) if root is not None else []
