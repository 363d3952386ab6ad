"""``/api/streams``: the streams a caller may watch, and (admin) adding, changing, deleting,
starting and stopping them; one picture of a stream (``…/snapshot.jpg``)."""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final

import trio
from quart import Blueprint, Response, abort, jsonify, request

from ..auth import Grant
from ..config import StreamConfig, stream_from_dict, stream_to_dict
from ..errors import ConfigError, ErrorCode, SignalingError
from ..media.snapshot import SnapshotError
from ..registry import Stream, StreamStatistics
from ..store import ChangeRefused
from .access import caller, json_error, require_admin
from .services import Services

if TYPE_CHECKING:  # a single process never imports the cluster (and its Redis client)
    from ..cluster.leases import Owner
    from ..cluster.replica_registry import ReplicaEntry

#: How long a snapshot of a stopped stream waits for its source's first keyframe (seconds).
SNAPSHOT_WAIT: Final = 15.0
#: The API's camelCase spellings of the configuration file's stream keys.
API_KEYS: Final = {
    "onDemand": "on_demand",
    "rtspTransport": "rtsp_transport",
    "defaultQuality": "default_quality",
}


def streams_blueprint(services: Services) -> Blueprint:
    """The ``/api/streams`` routes, over ``services.registry`` and ``services.stream_changes``."""
    streams = Blueprint("streams", __name__)

    @streams.route("/api/streams")
    async def list_streams() -> Any:
        grant = caller(services)
        visible = [s for s in services.registry.statistics() if grant.allows(s.id)]
        ids = [s.id for s in visible]
        owners = await stream_owners(services, ids)
        replicas = await stream_replicas(services, ids)
        return jsonify(
            {"streams": [stream_json(s, owners.get(s.id), replicas.get(s.id)) for s in visible]}
        )

    @streams.route("/api/streams/<stream_id>")
    async def get_stream(stream_id: str) -> Any:
        stream = stream_or_404(stream_id, caller(services))
        return jsonify(await _stream_json(services, stream.statistics()))

    def stream_or_404(stream_id: str, grant: Grant | None = None) -> Stream:
        """The stream, or a 404 if there is none (or ``grant`` may not see it: the same answer,
        so a token can't probe for the names of streams it isn't allowed)."""
        stream = services.registry.get(stream_id)
        if stream is None or (grant is not None and not grant.allows(stream_id)):
            message = f'Stream "{stream_id}" not found'
            abort(json_error(404, ErrorCode.STREAM_NOT_FOUND, message))
        return stream

    @streams.route("/api/streams/<stream_id>/snapshot.jpg")
    async def snapshot(stream_id: str) -> Any:
        stream = stream_or_404(stream_id, caller(services))
        jpeg = None
        start_source = request.args.get("cached") != "1"
        try:
            with trio.move_on_after(SNAPSHOT_WAIT):
                if start_source:
                    # A cluster node that neither owns nor replicates the stream claims it or
                    # becomes a replica of it first: the picture is read here.
                    await stream.serve_locally()
                jpeg = await stream.snapshot(start_source=start_source)
        except SignalingError as exc:
            return json_error(503, exc.code, f"No picture: {exc.message}")
        except LookupError as exc:
            return json_error(503, ErrorCode.STREAM_UNAVAILABLE, f"No picture: {exc}")
        except SnapshotError as exc:
            return json_error(502, ErrorCode.STREAM_UNAVAILABLE, str(exc))
        if jpeg is None:
            message = f"No picture: the source sent no keyframe within {SNAPSHOT_WAIT:g} s"
            return json_error(503, ErrorCode.STREAM_UNAVAILABLE, message)
        response = Response(jpeg, content_type="image/jpeg")
        response.headers["Cache-Control"] = "no-cache"
        return response

    # One change at a time: each checks the registry, records the change in the store, then
    # changes the registry. Interleaved, two DELETEs of one stream both passed the check and
    # the second raised KeyError (a 500), and two POSTs of one id overwrote each other's
    # saved definition. The lock is the store's: in a cluster, changes made on other nodes
    # are applied under it too. The body is read before the lock: a slow client holds up no
    # one.
    def changing() -> trio.Lock:
        return services.stream_changes.lock

    @streams.route("/api/streams", methods=["POST"])
    async def add_stream() -> Any:
        require_admin(services)
        body = await _request_object()
        async with changing():
            config = await _parse_definition(body, None)
            if services.registry.get(config.id) is not None:
                message = f'A stream "{config.id}" exists already (PUT /api/streams/{config.id})'
                return json_error(409, ErrorCode.STREAM_EXISTS, message, field="id")
            saved = services.stream_changes.save(config.id, stream_to_dict(config))
            if refused := await _record(saved):
                return refused
            stream = services.registry.add(config)
        return jsonify(await _stream_json(services, stream.statistics())), 201

    @streams.route("/api/streams/<stream_id>", methods=["PUT", "PATCH"])
    async def change_stream(stream_id: str) -> Any:
        require_admin(services)
        stream_or_404(stream_id)
        body = await _request_object()
        async with changing():
            stream = stream_or_404(stream_id)  # again: it may be gone by now
            if request.method == "PATCH":
                # Unmentioned fields keep their values (the source, credentials included).
                # A new source replaces the qualities, new qualities replace the source.
                current = stream_to_dict(stream.config)
                if "qualities" in body:
                    current.pop("source", None)
                if "source" in body:
                    current.pop("qualities", None)
                    current.pop("default_quality", None)
                body = {**current, **body}
            config = await _parse_definition(body, stream_id)
            definition = stream_to_dict(config)
            saved = services.stream_changes.save(stream_id, definition, enabled=stream.enabled)
            if refused := await _record(saved):
                return refused
            stream = services.registry.replace(config)
        return jsonify(await _stream_json(services, stream.statistics()))

    @streams.route("/api/streams/<stream_id>", methods=["DELETE"])
    async def delete_stream(stream_id: str) -> Any:
        require_admin(services)
        async with changing():
            stream_or_404(stream_id)
            if refused := await _record(services.stream_changes.delete(stream_id)):
                return refused
            services.registry.remove(stream_id)
        return "", 204

    # Two routes, not one ``<action>`` route: that one also took ``POST …/snapshot.jpg`` (an
    # HTML 404 instead of a 405) and made every ``Allow`` of that path list POST.
    @streams.route("/api/streams/<stream_id>/start", methods=["POST"])
    async def start_stream(stream_id: str) -> Any:
        return await set_enabled(stream_id, True)

    @streams.route("/api/streams/<stream_id>/stop", methods=["POST"])
    async def stop_stream(stream_id: str) -> Any:
        return await set_enabled(stream_id, False)

    async def set_enabled(stream_id: str, enabled: bool) -> Any:
        require_admin(services)
        async with changing():
            stream_or_404(stream_id)
            if refused := await _record(services.stream_changes.set_enabled(stream_id, enabled)):
                return refused
            stream = services.registry.set_enabled(stream_id, enabled)
        return jsonify(await _stream_json(services, stream.statistics()))

    return streams


async def _record(change: Awaitable[None]) -> Any:
    """Await a store change; None when recorded, else the error response to answer."""
    try:
        await change
    except ChangeRefused as exc:
        return json_error(exc.status, exc.code, str(exc))
    return None


async def stream_owners(services: Services, stream_ids: list[str]) -> dict[str, Owner | None]:
    """Which node owns each stream: nothing in a single process (no owners)."""
    if services.cluster is None:
        return {}
    return await services.cluster.owners(stream_ids)


async def stream_replicas(
    services: Services, stream_ids: list[str]
) -> dict[str, list[ReplicaEntry]]:
    """Which nodes replicate each stream: nothing in a single process (no replicas)."""
    if services.cluster is None:
        return {}
    return await services.cluster.replicas(stream_ids)


async def _stream_json(services: Services, stats: StreamStatistics) -> dict[str, Any]:
    owners = await stream_owners(services, [stats.id])
    replicas = await stream_replicas(services, [stats.id])
    return stream_json(stats, owners.get(stats.id), replicas.get(stats.id))


async def _request_object() -> dict[str, Any]:
    """The request's body as a JSON object, its keys in the configuration file's spelling;
    aborts with 400 when it is anything else."""
    # Parsed here, not by ``request.get_json``: that decodes the body as UTF-8 outside its
    # ``silent`` guard, so a body of other bytes was a 500 (found by the API fuzzer).
    try:
        body = json.loads(await request.get_data())
    except (ValueError, RecursionError):  # not UTF-8 (or -16/-32), not JSON, too deep
        body = None
    if not isinstance(body, dict):
        abort(json_error(400, ErrorCode.INVALID_CONFIG, "The body must be a JSON object"))
    return {API_KEYS.get(str(key), str(key)): value for key, value in body.items()}


async def _parse_definition(body: dict[str, Any], stream_id: str | None) -> StreamConfig:
    """A stream definition from an API body; aborts with 400 naming the bad field."""
    if stream_id is not None and body.setdefault("id", stream_id) != stream_id:
        message = f'The body\'s id "{body["id"]}" is not the stream "{stream_id}"'
        abort(json_error(400, ErrorCode.INVALID_CONFIG, message, field="id"))
    try:
        # In a thread: a file source's existence is checked on disk.
        return await trio.to_thread.run_sync(functools.partial(stream_from_dict, body))
    except ConfigError as exc:
        abort(json_error(400, ErrorCode.INVALID_CONFIG, exc.reason, field=exc.key))


def stream_json(
    stats: StreamStatistics,
    owner: Owner | None = None,
    replicas: list[ReplicaEntry] | None = None,
) -> dict[str, Any]:
    """One stream as the API shows it (``Stream`` in ``openapi.json``); ``owner``: the cluster
    node reading its source (None in a single process, or while no node owns it);
    ``replicas``: the nodes serving it from the owner's frames (``ms:replicas:{stream}``)."""
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
        "rtspTransportInUse": stats.rtsp_transport_in_use,
        "audio": stats.audio,
        "enabled": stats.enabled,
        "origin": stats.origin,
        "running": stats.source_running,
        "framesPublished": stats.fanout.published_frames,
        "bytesPublished": stats.fanout.published_bytes,
        "framesDropped": stats.fanout.dropped_frames,
        "framesSkipped": stats.fanout.skipped_frames,
        "encodersOpened": stats.encoders_opened,
        "defaultQuality": stats.default_quality,
        "qualities": [
            {
                "name": quality.name,
                "source": quality.source,
                "state": str(quality.state),
                "running": quality.running,
                "viewers": quality.viewers,
                "width": quality.width,
                "height": quality.height,
                "bitrate": quality.bitrate,
            }
            for quality in stats.qualities
        ],
        "owner": None if owner is None else {"node": owner.node_id, "epoch": owner.epoch},
        "replicas": [
            {"node": r.node, "upstream": r.upstream, "depth": r.depth, "viewers": r.viewers}
            for r in replicas or ()
        ],
    }
