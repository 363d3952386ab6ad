"""What feeds a replica a node starts for its own WHEP, fallback or snapshot viewers."""

from __future__ import annotations

from mediastream.cluster.placement import ReplicaView, choose_upstream


def test_the_owner_feeds_it_while_it_has_relay_room() -> None:
    replicas = [ReplicaView("b", "a", 1, viewers=1, relays=0)]
    assert choose_upstream("a", replicas, max_relays=2) == ("a", 1)
    assert choose_upstream("a", [], max_relays=1) == ("a", 1)


def test_a_full_owner_hands_it_to_the_shallowest_replica_with_room() -> None:
    replicas = [
        ReplicaView("b", "a", 1, viewers=3, relays=1),  # full (max_relays 1)
        ReplicaView("c", "b", 2, viewers=1, relays=0),
        ReplicaView("d", "a", 1, viewers=5, relays=0),
    ]
    assert choose_upstream("a", replicas, max_relays=1) == ("d", 2)


def test_no_relay_room_anywhere_or_no_limit_the_owner_feeds_it() -> None:
    replicas = [ReplicaView("b", "a", 1, viewers=1, relays=1)]
    assert choose_upstream("a", replicas, max_relays=1) == ("a", 1)
    many = [ReplicaView(n, "a", 1, viewers=1, relays=0) for n in "bcdef"]
    assert choose_upstream("a", many, max_relays=0) == ("a", 1)
