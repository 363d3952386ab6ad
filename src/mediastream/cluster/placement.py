"""Which node should own a stream nobody owns yet: rendezvous hashing, then load.

Rendezvous (highest-random-weight) hashing ranks the nodes by a hash of ``(node, stream)``:
every node computes the same ranking without talking to the others, and when a node joins
or leaves only the streams it wins or held move (a modulo hash would move almost all). The
first node in the ranking that is serving and not full gets the stream; when all are full,
the least loaded serving node does (a full cluster degrades instead of refusing). A stream
whose owner is full is served by replicas as well: :func:`choose_replica` picks the node for
its next viewer and what feeds it, leaving out the nodes :class:`ReplicaCooldowns` remembers
could not be fed (a relay that refused them, or that they never reached). Pure logic.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from .leases import NodeRecord, NodeState

#: a node whose load is at least this is full (load is the share of its capacity in use).
FULL: Final = 1.0
#: a replica node that could not be fed a stream is left out of its placement for this long,
#: doubling each time it fails again after its cool-down, up to COOLDOWN_MAX.
COOLDOWN_FIRST: Final = 60.0  # seconds
COOLDOWN_MAX: Final = 960.0  # seconds
#: (stream, node) failures remembered at most; the oldest is forgotten first.
COOLDOWN_MEMORY: Final = 1024


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


@dataclass(frozen=True)
class ReplicaView:
    """What the owner knows of one replica of a stream when it places a viewer: its registry
    entry (or relay connection), plus the viewers and replicas sent there not yet reported."""

    node: str
    upstream: str
    depth: int
    viewers: int
    relays: int


@dataclass(frozen=True)
class ReplicaChoice:
    """Where the next viewer goes: ``node``, a replica fed by ``upstream`` at ``depth``."""

    node: str
    upstream: str
    depth: int
    #: True: ``node`` is not a replica yet (it starts one, fed by ``upstream``)
    fresh: bool


def choose_replica(
    stream_id: str,
    nodes: Iterable[NodeRecord],
    owner: str,
    owner_relays: int,
    replicas: Iterable[ReplicaView],
    *,
    max_viewers: int,
    max_relays: int,
    max_load: float,
    prefer: str | None = None,
    excluded: Iterable[str] = (),
) -> ReplicaChoice | None:
    """The node to serve a stream's next viewer when its owner is full; None when no other
    node can (the owner serves it anyway).

    A replica with room (fewer than ``max_viewers`` viewers, load under ``max_load``) first,
    in the stream's ranking (one more relay connection costs the owner); else a fresh node
    under ``max_load``: ``prefer`` (the viewer's socket node: no signaling hop) if it may be
    one, else the highest-ranked. A fresh replica is fed by the owner while the owner feeds
    fewer than ``max_relays`` replicas of the stream, else by the replica with relay room and the
    smallest depth (then the fewest relays): replicas chain. When every replica is full and
    no node is fresh, the replica with the fewest viewers (the limits are soft: a full
    cluster degrades, it does not refuse). ``max_viewers``, ``max_relays``, ``max_load`` of
    0: no such limit. ``excluded``: nodes seen dead whose records have not expired yet.
    """
    skip = set(excluded) | {owner}
    ranked = [n for n in rank_nodes(stream_id, nodes) if n.node_id not in skip and n.relay_address]
    loads = {n.node_id: n.load for n in ranked}
    known = {r.node: r for r in replicas if r.node in loads}

    def loaded(node_id: str) -> bool:
        return max_load > 0 and loads[node_id] >= max_load

    def has_room(replica: ReplicaView) -> bool:
        return (max_viewers <= 0 or replica.viewers < max_viewers) and not loaded(replica.node)

    for node in ranked:
        replica = known.get(node.node_id)
        if replica is not None and has_room(replica):
            return ReplicaChoice(replica.node, replica.upstream, replica.depth, fresh=False)
    fresh = [n.node_id for n in ranked if n.node_id not in known and not loaded(n.node_id)]
    if fresh:
        chosen = prefer if prefer in fresh else fresh[0]
        assert chosen is not None
        if max_relays <= 0 or owner_relays < max_relays:
            return ReplicaChoice(chosen, owner, 1, fresh=True)
        feeders = [r for r in known.values() if r.relays < max_relays]
        if not feeders:  # every feeder full: the owner (soft, as the viewer cap)
            return ReplicaChoice(chosen, owner, 1, fresh=True)
        upstream = min(feeders, key=lambda r: (r.depth, r.relays, r.node))
        return ReplicaChoice(chosen, upstream.node, upstream.depth + 1, fresh=True)
    if not known:
        return None
    least = min(known.values(), key=lambda r: (r.viewers, r.depth, r.node))
    return ReplicaChoice(least.node, least.upstream, least.depth, fresh=False)


@dataclass
class _Cooldown:
    #: the clock's time the node may be placed again
    until: float
    #: how long this cool-down lasts (the next failure after it doubles it)
    length: float


class ReplicaCooldowns:
    """The replica nodes an owner could not feed, per stream, left out of placement for a
    while: a node sent viewers whose relay never connected (another ``relay_secret``, TLS on
    one side only, a firewall) would otherwise be chosen again for every re-offer of the
    viewers it failed.

    A failure starts a cool-down of ``first`` seconds; a failure after the cool-down ended
    (the node is still failing) doubles it, up to ``longest``; a failure during it (another
    viewer or quality that was already on its way) restarts it at the same length. A node
    that connects, or leaves the cluster, is forgotten; so is one whose cool-down ended
    ``longest`` ago (not failing any more). At most ``limit`` (stream, node) pairs are kept
    (the oldest failure is forgotten first). Times are the caller's clock (Trio's).
    """

    def __init__(
        self,
        first: float = COOLDOWN_FIRST,
        longest: float = COOLDOWN_MAX,
        limit: int = COOLDOWN_MEMORY,
    ) -> None:
        self.first = first
        self.longest = longest
        self._limit = limit
        self._failed: collections.OrderedDict[tuple[str, str], _Cooldown] = (
            collections.OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._failed)

    def failed(self, stream_id: str, node: str, now: float) -> float:
        """``node`` could not be fed ``stream_id``: how long it is left out from ``now``."""
        key = (stream_id, node)
        earlier = self._failed.pop(key, None)
        if earlier is None or now - earlier.until > self.longest:
            length = self.first
        elif now < earlier.until:
            length = earlier.length
        else:
            length = min(earlier.length * 2, self.longest)
        self._failed[key] = _Cooldown(now + length, length)
        while len(self._failed) > self._limit:
            self._failed.popitem(last=False)
        return length

    def cooling(self, stream_id: str, now: float) -> set[str]:
        """The nodes not to place ``stream_id``'s viewers on at ``now``; forgets the
        failures that are over for good."""
        for key, cooldown in list(self._failed.items()):
            if now - cooldown.until > self.longest:
                del self._failed[key]
        return {
            node
            for (stream, node), cooldown in self._failed.items()
            if stream == stream_id and now < cooldown.until
        }

    def connected(self, stream_id: str, node: str) -> None:
        """``node`` was fed ``stream_id`` after all: placed again as any other."""
        self._failed.pop((stream_id, node), None)

    def keep_nodes(self, live: Iterable[str]) -> None:
        """Forget the nodes not in ``live`` (they left: a node started again is new)."""
        alive = set(live)
        for key in [key for key in self._failed if key[1] not in alive]:
            del self._failed[key]


def choose_upstream(
    owner: str, replicas: Iterable[ReplicaView], *, max_relays: int
) -> tuple[str, int]:
    """What feeds a fresh replica of a stream a node starts for its own viewers, and at which
    depth: the owner while it feeds fewer than ``max_relays`` replicas (0: no limit), else
    the replica with relay room and the smallest depth (then the fewest relays), else the
    owner anyway (soft, as in :func:`choose_replica`)."""
    known = list(replicas)
    owner_relays = sum(1 for r in known if r.upstream == owner)
    if max_relays <= 0 or owner_relays < max_relays:
        return owner, 1
    feeders = [r for r in known if r.relays < max_relays]
    if not feeders:
        return owner, 1
    upstream = min(feeders, key=lambda r: (r.depth, r.relays, r.node))
    return upstream.node, upstream.depth + 1
