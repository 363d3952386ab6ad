"""Which node should own a stream nobody owns yet: rendezvous hashing, then load.

Rendezvous (highest-random-weight) hashing ranks the nodes by a hash of ``(node, stream)``:
every node computes the same ranking without talking to the others, and when a node joins
or leaves only the streams it wins or held move (a modulo hash would move almost all). The
first node in the ranking that is serving and not full gets the stream; when all are full,
the least loaded serving node does (a full cluster degrades instead of refusing). Pure logic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Final

from .leases import NodeRecord, NodeState

#: a node whose load is at least this is full (load is the share of its capacity in use).
FULL: Final = 1.0


def rendezvous_weight(node_id: str, stream_id: str) -> int:
    """The node's weight for the stream: 64 bits of BLAKE2b, the same on every machine."""
    digest = hashlib.blake2b(
        f"{node_id}\x00{stream_id}".encode(), digest_size=8, person=b"ms-placement"
    ).digest()
    return int.from_bytes(digest, "big")


def rank_nodes(stream_id: str, nodes: Iterable[NodeRecord]) -> list[NodeRecord]:
    """The serving nodes, the stream's preferred one first (ties broken by node id)."""
    serving = [node for node in nodes if node.state is NodeState.SERVING]
    return sorted(
        serving,
        key=lambda node: (rendezvous_weight(node.node_id, stream_id), node.node_id),
        reverse=True,
    )


def choose_owner(stream_id: str, nodes: Iterable[NodeRecord]) -> NodeRecord | None:
    """The node that should claim ``stream_id``; None when no node is serving.

    The highest-ranked node that is not full; if every serving node is full, the least
    loaded one (the higher-ranked among equals). Draining nodes never get new streams.
    """
    ranked = rank_nodes(stream_id, nodes)
    for node in ranked:
        if node.load < FULL:
            return node
    if not ranked:
        return None
    # min() keeps the first of equals, which is the higher-ranked.
    return min(ranked, key=lambda node: node.load)


def stream_ids_placed_on(
    node_id: str, node_ids: Sequence[str], count: int, prefix: str = "cam"
) -> list[str]:
    """The first ``count`` ids ``{prefix}-{n}`` that placement gives to ``node_id`` when the
    nodes ``node_ids`` all serve, idle: for tests, benchmarks and trials that need streams a
    given node will own.

    Raises:
        ValueError: ``node_id`` is not one of ``node_ids``.
    """
    if node_id not in node_ids:
        raise ValueError(f'node "{node_id}" is not among {list(node_ids)}')
    records = [NodeRecord(node, f"http://{node}") for node in node_ids]
    found: list[str] = []
    index = 0
    while len(found) < count:
        stream_id = f"{prefix}-{index}"
        index += 1
        owner = choose_owner(stream_id, records)
        if owner is not None and owner.node_id == node_id:
            found.append(stream_id)
    return found
