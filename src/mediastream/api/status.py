"""How the server is doing, and what it offers: ``/healthz``, ``/api/stats``, ``/api/cluster``,
``/metrics``, ``/api/openapi.json``."""

from __future__ import annotations

import functools
import importlib.resources
from typing import Any

import trio
from quart import Blueprint, Response, jsonify

from ..errors import ErrorCode
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .access import caller, json_error, require_admin
from .services import Services


def status_blueprint(services: Services) -> Blueprint:
    """Liveness (public), the server's statistics and metrics (admin), the API description."""
    status = Blueprint("status", __name__)

    @status.route("/healthz")
    async def healthz() -> Any:
        cluster = services.cluster
        if cluster is not None and cluster.draining:
            # Shutting down, its streams handed over: a load balancer takes it out. (Never
            # Redis's state: a Redis outage must not fail every node's health check.)
            response = jsonify({"status": "draining"})
            response.status_code = 503
        else:
            response = jsonify({"status": "ok"})
        if cluster is not None and cluster.node_id:
            # Which node answered: behind a load balancer, or one port shared by workers.
            response.headers["X-MediaStream-Node"] = cluster.node_id
        return response

    @status.route("/metrics")
    async def metrics() -> Any:
        require_admin(services)
        # Read in the event loop on purpose: the statistics it reads belong to this thread.
        return Response(services.metrics.exposition(), content_type=METRICS_CONTENT_TYPE)

    @status.route("/api/openapi.json")
    async def openapi() -> Any:
        caller(services)
        description = await trio.to_thread.run_sync(_openapi_description)
        return Response(description, content_type="application/json")

    @status.route("/api/stats")
    async def stats() -> Any:
        if not caller(services).admin:
            return json_error(403, ErrorCode.FORBIDDEN, "This needs an admin token")
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

    @status.route("/api/cluster")
    async def cluster() -> Any:
        require_admin(services)
        node = services.cluster
        if node is None:
            return jsonify({"nodeId": None, "nodes": []})
        from ..cluster.errors import RedisUnavailable  # a cluster node has it imported already

        try:
            records = await node.nodes()
        except RedisUnavailable as exc:
            return json_error(
                503, ErrorCode.CLUSTER_UNAVAILABLE, f"The cluster's nodes are unknown: {exc}"
            )
        owners = await node.owners([s.id for s in services.registry])
        owned: dict[str, list[str]] = {}
        for stream_id, owner in owners.items():
            if owner is not None:
                owned.setdefault(owner.node_id, []).append(stream_id)
        replicated: dict[str, list[str]] = {}
        for stream_id, entries in (await node.replicas([s.id for s in services.registry])).items():
            for entry in entries:
                replicated.setdefault(entry.node, []).append(stream_id)
        return jsonify(
            {
                "nodeId": node.node_id,
                "nodes": [
                    {
                        "id": record.node_id,
                        "publicUrl": record.public_url,
                        "state": str(record.state),
                        "load": record.load,
                        "streams": sorted(owned.get(record.node_id, [])),
                        "replicates": sorted(replicated.get(record.node_id, [])),
                    }
                    for record in records
                ],
            }
        )

    return status


@functools.cache
def _openapi_description() -> bytes:
    """``openapi.json``, the OpenAPI 3.1 description of the routes (package data)."""
    return importlib.resources.files("mediastream").joinpath("openapi.json").read_bytes()
