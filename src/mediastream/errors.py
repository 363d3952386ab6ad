"""Every error MediaStream raises on purpose, in one tree.

    MediaStreamError
    ├── ConfigError          a configuration file or value is wrong (names the file and key)
    ├── SignalingError       one client message can't be honoured; becomes an ``error`` message
    │                        for that stream (``code`` is machine-readable) and the socket lives on
    └── SourceError          a camera, file or pattern can't be opened or read
        └── SourceAccessDenied   the camera refused the credentials or access (401/403)

Anything else that escapes is a bug: the socket that hit it logs it and answers
``internal_error`` for the stream concerned, and still keeps its other streams.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.StrEnum):
    """Machine-readable codes sent beside the human-readable text of an ``error`` message."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_TYPE = "unknown_type"
    MESSAGE_TOO_LARGE = "message_too_large"
    STREAM_NOT_FOUND = "stream_not_found"
    STREAM_UNAVAILABLE = "stream_unavailable"
    STREAM_EXISTS = "stream_exists"
    #: (HTTP) another node of the cluster changed the stream meanwhile: read it, try again
    STREAM_CHANGED = "stream_changed"
    #: in a cluster: Redis cannot be reached (HTTP: a change that needs it; a socket: an offer
    #: for a stream this node does not own, which the page sends again after its backoff)
    CLUSTER_UNAVAILABLE = "cluster_unavailable"
    INVALID_CONFIG = "invalid_config"
    INVALID_SDP = "invalid_sdp"
    UNSUPPORTED_CODEC = "unsupported_codec"
    NEGOTIATION_IN_PROGRESS = "negotiation_in_progress"
    NO_SESSION = "no_session"
    UNKNOWN_QUALITY = "unknown_quality"
    INVALID_CANDIDATE = "invalid_candidate"
    TOO_MANY_CANDIDATES = "too_many_candidates"
    TOO_MANY_STREAMS = "too_many_streams"
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN = "forbidden"
    RATE_LIMITED = "rate_limited"
    NEGOTIATION_TIMEOUT = "negotiation_timeout"
    PEER_FAILED = "peer_failed"
    #: in a cluster: messages to or from the node serving the stream were lost (retried)
    RELAY_FAILED = "relay_failed"
    SERVER_SHUTDOWN = "server_shutdown"
    INTERNAL_ERROR = "internal_error"


class MediaStreamError(Exception):
    """Base of every error raised on purpose by MediaStream."""


class ConfigError(MediaStreamError):
    """A configuration value is missing, unknown or invalid.

    Args:
        message: what is wrong, in words a person can act on.
        path: the file the value came from, if any.
        key: the dotted path of the key inside that file (``streams[2].source``).
    """

    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        self.reason = message
        self.path = path
        self.key = key
        where = ": ".join(part for part in (path, key) if part)
        super().__init__(f"{where}: {message}" if where else message)


class SignalingError(MediaStreamError):
    """A client message that can't be honoured.

    It is reported to the client as ``{"type": "error", "streamId": ..., "payload": message,
    "code": code}``; it never closes the socket by itself.
    """

    def __init__(self, code: ErrorCode, message: str, *, stream_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.stream_id = stream_id
        super().__init__(f"{code}: {message}")


class SourceError(MediaStreamError):
    """A media source could not be opened or read. The text never contains credentials."""


class SourceAccessDenied(SourceError):
    """The camera answered 401 or 403: retrying at the usual pace would only lock the account."""
