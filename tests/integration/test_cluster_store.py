"""The stream store shared by a cluster, and the cluster view: two real nodes, one real Redis.

A change made through one node's API is applied by every node; two nodes changing one stream
at once get one winner and one 409; a Redis restarted empty gets the streams back from the
nodes; ``/api/streams`` and ``/api/cluster`` name the same owner on every node; ``/metrics``
shows each node's cluster series.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from mediastream.cluster.placement import stream_ids_placed_on
from mediastream.cluster.redis_client import Redis
from mediastream.cluster.stream_store import (
    CHANGES_CHANNEL,
    STREAMS_KEY,
    LocalCopy,
    SharedStreamStore,
)
from mediastream.server import RunningServer
from mediastream.store import StreamChanged, StreamStore

from support.cluster import PATTERN, cluster_of, start_cluster
from support.http import HttpResponse, get, request, scrape
from support.redis import RedisServer
from support.servers import StartServer, make_config
from support.viewer import SignalingFailed, open_viewer

NODES = ("node-a", "node-b")
#: how long a change may take to reach the other node (a bound, not an expectation)
REACH = 15


def placed_on(node_id: str) -> str:
    """A stream id that placement gives to ``node_id`` when both nodes serve, idle."""
    return stream_ids_placed_on(node_id, NODES, 1, "api-cam")[0]


async def start_nodes(
    start_server: StartServer, redis: RedisServer, streams: list[dict[str, Any]] | None = None
) -> list[RunningServer]:
    """Nodes A and B serving ``streams``, both in Redis."""
    return await start_cluster(start_server, redis.url, NODES, streams or [])


def store_of(server: RunningServer) -> SharedStreamStore:
    store = server.services.stream_changes
    assert isinstance(store, SharedStreamStore)
    return store


async def call(server: RunningServer, method: str, path: str, body: Any = None) -> HttpResponse:
    data = b"" if body is None else json.dumps(body).encode()
    return await request(
        server.url + path,
        method=method,
        headers={"Content-Type": "application/json"},
        body=data,
    )


async def wait_until(server: RunningServer, condition: Any) -> None:
    """Until ``condition()`` holds on ``server`` (checked after each of its changes)."""
    with trio.fail_after(REACH):
        await server.services.changes.wait_until(condition)


async def test_a_stream_added_on_one_node_is_listed_and_played_on_the_other(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    stream_id = placed_on("node-a")
    created = await call(a, "POST", "/api/streams", {"id": stream_id, "source": PATTERN})
    assert created.status == 201, created.body
    assert created.json()["owner"] is None  # nobody watches it yet: nobody owns it

    await wait_until(b, lambda: b.services.registry.get(stream_id) is not None)
    listed = (await get(b.url + "/api/streams")).json()["streams"]
    on_b = next(s for s in listed if s["id"] == stream_id)
    assert on_b["source"] == created.json()["source"]
    assert (on_b["origin"], on_b["enabled"]) == ("api", True)

    # A viewer on B plays it; its owner (A, by placement) reads it, and both nodes say so.
    async with open_viewer(b.ws_url) as viewer:
        played = await viewer.play(stream_id, trickle=True)
        await played.wait_frames(5)
        owners = []
        for node in (a, b):
            stream = (await get(f"{node.url}/api/streams/{stream_id}")).json()
            owners.append(stream["owner"])
        assert owners[0] == owners[1]
        assert owners[0]["node"] == "node-a" and owners[0]["epoch"] > 0

        for node in (a, b):
            view = (await get(node.url + "/api/cluster")).json()
            assert view["nodeId"] == cluster_of(node).node_id
            assert [n["id"] for n in view["nodes"]] == ["node-a", "node-b"]
            assert [n["streams"] for n in view["nodes"]] == [[stream_id], []]
            assert {n["state"] for n in view["nodes"]} == {"serving"}
            assert all(n["publicUrl"].startswith("http://") for n in view["nodes"])

    # Each node keeps a copy of what it has seen, on its own disk.
    for node in (a, b):
        copy = LocalCopy(Path(a_data_dir(node))).load()
        assert [(r.id, r.node, r.deleted) for r in copy] == [(stream_id, "node-a", False)]


def a_data_dir(node: RunningServer) -> str:
    store = store_of(node)
    return str(store._copy.path.parent)


async def test_edits_and_deletes_on_either_node_reach_the_other(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(
        start_server, redis_server, [{"id": "porch", "source": PATTERN, "on_demand": True}]
    )

    def name_on(node: RunningServer) -> str | None:
        stream = node.services.registry.get("porch")
        return None if stream is None else stream.config.name

    # A stream of the configuration file, renamed through B.
    changed = await call(b, "PATCH", "/api/streams/porch", {"name": "Back porch"})
    assert changed.status == 200, changed.body
    await wait_until(a, lambda: name_on(a) == "Back porch")
    stream_on_a = a.services.registry.get("porch")
    assert stream_on_a is not None and stream_on_a.origin == "api"
    assert stream_on_a.config.source.text == PATTERN  # the source kept, credentials and all

    # Stopped through A, started through B.
    assert (await call(a, "POST", "/api/streams/porch/stop")).status == 200
    await wait_until(b, lambda: not b.services.registry.get("porch").enabled)  # type: ignore[union-attr]
    async with open_viewer(b.ws_url) as viewer:
        with pytest.raises(SignalingFailed) as refused:
            await viewer.play("porch", trickle=True)
        assert refused.value.code == "stream_unavailable"
    assert (await call(b, "POST", "/api/streams/porch/start")).status == 200
    await wait_until(a, lambda: a.services.registry.get("porch").enabled)  # type: ignore[union-attr]

    # Deleted through B: gone on A, also after a read.
    assert (await call(b, "DELETE", "/api/streams/porch")).status == 204
    await wait_until(a, lambda: a.services.registry.get("porch") is None)
    assert (await get(a.url + "/api/streams/porch")).status == 404
    # Added again through A with the id of the deleted one: a new version over the tombstone.
    again = await call(a, "POST", "/api/streams", {"id": "porch", "source": PATTERN})
    assert again.status == 201, again.body
    await wait_until(b, lambda: b.services.registry.get("porch") is not None)


async def test_two_nodes_changing_one_stream_at_once_one_wins_the_other_gets_409(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, b = await start_nodes(
        start_server, redis_server, [{"id": "gate", "source": PATTERN, "on_demand": True}]
    )
    store_a, store_b = store_of(a), store_of(b)
    version = store_b.version("gate")
    answers: dict[str, HttpResponse] = {}

    async def patch(node: RunningServer, name: str, answers: dict[str, HttpResponse]) -> None:
        answers[name] = await call(node, "PATCH", "/api/streams/gate", {"name": name})

    # B's PATCH waits for B's store (the test holds its lock, as another change of B's would);
    # meanwhile A's PATCH is written. B's then reaches Redis with the version both nodes had,
    # before B has applied A's change (that waits behind B's PATCH: the lock is fair).
    async with trio.open_nursery() as nursery, store_b.lock:
        nursery.start_soon(patch, b, "From B", answers)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert store_b.lock.statistics().tasks_waiting == 1  # B's PATCH, queued first
        await patch(a, "From A", answers)
        assert answers["From A"].status == 200, answers["From A"].body
    refused = answers["From B"]
    assert refused.status == 409, refused.body
    assert refused.json()["code"] == "stream_changed"
    assert 'changed on node "node-a"' in refused.json()["error"]
    assert store_b.statistics().conflicts == 1
    conflicts = ("mediastream_cluster_store_changes_total", (("result", "conflicts"),))
    assert (await scrape(b.url))[conflicts] == 1
    # B took A's version on the spot: both nodes show A's change, and B's retry works.
    gate_b = b.services.registry.get("gate")
    assert gate_b is not None and gate_b.config.name == "From A"
    assert store_b.version("gate") > version
    retried = await call(b, "PATCH", "/api/streams/gate", {"name": "From B"})
    assert retried.status == 200, retried.body
    await wait_until(a, lambda: a.services.registry.get("gate").config.name == "From B")  # type: ignore[union-attr]

    # The same, one store call against the other: the loser raises StreamChanged.
    async with store_b.lock:
        async with store_a.lock:
            await store_a.save("gate", {"id": "gate", "source": PATTERN, "name": "A again"})
        with pytest.raises(StreamChanged):
            await store_b.save("gate", {"id": "gate", "source": PATTERN, "name": "B again"})

    # Through the API, at once, on both nodes: each answer is a success or a clear 409, and
    # both nodes end with the same definition and version.
    for round_ in range(3):
        answers = {}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(patch, a, f"A{round_}", answers)
            nursery.start_soon(patch, b, f"B{round_}", answers)
        assert any(r.status == 200 for r in answers.values())
        for answer in answers.values():
            assert answer.status in (200, 409), answer.body
            if answer.status == 409:
                assert answer.json()["code"] == "stream_changed"
                assert "read it again and retry" in answer.json()["error"]

        def same() -> bool:
            return store_a.version("gate") == store_b.version("gate")

        with trio.fail_after(REACH):
            await store_a.changes.wait_until(same)
            await store_b.changes.wait_until(same)
        names = {n.services.registry.get("gate").config.name for n in (a, b)}  # type: ignore[union-attr]
        assert len(names) == 1 and names <= {f"A{round_}", f"B{round_}"}


async def test_redis_restarted_empty_gets_the_streams_back_from_the_nodes(
    start_server: StartServer, redis_server: RedisServer, client: Redis
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    assert (await call(a, "POST", "/api/streams", {"id": "dock", "source": PATTERN})).status == 201
    assert (await call(a, "POST", "/api/streams/dock/stop")).status == 200
    await wait_until(
        b, lambda: (s := b.services.registry.get("dock")) is not None and not s.enabled
    )
    version = store_of(a).version("dock")

    syncs = [store_of(n).statistics().syncs for n in (a, b)]
    redis_server.restart_empty()
    for node, before in zip((a, b), syncs, strict=True):
        store = store_of(node)
        with trio.fail_after(REACH):
            await store.changes.wait_until(lambda s=store, n=before: s.statistics().syncs > n)

    # Written back by the nodes, with the version it had: nothing the API changed is lost.
    record = json.loads(await client.hget(STREAMS_KEY, "dock") or "null")
    assert record is not None
    assert (record["version"], record["enabled"], record["node"]) == (version, False, "node-a")
    assert sum(store_of(n).statistics().written_back for n in (a, b)) >= 1
    # And the store works on: a change through B after the restart reaches A.
    assert (await call(b, "POST", "/api/streams/dock/start")).status == 200
    await wait_until(a, lambda: a.services.registry.get("dock").enabled)  # type: ignore[union-attr]


async def test_a_node_restarted_while_redis_is_down_serves_the_streams_it_knew(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    a, _ = await start_nodes(start_server, redis_server)
    assert (await call(a, "POST", "/api/streams", {"id": "yard", "source": PATTERN})).status == 201
    data_dir = a_data_dir(a)
    redis_server.stop()
    config = make_config(
        [],
        server={"data_dir": data_dir},
        cluster={"redis_url": redis_server.url, "node_id": "node-c"},
    )
    c = await start_server(config)
    yard = c.services.registry.get("yard")
    assert yard is not None and yard.origin == "api"
    listed = (await get(c.url + "/api/streams")).json()["streams"]
    assert [(s["id"], s["owner"]) for s in listed] == [("yard", None)]
    # Changes need Redis: refused clearly, nothing changed.
    refused = await call(c, "PATCH", "/api/streams/yard", {"name": "x"})
    assert refused.status == 503, refused.body
    assert refused.json()["code"] == "cluster_unavailable"
    assert "Redis" in refused.json()["error"]
    assert c.services.registry.get("yard").config.name == ""  # type: ignore[union-attr]
    unknown = await get(c.url + "/api/cluster")
    assert (unknown.status, unknown.json()["code"]) == (503, "cluster_unavailable")
    health = await get(c.url + "/healthz")
    assert health.status == 200


async def test_bad_input_is_refused_clearly_and_reaches_no_node(
    start_server: StartServer, redis_server: RedisServer, client: Redis
) -> None:
    a, b = await start_nodes(start_server, redis_server)
    bad = await call(a, "POST", "/api/streams", {"id": "x", "source": "ftp://nope"})
    assert bad.status == 400 and bad.json()["field"] == "source"
    not_object = await call(b, "POST", "/api/streams", [1, 2])
    assert not_object.status == 400 and not_object.json()["code"] == "invalid_config"
    assert (await call(b, "PATCH", "/api/streams/nothing", {"name": "x"})).status == 404
    # Junk on the channel and in the hash (another program, a bug): ignored by every node.
    await client.publish(CHANGES_CHANNEL, "not a record")
    await client.hset(STREAMS_KEY, {"junk": '{"version": "high"}'})
    exists = await call(a, "POST", "/api/streams", {"id": "x", "source": PATTERN})
    assert exists.status == 201
    await wait_until(b, lambda: b.services.registry.get("x") is not None)
    assert b.services.registry.get("junk") is None
    twice = await call(a, "POST", "/api/streams", {"id": "x", "source": PATTERN})
    assert (twice.status, twice.json()["code"]) == (409, "stream_exists")
    assert sorted(await client.hkeys(STREAMS_KEY)) == ["junk", "x"]


async def test_metrics_show_each_nodes_cluster_series(
    start_server: StartServer, redis_server: RedisServer
) -> None:
    on_a, on_b = placed_on("node-a"), placed_on("node-b")
    streams = [{"id": s, "source": PATTERN, "on_demand": True} for s in (on_a, on_b)]
    a, b = await start_nodes(start_server, redis_server, streams)
    async with open_viewer(a.ws_url) as viewer:
        local = await viewer.play(on_a, trickle=True)
        remote = await viewer.play(on_b, trickle=True)
        await local.wait_frames(3)
        await remote.wait_frames(3)
        at_a, at_b = await scrape(a.url), await scrape(b.url)

    assert at_a[("mediastream_cluster_streams_owned", ())] == 1
    assert at_a[("mediastream_cluster_stream_owned", (("stream", on_a),))] == 1
    assert at_a[("mediastream_cluster_stream_owned", (("stream", on_b),))] == 0
    assert at_b[("mediastream_cluster_stream_owned", (("stream", on_b),))] == 1
    assert at_a[("mediastream_cluster_relayed_sessions", ())] == 1
    assert at_b[("mediastream_cluster_remote_sockets", ())] == 1
    assert at_a[("mediastream_cluster_offers_total", (("route", "relayed"),))] == 1
    assert at_b[("mediastream_cluster_offers_total", (("route", "remote"),))] == 1
    out = (("direction", "out"), ("kind", "offer"))
    into = (("direction", "in"), ("kind", "offer"))
    assert at_a[("mediastream_cluster_relay_messages_total", out)] == 1
    assert at_b[("mediastream_cluster_relay_messages_total", into)] == 1
    assert (
        at_b[
            ("mediastream_cluster_relay_messages_total", (("direction", "out"), ("kind", "client")))
        ]
        >= 1
    )
    assert at_a[("mediastream_cluster_relay_retries_total", ())] == 0
    assert at_a[("mediastream_cluster_takeovers_total", ())] == 0  # nobody died
    # Every node times its Redis commands (lease renewals, routing, the store's sync).
    for samples in (at_a, at_b):
        assert samples[("mediastream_cluster_redis_command_seconds_count", ())] > 0
        assert samples[("mediastream_cluster_redis_command_seconds_bucket", (("le", "2.0"),))] > 0
        assert samples[("mediastream_cluster_redis_failures_total", ())] == 0
        written = ("mediastream_cluster_store_changes_total", (("result", "written"),))
        assert samples[written] == 0  # no change through the API in this test


async def test_a_single_process_has_no_cluster_view(start_server: StartServer) -> None:
    server = await start_server()
    view = await get(server.url + "/api/cluster")
    assert (view.status, view.json()) == (200, {"nodeId": None, "nodes": []})
    listed = (await get(server.url + "/api/streams")).json()["streams"]
    assert listed and all(s["owner"] is None for s in listed)
    samples = await scrape(server.url)
    assert not any(name.startswith("mediastream_cluster_") for name, _ in samples)


async def test_a_stream_added_before_the_node_joined_the_cluster_is_shared_once_changed(
    start_server: StartServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Node A ran alone first: its API added "attic" to its own streams.sqlite3.
    data_dir = tmp_path / "node-a"
    StreamStore(data_dir).save("attic", {"id": "attic", "source": PATTERN})
    a = await start_server(
        make_config(
            [],
            server={"data_dir": str(data_dir)},
            cluster={"redis_url": redis_server.url, "node_id": "node-a"},
        )
    )
    b = await start_server(
        make_config([], cluster={"redis_url": redis_server.url, "node_id": "node-b"})
    )
    assert a.services.registry.get("attic") is not None
    assert b.services.registry.get("attic") is None  # not shared by joining alone
    # Stopped through A: the change carries the definition, so B gets the stream, stopped.
    assert (await call(a, "POST", "/api/streams/attic/stop")).status == 200
    await wait_until(b, lambda: b.services.registry.get("attic") is not None)
    attic = b.services.registry.get("attic")
    assert attic is not None and not attic.enabled and attic.origin == "api"
