"""Configuration: one frozen, typed structure, loaded from TOML.

Every key is documented in ``docs/mediastream.example.toml`` (a test proves that file loads
and equals the defaults). Unknown keys and bad values raise :class:`ConfigError` naming the
file and the full key path (``streams[1].source``). With no file at all, :func:`default_config`
serves three synthetic demo streams, so a newcomer sees video at once.

Durations are in seconds, sizes in bytes, unless the key's name says otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlsplit

from .errors import ConfigError

SECONDS: Final = 1.0
KIB: Final = 1024

STREAM_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

#: lavfi sources a ``pattern:`` stream may use (all cheap to generate in real time).
PATTERNS: Final = frozenset(
    {
        "testsrc", "testsrc2", "smptebars", "smptehdbars", "pal75bars", "pal100bars",
        "rgbtestsrc", "yuvtestsrc", "cellauto", "life", "mandelbrot",
    }
)  # fmt: skip


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: where to listen and how to stop."""

    host: str = "0.0.0.0"
    port: int = 8107
    #: how long a shutdown waits for sockets and peers to close before cutting them off.
    graceful_timeout: float = 5 * SECONDS
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: "text" for people, "json" (one object per line) for log collectors.
    log_format: Literal["text", "json"] = "text"
    #: serve HTTPS and WSS with this certificate chain and private key (PEM files).
    certfile: str = ""
    keyfile: str = ""
    #: where changes made through the management API are kept (created if missing).
    data_dir: str = "data"


@dataclass(frozen=True)
class SecurityConfig:
    """``[security]``: who may watch what. No secret and no key: the server is open."""

    #: HS256 secret that signs and checks access tokens (or put it in ``jwt_secret_file``).
    jwt_secret: str = ""
    jwt_secret_file: str = ""
    #: PEM public key checking RS256/ES256 tokens issued elsewhere.
    jwt_public_key_file: str = ""
    #: origins whose pages may open ``/ws`` (``https://wall.example.com``); empty: only the
    #: server's own origin; ``"*"``: any.
    allowed_origins: tuple[str, ...] = ()


@dataclass(frozen=True)
class IceServerConfig:
    """One ``[[webrtc.ice_servers]]`` entry (STUN or TURN)."""

    urls: tuple[str, ...]
    #: fixed TURN credentials…
    username: str | None = None
    credential: str | None = None
    #: …or the TURN server's shared secret (coturn's ``static-auth-secret``): every socket and
    #: every server peer then gets its own time-limited credentials (the TURN REST API scheme).
    secret: str | None = None
    #: lifetime of those time-limited credentials.
    credential_ttl: float = 24 * 3600 * SECONDS


@dataclass(frozen=True)
class WebRTCConfig:
    """``[webrtc]``: peer connections."""

    #: STUN/TURN servers for the server's peers. Empty: host candidates only, which is right
    #: on a LAN and avoids waiting for an unreachable public STUN server.
    ice_servers: tuple[IceServerConfig, ...] = ()
    #: time from an offer to a connected peer before the session is ended.
    negotiation_timeout: float = 20 * SECONDS
    #: ignore browsers' mDNS (``.local``) host candidates: resolving them costs aiortc a fixed
    #: second per peer connection, and the server learns the browser's address from its
    #: connectivity checks anyway.
    ignore_mdns_candidates: bool = True


@dataclass(frozen=True)
class MediaConfig:
    """``[media]``: sources and fan-out."""

    #: an on-demand stream keeps running this long after its last viewer leaves.
    on_demand_grace: float = 10 * SECONDS
    #: giving up on opening a source (RTSP connect and describe).
    open_timeout: float = 10 * SECONDS
    #: a source that delivers nothing for this long is treated as stalled and reopened.
    read_timeout: float = 5 * SECONDS
    #: first retry delay after a source fails; doubles up to ``retry_max_delay``.
    retry_initial_delay: float = 1 * SECONDS
    retry_max_delay: float = 30 * SECONDS
    #: the least wait before retrying a camera that refused its credentials or access
    #: (401/403): cameras lock an account after a few failed logins, and a wrong password
    #: does not fix itself; an edit of the stream through the API retries at once.
    access_denied_retry_delay: float = 300 * SECONDS
    #: frames a viewer may fall behind before it skips ahead to the next keyframe.
    viewer_queue_frames: int = 300
    #: frames of the current GOP kept for late joiners; a longer GOP is not cached.
    gop_cache_frames: int = 300
    #: how fast a late joiner is sent the cached GOP, in kbit/s: fast enough to reach the
    #: live edge quickly, paced so a big GOP doesn't arrive as one burst.
    catchup_rate_kbps: int = 20_000


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: what one client may ask of the server."""

    #: larger signaling messages get a ``message_too_large`` error.
    max_message_bytes: int = 64 * KIB
    max_sdp_bytes: int = 48 * KIB
    max_streams_per_socket: int = 128
    #: candidates queued for a session before its offer is processed.
    max_pending_candidates: int = 64
    #: sockets one client address may hold open at once (a page holds one).
    max_sockets_per_client: int = 32
    #: offers one socket may send per second (sustained; twice that in a burst).
    max_offers_per_second: float = 10.0
    #: messages of any kind one socket may send per second before it is closed as abusive.
    max_messages_per_second: float = 200.0


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several nodes sharing streams through Redis. No ``redis_url``: one
    process on its own, no Redis (the default)."""

    #: ``redis://host:6379/0``, ``rediss://…`` (TLS) or ``unix:///path/redis.sock``.
    redis_url: str = ""
    #: this node's name in the cluster; empty: the host name and the HTTP port (``host-8107``).
    node_id: str = ""
    #: where browsers and the other nodes reach this node (``http://10.0.0.5:8107``); empty:
    #: ``http://`` + the host name + the HTTP port.
    public_url: str = ""
    #: on SIGTERM a node hands its streams over to the others for at most this long, then
    #: closes its sockets and exits (docs/cluster.md, "Drain").
    drain_timeout: float = 10 * SECONDS
    #: viewers (sessions) a stream's owner serves itself; the next ones are served by
    #: replicas, other nodes fed with its encoded frames over the relay. 0: no replicas.
    max_viewers_per_node: int = 0
    #: a node whose load (the share of one core its process uses, as published in its node
    #: record) is at least this counts as full for new viewers of the streams it serves, and
    #: is not chosen as a new replica. 0: off. Either limit set turns replicas on.
    max_load_per_node: float = 0.0
    #: replicas a node feeds per stream (each by one relay connection per quality its viewers
    #: watch) before a new replica is fed by a replica instead (replicas chain). 0: no limit
    #: (every replica fed by the owner).
    max_relays_per_node: int = 4
    #: the TCP port other nodes pull encoded frames from (replicas); 0: any free port. With
    #: ``serve --workers N``, worker i listens on relay_port + i.
    relay_port: int = 0
    #: the secret the nodes prove to each other on the relay (HMAC challenge); empty: derived
    #: from redis_url (every node of a cluster has it; set one when the URL has no password).
    relay_secret: str = ""
    #: mutual TLS on the relay (all three or none; PEM files): this node's certificate, signed
    #: by the CA in relay_tls_ca, and its unencrypted key. Only nodes holding a certificate
    #: of that CA relay to each other, and the frames are encrypted; the secret is still
    #: proved inside TLS. Empty: the relay is plain TCP.
    relay_tls_cert: str = ""
    relay_tls_key: str = ""
    relay_tls_ca: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True)
class SourceSpec:
    """Where a stream's media comes from; parsed from the ``source`` string."""

    kind: Literal["rtsp", "file", "pattern"]
    #: the address to open: an RTSP URL, an absolute file path, or a lavfi graph.
    location: str
    #: for ``pattern:``: generator options (size, fps, kbps, gop).
    options: tuple[tuple[str, str], ...] = ()
    #: the ``source`` string as written (credentials included: never shown, only stored).
    text: str = field(default="", compare=False, repr=False)

    @property
    def option_map(self) -> dict[str, str]:
        return dict(self.options)


#: The name of a stream's only quality when it lists none (a plain ``source``).
IMPLICIT_QUALITY: Final = "main"
#: What a viewer may ask for besides a quality's name: let the server choose.
AUTO_QUALITY: Final = "auto"
QUALITY_NAME_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
#: qualities one stream may list (cameras offer two or three streams)
MAX_QUALITIES: Final = 8


@dataclass(frozen=True)
class QualityConfig:
    """One ``qualities`` entry of a stream: one of the camera's streams (``main``, ``sub``),
    read only while some viewer watches it. Its resolution and bitrate are learnt from the
    stream itself when it is read."""

    name: str
    source: SourceSpec


@dataclass(frozen=True)
class StreamConfig:
    """One ``[[streams]]`` entry."""

    id: str
    #: with ``qualities``: the default quality's source (set from it; not written in the file).
    source: SourceSpec
    name: str = ""
    #: several sources of one camera, **best first** (``main`` before ``sub``); each viewer
    #: gets the one that fits its tile and its network and moves between them on the same
    #: RTP stream. Empty: ``source`` is the stream's only quality, named "main".
    qualities: tuple[QualityConfig, ...] = ()
    #: the quality a viewer starts on when its page asks for none; empty: the first listed.
    default_quality: str = ""
    #: how to ask an RTSP camera for its media: ``"auto"`` tries TCP (passes NAT and firewalls)
    #: and, if the camera refuses it (461 Unsupported transport), UDP, then keeps to what
    #: worked; ``"tcp"`` or ``"udp"`` ask for that one only.
    rtsp_transport: Literal["auto", "tcp", "udp"] = "auto"
    #: start on the first viewer and stop after the last (plus the grace period); ``false``
    #: keeps the stream running from server start.
    on_demand: bool = True
    #: send the camera's audio to viewers who ask for it (G.711 and Opus as they are, other
    #: codecs such as AAC transcoded to Opus once).
    audio: bool = True

    @property
    def display_name(self) -> str:
        return self.name or self.id

    @property
    def quality_list(self) -> tuple[QualityConfig, ...]:
        """The stream's qualities, best first: the listed ones, or its ``source`` alone."""
        return self.qualities or (QualityConfig(IMPLICIT_QUALITY, self.source),)

    @property
    def default_quality_name(self) -> str:
        return self.default_quality or self.quality_list[0].name


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    webrtc: WebRTCConfig = field(default_factory=WebRTCConfig)
    media: MediaConfig = field(default_factory=MediaConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    streams: tuple[StreamConfig, ...] = ()


DEMO_STREAMS: Final = (
    ("demo-1", "Demo 1 — test card", "pattern:testsrc2?size=640x360&fps=25&kbps=800&gop=50"),
    ("demo-2", "Demo 2 — colour bars", "pattern:testsrc?size=640x360&fps=25&kbps=800&gop=50"),
    ("demo-3", "Demo 3 — automaton", "pattern:cellauto?size=640x360&fps=25&kbps=800&gop=50"),
)


def default_config() -> Config:
    """The configuration used with no file: three on-demand synthetic demo streams."""
    streams = tuple(
        StreamConfig(id=stream_id, name=name, source=parse_source(url, key=f"streams[{index}]"))
        for index, (stream_id, name, url) in enumerate(DEMO_STREAMS)
    )
    return Config(streams=streams)


def load_config(path: str | Path) -> Config:
    """Load and validate a TOML configuration file.

    Raises:
        ConfigError: naming the file and the key for anything unknown or invalid.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror}", path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", path=str(path)) from None
    return config_from_dict(data, path=path)


def config_from_dict(data: dict[str, Any], *, path: Path | None = None) -> Config:
    """Build a :class:`Config` from parsed TOML; file paths resolve against ``path``'s folder."""
    where = str(path) if path else None
    base_dir = path.parent if path else Path.cwd()
    try:
        streams_data = data.get("streams", [])
        config = _build(Config, {k: v for k, v in data.items() if k != "streams"}, "")
        streams = _build_streams(streams_data, base_dir)
        config = _resolve_files(config, base_dir)
        _check_ranges(config)
    except ConfigError as exc:
        raise ConfigError(exc.reason, path=where, key=exc.key) from None
    return dataclasses.replace(config, streams=streams)


def _build_streams(items: Any, base_dir: Path) -> tuple[StreamConfig, ...]:
    if not isinstance(items, list):
        raise ConfigError("must be an array of tables ([[streams]])", key="streams")
    streams: list[StreamConfig] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        stream = stream_from_dict(item, key=f"streams[{index}]", base_dir=base_dir)
        if stream.id in seen:
            raise ConfigError(f'duplicate stream id "{stream.id}"', key=f"streams[{index}].id")
        seen.add(stream.id)
        streams.append(stream)
    return tuple(streams)


def stream_from_dict(item: Any, *, key: str = "", base_dir: Path | None = None) -> StreamConfig:
    """One stream from its table (a ``[[streams]]`` entry, or a management API body).

    Raises:
        ConfigError: naming the key (``key.field``, or just ``field`` when ``key`` is empty).
    """
    if not isinstance(item, dict):
        raise ConfigError("must be a table (an object)", key=key or None)
    if "qualities" in item:
        if "source" in item:
            raise ConfigError(
                "set source (one quality) or qualities (several), not both",
                key=_join(key, "qualities"),
            )
        qualities = _qualities_from(item["qualities"], _join(key, "qualities"), base_dir)
        default = item.get("default_quality", "")
        names = [quality.name for quality in qualities]
        if not isinstance(default, str) or (default and default not in names):
            raise ConfigError(
                f"must be one of the qualities ({', '.join(names)}), got {default!r}",
                key=_join(key, "default_quality"),
            )
        chosen = next(q for q in qualities if q.name == (default or names[0]))
        fields: dict[str, Any] = {**item, "source": chosen.source, "qualities": qualities}
    else:
        if "source" not in item:
            raise ConfigError("missing required key (or give qualities)", key=_join(key, "source"))
        if item.get("default_quality", "") not in ("", IMPLICIT_QUALITY):
            raise ConfigError(
                f'needs qualities (a stream with one source has one quality, "{IMPLICIT_QUALITY}")',
                key=_join(key, "default_quality"),
            )
        source_text = item["source"]
        if not isinstance(source_text, str):
            raise ConfigError("must be a string", key=_join(key, "source"))
        source = parse_source(source_text, key=_join(key, "source"), base_dir=base_dir)
        fields = {**item, "source": source}
    stream = _build(StreamConfig, fields, key)
    if not STREAM_ID_PATTERN.fullmatch(stream.id):
        raise ConfigError(
            f'"{stream.id}" is not a valid id (1-64 letters, digits, "_.-", starting with '
            "a letter or digit)",
            key=_join(key, "id"),
        )
    return stream


def _qualities_from(items: Any, key: str, base_dir: Path | None) -> list[QualityConfig]:
    """The ``qualities`` array: tables of ``name`` and ``source``, names unique.

    Raises:
        ConfigError: naming the entry and its key (``streams[0].qualities[1].source``).
    """
    if not isinstance(items, list) or not items:
        raise ConfigError(
            'must be a non-empty array of tables ({name = "main", source = "rtsp://…"})', key=key
        )
    if len(items) > MAX_QUALITIES:
        raise ConfigError(f"at most {MAX_QUALITIES} qualities, got {len(items)}", key=key)
    qualities: list[QualityConfig] = []
    for index, entry in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError("must be a table with name and source", key=where)
        for name in entry:
            if name not in ("name", "source"):
                raise ConfigError("unknown key (known keys: name, source)", key=f"{where}.{name}")
        for required in ("name", "source"):
            if not isinstance(entry.get(required), str):
                raise ConfigError("missing required string", key=f"{where}.{required}")
        name = entry["name"]
        if not QUALITY_NAME_PATTERN.fullmatch(name) or name == AUTO_QUALITY:
            raise ConfigError(
                f'"{name}" is not a valid quality name (1-32 letters, digits, "_-", not '
                f'"{AUTO_QUALITY}")',
                key=f"{where}.name",
            )
        if any(quality.name == name for quality in qualities):
            raise ConfigError(f'duplicate quality name "{name}"', key=f"{where}.name")
        source = parse_source(entry["source"], key=f"{where}.source", base_dir=base_dir)
        qualities.append(QualityConfig(name, source))
    return qualities


def stream_to_dict(stream: StreamConfig) -> dict[str, Any]:
    """The inverse of :func:`stream_from_dict` (with the source as written, credentials too)."""
    definition: dict[str, Any] = {"id": stream.id, "name": stream.name}
    if stream.qualities:
        definition["qualities"] = [
            {"name": quality.name, "source": _source_text(quality.source)}
            for quality in stream.qualities
        ]
        definition["default_quality"] = stream.default_quality
    else:
        definition["source"] = _source_text(stream.source)
    definition.update(
        rtsp_transport=stream.rtsp_transport, on_demand=stream.on_demand, audio=stream.audio
    )
    return definition


def _source_text(source: SourceSpec) -> str:
    return source.text or source.location


def parse_source(text: str, *, key: str, base_dir: Path | None = None) -> SourceSpec:
    """Parse a ``source`` string: ``rtsp://…``, ``rtsps://…``, ``file:…`` or a path, ``pattern:…``.

    Raises:
        ConfigError: naming ``key`` (the error text never repeats credentials).
    """
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("rtsp", "rtsps"):
        if not parts.hostname:
            raise ConfigError("RTSP URL has no host", key=key)
        return SourceSpec(kind="rtsp", location=text, text=text)
    if scheme == "pattern":
        name = parts.path
        if name not in PATTERNS:
            raise ConfigError(
                f'unknown pattern "{name}"; choose one of {", ".join(sorted(PATTERNS))}', key=key
            )
        options = dict(parse_qsl(parts.query, keep_blank_values=True))
        _check_pattern_options(options, key)
        return SourceSpec(
            kind="pattern", location=name, options=tuple(sorted(options.items())), text=text
        )
    if scheme in ("file", ""):
        raw_path = parts.path if scheme == "file" else text
        file_path = Path(raw_path)
        if not file_path.is_absolute():
            file_path = (base_dir or Path.cwd()) / file_path
        _require_file(file_path, key)
        return SourceSpec(kind="file", location=str(file_path), text=text)
    raise ConfigError(
        f'unsupported source scheme "{scheme}:"; use rtsp://, rtsps://, file: or pattern:', key=key
    )


_PATTERN_OPTIONS: Final = {
    "size": re.compile(r"^\d{2,4}x\d{2,4}$"),
    "fps": re.compile(r"^\d{1,2}$"),
    "kbps": re.compile(r"^\d{2,5}$"),
    "gop": re.compile(r"^\d{1,4}$"),
}


def _check_pattern_options(options: dict[str, str], key: str) -> None:
    for name, value in options.items():
        pattern = _PATTERN_OPTIONS.get(name)
        if pattern is None:
            raise ConfigError(
                f'unknown pattern option "{name}"; known: {", ".join(_PATTERN_OPTIONS)}', key=key
            )
        if not pattern.fullmatch(value):
            raise ConfigError(f'bad value "{value}" for pattern option "{name}"', key=key)
    width, _, height = options.get("size", "640x360").partition("x")
    if int(width) % 2 or int(height) % 2:
        raise ConfigError("pattern size must have even width and height (H.264 4:2:0)", key=key)
    if not 1 <= int(options.get("fps", "25")) <= 60:
        raise ConfigError("pattern fps must be 1-60", key=key)


def _require_file(path: Path, key: str) -> None:
    """Raise ConfigError unless ``path`` is a file (a folder is named as one, not as missing)."""
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not a file", key=key)
    if not path.is_file():
        raise ConfigError(f"file not found: {path}", key=key)


def _resolve_files(config: Config, base_dir: Path) -> Config:
    """File settings relative to the configuration file's folder; each must exist."""

    def resolve(value: str, key: str) -> str:
        if not value:
            return value
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        _require_file(path, key)
        return str(path)

    data_dir = Path(config.server.data_dir)
    server = dataclasses.replace(
        config.server,
        certfile=resolve(config.server.certfile, "server.certfile"),
        keyfile=resolve(config.server.keyfile, "server.keyfile"),
        data_dir=str(data_dir if data_dir.is_absolute() else base_dir / data_dir),
    )
    security = dataclasses.replace(
        config.security,
        jwt_secret_file=resolve(config.security.jwt_secret_file, "security.jwt_secret_file"),
        jwt_public_key_file=resolve(
            config.security.jwt_public_key_file, "security.jwt_public_key_file"
        ),
    )
    cluster = dataclasses.replace(
        config.cluster,
        relay_tls_cert=resolve(config.cluster.relay_tls_cert, "cluster.relay_tls_cert"),
        relay_tls_key=resolve(config.cluster.relay_tls_key, "cluster.relay_tls_key"),
        relay_tls_ca=resolve(config.cluster.relay_tls_ca, "cluster.relay_tls_ca"),
    )
    return dataclasses.replace(config, server=server, security=security, cluster=cluster)


def _check_ranges(config: Config) -> None:
    positive = {
        "server.graceful_timeout": config.server.graceful_timeout,
        "webrtc.negotiation_timeout": config.webrtc.negotiation_timeout,
        "media.open_timeout": config.media.open_timeout,
        "media.read_timeout": config.media.read_timeout,
        "media.retry_initial_delay": config.media.retry_initial_delay,
        "media.retry_max_delay": config.media.retry_max_delay,
        "media.access_denied_retry_delay": config.media.access_denied_retry_delay,
        "media.viewer_queue_frames": config.media.viewer_queue_frames,
        "media.gop_cache_frames": config.media.gop_cache_frames,
        "media.catchup_rate_kbps": config.media.catchup_rate_kbps,
        "limits.max_message_bytes": config.limits.max_message_bytes,
        "limits.max_sdp_bytes": config.limits.max_sdp_bytes,
        "limits.max_streams_per_socket": config.limits.max_streams_per_socket,
        "limits.max_pending_candidates": config.limits.max_pending_candidates,
        "limits.max_sockets_per_client": config.limits.max_sockets_per_client,
        "limits.max_offers_per_second": config.limits.max_offers_per_second,
        "limits.max_messages_per_second": config.limits.max_messages_per_second,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"must be greater than 0, got {value}", key=key)
    if config.media.on_demand_grace < 0:
        raise ConfigError("must be 0 or more", key="media.on_demand_grace")
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(
            f"must be a port number 0-65535, got {config.server.port}", key="server.port"
        )
    if config.media.retry_max_delay < config.media.retry_initial_delay:
        raise ConfigError("must be at least media.retry_initial_delay", key="media.retry_max_delay")
    if bool(config.server.certfile) != bool(config.server.keyfile):
        key = "server.keyfile" if config.server.certfile else "server.certfile"
        raise ConfigError("TLS needs both server.certfile and server.keyfile", key=key)
    security = config.security
    if security.jwt_secret and security.jwt_secret_file:
        raise ConfigError("set jwt_secret or jwt_secret_file, not both", key="security.jwt_secret")
    if (security.jwt_secret or security.jwt_secret_file) and security.jwt_public_key_file:
        raise ConfigError(
            "choose a shared secret or a public key, not both", key="security.jwt_public_key_file"
        )
    if security.jwt_secret and len(security.jwt_secret) < 32:
        raise ConfigError(
            "must be at least 32 characters (e.g. `openssl rand -hex 32`)",
            key="security.jwt_secret",
        )
    for index, origin in enumerate(security.allowed_origins):
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ConfigError(
                f'"{origin}" is not an origin such as https://wall.example.com (no path)',
                key=f"security.allowed_origins[{index}]",
            )
    _check_cluster(config.cluster)
    for index, server in enumerate(config.webrtc.ice_servers):
        if server.secret and (server.username or server.credential):
            raise ConfigError(
                "a TURN secret makes its own credentials: set secret, or username and "
                "credential, not both",
                key=f"webrtc.ice_servers[{index}].secret",
            )
        if server.credential_ttl <= 0:
            raise ConfigError(
                "must be greater than 0", key=f"webrtc.ice_servers[{index}].credential_ttl"
            )
        for url in server.urls:
            if not re.match(r"^(stun|stuns|turn|turns):", url):
                raise ConfigError(
                    f'"{url}" is not a stun:, stuns:, turn: or turns: URL',
                    key=f"webrtc.ice_servers[{index}].urls",
                )


NODE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def _check_cluster(cluster: ClusterConfig) -> None:
    if cluster.redis_url and urlsplit(cluster.redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f'"{cluster.redis_url}" is not a redis://, rediss:// or unix:// URL',
            key="cluster.redis_url",
        )
    if cluster.node_id and not NODE_ID_PATTERN.fullmatch(cluster.node_id):
        raise ConfigError(
            f'"{cluster.node_id}" is not a valid node id (1-64 letters, digits, "_.-", starting '
            "with a letter or digit)",
            key="cluster.node_id",
        )
    if cluster.public_url and not re.match(r"^https?://[^/\s]+/?$", cluster.public_url):
        raise ConfigError(
            f'"{cluster.public_url}" is not a URL such as http://10.0.0.5:8107 (no path)',
            key="cluster.public_url",
        )
    if cluster.drain_timeout <= 0:
        raise ConfigError("must be greater than 0", key="cluster.drain_timeout")
    if cluster.max_viewers_per_node < 0:
        raise ConfigError("must be 0 (no replicas) or more", key="cluster.max_viewers_per_node")
    if not 0 <= cluster.max_load_per_node <= 64 or math.isnan(cluster.max_load_per_node):
        raise ConfigError(
            "must be 0 (off) or a share of one core such as 0.8 (at most 64)",
            key="cluster.max_load_per_node",
        )
    if cluster.max_relays_per_node < 0:
        raise ConfigError("must be 0 (no limit) or more", key="cluster.max_relays_per_node")
    if not 0 <= cluster.relay_port <= 65535:
        raise ConfigError(
            f"must be a port number 0-65535, got {cluster.relay_port}", key="cluster.relay_port"
        )
    if cluster.relay_secret and len(cluster.relay_secret) < 16:
        raise ConfigError(
            "must be at least 16 characters (e.g. `openssl rand -hex 32`)",
            key="cluster.relay_secret",
        )
    if (cluster.node_id or cluster.public_url) and not cluster.redis_url:
        raise ConfigError(
            "node_id and public_url need cluster.redis_url (without it there is no cluster)",
            key="cluster.redis_url",
        )
    if cluster.relay_tls_cert or cluster.relay_tls_key or cluster.relay_tls_ca:
        # Imported only then: reading the files and checking them is the TLS module's.
        from .cluster.relay_tls import load_relay_tls

        load_relay_tls(cluster)  # at start, not at the first replica


# --- a small typed loader: dataclass fields drive validation ---------------------------------

_T = typing.TypeVar("_T")


def _build(cls: type[_T], data: Any, key: str) -> _T:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and mistyped values."""
    if not isinstance(data, dict):
        raise ConfigError("must be a table", key=key or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in data:
        if name not in fields:
            known = ", ".join(fields)
            raise ConfigError(f"unknown key (known keys: {known})", key=_join(key, name))
    values: dict[str, Any] = {}
    for name, spec in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], _join(key, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError("missing required key", key=_join(key, name))
    return cls(**values)


def _convert(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint in (SourceSpec, QualityConfig) and isinstance(value, hint):
        return value  # parsed already, by stream_from_dict
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(inner, value, key)
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"must be one of {choices}, got {value!r}", key=key)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError("must be an array", key=key)
        return tuple(_convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key)  # type: ignore[arg-type]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=key)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", key=key)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {value!r}", key=key)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, got {value!r}", key=key)
        return value
    raise ConfigError(f"unsupported configuration type {hint!r}", key=key)  # a bug, not input


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
