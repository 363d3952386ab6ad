"""The lease state machine and the values read back from Redis, without Redis."""

from __future__ import annotations

import pytest
import trio

from mediastream.cluster.errors import ClusterError, LeaseLost, LeaseStateError
from mediastream.cluster.leases import LeaseState, NodeRecord, NodeState, Owner, StreamLease


def test_a_lease_moves_only_along_its_transitions() -> None:
    lease = StreamLease("cam-1", "node-a")
    with pytest.raises(LeaseStateError, match='cannot go from "claiming" to "lost"'):
        lease._move(LeaseState.LOST)
    lease._move(LeaseState.RELEASED)
    with pytest.raises(LeaseStateError, match='from "released" to "held"'):
        lease._move(LeaseState.HELD)


async def test_a_held_lease_past_its_deadline_is_lost_when_checked_and_cancels_its_scopes() -> None:
    lease = StreamLease("cam-1", "node-a")
    lease._hold(epoch=7, stop_at=trio.current_time() + 3600)
    lease.check()  # held, deadline ahead: no error
    with trio.CancelScope() as ingest:
        lease.cancel_on_loss(ingest)
        lease._stop_at = trio.current_time()  # as if the process had slept past it
        with pytest.raises(LeaseLost, match=r'does not own stream "cam-1" \(lease lost: not'):
            lease.check()
        await trio.sleep_forever()  # cancelled by the loss
    assert ingest.cancelled_caught
    assert lease.state is LeaseState.LOST and lease.lost.is_set()
    late = trio.CancelScope()
    lease.cancel_on_loss(late)
    assert late.cancel_called


def test_a_lease_never_held_cannot_be_used() -> None:
    with pytest.raises(LeaseLost, match="lease claiming"):
        StreamLease("cam-1", "node-a").check()


@pytest.mark.parametrize("value", ["node-a", "|7", "node-a|", "node-a|x7"])
def test_a_bad_owner_value_is_named(value: str) -> None:
    with pytest.raises(ClusterError, match="bad owner value"):
        Owner.parse(value)


def test_owner_values_round_trip_and_node_ids_may_contain_bars() -> None:
    assert Owner.parse("node|a|12") == Owner("node|a", 12)
    assert Owner.parse(Owner("n", 1764750000123).value) == Owner("n", 1764750000123)


def test_node_records_round_trip_and_bad_ones_are_named() -> None:
    record = NodeRecord("a", "http://a:8107", "a:9000", NodeState.DRAINING, 0.5)
    assert NodeRecord.from_json(record.to_json()) == record
    for bad in ["[]", "{not json", '{"node_id": "a"}', record.to_json().replace("0.5", '"x"')]:
        with pytest.raises(ClusterError, match="bad node record"):
            NodeRecord.from_json(bad)
