"""Stream leases and node records against a real redis-server: one owner at a time, always.

Lease timings are short here (2 s) so that expiries happen within a test; what is asserted
is the order of events (the old owner stops before a new one starts), never a duration.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from mediastream.cluster.errors import LeaseLost, OwnedElsewhere, RedisUnavailable
from mediastream.cluster.leases import (
    LeaseState,
    NodeRecord,
    Owner,
    StreamLease,
    current_owner,
    hold_stream_lease,
    live_nodes,
    run_node_registration,
)
from mediastream.cluster.redis_client import Redis, open_redis

from support.redis import RedisServer
from support.tcp_proxy import TcpProxy

# A wide margin: the old owner must stop before Redis frees the lease even on a busy machine.
TTL, RENEW, MARGIN = 2.0, 0.3, 1.0  # seconds
hold = functools.partial(hold_stream_lease, ttl=TTL, renew_interval=RENEW, safety_margin=MARGIN)
SRC = Path(__file__).parents[2] / "src"
HOLDER = Path(__file__).parents[1] / "support" / "lease_holder.py"


async def claim_when_free(
    nursery: trio.Nursery, client: Redis, stream: str, node: str, events: list[str]
) -> StreamLease:
    """A contender: try to claim every 50 ms until the stream is free (what a node does)."""
    while True:
        try:
            lease: StreamLease = await nursery.start(hold, client, stream, node)
        except (OwnedElsewhere, RedisUnavailable):
            await trio.sleep(0.05)
            continue
        events.append(f"{node} claimed")
        return lease


async def record_loss(lease: StreamLease, events: list[str]) -> None:
    """A stand-in ingest: runs until the lease's loss cancels it."""
    with trio.CancelScope() as ingest:
        lease.cancel_on_loss(ingest)
        await trio.sleep_forever()
    events.append(f"{lease.node_id} ingest stopped")


async def race(
    nursery: trio.Nursery, client: Redis, stream: str, nodes: int
) -> tuple[list[StreamLease], list[OwnedElsewhere]]:
    """``nodes`` nodes claim ``stream`` at once; the winners' leases stay in ``nursery``."""
    winners: list[StreamLease] = []
    refusals: list[OwnedElsewhere] = []

    async def contend(node: str) -> None:
        try:
            winners.append(await nursery.start(hold, client, stream, node))
        except OwnedElsewhere as exc:
            refusals.append(exc)

    async with trio.open_nursery() as racers:
        for index in range(nodes):
            racers.start_soon(contend, f"node-{index}")
    return winners, refusals


async def test_racing_nodes_get_exactly_one_owner_and_epochs_only_increase(client: Redis) -> None:
    epochs: list[int] = []
    for _round in range(3):
        async with trio.open_nursery() as nursery:
            winners, refusals = await race(nursery, client, "cam-race", 8)
            assert len(winners) == 1 and len(refusals) == 7
            (winner,) = winners
            assert {(r.node_id, r.epoch) for r in refusals} == {(winner.node_id, winner.epoch)}
            owner = await current_owner(client, "cam-race")
            assert owner == Owner(winner.node_id, winner.epoch)
            epochs.append(winner.epoch)
            nursery.cancel_scope.cancel()  # the owner lets go: released at once
        assert winner.state is LeaseState.RELEASED
        assert await current_owner(client, "cam-race") is None
    assert epochs == sorted(set(epochs))


async def test_an_owner_cut_off_from_redis_stops_before_another_node_takes_over(
    redis_server: RedisServer, client: Redis
) -> None:
    events: list[str] = []
    proxy = TcpProxy(redis_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        async with open_redis(f"redis://127.0.0.1:{proxy.port}/0") as client_a:
            lease_a: StreamLease = await nursery.start(hold, client_a, "cam-cut", "node-a")
            nursery.start_soon(record_loss, lease_a, events)
            await lease_a.wait_changed()  # renewed once through the proxy
            proxy.hold()  # node-a's Redis goes silent; node-b's does not
            with trio.fail_after(10):
                lease_b = await claim_when_free(nursery, client, "cam-cut", "node-b", events)
            assert lease_a.state is LeaseState.LOST
            assert "not renewed before its deadline" in lease_a.loss_reason
            assert events == ["node-a ingest stopped", "node-b claimed"]
            assert lease_b.epoch > lease_a.epoch
            with pytest.raises(LeaseLost, match='does not own stream "cam-cut"'):
                lease_a.check()
            nursery.cancel_scope.cancel()


async def test_a_hung_redis_makes_the_owner_give_up_before_its_lease_expires(
    redis_server: RedisServer, client: Redis
) -> None:
    events: list[str] = []
    async with open_redis(redis_server.url) as client_b, trio.open_nursery() as nursery:
        lease_a: StreamLease = await nursery.start(hold, client, "cam-hung", "node-a")
        nursery.start_soon(record_loss, lease_a, events)
        redis_server.freeze()
        with trio.fail_after(10):
            await lease_a.lost.wait()
        redis_server.thaw()
        with trio.fail_after(10):
            lease_b = await claim_when_free(nursery, client_b, "cam-hung", "node-b", events)
        assert events == ["node-a ingest stopped", "node-b claimed"]
        assert lease_b.epoch > lease_a.epoch
        nursery.cancel_scope.cancel()


async def test_a_frozen_owner_wakes_up_to_a_lost_lease_and_never_acts_on_it(
    redis_server: RedisServer, client: Redis
) -> None:
    events: list[str] = []
    process_events: list[dict[str, Any]] = []
    process = start_lease_holder(redis_server.url, "cam-frozen", "node-a")
    try:
        assert process.stdout is not None
        held = await trio.to_thread.run_sync(read_event, process, "held", process_events)
        await trio.to_thread.run_sync(read_event, process, "tick", process_events)  # it acts
        os.kill(process.pid, signal.SIGSTOP)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(10):
                lease_b = await claim_when_free(nursery, client, "cam-frozen", "node-b", events)
            claimed_at = time.monotonic()
            os.kill(process.pid, signal.SIGCONT)
            lost = await trio.to_thread.run_sync(read_event, process, "lost", process_events)
            assert lease_b.state is LeaseState.HELD
            owner = await current_owner(client, "cam-frozen")
            assert owner is not None and owner.node_id == "node-b"
            nursery.cancel_scope.cancel()
        ticks = [e for e in process_events if e["event"] == "tick"]
        assert ticks and all(tick["mono"] < claimed_at for tick in ticks)
        assert "deadline" in lost["reason"]
        assert lease_b.epoch > held["epoch"]
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def start_lease_holder(url: str, stream: str, node: str) -> subprocess.Popen[str]:
    """support/lease_holder.py in a process of its own, holding ``stream`` for ``node``."""
    paths = [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    command = [sys.executable, str(HOLDER), url, stream, node, str(TTL), str(RENEW), str(MARGIN)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)


def read_event(
    process: subprocess.Popen[str], wanted: str, seen: list[dict[str, Any]]
) -> dict[str, Any]:
    """Read the holder's lines (appended to ``seen``) up to the first ``wanted`` one."""
    assert process.stdout is not None
    for line in process.stdout:
        event: dict[str, Any] = json.loads(line)
        seen.append(event)
        if event["event"] == wanted:
            return event
    raise AssertionError(f"the lease holder exited before printing {wanted!r}: {seen}")


async def test_redis_restarted_empty_nodes_register_again_and_the_owner_claims_a_new_epoch(
    redis_server: RedisServer, client: Redis
) -> None:
    record = NodeRecord(node_id="node-a", public_url="http://127.0.0.1:8107")
    async with trio.open_nursery() as nursery:
        registration = await nursery.start(
            functools.partial(run_node_registration, ttl=1.0, interval=0.2), client, record
        )
        assert [node.node_id for node in await live_nodes(client)] == ["node-a"]
        lease: StreamLease = await nursery.start(hold, client, "cam-restart", "node-a")
        first_epoch = lease.epoch
        redis_server.restart_empty()
        with trio.fail_after(10):
            while lease.epoch == first_epoch:
                await lease.wait_changed()
            await registration.wait_renewed()
        assert lease.state is LeaseState.HELD
        assert lease.epoch > first_epoch
        assert lease.statistics().reclaims == 1
        owner = await current_owner(client, "cam-restart")
        assert owner is not None and (owner.node_id, owner.epoch) == ("node-a", lease.epoch)
        assert [node.node_id for node in await live_nodes(client)] == ["node-a"]
        nursery.cancel_scope.cancel()
    assert await live_nodes(client) == []  # unregistered on the way out


async def test_redis_down_fails_fast_and_clearly_and_the_owner_gives_up_in_time(
    redis_server: RedisServer, client: Redis
) -> None:
    async with trio.open_nursery() as nursery:
        lease: StreamLease = await nursery.start(hold, client, "cam-down", "node-a")
        redis_server.stop()
        with trio.fail_after(10):
            await lease.lost.wait()
        assert lease.statistics().failed_renewals >= 1
        assert "not renewed before its deadline" in lease.loss_reason
        with pytest.raises(RedisUnavailable) as caught:
            await nursery.start(hold, client, "cam-other", "node-a")
        assert f"127.0.0.1:{redis_server.port}" in str(caught.value)
        assert 'claim the lease of stream "cam-other"' in str(caught.value)
        nursery.cancel_scope.cancel()


async def test_node_records_list_live_nodes_and_skip_bad_ones(client: Redis) -> None:
    async with trio.open_nursery() as nursery:
        for node in ("b", "a"):
            record = NodeRecord(node_id=node, public_url=f"http://{node}:8107", load=0.25)
            await nursery.start(run_node_registration, client, record)
        await client.set("ms:node:broken", "{not json")
        nodes = await live_nodes(client)
        assert [(n.node_id, n.load) for n in nodes] == [("a", 0.25), ("b", 0.25)]
        nursery.cancel_scope.cancel()
