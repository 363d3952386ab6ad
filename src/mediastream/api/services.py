"""What the routes are given: built once per server by ``server.serve``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..changes import ChangeSignal
from ..metrics import Metrics
from ..registry import StreamRegistry
from ..signaling import SignalingHub
from ..statistics import ServerStatistics, task_names, thread_count
from ..store import StreamChanges
from ..webrtc.bridge import PeerConnectionFactory
from ..whep import WhepHub

if TYPE_CHECKING:  # a single process never imports the cluster (and its Redis client)
    from ..cluster.routing import ClusterNode


@dataclass(frozen=True)
class Services:
    """What the routes need; built once per server by ``server.serve``."""

    registry: StreamRegistry
    peers: PeerConnectionFactory
    hub: SignalingHub
    static_dir: Path
    #: where the management API records its changes (a cluster: Redis, seen by every node)
    stream_changes: StreamChanges
    #: notified on every socket, session, peer connection and source change.
    changes: ChangeSignal
    metrics: Metrics
    #: the WHEP sessions (``/whep``)
    whep: WhepHub
    #: this node of a cluster; None in a single process (no ``[cluster] redis_url``)
    cluster: ClusterNode | None = None
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
            # A WHEP session is a session like a socket's (it has no socket to count it under).
            open_sessions=sockets.open_sessions + self.whep.open_sessions,
            sessions_per_socket=sockets.sessions_per_socket,
            open_peer_connections=peers.open_peer_connections,
            peer_connections_opened=peers.peer_connections_opened,
            sources_running=sum(s.source_running for s in streams),
            viewers=sum(s.viewers for s in streams),
            tasks=len(task_names()),
            threads=thread_count(),
        )
