"""Prometheus metrics at ``/metrics`` (prometheus-client).

Two kinds:

- **Events**, counted where they happen: signaling messages by type, errors by code,
  connections ended by a failure inside the server or a ping flood (by reason), and the
  offer→answer and offer→first-frame latencies (histograms).
- **Levels**, read from the server's own statistics at scrape time by a collector (nothing is
  counted twice, and nothing is paid between scrapes): sockets, sessions per socket, peer
  connections, and per stream its viewers, state, frames and bytes read, RTP packets and bytes
  sent to viewers, frames dropped for slow viewers, source restarts, encoders opened.

In a cluster (``[cluster] redis_url``) each node adds its own ``mediastream_cluster_*`` series:
the streams it owns, the round trips of its Redis commands (a histogram, timed in
``cluster/redis_client.py``) and its failures, the offers it routed, and the messages it
relayed to and from other nodes by kind, with their errors, retries and drops.

Everything lives in one :class:`Metrics` object with its own registry (no module-level state).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
)
from prometheus_client.registry import Collector

from .media.source_contract import SourceState

if TYPE_CHECKING:
    from .cluster.routing import RoutingStatistics
    from .cluster.stream_store import StoreStatistics
    from .registry import StreamStatistics
    from .statistics import ServerStatistics

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SESSIONS_PER_SOCKET_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128)
#: a Redis command on a LAN takes well under a millisecond; 2 s is the command timeout.
REDIS_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


class Metrics:
    """The server's metrics.

    Args:
        server: the server-wide statistics, read at each scrape.
        streams: every stream's statistics, read at each scrape.
    """

    def __init__(
        self,
        server: Callable[[], ServerStatistics],
        streams: Callable[[], list[StreamStatistics]],
    ) -> None:
        self.registry = CollectorRegistry()
        self.messages = Counter(
            "mediastream_signaling_messages",
            "Signaling messages received, by type (invalid: could not be parsed).",
            ["type"],
            registry=self.registry,
        )
        self.errors = Counter(
            "mediastream_signaling_errors",
            "Error messages sent to clients, by code.",
            ["code"],
            registry=self.registry,
        )
        self.connection_failures = Counter(
            "mediastream_connection_failures",
            "Connections (HTTP or WebSocket) ended by a failure inside the server, by the "
            "exception's class (each ended only its own connection), or by a limit the HTTP "
            "server enforces (ping_flood: a socket closed with 1008 for too many pings).",
            ["reason"],
            registry=self.registry,
        )
        self.peer_close_overruns = Counter(
            "mediastream_peer_close_overruns",
            "Peer connection closes that outlived their session's wait (5 s) and went on "
            "closing in the background.",
            registry=self.registry,
        )
        self.fallback_returns = Counter(
            "mediastream_fallback_returns",
            "Fallbacks (video over the socket) ended by their page because its WebRTC "
            "connection, retried in the background, shows a picture again.",
            registry=self.registry,
        )
        self.offer_to_answer = Histogram(
            "mediastream_offer_answer_seconds",
            "Time from receiving an offer to sending its answer.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.offer_to_first_frame = Histogram(
            "mediastream_first_frame_seconds",
            "Time from receiving an offer to sending the session's first video frame.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._streams = streams
        self.registry.register(_LevelsCollector(server, streams))
        # Created on first use: a single process shows no Redis series.
        self._redis_seconds: Histogram | None = None
        self._redis_failures: Counter | None = None

    def observe_redis_command(self, seconds: float, failed: bool) -> None:
        """One Redis command of this node took ``seconds`` (``failed``: it raised
        ``RedisUnavailable`` after that long)."""
        if self._redis_seconds is None or self._redis_failures is None:
            self._redis_seconds = Histogram(
                "mediastream_cluster_redis_command_seconds",
                "Round trip of this node's Redis commands that were answered.",
                buckets=REDIS_BUCKETS,
                registry=self.registry,
            )
            self._redis_failures = Counter(
                "mediastream_cluster_redis_failures",
                "Redis commands of this node that failed: refused, dropped, or not answered "
                "within the command timeout (2 s).",
                registry=self.registry,
            )
        if failed:
            self._redis_failures.inc()
        else:
            self._redis_seconds.observe(seconds)

    def watch_cluster(
        self, routing: Callable[[], RoutingStatistics], store: Callable[[], StoreStatistics]
    ) -> None:
        """Add this cluster node's series, read from ``routing()`` and ``store()`` (the shared
        stream store) at each scrape."""
        self.registry.register(_ClusterCollector(routing, store, self._streams))

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _LevelsCollector(Collector):
    def __init__(
        self,
        server: Callable[[], ServerStatistics],
        streams: Callable[[], list[StreamStatistics]],
    ) -> None:
        self._server = server
        self._streams = streams

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | GaugeHistogramMetricFamily]:
        server = self._server()
        yield GaugeMetricFamily(
            "mediastream_sockets_open", "Signaling sockets open.", value=server.open_sockets
        )
        yield CounterMetricFamily(
            "mediastream_sockets_opened", "Signaling sockets opened.", value=server.sockets_opened
        )
        yield GaugeMetricFamily(
            "mediastream_sessions_open",
            "Stream sessions open (all sockets and WHEP).",
            value=server.open_sessions,
        )
        yield GaugeMetricFamily(
            "mediastream_peer_connections_open",
            "Server peer connections open.",
            value=server.open_peer_connections,
        )
        buckets = [
            (str(bound), sum(1 for n in server.sessions_per_socket if n <= bound))
            for bound in SESSIONS_PER_SOCKET_BUCKETS
        ]
        buckets.append(("+Inf", len(server.sessions_per_socket)))
        yield GaugeHistogramMetricFamily(
            "mediastream_streams_per_socket",
            "Open sockets by how many streams each carries.",
            buckets=buckets,
            gsum_value=sum(server.sessions_per_socket),
        )

        streams = self._streams()
        per_stream = {
            "viewers": GaugeMetricFamily(
                "mediastream_stream_viewers", "Viewers of each stream.", labels=["stream"]
            ),
            "running": GaugeMetricFamily(
                "mediastream_stream_source_running",
                "1 while the stream's source runs.",
                labels=["stream"],
            ),
            "state": GaugeMetricFamily(
                "mediastream_stream_state",
                "The stream's source state (1 for the current one).",
                labels=["stream", "state"],
            ),
        }
        counters = {
            "frames": CounterMetricFamily(
                "mediastream_stream_frames_read", "Frames read from the source.", labels=["stream"]
            ),
            "bytes": CounterMetricFamily(
                "mediastream_stream_bytes_read",
                "Media bytes read from the source.",
                labels=["stream"],
            ),
            "packets_sent": CounterMetricFamily(
                "mediastream_stream_packets_sent", "RTP packets sent to viewers.", labels=["stream"]
            ),
            "bytes_sent": CounterMetricFamily(
                "mediastream_stream_bytes_sent",
                "RTP payload bytes sent to viewers.",
                labels=["stream"],
            ),
            "dropped": CounterMetricFamily(
                "mediastream_stream_frames_dropped",
                "Frames lost by viewers that had started playing (a slow link, a full socket).",
                labels=["stream"],
            ),
            "restarts": CounterMetricFamily(
                "mediastream_stream_source_restarts",
                "Times the source was reopened (camera reconnects).",
                labels=["stream"],
            ),
            "encoders": CounterMetricFamily(
                "mediastream_stream_encoders_opened",
                "Encoders opened for transcoding (per source start, never per viewer).",
                labels=["stream"],
            ),
        }
        for stream in streams:
            labels = [stream.id]
            per_stream["viewers"].add_metric(labels, stream.viewers)
            per_stream["running"].add_metric(labels, int(stream.source_running))
            for state in SourceState:
                per_stream["state"].add_metric([stream.id, str(state)], int(stream.state == state))
            counters["frames"].add_metric(labels, stream.fanout.published_frames)
            counters["bytes"].add_metric(labels, stream.fanout.published_bytes)
            counters["packets_sent"].add_metric(labels, stream.fanout.sent_packets)
            counters["bytes_sent"].add_metric(labels, stream.fanout.sent_bytes)
            counters["dropped"].add_metric(labels, stream.fanout.dropped_frames)
            counters["restarts"].add_metric(labels, stream.source_restarts)
            counters["encoders"].add_metric(labels, stream.encoders_opened)
        per_quality = {
            "viewers": GaugeMetricFamily(
                "mediastream_quality_viewers",
                "Viewers whose video comes from each quality of each stream now.",
                labels=["stream", "quality"],
            ),
            "running": GaugeMetricFamily(
                "mediastream_quality_source_running",
                "1 while the quality's source runs.",
                labels=["stream", "quality"],
            ),
            "bitrate": GaugeMetricFamily(
                "mediastream_quality_bitrate_bps",
                "The quality's bitrate, measured from the stream (0 before it was read).",
                labels=["stream", "quality"],
            ),
        }
        for stream in streams:
            for quality in stream.qualities:
                labels = [stream.id, quality.name]
                per_quality["viewers"].add_metric(labels, quality.viewers)
                per_quality["running"].add_metric(labels, int(quality.running))
                per_quality["bitrate"].add_metric(labels, quality.bitrate)
        yield from per_stream.values()
        yield from counters.values()
        yield from per_quality.values()


class _ClusterCollector(Collector):
    def __init__(
        self,
        routing: Callable[[], RoutingStatistics],
        store: Callable[[], StoreStatistics],
        streams: Callable[[], list[StreamStatistics]],
    ) -> None:
        self._routing = routing
        self._store = store
        self._streams = streams

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        routing = self._routing()
        owned = set(routing.owned_streams)
        yield GaugeMetricFamily(
            "mediastream_cluster_streams_owned",
            "Streams this node owns (holds the lease of, and may read the source of).",
            value=len(owned),
        )
        per_stream = GaugeMetricFamily(
            "mediastream_cluster_stream_owned",
            "1 while this node owns the stream, 0 while it does not (another node may).",
            labels=["stream"],
        )
        for stream in self._streams():
            per_stream.add_metric([stream.id], int(stream.id in owned))
        yield per_stream
        replicated = GaugeMetricFamily(
            "mediastream_cluster_stream_replicated",
            "1 while this node serves the stream as a replica (from the owner's frames), else 0.",
            labels=["stream"],
        )
        for stream in self._streams():
            replicated.add_metric([stream.id], int(stream.id in routing.replicas))
        yield replicated
        yield GaugeMetricFamily(
            "mediastream_cluster_relayed_sessions",
            "Sessions of this node's sockets relayed to the stream's owner on another node.",
            value=routing.relayed_sessions,
        )
        yield GaugeMetricFamily(
            "mediastream_cluster_remote_sockets",
            "Sockets of other nodes whose sessions this node serves (as the streams' owner).",
            value=routing.remote_sockets,
        )
        offers = CounterMetricFamily(
            "mediastream_cluster_offers",
            "Offers by route: local (a stream this node owned, no Redis), routed (its owner "
            "looked up), relayed (sent to another node), remote (from another node's socket), "
            "replica (served here as a replica: the owner was full).",
            labels=["route"],
        )
        for route, count in (
            ("local", routing.local_offers),
            ("routed", routing.routed_offers),
            ("relayed", routing.relayed_offers),
            ("remote", routing.remote_offers),
            ("replica", routing.replica_offers),
        ):
            offers.add_metric([route], count)
        yield offers
        messages = CounterMetricFamily(
            "mediastream_cluster_relay_messages",
            "Messages relayed between nodes over the bus, by direction (out: sent by this "
            "node; in: handled by its inbox) and kind (offer, ice, close, client, ended…).",
            labels=["direction", "kind"],
        )
        for direction, counts in (("out", routing.messages_out), ("in", routing.messages_in)):
            for kind, count in counts:
                messages.add_metric([direction, kind], count)
        yield messages
        errors = CounterMetricFamily(
            "mediastream_cluster_relay_errors",
            "Messages this node could not relay, by kind: the node was gone, no reply "
            "within two tries, or Redis was unavailable.",
            labels=["kind"],
        )
        for kind, count in routing.message_errors:
            errors.add_metric([kind], count)
        yield errors
        yield CounterMetricFamily(
            "mediastream_cluster_takeovers",
            "Leases of nodes whose process ended (their liveness connection gone from Redis) "
            "that this node deleted so the streams could be claimed again at once.",
            value=routing.takeovers,
        )
        yield GaugeMetricFamily(
            "mediastream_cluster_replicas",
            "Streams this node replicates: served to its viewers from the owner's frames.",
            value=len(routing.replicas),
        )
        yield GaugeMetricFamily(
            "mediastream_cluster_frame_relay_connections",
            "Replicas fed by this node's frame relay now (one connection per stream).",
            value=routing.relay_connections,
        )
        yield CounterMetricFamily(
            "mediastream_cluster_frame_relay_refused",
            "Connections to the frame relay refused: TLS failed, secret not proved, not the owner.",
            value=routing.relay_refused,
        )
        yield CounterMetricFamily(
            "mediastream_cluster_frame_relay_skipped_frames",
            "Frames slow replicas skipped to the next keyframe (owner side).",
            value=routing.relay_skipped_frames,
        )
        yield CounterMetricFamily(
            "mediastream_cluster_frame_relay_upstream_refused",
            "Relay connections of this node's replicas that their upstream refused (another "
            "relay_secret, TLS on one side only, not serving the stream): the replica side of "
            "frame_relay_refused.",
            value=routing.relay_upstream_refused,
        )
        yield GaugeMetricFamily(
            "mediastream_cluster_replica_cooldowns",
            "Replica nodes (per stream) this owner could not feed (relay refused, or never "
            "connected) and leaves out of placement for a cool-down, or still remembers.",
            value=routing.replica_cooldowns,
        )
        yield CounterMetricFamily(
            "mediastream_cluster_frame_relay_reconnects",
            "Times this node's replicas reconnected to an owner's frame relay.",
            value=routing.relay_reconnects,
        )
        bus = routing.bus
        yield CounterMetricFamily(
            "mediastream_cluster_relay_retries",
            "Requests sent a second time for want of a reply.",
            value=bus.retries if bus else 0,
        )
        dropped = CounterMetricFamily(
            "mediastream_cluster_relay_dropped",
            "Messages this node received and dropped, by reason: full (its inbox), duplicate, "
            "invalid (not an envelope), unmatched_reply (came too late), stale (another "
            "epoch or offer).",
            labels=["reason"],
        )
        for reason, count in (
            ("full", bus.dropped_full if bus else 0),
            ("duplicate", bus.dropped_duplicate if bus else 0),
            ("invalid", bus.dropped_invalid if bus else 0),
            ("unmatched_reply", bus.dropped_unmatched_reply if bus else 0),
            ("stale", routing.stale_dropped),
        ):
            dropped.add_metric([reason], count)
        yield dropped
        store = self._store()
        changes = CounterMetricFamily(
            "mediastream_cluster_store_changes",
            "Stream changes in the shared store seen by this node: written (through its API), "
            "conflicts (refused with 409: another node had changed the stream), applied (made "
            "by other nodes), written_back (records Redis had lost, written back by this node).",
            labels=["result"],
        )
        for result, count in (
            ("written", store.written),
            ("conflicts", store.conflicts),
            ("applied", store.applied),
            ("written_back", store.written_back),
        ):
            changes.add_metric([result], count)
        yield changes
