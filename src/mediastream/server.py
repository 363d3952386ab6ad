"""Running the server: the process's task tree, start-up and graceful shutdown.

    serve                                  trio_asyncio loop: aiortc runs inside it
    └── nursery
        ├── StreamRegistry.run             stream supervisors and their sources
        ├── PeerConnectionFactory.run      closes that outlive their sessions' wait
        ├── memory.trim_periodically       freed heap memory back to the system
        ├── hypercorn.trio.serve           HTTP, static files, /ws handlers
        │   └── SignalingHub.serve × N     one per socket (see ``signaling.py``)
        ├── WhepHub.run                    WHEP sessions (see ``whep.py``)
        ├── SharedStreamStore.run          only with ``[cluster] redis_url``: other nodes'
        │                                  stream changes (``cluster/stream_store.py``)
        ├── ClusterNode.run                only with ``[cluster] redis_url``: node record,
        │                                  inbox, leases, remote sockets (``cluster/routing.py``)
        └── (waits for a shutdown request)

In a cluster, shutdown first drains the node (``ClusterNode.drain``: its streams handed over
to the other nodes, at most ``cluster.drain_timeout``). Then shutdown closes every socket
(code 1001) and ends every WHEP session, which ends every session and closes its peer
connection; then Hypercorn stops; then the sources stop, and peer closes
still running get a few seconds more (``SHUTDOWN_CLOSE_TIMEOUT``). The rest of the sequence is
bounded by ``server.graceful_timeout`` plus a second; whatever is left is cancelled.

trio-asyncio keeps its loop in a context variable, so ``open_loop()`` must enclose Hypercorn
itself: handlers started from a sibling task would find no loop.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import hypercorn.config
import hypercorn.trio
import trio
import trio_asyncio

from . import hypercorn_compat, memory
from .api.pages import DEFAULT_STATIC_DIR
from .api.services import Services
from .app import create_app
from .changes import ChangeSignal
from .config import Config
from .errors import ConfigError
from .metrics import Metrics
from .registry import StreamRegistry
from .signaling import LocalRouter, SignalingHub
from .store import LocalStreamChanges, StreamChanges, StreamStore
from .webrtc import aiortc_compat
from .webrtc.bridge import PeerConnectionFactory
from .whep import WhepHub

if TYPE_CHECKING:  # a single process never imports the cluster (and its Redis client)
    from .cluster.stream_store import SharedStreamStore

log = logging.getLogger(__name__)

#: Hypercorn's own hard cap on one WebSocket message; above it the socket is closed (1009).
#: Smaller oversize messages get a ``message_too_large`` error and the socket lives on.
HARD_MESSAGE_LIMIT_FACTOR: Final = 4
SHUTDOWN_MARGIN: Final = 1.0  # seconds beyond graceful_timeout before everything is cancelled


@dataclass(frozen=True)
class Worker:
    """One of the processes of ``mediastream serve --workers N``."""

    index: int
    #: the listening HTTP socket, bound once by the parent and inherited by every worker
    listen_fd: int


@dataclass
class RunningServer:
    """Handed to whoever started :func:`serve` (``await nursery.start(serve, config)``)."""

    urls: list[str]
    services: Services
    _shutdown_requested: trio.Event = field(default_factory=trio.Event)
    _stopped: trio.Event = field(default_factory=trio.Event)

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def ws_url(self) -> str:
        return self.url.replace("http", "ws", 1) + "/ws"

    def request_shutdown(self) -> None:
        self._shutdown_requested.set()

    async def wait_stopped(self) -> None:
        """Wait until :func:`serve` has finished shutting down."""
        await self._stopped.wait()


async def serve(
    config: Config,
    *,
    static_dir: Path = DEFAULT_STATIC_DIR,
    worker: Worker | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until :meth:`RunningServer.request_shutdown`, then shut down gracefully.

    ``worker``: this process is one of ``serve --workers N`` (see ``workers.py``): it serves
    on the listening socket its parent bound, and its node id says which worker it is.

    Raises:
        ConfigError: the static folder is missing.
        OSError: the address can't be bound.
    """
    if not await trio.Path(static_dir).is_dir():
        raise ConfigError(f"static files folder not found: {static_dir}")
    hypercorn_compat.install()
    aiortc_compat.install()
    stopped = trio.Event()
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_asyncio_error)
            changes = ChangeSignal()
            store = await trio.to_thread.run_sync(StreamStore, Path(config.server.data_dir))
            # The metrics read the services' statistics at scrape time (bound just below).
            metrics = Metrics(lambda: services.statistics(), lambda: registry.statistics())
            peers = PeerConnectionFactory(
                config.webrtc,
                changes,
                catchup_rate=config.media.catchup_rate_kbps * 1000 / 8,
                on_close_overrun=metrics.peer_close_overruns.inc,
            )
            local = LocalRouter(peers, config.webrtc, config.limits, metrics)
            cluster = None
            shared: SharedStreamStore | None = None
            stream_changes: StreamChanges = LocalStreamChanges(store)
            if config.cluster.redis_url:
                # Imported only here: a single process never imports a Redis client.
                from .cluster.routing import ClusterNode
                from .cluster.stream_store import LocalCopy, SharedStreamStore

                cluster = ClusterNode(
                    config,
                    local,
                    on_redis_command=metrics.observe_redis_command,
                    worker=None if worker is None else worker.index,
                )
                copy = await trio.to_thread.run_sync(LocalCopy, Path(config.server.data_dir))
                shared = SharedStreamStore(
                    config.cluster.redis_url,
                    config.cluster.node_id,
                    copy,
                    on_command=metrics.observe_redis_command,
                )
                stream_changes = shared
                metrics.watch_cluster(cluster.statistics, shared.statistics)
            registry = StreamRegistry(config, changes, gate=cluster)
            registry.apply_stored(await trio.to_thread.run_sync(store.load))
            if cluster is not None and shared is not None:
                # The cluster's store over the file's (and the single process's changes).
                registry.apply_stored(await shared.load())
                cluster.registry = shared.registry = registry
            hub = SignalingHub(config, registry, peers, changes, metrics=metrics, router=cluster)
            whep = WhepHub(
                limits=config.limits,
                webrtc=config.webrtc,
                find_stream=registry.get,
                peers=peers,
                authenticator=hub.authenticator,
                changes=changes,
                metrics=metrics,
            )
            services = Services(
                stream_changes=stream_changes,
                registry=registry,
                peers=peers,
                hub=hub,
                static_dir=static_dir,
                changes=changes,
                metrics=metrics,
                whep=whep,
                cluster=cluster,
                allowed_origins=config.security.allowed_origins,
            )
            app = create_app(services)
            hypercorn_stop = trio.Event()
            async with trio.open_nursery() as lifetime:
                await lifetime.start(registry.run)
                await lifetime.start(peers.run)  # owns peer closes that outlive their sessions
                await lifetime.start(memory.trim_periodically)
                await lifetime.start(whep.run)
                async with trio.open_nursery() as http:
                    urls = await http.start(
                        functools.partial(
                            hypercorn.trio.serve,
                            app,
                            _hypercorn_config(config, metrics, changes, worker),
                            shutdown_trigger=hypercorn_stop.wait,
                        )
                    )
                    if cluster is not None and shared is not None:
                        from .cluster import node_identity

                        port = _bound_port(urls[0])
                        shared.node_id = node_identity(config.cluster, port)[0]
                        # In step with the cluster's streams before the server says it is up.
                        await lifetime.start(shared.run)
                        await lifetime.start(cluster.run, port)
                    running = RunningServer(urls=urls, services=services, _stopped=stopped)
                    log.info("MediaStream serving %d streams on %s", len(registry), ", ".join(urls))
                    if not hub.authenticator.enabled:
                        log.warning(
                            "OPEN MODE: no security.jwt_secret or jwt_public_key_file is set, so "
                            "anyone who can reach this server may watch every stream. Set one "
                            "before exposing cameras (docs/security.md)."
                        )
                    task_status.started(running)
                    await running._shutdown_requested.wait()
                    if cluster is not None:
                        await cluster.drain(config.cluster.drain_timeout)

                    log.info("shutting down: closing %d sockets", hub.statistics().open_sockets)
                    lifetime.cancel_scope.deadline = (
                        trio.current_time() + config.server.graceful_timeout + SHUTDOWN_MARGIN
                    )
                    hub.shutdown()
                    whep.shutdown()
                    hypercorn_stop.set()
                if cluster is not None:  # leave the cluster while Redis is still reachable
                    cluster.stop()
                    await cluster.wait_stopped()
                lifetime.cancel_scope.cancel()  # Hypercorn is done: stop the sources
            if trio.current_time() >= lifetime.cancel_scope.deadline:
                log.warning(
                    "shutdown took longer than %.0f s; the rest was cancelled",
                    config.server.graceful_timeout,
                )
            log.info("stopped: %d peer connections open", peers.statistics().open_peer_connections)
    finally:
        stopped.set()


def _bound_port(url: str) -> int:
    """The HTTP port Hypercorn bound (``server.port`` may be 0: any free port)."""
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _log_asyncio_error(loop: Any, context: dict[str, Any]) -> None:
    """Log what asyncio reports about aiortc's tasks instead of raising it.

    trio-asyncio's default handler raises every such report (a task garbage-collected while
    still pending, an exception no one retrieved) into the loop's nursery, which encloses the
    whole server: one peer connection's stray task would end every socket and session. That
    happened when closing a peer was cut off on a loaded machine, leaving its ICE transport's
    monitor task waiting forever until the garbage collector found it (closes now run to their
    end, see ``PeerConnectionFactory.run``); any other such report must not end the server
    either.
    """
    what = context.get("task") or context.get("future") or context.get("handle") or ""
    log.error(
        "asyncio: %s %s",
        context.get("message", "unhandled error"),
        what,
        exc_info=context.get("exception"),
    )


def _hypercorn_config(
    config: Config, metrics: Metrics, changes: ChangeSignal, worker: Worker | None = None
) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()

    def connection_failed(reason: str) -> None:
        metrics.connection_failures.labels(reason=reason).inc()
        changes.notify()

    hypercorn_compat.on_connection_failure(hc, connection_failed)
    host = config.server.host
    if worker is not None:
        hc.bind = [f"fd://{worker.listen_fd}"]
    else:
        hc.bind = [
            f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"
        ]
    hc.graceful_timeout = config.server.graceful_timeout
    hc.websocket_max_message_size = config.limits.max_message_bytes * HARD_MESSAGE_LIMIT_FACTOR
    hypercorn_compat.limit_inflation(hc.websocket_max_message_size)
    # Hypercorn answers pings itself, unseen by the application's message limit: pings are
    # held to the same rate.
    hypercorn_compat.limit_pings(hc, config.limits.max_messages_per_second)
    # No access log: the signaling socket's URL carries the page's access token.
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    if config.server.certfile:
        hc.certfile = config.server.certfile
        hc.keyfile = config.server.keyfile
    return hc
