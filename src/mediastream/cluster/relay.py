"""The relay: a stream's owner, or one of its replicas, serves its encoded frames to
replicas over TCP, one quality per connection.

One TCP connection per (stream, quality, replica): a replica's connection for a quality runs
while that quality has viewers there. The *upstream* is the node serving the frames: the
stream's owner, or a replica of it (replicas chain: a replica fans the frames it is fed out to
its viewers and to the replicas below it alike). Every message is a record: a 4-byte
big-endian length, one byte of type, then the body. The upstream speaks first::

    upstream CHALLENGE  32 random bytes (a fresh nonce)
    replica  HELLO      {"stream", "node", "nonce": hex, "mac": hex, "quality"?}
                        mac = HMAC-SHA256(secret, "replica|" nonce stream "|" node)
                        quality: absent for the stream's default quality (as an older
                        replica asks for it)
    upstream WELCOME    {"mac": hex, "quality"}  mac = HMAC-SHA256(secret, "owner|"
                        replica's nonce stream); quality: the one it serves
             (or ERROR  text, and the connection closes: a refusal)
    upstream INFO       that quality's SourceInfo as JSON (what the viewers' tracks are built
                        from); an ERROR here instead (its source did not open in time) is a
                        failure the replica retries, not a refusal
    upstream FRAME …    the current GOP from its keyframe, then live frames
    upstream IDLE       (empty) after 1 s with no frame to send: the replica takes 5 s of
                        silence as an upstream frozen or gone, and reconnects
    replica  VIEWERS    {"viewers": n} whenever its viewer count changes (the owner places
                        the next viewers with it; replicas further down: from Redis)

A FRAME body is ``!BBQIH`` (kind, flags: bit 0 keyframe, timestamp, size, payload count),
then each RTP payload as a 4-byte length and its bytes: the frames the upstream's fan-out of
that quality publishes, never decoded, never RTP. The upstream's side is a viewer of that
quality on its own stream, so that quality's source starts there on demand: on the owner, its
ingest (one camera session per quality in the whole cluster, whichever replicas ask for it);
on a replica, its own relay connection of that quality to its upstream. A quality therefore
flows down a chain only as far as it has viewers.

Security: a connection sends nothing of a stream before the replica has proved the shared
secret (``cluster.relay_secret``, else derived from ``cluster.redis_url``), and the replica
checks the upstream's proof before it believes a frame. Camera URLs and credentials never
cross: only frames and the SourceInfo do. Everything read is bounded (record size, handshake
time). With ``cluster.relay_tls_*`` all of the above runs inside mutual TLS (:mod:`.relay_tls`:
the upstream sends STARTTLS in clear, then the TLS handshake, bounded by the handshake time
too), on every hop of a chain alike.

Slow replicas: the upstream's side is an ordinary fan-out subscriber (bounded queue); a replica
that falls behind skips to the next keyframe there (counted as the subscriber's drops), so it
never gets P-frames without their keyframe. A replica that reconnects publishes nothing until
a keyframe newer than the last frame it published; one fed by another upstream (or the same
node on another timeline) continues its own timeline from that upstream's keyframe on. Each
quality's connection keeps its own place (:class:`_Resumption`).

Replicas that cannot be fed: the upstream remembers the replica nodes its owner sent viewers
to (:meth:`RelayServer.placed`) until they connect; :meth:`RelayServer.overdue` names those
that never did, which the owner leaves out of placement for a while. A replica that no
upstream accepts within a bound (``reach_within``) gives up, and its viewers re-offer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import secrets
import struct
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

import trio

from ..feeds import QualityFeed
from ..media.fanout import Subscriber
from ..media.frames import EncodedFrame
from ..media.source_contract import SourceInfo, SourceState
from ..registry import Stream
from .errors import RelayError, RelayRefused
from .relay_tls import STARTTLS, TLS_KEYS, RelayTLS, accept_tls, connect_tls

log = logging.getLogger(__name__)

MAGIC_CHALLENGE: Final = 0
HELLO: Final = 1
WELCOME: Final = 2
INFO: Final = 3
FRAME: Final = 4
ERROR: Final = 5
VIEWERS: Final = 6
#: the upstream has nothing to send (its source between frames, down or reconnecting): sent
#: after IDLE_INTERVAL of silence, so that only a frozen or cut upstream is ever silent
IDLE: Final = 8

#: the largest record accepted (a 4K keyframe is well below).
MAX_RECORD: Final = 16 * 1024 * 1024
#: the largest record accepted before the peer has proved the secret.
MAX_HANDSHAKE_RECORD: Final = 4096
HANDSHAKE_TIMEOUT: Final = 5.0  # seconds
#: a replica that takes no bytes for this long is dropped (it reconnects and resumes).
SEND_TIMEOUT: Final = 10.0  # seconds
#: an upstream that sends nothing for this long is taken as stopped (a frozen process keeps
#: its connection open): the replica reconnects, looking its upstream up again. A live
#: upstream with no frames to send (its camera down) sends IDLE every IDLE_INTERVAL instead.
UPSTREAM_SILENCE_LIMIT: Final = 5.0  # seconds
IDLE_INTERVAL: Final = 1.0  # seconds
#: how long the upstream waits for a quality's source to open before sending the replica an
#: ERROR (which it retries).
INFO_TIMEOUT: Final = 20.0  # seconds
#: connections the relay serves at once (a replica has one per stream and quality).
MAX_CONNECTIONS: Final = 512
#: the replica's waits between reconnections (the last one repeats).
RECONNECT_DELAYS: Final = (0.1, 0.5, 1.0, 2.0)

_KINDS: Final[tuple[Literal["video", "audio", "source_audio"], ...]] = (
    "video",
    "audio",
    "source_audio",
)
_FRAME_HEADER: Final = struct.Struct("!BBQIH")
_LENGTH: Final = struct.Struct("!I")


def relay_key(relay_secret: str, redis_url: str) -> bytes:
    """The key both sides prove: the configured secret, else one derived from the Redis URL
    (which every node of a cluster has)."""
    if relay_secret:
        return relay_secret.encode()
    return hmac.new(redis_url.encode(), b"mediastream relay key v1", hashlib.sha256).digest()


def _mac(key: bytes, *parts: bytes) -> str:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).hexdigest()


# --- records --------------------------------------------------------------------------------


def encode_record(kind: int, body: bytes) -> bytes:
    return _LENGTH.pack(len(body) + 1) + bytes((kind,)) + body


def encode_frame(frame: EncodedFrame) -> bytes:
    parts = [
        _FRAME_HEADER.pack(
            _KINDS.index(frame.kind), int(frame.keyframe), frame.timestamp, frame.size,
            len(frame.payloads),
        )
    ]  # fmt: skip
    for payload in frame.payloads:
        parts.append(_LENGTH.pack(len(payload)))
        parts.append(payload)
    return encode_record(FRAME, b"".join(parts))


def decode_frame(body: bytes) -> EncodedFrame:
    """Raises RelayError naming what is wrong with the record."""
    try:
        kind, flags, timestamp, size, count = _FRAME_HEADER.unpack_from(body)
        offset = _FRAME_HEADER.size
        payloads = []
        for _ in range(count):
            (length,) = _LENGTH.unpack_from(body, offset)
            offset += _LENGTH.size
            if offset + length > len(body):
                raise RelayError("a frame's payload runs past its record")
            payloads.append(body[offset : offset + length])
            offset += length
        if offset != len(body):
            raise RelayError(f"{len(body) - offset} stray bytes after a frame's payloads")
        return EncodedFrame(_KINDS[kind], timestamp, bool(flags & 1), tuple(payloads), size)
    except (struct.error, IndexError) as exc:
        raise RelayError(f"malformed frame record: {exc}") from None


class RecordReader:
    """Records from a byte stream, each at most ``limit`` bytes."""

    def __init__(self, stream: trio.abc.ReceiveStream, peer: str) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._peer = peer
        self.limit = MAX_HANDSHAKE_RECORD

    async def _fill(self, size: int) -> None:
        while len(self._buffer) < size:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise RelayError(f"{self._peer} closed the relay connection")
            self._buffer += chunk

    async def read(self) -> tuple[int, bytes]:
        """Raises RelayError: the connection closed, or a record is too big or empty."""
        await self._fill(_LENGTH.size)
        (length,) = _LENGTH.unpack_from(self._buffer)
        if not 1 <= length <= self.limit:
            raise RelayError(f"{self._peer} sent a record of {length} bytes (limit {self.limit})")
        await self._fill(_LENGTH.size + length)
        record = bytes(self._buffer[_LENGTH.size : _LENGTH.size + length])
        del self._buffer[: _LENGTH.size + length]
        return record[0], record[1:]

    async def read_json(self, expected: int) -> dict[str, Any]:
        kind, body = await self.read()
        if kind == ERROR:
            raise RelayRefused(f"{self._peer}: {body.decode(errors='replace')}")
        if kind != expected:
            raise RelayError(f"{self._peer} sent record type {kind}, expected {expected}")
        try:
            item = json.loads(body)
        except ValueError as exc:
            raise RelayError(f"{self._peer} sent bad JSON: {exc}") from None
        if not isinstance(item, dict):
            raise RelayError(f"{self._peer} sent JSON that is not an object")
        return item


def info_to_json(info: SourceInfo) -> bytes:
    item = asdict(info)
    item["source_audio_config"] = info.source_audio_config.hex()
    return json.dumps(item).encode()


def info_from_json(item: dict[str, Any]) -> SourceInfo:
    """Raises RelayError when the upstream's SourceInfo does not fit this node's."""
    try:
        item = dict(item)
        item["source_audio_config"] = bytes.fromhex(item.get("source_audio_config", ""))
        return SourceInfo(**item)
    except (TypeError, ValueError) as exc:
        raise RelayError(f"the upstream's source description does not fit: {exc}") from None


# --- the upstream's side --------------------------------------------------------------------


@dataclass
class RelayStatistics:
    #: connections from replicas served now
    connections: int = 0
    #: connections refused: TLS failed, bad or missing secret, no such stream, not serving
    #: it, no such quality, too many
    refused: int = 0
    #: frames a slow replica skipped (to the next keyframe), all connections together
    skipped_frames: int = 0
    frames_sent: int = 0
    #: per stream, per replica node: the viewers it reported
    replica_viewers: dict[str, dict[str, int]] = field(default_factory=dict)


class RelayServer:
    """Serves the streams this node owns or replicates to replicas (see the module doc).

    Args:
        key: the shared secret's key (:func:`relay_key`).
        find_stream: the stream of an id, if this node has it.
        may_serve: whether this node owns the stream now, or is a live replica of it; the
            node calls :meth:`disconnect` when that ends (lease lost, handed over, replica
            ended).
        tls: mutual TLS around every connection (None: plain TCP).
    """

    def __init__(
        self,
        key: bytes,
        node_id: str,
        find_stream: Callable[[str], Stream | None],
        may_serve: Callable[[str], bool],
        *,
        tls: RelayTLS | None = None,
    ) -> None:
        self._key = key
        self._tls = tls
        self._node_id = node_id
        self._find_stream = find_stream
        self._may_serve = may_serve
        self.stats = RelayStatistics()
        #: relay connections per stream (they count as the stream's viewers here)
        self._per_stream: dict[str, int] = {}
        #: relay connections per (stream, replica node): one per quality it relays; its
        #: report is forgotten with the last one
        self._per_replica: dict[tuple[str, str], int] = {}
        self._scopes: dict[str, set[trio.CancelScope]] = {}
        #: per stream, per replica node: viewers sent there since its last report
        self._placed: dict[str, dict[str, int]] = {}
        #: per stream, per replica node sent viewers and not connected (authenticated) since:
        #: Trio's clock at the first of them (:meth:`overdue` finds those that never came)
        self._awaited: dict[str, dict[str, float]] = {}

    def connections(self, stream_id: str) -> int:
        """Relay connections of ``stream_id`` served now (one per replica and quality)."""
        return self._per_stream.get(stream_id, 0)

    def fed_nodes(self, stream_id: str) -> set[str]:
        """The replica nodes connected (authenticated) for ``stream_id`` now."""
        return {node for stream, node in self._per_replica if stream == stream_id}

    def replicas_fed(self, stream_id: str) -> int:
        """Replica nodes fed ``stream_id`` from here now, whatever qualities each relays (what
        ``cluster.max_relays_per_node`` limits)."""
        return sum(stream == stream_id for stream, _ in self._per_replica)

    def replica_viewers(self, stream_id: str) -> dict[str, int]:
        """Each connected replica's viewers: its last report, plus the viewers sent there
        since (a burst of offers must not all go to one replica before it reports)."""
        placed = self._placed.get(stream_id, {})
        reported = self.stats.replica_viewers.get(stream_id, {})
        return {
            node: reported.get(node, 0) + placed.get(node, 0)
            for node in reported.keys() | placed.keys()
        }

    def placed(self, stream_id: str, node: str) -> None:
        """A viewer was sent to ``node`` as a replica of ``stream_id`` fed from here."""
        per_node = self._placed.setdefault(stream_id, {})
        per_node[node] = per_node.get(node, 0) + 1
        if (stream_id, node) not in self._per_replica:
            self._awaited.setdefault(stream_id, {}).setdefault(node, trio.current_time())

    def unconnected(self, stream_id: str) -> int:
        """Replicas sent viewers as fed from here that have not connected yet."""
        reported = self.stats.replica_viewers.get(stream_id, {})
        return sum(node not in reported for node in self._placed.get(stream_id, {}))

    def overdue(self, stream_id: str, placed_before: float) -> list[str]:
        """The replica nodes sent viewers of ``stream_id`` before ``placed_before`` (Trio's
        clock) that have not connected since; forgotten here (their viewers no longer count
        on them: they never came)."""
        awaited = self._awaited.get(stream_id, {})
        late = [node for node, since in awaited.items() if since < placed_before]
        for node in late:
            self.forget(stream_id, node)
        return late

    def forget(self, stream_id: str, node: str) -> None:
        """Count no viewer sent to ``node`` for ``stream_id`` any more (it cannot be fed: its
        connection was refused, or it never came)."""
        for per_stream in (self._placed, self._awaited):
            per_node = per_stream.get(stream_id, {})
            per_node.pop(node, None)
            if not per_node:
                per_stream.pop(stream_id, None)

    def disconnect(self, stream_id: str) -> int:
        """Close every replica's connection for ``stream_id`` (they reconnect and resume at
        the next keyframe); how many were closed."""
        scopes = self._scopes.get(stream_id, set())
        for scope in scopes:
            scope.cancel()
        return len(scopes)

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``host:port`` until cancelled; started with the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info('relay of node "%s" listening on %s:%d', self._node_id, host, bound)
        async with trio.open_nursery() as nursery:
            task_status.started(bound)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, connection: trio.SocketStream) -> None:
        peer = "a relay client"
        with contextlib.suppress(Exception):
            peer = "relay client {}:{}".format(*connection.socket.getpeername()[:2])
        try:
            async with connection:
                stream: trio.abc.Stream = connection
                if self._tls is not None:
                    try:
                        with trio.fail_after(HANDSHAKE_TIMEOUT):
                            stream = await accept_tls(connection, self._tls)
                    except (RelayRefused, trio.TooSlowError) as exc:
                        self.stats.refused += 1
                        why = str(exc) or f"did not finish TLS in {HANDSHAKE_TIMEOUT:g} s"
                        log.warning('relay of node "%s": %s refused: %s', self._node_id, peer, why)
                        return
                if self.stats.connections >= MAX_CONNECTIONS:
                    self.stats.refused += 1
                    await _send_error(stream, f"too many relay connections ({MAX_CONNECTIONS})")
                    return
                await self._serve_checked(stream, peer)
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info('relay of node "%s": %s: %s', self._node_id, peer, exc)

    async def _serve_checked(self, connection: trio.abc.Stream, peer: str) -> None:
        reader = RecordReader(connection, peer)
        nonce = secrets.token_bytes(32)
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
            await connection.send_all(encode_record(MAGIC_CHALLENGE, nonce))
            hello = await reader.read_json(HELLO)
        if handshake.cancelled_caught:
            self.stats.refused += 1
            raise RelayError(f"{peer} did not complete the handshake in {HANDSHAKE_TIMEOUT:g} s")
        stream_id, node, their_nonce, mac = (
            hello.get("stream"), hello.get("node"), hello.get("nonce"), hello.get("mac")
        )  # fmt: skip
        if not all(isinstance(v, str) for v in (stream_id, node, their_nonce, mac)):
            self.stats.refused += 1
            await _send_error(connection, 'HELLO needs strings "stream", "node", "nonce", "mac"')
            return
        assert isinstance(stream_id, str) and isinstance(node, str)
        assert isinstance(their_nonce, str) and isinstance(mac, str)
        expected = _mac(self._key, b"replica", nonce, stream_id.encode(), node.encode())
        if not hmac.compare_digest(expected, mac):
            self.stats.refused += 1
            log.warning(
                'relay of node "%s": %s refused: it does not know the cluster\'s relay secret',
                self._node_id, peer,
            )  # fmt: skip
            await _send_error(connection, "authentication failed")
            return
        stream = self._find_stream(stream_id)
        if stream is None or not self._may_serve(stream_id):
            self.stats.refused += 1
            await _send_error(connection, f'node "{self._node_id}" does not serve "{stream_id}"')
            return
        quality = hello.get("quality")  # absent: the default one (an older replica)
        names = [feed.name for feed in stream.qualities]
        if quality is None:
            quality = stream.quality().name
        elif quality not in names:
            self.stats.refused += 1
            await _send_error(
                connection,
                f'"{stream_id}" on node "{self._node_id}" has no quality {json.dumps(quality)} '
                f"(it has {', '.join(names)})",
            )
            return
        assert isinstance(quality, str)
        welcome = _mac(self._key, b"owner", their_nonce.encode(), stream_id.encode())
        await connection.send_all(
            encode_record(WELCOME, json.dumps({"mac": welcome, "quality": quality}).encode())
        )
        label = f'replica "{node}" of "{stream_id}" quality "{quality}"'
        awaited = self._awaited.get(stream_id, {})
        if awaited.pop(node, None) is not None and not awaited:
            del self._awaited[stream_id]
        self.stats.connections += 1
        self._per_stream[stream_id] = self._per_stream.get(stream_id, 0) + 1
        replica_key = (stream_id, node)
        self._per_replica[replica_key] = self._per_replica.get(replica_key, 0) + 1
        scope = trio.CancelScope()
        self._scopes.setdefault(stream_id, set()).add(scope)
        try:
            with scope:
                if not self._may_serve(stream_id):  # lost while the handshake finished
                    return
                await self._feed(connection, reader, stream, quality, node, label, scope)
        finally:
            self._scopes[stream_id].discard(scope)
            if not self._scopes[stream_id]:
                del self._scopes[stream_id]
            self.stats.connections -= 1
            self._per_stream[stream_id] -= 1
            if not self._per_stream[stream_id]:
                del self._per_stream[stream_id]
            self._per_replica[replica_key] -= 1
            if not self._per_replica[replica_key]:  # the replica's last quality here
                del self._per_replica[replica_key]
                for per_stream in (self.stats.replica_viewers, self._placed):
                    per_node = per_stream.get(stream_id, {})
                    per_node.pop(node, None)
                    if not per_node:
                        per_stream.pop(stream_id, None)
            log.info('relay of node "%s": %s disconnected', self._node_id, label)

    async def _feed(
        self,
        connection: trio.abc.Stream,
        reader: RecordReader,
        stream: Stream,
        quality: str,
        node: str,
        label: str,
        scope: trio.CancelScope,
    ) -> None:
        # A counted viewer of that quality: the owner keeps its source (started for it if it
        # was not running) and its lease while replicas read it; a replica its relay source
        # of that quality (started for it the same way: a replica below is fed from this
        # node's fan-out of the quality).
        with stream.open_viewer(end=lambda code, message: scope.cancel(), quality=quality) as video:
            info: SourceInfo | None = None
            with trio.move_on_after(INFO_TIMEOUT):
                info = stream.quality(quality).source_info or await stream.wait_source_info(quality)
            if info is None:
                await _send_error(
                    connection,
                    f'"{stream.id}" on node "{self._node_id}" has not opened the source of '
                    f'quality "{quality}" within {INFO_TIMEOUT:g} s',
                )
                return
            await connection.send_all(encode_record(INFO, info_to_json(info)))
            log.info('relay of node "%s": serving %s', self._node_id, label)
            with contextlib.ExitStack() as extra:
                subscribers = [video]
                if info.audio_codec:
                    subscribers.append(extra.enter_context(stream.open_audio("audio", quality)))
                if info.source_audio_config:
                    subscribers.append(
                        extra.enter_context(stream.open_audio("source_audio", quality))
                    )
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read_reports, reader, stream.id, node, scope)
                    nursery.start_soon(self._end_if_moved, stream, video, quality, label, scope)
                    try:
                        await self._send_frames(connection, subscribers)
                    except (RelayError, trio.BrokenResourceError, OSError) as exc:
                        log.info('relay of node "%s": %s: %s', self._node_id, label, exc)
                    finally:
                        self.stats.skipped_frames += sum(s.dropped_frames for s in subscribers)
                    nursery.cancel_scope.cancel()

    async def _send_frames(self, connection: trio.abc.Stream, subscribers: list[Any]) -> None:
        while True:
            arrived = trio.Event()
            for subscriber in subscribers:
                subscriber.set_wakeup(arrived.set)
            batch: list[bytes] = []
            for subscriber in subscribers:
                while (frame := subscriber.get_nowait()) is not None:
                    batch.append(encode_frame(frame))
            if batch:
                with trio.move_on_after(SEND_TIMEOUT) as sending:
                    await connection.send_all(b"".join(batch))
                if sending.cancelled_caught:
                    raise RelayError(f"the replica took nothing for {SEND_TIMEOUT:g} s")
                self.stats.frames_sent += len(batch)
                continue
            with trio.move_on_after(IDLE_INTERVAL) as idle:
                await arrived.wait()
            if idle.cancelled_caught:
                with trio.move_on_after(SEND_TIMEOUT) as sending:
                    await connection.send_all(encode_record(IDLE, b""))
                if sending.cancelled_caught:
                    raise RelayError(f"the replica took nothing for {SEND_TIMEOUT:g} s")

    async def _end_if_moved(
        self, stream: Stream, video: Subscriber, quality: str, label: str, scope: trio.CancelScope
    ) -> None:
        # An edit that removes the quality moves its viewers to the default one: this
        # connection must carry its own quality only (the replica asks again, and learns).
        await stream.changes.wait_until(lambda: stream.quality_of(video) != quality)
        log.info('relay of node "%s": %s: the stream no longer has it', self._node_id, label)
        scope.cancel()

    async def _read_reports(
        self, reader: RecordReader, stream_id: str, node: str, scope: trio.CancelScope
    ) -> None:
        try:
            while True:
                report = await reader.read_json(VIEWERS)
                viewers = report.get("viewers")
                if isinstance(viewers, int) and not isinstance(viewers, bool):
                    self.stats.replica_viewers.setdefault(stream_id, {})[node] = viewers
                    self._placed.get(stream_id, {}).pop(node, None)
        except (RelayError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            scope.cancel()  # the replica went away: stop sending to it


async def _send_error(connection: trio.abc.Stream, message: str) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        with trio.move_on_after(1.0):
            await connection.send_all(encode_record(ERROR, message.encode()))


# --- the replica's side ---------------------------------------------------------------------


@dataclass
class ReplicaStatistics:
    reconnects: int = 0
    #: connections an upstream refused (the secret, TLS, not serving the stream or quality)
    refused: int = 0
    #: frames not published after a reconnection, until a keyframe newer than the last one
    resume_skipped_frames: int = 0
    frames_received: int = 0


async def open_relay(
    address: str,
    key: bytes,
    stream_id: str,
    node_id: str,
    quality: str | None = None,
    *,
    tls: RelayTLS | None = None,
) -> tuple[trio.abc.Stream, RecordReader, SourceInfo]:
    """Connect to the upstream's relay at ``address`` (``host:port``), prove the secret, check
    its proof; return the connection, its reader (at the first frame) and the SourceInfo.
    With ``tls``, all of it inside mutual TLS (and a relay without TLS is refused).

    Args:
        quality: the quality to relay; None: the stream's default one (not named in the
            HELLO, so that an upstream of an older version serves it too).

    Raises:
        RelayRefused: the upstream refused (the secret, not serving the stream, no such
            quality), could not prove the secret itself, does not serve the quality asked
            for, or one side has TLS and the other not.
        RelayError, OSError: the connection failed, or the upstream's source of the quality
            did not open in time (both worth trying again).
    """
    host, _, port = address.rpartition(":")
    peer = f"relay {address}" + (f' (quality "{quality}")' if quality is not None else "")
    socket_stream = await trio.open_tcp_stream(host.strip("[]"), int(port))
    connection: trio.abc.Stream = socket_stream
    try:
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as handshake:
            if tls is not None:
                connection = await connect_tls(socket_stream, tls, peer)
            reader = RecordReader(connection, peer)
            kind, nonce = await reader.read()
            if kind == STARTTLS:
                raise RelayRefused(f"{peer} expects TLS, and this node has none ({TLS_KEYS})")
            if kind != MAGIC_CHALLENGE or len(nonce) != 32:
                raise RelayError(f"{peer} is not a MediaStream relay")
            mine = secrets.token_hex(16)
            mac = _mac(key, b"replica", nonce, stream_id.encode(), node_id.encode())
            hello = {"stream": stream_id, "node": node_id, "nonce": mine, "mac": mac}
            if quality is not None:
                hello["quality"] = quality
            await connection.send_all(encode_record(HELLO, json.dumps(hello).encode()))
            welcome = await reader.read_json(WELCOME)
            expected = _mac(key, b"owner", mine.encode(), stream_id.encode())
            if not hmac.compare_digest(str(welcome.get("mac", "")), expected):
                raise RelayRefused(f"{peer} could not prove the cluster's relay secret")
            if quality is not None and welcome.get("quality") != quality:
                # An upstream of an older version ignores the name and serves its default.
                raise RelayRefused(
                    f'{peer} does not relay quality "{quality}" of "{stream_id}" (it serves '
                    f"{json.dumps(welcome.get('quality', 'the default quality only'))})"
                )
        if handshake.cancelled_caught:
            raise RelayError(f"{peer} did not complete the handshake in {HANDSHAKE_TIMEOUT:g} s")
        reader.limit = MAX_RECORD
        # The upstream may have to open the quality's source first (it waits INFO_TIMEOUT).
        with trio.move_on_after(INFO_TIMEOUT + HANDSHAKE_TIMEOUT) as waiting:
            try:
                item = await reader.read_json(INFO)
            except RelayRefused as exc:
                # Accepted, but its source did not open: a failure to retry like a cut
                # connection, not a refusal (this quality's viewers wait, the others play on).
                raise RelayNotReady(str(exc)) from None
        if waiting.cancelled_caught:
            raise RelayNotReady(f'{peer} did not describe "{stream_id}" within {INFO_TIMEOUT:g} s')
        info = info_from_json(item)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await connection.aclose()
        # It ends the attempt as a broken connection does (the replica tries again).
        if isinstance(exc, trio.BrokenResourceError):
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise RelayError(f"{peer}: the connection broke during the handshake{cause}") from None
        raise
    return connection, reader, info


class RelayNotReady(RelayError):
    """The upstream accepted the connection (both proved the secret), but its source of the
    quality did not open in time: retried, as a cut connection."""


@dataclass
class _Resumption:
    """Where the replica's timeline is, so that a reconnection publishes nothing twice and
    never a P-frame without its keyframe, and a new upstream's timeline continues this one."""

    #: kind -> the newest timestamp published (on this replica's timeline)
    last: dict[str, int] = field(default_factory=dict)
    #: kind -> what is added to the upstream's timestamps (0 until the timeline changes)
    shift: dict[str, int] = field(default_factory=dict)
    #: the upstream changed: its timestamps are of another timeline, rebased at its keyframe
    rebase: bool = False
    #: kinds whose shift is still to be set after a rebase (at their first frame)
    unshifted: set[str] = field(default_factory=set)


#: a rebased timeline starts one frame (at 30 fps, 90 kHz) after the last one published.
REBASE_STEP: Final = 3000


async def run_relay_source(
    stream_id: str,
    node_id: str,
    key: bytes,
    locate_upstream: Callable[[], Awaitable[tuple[str, str]]],
    sink: Stream,
    stats: ReplicaStatistics,
    *,
    refused: Callable[[RelayRefused], None] | None = None,
    quality: str | None = None,
    tls: RelayTLS | None = None,
    reach_within: float = math.inf,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A replica's source of one quality (None: the default one): the upstream's frames of
    that quality, published to this node's fan-out of it, until cancelled. Every quality's
    connection is one call of this, each with its own resumption state, its own upstream
    look-ups and its own TLS connection (``tls``: None for plain TCP). ``sink`` is this
    node's stream: the quality's feed takes the frames and the SourceInfo, and the stream's
    viewer count is reported up each connection.

    ``locate_upstream`` gives the upstream's relay address and a name of its timeline (the
    owner and its epoch, a replica: another name is another timeline), e.g. a new owner's
    after one died and another claimed the stream; or raises ClusterError when the replica
    must end: that error ends this function. A refusal is raised too, unless ``refused``
    takes it (it raises to end, or returns: the next ``locate_upstream`` names another
    node). A cut connection, or one the upstream keeps silent for
    :data:`UPSTREAM_SILENCE_LIMIT` (a frozen process), is made again
    (:data:`RECONNECT_DELAYS`) and the stream resumes at the next keyframe newer than the
    last frame published; another timeline's frames are
    moved onto this replica's from their first keyframe on. The viewers see a jump, never a
    broken picture nor timestamps going back.

    Raises:
        RelayError: no upstream accepted this node within ``reach_within`` seconds of the
            start (a firewall, an address that does not answer): its viewers would wait for
            ever. Once one has, cut connections are retried without end.
    """
    feed = sink.quality(quality)
    # The default quality is not named: an upstream of an older version serves it too.
    asked = None if feed is sink.quality() else feed.name
    what = f'"{stream_id}" quality "{feed.name}"'
    task_status.started()
    feed.source_state(SourceState.STARTING)
    resumption = _Resumption()
    failures = 0
    opened = False
    timeline = ""
    reason = "no connection made"
    #: until an upstream accepts this node; then cut connections are retried without end
    reaching = trio.CancelScope(deadline=trio.current_time() + reach_within)
    try:
        with reaching:
            while True:
                address, source = await locate_upstream()
                if timeline and source != timeline:
                    resumption.rebase = True
                    log.info("%s: the relay moves to %s at %s", what, source, address)
                timeline = source
                try:
                    connection, reader, info = await open_relay(
                        address, key, stream_id, node_id, asked, tls=tls
                    )
                except RelayRefused as exc:
                    stats.refused += 1
                    if refused is None:
                        raise  # the upstream will not serve this node: the replica ends
                    refused(exc)
                    reason = str(exc)
                except RelayNotReady as exc:
                    reaching.deadline = math.inf  # accepted: the upstream is reachable
                    reason = str(exc)
                except (RelayError, OSError) as exc:
                    reason = str(exc)
                else:
                    reaching.deadline = math.inf
                    reason = "the connection ended"
                    async with connection:
                        if not opened:
                            feed.relay_opened(info)
                            opened = True
                        feed.source_state(SourceState.LIVE, f"relayed from {address}")
                        failures = 0
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(_report_viewers, connection, sink)
                            try:
                                await _receive(reader, feed, resumption, stats)
                            except (RelayError, trio.BrokenResourceError, OSError) as exc:
                                reason = str(exc)
                            nursery.cancel_scope.cancel()
                failures += 1
                stats.reconnects += 1
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS)) - 1]
                log.warning(
                    "%s: relay from the upstream at %s broke (%s); reconnecting in %.1f s, "
                    "resuming at the next keyframe",
                    what, address, reason, delay,
                )  # fmt: skip
                feed.source_state(SourceState.RECONNECTING, f"relay: {reason}")
                await trio.sleep(delay)
        raise RelayError(
            f"no upstream accepted this node within {reach_within:g} s (the last try: {reason})"
        )
    finally:
        feed.source_state(SourceState.STOPPED)


async def _receive(
    reader: RecordReader, sink: QualityFeed, resumption: _Resumption, stats: ReplicaStatistics
) -> None:
    # After a reconnection the upstream starts again at its cached keyframe: what was published
    # already is not published twice, and no P-frame goes out before a newer keyframe.
    last, shift = resumption.last, resumption.shift
    resuming = "video" in last
    #: keyframes passed over as already published (one at most on the same timeline: the
    #: cached one resent; a second means the upstream's timeline went back)
    passed_keyframes = 0
    while True:
        with trio.move_on_after(UPSTREAM_SILENCE_LIMIT) as waiting:
            kind, body = await reader.read()
        if waiting.cancelled_caught:
            raise RelayError(f"the upstream sent nothing for {UPSTREAM_SILENCE_LIMIT:g} s")
        if kind == IDLE:
            continue  # alive, with nothing to send
        if kind == ERROR:
            raise RelayRefused(f"the upstream: {body.decode(errors='replace')}")
        if kind != FRAME:
            raise RelayError(f"unexpected record type {kind} among frames")
        frame = decode_frame(body)
        stats.frames_received += 1
        if frame.kind == "video" and resuming:
            if not frame.keyframe:
                stats.resume_skipped_frames += 1
                continue
            behind = frame.timestamp + shift.get("video", 0) <= last["video"]
            if resumption.rebase or (behind and passed_keyframes):
                # Another upstream, or the same node on another timeline (a replica that
                # claimed the stream between the look-up and the connection): its timeline
                # continues this one from its keyframe on.
                shift["video"] = last["video"] + REBASE_STEP - frame.timestamp
                resumption.unshifted = {k for k in last if k != "video"}
                resumption.rebase = False
            elif behind:
                passed_keyframes += 1
                stats.resume_skipped_frames += 1
                continue
            resuming = False
        elif resuming:
            continue  # audio from before the video resumes
        if frame.kind in resumption.unshifted:
            shift[frame.kind] = last[frame.kind] + 1 - frame.timestamp
            resumption.unshifted.discard(frame.kind)
        timestamp = frame.timestamp + shift.get(frame.kind, 0)
        newest = last.get(frame.kind)
        if newest is not None and timestamp <= newest and frame.kind != "video":
            continue  # audio already published
        if timestamp != frame.timestamp:
            frame = dataclasses.replace(frame, timestamp=timestamp)
        last[frame.kind] = timestamp
        sink.publish_relayed(frame)


async def _report_viewers(connection: trio.abc.Stream, stream: Stream) -> None:
    reported = -1
    # A broken connection is the receiver's to notice; this task just stops.
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        while True:
            count = stream.viewers
            if count != reported:
                record = encode_record(VIEWERS, json.dumps({"viewers": count}).encode())
                await connection.send_all(record)
                reported = count
            await stream.changes.wait()
