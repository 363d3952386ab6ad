"""Where a full owner sends the next viewer: replicas with room, fresh nodes, chaining under
``max_relays_per_node``, and nodes at ``max_load_per_node`` left out (pure logic, fake
records). The registry entries' JSON is checked too."""

from __future__ import annotations

import pytest

from mediastream.cluster.errors import ClusterError
from mediastream.cluster.leases import NodeRecord
from mediastream.cluster.placement import (
    ReplicaChoice,
    ReplicaCooldowns,
    ReplicaView,
    choose_replica,
    rank_nodes,
)
from mediastream.cluster.replica_registry import ReplicaEntry

NODES = ("a", "b", "c", "d")


def record(node_id: str, load: float = 0.0) -> NodeRecord:
    return NodeRecord(node_id, f"http://{node_id}", relay_address=f"{node_id}:9000", load=load)


def ranked_stream(*order: str) -> str:
    """A stream id whose placement ranks the nodes in ``order``."""
    records = [record(n) for n in NODES]
    for index in range(100_000):
        stream_id = f"cam-{index}"
        if tuple(r.node_id for r in rank_nodes(stream_id, records))[: len(order)] == order:
            return stream_id
    raise AssertionError(f"no stream ranks {order}")


STREAM = ranked_stream("a", "b", "c", "d")  # a owns it; b, c, d in this order after it


def choose(
    replicas: list[ReplicaView],
    *,
    loads: dict[str, float] | None = None,
    owner_relays: int = 0,
    max_viewers: int = 1,
    max_relays: int = 1,
    max_load: float = 0.0,
    prefer: str | None = None,
    excluded: tuple[str, ...] = (),
) -> ReplicaChoice | None:
    nodes = [record(n, (loads or {}).get(n, 0.0)) for n in NODES]
    return choose_replica(
        STREAM, nodes, "a", owner_relays, replicas, max_viewers=max_viewers,
        max_relays=max_relays, max_load=max_load, prefer=prefer, excluded=excluded,
    )  # fmt: skip


def test_the_first_fresh_replica_is_fed_by_the_owner() -> None:
    assert choose([]) == ReplicaChoice("b", "a", 1, fresh=True)
    assert choose([], prefer="d") == ReplicaChoice("d", "a", 1, fresh=True)


def test_an_owner_at_its_relay_limit_has_the_next_replica_fed_by_a_replica() -> None:
    b = ReplicaView("b", "a", 1, viewers=1, relays=0)
    assert choose([b], owner_relays=1) == ReplicaChoice("c", "b", 2, fresh=True)
    # b feeds one already: c (depth 2, relay room) feeds d.
    b_full = ReplicaView("b", "a", 1, viewers=1, relays=1)
    c = ReplicaView("c", "b", 2, viewers=1, relays=0)
    assert choose([b_full, c], owner_relays=1) == ReplicaChoice("d", "c", 3, fresh=True)
    # Relay room on both: the shallower first.
    b_room = ReplicaView("b", "a", 1, viewers=1, relays=0)
    assert choose([b_room, c], owner_relays=1) == ReplicaChoice("d", "b", 2, fresh=True)
    # No limit: the owner feeds everyone.
    assert choose([b], owner_relays=7, max_relays=0) == ReplicaChoice("c", "a", 1, fresh=True)


def test_a_replica_with_room_comes_before_a_fresh_node_and_a_full_cluster_degrades() -> None:
    b = ReplicaView("b", "a", 1, viewers=0, relays=1)
    c = ReplicaView("c", "b", 2, viewers=0, relays=0)
    assert choose([c, b], max_viewers=2) == ReplicaChoice("b", "a", 1, fresh=False)
    full = [
        ReplicaView("b", "a", 1, viewers=3, relays=1),
        ReplicaView("c", "b", 2, viewers=2, relays=1),
        ReplicaView("d", "c", 3, viewers=3, relays=0),
    ]
    assert choose(full, max_viewers=2) == ReplicaChoice("c", "b", 2, fresh=False)


def test_a_node_at_the_load_limit_is_neither_a_fresh_replica_nor_one_with_room() -> None:
    loads = {"b": 0.9, "c": 0.2}
    assert choose([], loads=loads, max_load=0.8) == ReplicaChoice("c", "a", 1, fresh=True)
    # Without the limit the loaded node is placement's first.
    assert choose([], loads=loads) == ReplicaChoice("b", "a", 1, fresh=True)
    b = ReplicaView("b", "a", 1, viewers=0, relays=0)
    assert choose([b], loads=loads, max_viewers=5, max_load=0.8) == ReplicaChoice(
        "c", "a", 1, fresh=True
    )
    everyone = {"b": 0.9, "c": 0.9, "d": 0.8}
    assert choose([], loads=everyone, max_load=0.8) is None


def test_dead_nodes_and_nodes_without_a_relay_are_never_chosen() -> None:
    assert choose([], excluded=("b",)) == ReplicaChoice("c", "a", 1, fresh=True)
    nodes = [record("a"), NodeRecord("b", "http://b"), record("c")]
    chosen = choose_replica(STREAM, nodes, "a", 0, [], max_viewers=1, max_relays=1, max_load=0.0)
    assert chosen == ReplicaChoice("c", "a", 1, fresh=True)
    # A replica whose node record is gone (expired) is not a candidate either.
    gone = ReplicaView("e", "a", 1, viewers=0, relays=0)
    assert choose([gone]) == ReplicaChoice("b", "a", 1, fresh=True)


def test_a_registry_entry_round_trips_and_a_bad_one_names_what_is_wrong() -> None:
    entry = ReplicaEntry("b", "a", 1, viewers=3, relays=1, relay_address="b:9000", offers=4)
    assert ReplicaEntry.from_json(entry.to_json()) == entry
    with pytest.raises(ClusterError, match="bad replica entry"):
        ReplicaEntry.from_json('{"node": "b"}')
    with pytest.raises(ClusterError, match="wrong type"):
        ReplicaEntry.from_json(entry.to_json().replace('"viewers":3', '"viewers":"3"'))


def test_a_node_left_out_is_never_chosen_and_the_owner_serves_when_none_is_left() -> None:
    # b, the stream's first replica candidate, cannot be fed: c gets the viewer.
    assert choose([], excluded=("b",)) == ReplicaChoice("c", "a", 1, fresh=True)
    assert choose([], prefer="b", excluded=("b",)) == ReplicaChoice("c", "a", 1, fresh=True)
    # b already a replica with room (registered, or counted from the viewers sent there):
    # left out all the same, and not the fallback of a full cluster either.
    b = ReplicaView("b", "a", 1, viewers=0, relays=0)
    assert choose([b], excluded=("b",)) == ReplicaChoice("c", "a", 1, fresh=True)
    full_b = ReplicaView("b", "a", 1, viewers=1, relays=0)
    assert choose([full_b], excluded=("c", "d")) == ReplicaChoice("b", "a", 1, fresh=False)
    assert choose([full_b], excluded=("b", "c", "d")) is None
    # Nor a feeder of a chain.
    c = ReplicaView("c", "a", 1, viewers=1, relays=0)
    assert choose([full_b, c], owner_relays=1, excluded=("b",)) == ReplicaChoice(
        "d", "c", 2, fresh=True
    )


def test_a_node_that_could_not_be_fed_cools_down_doubling_while_it_keeps_failing() -> None:
    cooldowns = ReplicaCooldowns(first=60.0, longest=240.0, limit=8)
    assert cooldowns.cooling(STREAM, 0.0) == set()
    assert cooldowns.failed(STREAM, "b", 100.0) == 60.0
    assert cooldowns.cooling(STREAM, 100.0) == {"b"}
    assert cooldowns.cooling(STREAM, 159.9) == {"b"}
    assert cooldowns.cooling("another-stream", 120.0) == set()  # per stream
    # Another of its viewers failing during the cool-down: the same length, from now.
    assert cooldowns.failed(STREAM, "b", 150.0) == 60.0
    assert cooldowns.cooling(STREAM, 209.9) == {"b"}
    assert cooldowns.cooling(STREAM, 210.0) == set()  # tried again
    # Failing again after it: doubled, up to the longest.
    assert cooldowns.failed(STREAM, "b", 215.0) == 120.0
    assert cooldowns.failed(STREAM, "b", 340.0) == 240.0
    assert cooldowns.failed(STREAM, "b", 590.0) == 240.0
    # Connected after all: forgotten, the next failure starts over.
    cooldowns.connected(STREAM, "b")
    assert cooldowns.cooling(STREAM, 600.0) == set() and len(cooldowns) == 0
    assert cooldowns.failed(STREAM, "b", 600.0) == 60.0
    # Not failing for the longest cool-down after its own: forgotten, and starts over.
    assert cooldowns.cooling(STREAM, 660.0 + 240.1) == set() and len(cooldowns) == 0
    assert cooldowns.failed(STREAM, "b", 1000.0) == 60.0


def test_the_cool_down_memory_forgets_nodes_that_left_and_is_bounded() -> None:
    cooldowns = ReplicaCooldowns(first=60.0, longest=240.0, limit=3)
    cooldowns.failed(STREAM, "b", 0.0)
    cooldowns.failed(STREAM, "c", 0.0)
    cooldowns.keep_nodes(["a", "c", "d"])  # b left the cluster
    assert cooldowns.cooling(STREAM, 1.0) == {"c"}
    for index in range(5):
        cooldowns.failed(f"cam-x{index}", "d", 2.0)
    assert len(cooldowns) == 3  # the oldest failures forgotten first
    assert cooldowns.cooling(STREAM, 3.0) == set()
    assert cooldowns.cooling("cam-x4", 3.0) == {"d"}
