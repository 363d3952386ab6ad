"""Several MediaStream nodes as one cluster, coordinated through Redis (docs/cluster.md).

Nothing here runs unless ``[cluster] redis_url`` is set: a single process never imports a
Redis client nor opens a connection.

- :mod:`.leases`: node records and stream ownership (leases with fencing epochs).
- :mod:`.placement`: which node should own a stream (rendezvous hashing, then load).
- :mod:`.envelope`: the message format between nodes, parsed once at the edge.
- :mod:`.bus`: inboxes, request/reply with one retry, de-duplication (no Redis in it).
- :mod:`.redis_bus`: the bus over Redis pub/sub; :mod:`.redis_client`: the bounded client.
- :mod:`.errors`: the cluster's exception tree.
- :mod:`.routing`: the node itself (``ClusterNode``): started by ``server.serve``, it is the
  signaling Router (local or relayed sessions) and the registry's IngestGate (only the
  owner reads a camera; a replica runs the owner's frames instead).
- :mod:`.relay`: replicas' frame relay (authenticated TCP, one connection per stream, from
  the owner or from a replica: replicas chain).
- :mod:`.replica_registry`: which nodes replicate a stream (``ms:replicas:{stream}``).

Task tree: the app's lifetime nursery holds ``ClusterNode.run``, under which run the node
registration task, the bus (its receive pump) and one ``hold_stream_lease`` task per stream
this node owns, whose loss cancels that stream's ingest scope (see :mod:`.routing`).
"""

from __future__ import annotations

import socket

from ..config import ClusterConfig


def node_identity(cluster: ClusterConfig, port: int, worker: int | None = None) -> tuple[str, str]:
    """This node's id and public URL: as configured, else from the host name and HTTP port.

    The default id is ``{host name}-{port}`` so that several nodes on one machine (one per
    core, each on its own port) differ. A worker of ``serve --workers N`` (``worker`` = its
    index) adds ``-w{index}`` to the id, configured or not: the workers share the port and
    the configuration, and must still differ. They share the public URL too: nothing reaches
    a node by its URL except browsers, and any node routes any stream.
    """
    host = socket.gethostname()
    node_id = cluster.node_id or f"{host}-{port}"
    if worker is not None:
        node_id = f"{node_id}-w{worker}"
    public_url = (cluster.public_url or f"http://{host}:{port}").rstrip("/")
    return node_id, public_url
