"""Placement: rendezvous hashing over serving nodes, with a fallback by load."""

from __future__ import annotations

from collections import Counter

import pytest

from mediastream.cluster.leases import NodeRecord, NodeState
from mediastream.cluster.placement import (
    choose_owner,
    rank_nodes,
    rendezvous_weight,
    stream_ids_placed_on,
)

STREAMS = [f"cam-{index}" for index in range(600)]


def node(node_id: str, *, load: float = 0.0, state: NodeState = NodeState.SERVING) -> NodeRecord:
    return NodeRecord(node_id=node_id, public_url=f"http://{node_id}:8107", state=state, load=load)


def owners(nodes: list[NodeRecord]) -> dict[str, str | None]:
    return {
        stream: (chosen.node_id if (chosen := choose_owner(stream, nodes)) else None)
        for stream in STREAMS
    }


def test_every_node_computes_the_same_owner_whatever_the_order_it_lists_nodes_in() -> None:
    nodes = [node("a"), node("b"), node("c")]
    assert owners(nodes) == owners(list(reversed(nodes)))


def test_weights_are_stable_values_not_per_process_hashes() -> None:
    # Python's hash() of a str changes per process; placement must not.
    assert rendezvous_weight("node-a", "cam-1") == rendezvous_weight("node-a", "cam-1")
    assert rendezvous_weight("node-a", "cam-1") != rendezvous_weight("node-b", "cam-1")
    assert 0 <= rendezvous_weight("node-a", "cam-1") < 2**64


def test_streams_spread_over_the_nodes() -> None:
    counts = Counter(owners([node("a"), node("b"), node("c")]).values())
    assert set(counts) == {"a", "b", "c"}
    assert all(150 <= count <= 250 for count in counts.values()), counts


def test_a_node_leaving_moves_only_its_own_streams() -> None:
    before = owners([node("a"), node("b"), node("c")])
    after = owners([node("a"), node("c")])
    moved = [stream for stream in STREAMS if before[stream] != after[stream]]
    assert moved and all(before[stream] == "b" for stream in moved)
    assert len(moved) == sum(1 for owner in before.values() if owner == "b")


def test_a_node_joining_takes_streams_only_for_itself() -> None:
    before = owners([node("a"), node("b")])
    after = owners([node("a"), node("b"), node("c")])
    moved = [stream for stream in STREAMS if before[stream] != after[stream]]
    assert moved and all(after[stream] == "c" for stream in moved)


def test_a_full_preferred_node_passes_the_stream_to_the_next_in_its_ranking() -> None:
    nodes = [node("a"), node("b"), node("c")]
    stream = "cam-7"
    preferred, second, _ = rank_nodes(stream, nodes)
    full = [node(n.node_id, load=1.0) if n == preferred else n for n in nodes]
    chosen = choose_owner(stream, full)
    assert chosen is not None and chosen.node_id == second.node_id


def test_when_every_node_is_full_the_least_loaded_gets_the_stream() -> None:
    nodes = [node("a", load=1.5), node("b", load=1.1), node("c", load=1.3)]
    chosen = choose_owner("cam-1", nodes)
    assert chosen is not None and chosen.node_id == "b"


def test_draining_nodes_get_no_new_streams() -> None:
    nodes = [node("a", state=NodeState.DRAINING), node("b")]
    assert set(owners(nodes).values()) == {"b"}


def test_no_serving_node_means_no_owner() -> None:
    assert choose_owner("cam-1", []) is None
    assert choose_owner("cam-1", [node("a", state=NodeState.DRAINING)]) is None


def test_stream_ids_placed_on_a_node_are_the_ones_placement_gives_it() -> None:
    ids = stream_ids_placed_on("b", ("a", "b", "c"), 5, "wall")
    assert len(set(ids)) == 5 and all(i.startswith("wall-") for i in ids)
    nodes = [node("a"), node("b"), node("c")]
    for stream_id in ids:
        chosen = choose_owner(stream_id, nodes)
        assert chosen is not None and chosen.node_id == "b"

    with pytest.raises(ValueError, match='node "d" is not among'):
        stream_ids_placed_on("d", ("a", "b"), 1)
