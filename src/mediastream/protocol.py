"""The signaling protocol on ``/ws``: parsing client messages, building server messages.

No I/O here. Every message on the wire is a JSON object ``{"type", "streamId", "payload"}``
(``docs/protocol.md`` is the reference). Client messages are parsed once, at the edge, into
the frozen dataclasses below; whatever fails to parse raises :class:`SignalingError`, which
the socket turns into an ``error`` message for that stream.

Wire names (``streamId``, ``sdpMid``, ``sdpMLineIndex``) appear only in this module.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from .errors import ErrorCode, SignalingError

STREAM_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
SESSION_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
#: A page's shared peer connection, in the envelope's ``streamId``: ``~`` and then what a
#: session id may hold, so it can never be a stream's id (those start with a letter or digit).
PEER_ID_PATTERN: Final = re.compile(r"^~[A-Za-z0-9_.:-]{1,64}$")
#: m-lines one shared peer connection's offer may map to streams (the stream limit of the
#: socket bounds the streams; this bounds the message before that is checked).
MAX_PEER_SECTIONS: Final = 512
MID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,32}$")
MAX_CANDIDATE_CHARS: Final = 1024


@dataclass(frozen=True, slots=True)
class Tile:
    """Where a stream is shown: its element's rendered size in device pixels, and whether it
    can be seen at all (on screen, page visible)."""

    width: int
    height: int
    visible: bool = True


@dataclass(frozen=True, slots=True)
class QualityRequest:
    """``quality``: which of the stream's qualities this viewer wants (a name, or ``"auto"``:
    the server chooses from the tile and the network), and/or its tile now. What is left out
    stays as it was."""

    stream_id: str
    quality: str | None = None
    tile: Tile | None = None
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Offer:
    """``offer``: the browser's SDP offer for one stream.

    ``session_id`` is optional and chosen by the client; the server echoes it in every message
    about this session so a client can tell a late message of an old session from the new one.
    ``quality`` and ``tile`` (optional, as in ``quality``) say where the viewer starts.
    """

    stream_id: str
    sdp: str
    session_id: str | None = None
    quality: str | None = None
    tile: Tile | None = None


@dataclass(frozen=True, slots=True)
class IceCandidate:
    """``ice``: one trickled candidate; ``candidate is None`` means end of candidates."""

    stream_id: str
    candidate: str | None
    sdp_mid: str | None
    sdp_mline_index: int | None
    #: when given, a candidate for another session of this stream is ignored.
    session_id: str | None = None


@dataclass(frozen=True, slots=True)
class Close:
    """``close``: end this stream's sessions now (the browser's ``unregisterStream``).

    With ``fallback_only`` (``payload.fallback: true``) only the stream's fallback ends: the
    page is back on WebRTC, whose session carries on.
    """

    stream_id: str
    fallback_only: bool = False


@dataclass(frozen=True, slots=True)
class Ping:
    """``ping``: echoed as ``pong`` with the same payload, for round-trip measurements."""

    payload: Any


@dataclass(frozen=True, slots=True)
class Auth:
    """``auth``: replace this socket's access token (before the old one expires)."""

    token: str


@dataclass(frozen=True, slots=True)
class Fallback:
    """``fallback``: send this stream over the socket as fragmented MP4 (binary messages), for a
    browser whose peer connection can't connect; ``close`` ends it. It runs beside the stream's
    WebRTC session, so a page can retry WebRTC while it plays.

    ``audio_codecs``: the RFC 6381 audio codec strings the browser's Media Source Extensions
    take (``payload.audio``, e.g. ``["opus", "mp4a.40.2"]``); the stream's audio is sent if it
    is one of them. Empty: video only.

    ``quality`` and ``tile`` (optional, as in an offer) say which quality it starts on; later
    ``quality`` messages move it.
    """

    stream_id: str
    audio_codecs: tuple[str, ...] = ()
    quality: str | None = None
    tile: Tile | None = None


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """``offer`` to a page's shared peer connection (``streamId`` is its ``~`` id): the whole
    connection's SDP, every m-line the page plays mapped to its stream (``payload.streams``,
    mid → streamId). m-lines that are gone or stopped (port 0) end their streams' sessions;
    new ones start theirs."""

    peer_id: str
    sdp: str
    streams: dict[str, str]


@dataclass(frozen=True, slots=True)
class PeerApplied:
    """``applied``: the page has applied the shared connection's last answer, so the streams
    it added may start sending (a keyframe sent before that is lost in Chromium)."""

    peer_id: str


ClientMessage = (
    Offer | IceCandidate | Close | Ping | Auth | Fallback | QualityRequest | PeerOffer | PeerApplied
)

CLIENT_MESSAGE_TYPES: Final = (
    "offer",
    "ice",
    "close",
    "ping",
    "auth",
    "fallback",
    "quality",
    "applied",
)
PEER_MESSAGE_TYPES: Final = ("offer", "applied", "ice", "close")
MAX_TOKEN_CHARS: Final = 8192
#: a quality's name as a page may send it (the configuration's rule), or "auto"
QUALITY_PATTERN: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
MAX_TILE_PIXELS: Final = 32768  # per side: beyond any screen, device pixels included
MAX_AUDIO_CODECS: Final = 8  # codec strings a fallback request may list
MAX_CODEC_CHARS: Final = 40


def parse_client_message(text: str | bytes, *, max_sdp_bytes: int) -> ClientMessage:
    """Parse and validate one client message.

    Args:
        text: the WebSocket message as received.
        max_sdp_bytes: the largest SDP accepted in an offer.

    Raises:
        SignalingError: naming what was wrong; ``stream_id`` is set whenever the message
            named a usable stream id, so the error can be routed to that stream.
    """
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SignalingError(ErrorCode.INVALID_JSON, f"Message is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f"Message must be a JSON object, got {type(raw).__name__}",
        )

    message_type = raw.get("type")
    payload = raw.get("payload")
    top = raw.get("streamId")
    if isinstance(top, str) and top.startswith("~"):
        return _parse_peer_message(top, message_type, payload, max_sdp_bytes=max_sdp_bytes)
    stream_id = _stream_id_of(raw, payload)

    if not isinstance(message_type, str):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE, 'Message has no "type" string', stream_id=stream_id
        )
    if message_type == "ping":
        return Ping(payload)
    if message_type == "auth":
        token = payload.get("token") if isinstance(payload, dict) else None
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_CHARS:
            raise SignalingError(
                ErrorCode.INVALID_MESSAGE, 'auth payload needs a "token" string', stream_id=None
            )
        return Auth(token)
    if message_type not in CLIENT_MESSAGE_TYPES:
        raise SignalingError(
            ErrorCode.UNKNOWN_TYPE,
            f'Unknown message type "{message_type[:40]}"; expected one of '
            + ", ".join(CLIENT_MESSAGE_TYPES),
            stream_id=stream_id,
        )
    if stream_id is None:
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f'"{message_type}" needs a "streamId" (top level, or payload.streamId for offers)',
        )
    if message_type == "offer":
        return _parse_offer(stream_id, payload, max_sdp_bytes=max_sdp_bytes)
    if message_type == "ice":
        return _parse_ice(stream_id, payload)
    if message_type == "fallback":
        return _parse_fallback(stream_id, payload)
    if message_type == "applied":
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            '"applied" is for a shared peer connection (a "streamId" starting with "~")',
            stream_id=stream_id,
        )
    if message_type == "quality":
        return _parse_quality(stream_id, payload)
    return _parse_close(stream_id, payload)


def _parse_peer_message(
    peer_id: str, message_type: Any, payload: Any, *, max_sdp_bytes: int
) -> PeerOffer | PeerApplied | IceCandidate | Close:
    """A message to a page's shared peer connection; errors name it (``streamId`` ``~…``)."""
    if not PEER_ID_PATTERN.fullmatch(peer_id):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'A shared peer connection\'s id is "~" and 1-64 letters, digits or "_.:-"; got '
            f"{_clip(peer_id)!r}",
        )
    if message_type not in PEER_MESSAGE_TYPES:
        raise SignalingError(
            ErrorCode.UNKNOWN_TYPE,
            f"Unknown message type {_clip(message_type)!r} for a shared peer connection; "
            "expected one of " + ", ".join(PEER_MESSAGE_TYPES),
            stream_id=peer_id,
        )
    if message_type == "applied":
        return PeerApplied(peer_id)
    if message_type == "close":
        return Close(peer_id)
    if message_type == "ice":
        return _parse_ice(peer_id, payload)
    offer = _parse_offer(peer_id, payload, max_sdp_bytes=max_sdp_bytes)
    streams = payload.get("streams")
    if (
        not isinstance(streams, dict)
        or len(streams) > MAX_PEER_SECTIONS
        or not all(
            isinstance(mid, str) and MID_PATTERN.fullmatch(mid) and _valid_stream_id(stream)
            for mid, stream in streams.items()
        )
    ):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            "offer payload.streams must map each m-line's mid (1-32 letters, digits, "
            f'"_.:-") to a stream id, at most {MAX_PEER_SECTIONS} of them',
            stream_id=peer_id,
        )
    return PeerOffer(peer_id, offer.sdp, dict(streams))


def _parse_fallback(stream_id: str, payload: Any) -> Fallback:
    if payload is None:
        return Fallback(stream_id)
    if not isinstance(payload, dict):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'fallback payload must be an object with optional "audio", "quality" and "tile"',
            stream_id=stream_id,
        )
    audio = payload.get("audio", [])
    if (
        not isinstance(audio, list)
        or len(audio) > MAX_AUDIO_CODECS
        or not all(isinstance(c, str) and 0 < len(c) <= MAX_CODEC_CHARS for c in audio)
    ):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f"fallback payload.audio must be a list of at most {MAX_AUDIO_CODECS} codec strings "
            f"(1-{MAX_CODEC_CHARS} characters each)",
            stream_id=stream_id,
        )
    return Fallback(
        stream_id,
        tuple(audio),
        quality=_quality_of(payload, stream_id),
        tile=_tile_of(payload, stream_id),
    )


def _parse_close(stream_id: str, payload: Any) -> Close:
    fallback_only = payload.get("fallback", False) if isinstance(payload, dict) else False
    if not isinstance(fallback_only, bool):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            "close payload.fallback must be true or false",
            stream_id=stream_id,
        )
    return Close(stream_id, fallback_only)


def _stream_id_of(raw: dict[str, Any], payload: Any) -> str | None:
    """The message's stream id: top level first, then ``payload.streamId`` (legacy offers)."""
    top = raw.get("streamId")
    nested = payload.get("streamId") if isinstance(payload, dict) else None
    if top is None:
        top = nested
    elif nested is not None and nested != top:
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f'"streamId" is "{_clip(top)}" but payload.streamId is "{_clip(nested)}"',
            stream_id=top if _valid_stream_id(top) else None,
        )
    if top is None:
        return None
    if not _valid_stream_id(top):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f'"streamId" must be 1-128 characters of letters, digits, "_.:-"; got {_clip(top)!r}',
        )
    assert isinstance(top, str)
    return top


def _valid_stream_id(value: Any) -> bool:
    return isinstance(value, str) and STREAM_ID_PATTERN.fullmatch(value) is not None


def _parse_offer(stream_id: str, payload: Any, *, max_sdp_bytes: int) -> Offer:
    if not isinstance(payload, dict):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'offer payload must be an object with "sdp"',
            stream_id=stream_id,
        )
    sdp = payload.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise SignalingError(
            ErrorCode.INVALID_SDP, 'offer payload has no "sdp" string', stream_id=stream_id
        )
    if len(sdp.encode()) > max_sdp_bytes:
        raise SignalingError(
            ErrorCode.INVALID_SDP,
            f"offer SDP is {len(sdp.encode())} bytes; the limit is {max_sdp_bytes}",
            stream_id=stream_id,
        )
    if not sdp.startswith("v=0"):
        raise SignalingError(
            ErrorCode.INVALID_SDP, 'offer SDP must start with "v=0"', stream_id=stream_id
        )
    sdp_type = payload.get("type", "offer")
    if sdp_type != "offer":
        raise SignalingError(
            ErrorCode.INVALID_SDP,
            f'offer payload.type must be "offer", got {_clip(sdp_type)!r}',
            stream_id=stream_id,
        )
    return Offer(
        stream_id=stream_id,
        sdp=sdp,
        session_id=_session_id_of(payload, stream_id),
        quality=_quality_of(payload, stream_id),
        tile=_tile_of(payload, stream_id),
    )


def quality_fields(payload: dict[str, Any], stream_id: str) -> tuple[str | None, Tile | None]:
    """An offer's (or a relayed offer's) ``quality`` and ``tile``, validated.

    Raises:
        SignalingError: naming the field that is wrong.
    """
    return _quality_of(payload, stream_id), _tile_of(payload, stream_id)


def tile_json(tile: Tile) -> dict[str, Any]:
    return {"width": tile.width, "height": tile.height, "visible": tile.visible}


def _parse_quality(stream_id: str, payload: Any) -> QualityRequest:
    if not isinstance(payload, dict):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'quality payload must be an object with "quality" and/or "tile"',
            stream_id=stream_id,
        )
    quality, tile = _quality_of(payload, stream_id), _tile_of(payload, stream_id)
    if quality is None and tile is None:
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'quality payload needs "quality" (a name or "auto") or "tile" (or both)',
            stream_id=stream_id,
        )
    return QualityRequest(stream_id, quality, tile, _session_id_of(payload, stream_id))


def _quality_of(payload: dict[str, Any], stream_id: str) -> str | None:
    quality = payload.get("quality")
    if quality is not None and not (
        isinstance(quality, str) and QUALITY_PATTERN.fullmatch(quality)
    ):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            f'payload.quality must be a quality\'s name or "auto", got {_clip(quality)!r}',
            stream_id=stream_id,
        )
    return quality


def _tile_of(payload: dict[str, Any], stream_id: str) -> Tile | None:
    tile = payload.get("tile")
    if tile is None:
        return None
    if not isinstance(tile, dict):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'payload.tile must be an object {"width", "height", "visible"}',
            stream_id=stream_id,
        )
    sides = []
    for side in ("width", "height"):
        value = tile.get(side)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 <= value <= MAX_TILE_PIXELS
        ):
            raise SignalingError(
                ErrorCode.INVALID_MESSAGE,
                f"payload.tile.{side} must be a number of device pixels from 0 to "
                f"{MAX_TILE_PIXELS}, got {_clip(value)!r}",
                stream_id=stream_id,
            )
        sides.append(round(value))
    visible = tile.get("visible", True)
    if not isinstance(visible, bool):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            "payload.tile.visible must be true or false",
            stream_id=stream_id,
        )
    return Tile(sides[0], sides[1], visible)


def _session_id_of(payload: dict[str, Any], stream_id: str) -> str | None:
    session_id = payload.get("sessionId")
    if session_id is not None and not (
        isinstance(session_id, str) and SESSION_ID_PATTERN.fullmatch(session_id)
    ):
        raise SignalingError(
            ErrorCode.INVALID_MESSAGE,
            'payload.sessionId must be 1-64 characters of letters, digits, "_.:-"',
            stream_id=stream_id,
        )
    return session_id


def _parse_ice(stream_id: str, payload: Any) -> IceCandidate:
    if payload is None:
        return IceCandidate(stream_id, None, None, None)
    if not isinstance(payload, dict):
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            'ice payload must be an object with "candidate", or null',
            stream_id=stream_id,
        )
    candidate = payload.get("candidate")
    sdp_mid = payload.get("sdpMid")
    sdp_mline_index = payload.get("sdpMLineIndex")
    if candidate is not None and not isinstance(candidate, str):
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            "ice payload.candidate must be a string or null",
            stream_id=stream_id,
        )
    if candidate is not None and len(candidate) > MAX_CANDIDATE_CHARS:
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            f"ice payload.candidate is longer than {MAX_CANDIDATE_CHARS} characters",
            stream_id=stream_id,
        )
    if sdp_mid is not None and not isinstance(sdp_mid, str):
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            "ice payload.sdpMid must be a string or null",
            stream_id=stream_id,
        )
    if sdp_mline_index is not None and (
        isinstance(sdp_mline_index, bool)
        or not isinstance(sdp_mline_index, int)
        or not 0 <= sdp_mline_index < 1024
    ):
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            "ice payload.sdpMLineIndex must be an integer from 0 to 1023, or null",
            stream_id=stream_id,
        )
    if candidate is not None and candidate.strip() == "":
        candidate = None  # the browser's end-of-candidates
    if candidate is not None and sdp_mid is None and sdp_mline_index is None:
        raise SignalingError(
            ErrorCode.INVALID_CANDIDATE,
            "ice payload needs sdpMid or sdpMLineIndex to say which media it belongs to",
            stream_id=stream_id,
        )
    return IceCandidate(
        stream_id, candidate, sdp_mid, sdp_mline_index, _session_id_of(payload, stream_id)
    )


def _clip(value: Any, limit: int = 40) -> str:
    text = value if isinstance(value, str) else json.dumps(value)[:limit]
    return text if len(text) <= limit else text[:limit] + "…"


# --- server → client -------------------------------------------------------------------------


def encode(message_type: str, stream_id: str | None, payload: Any, **extra: Any) -> str:
    """One server message as JSON; ``extra`` adds top-level fields (``code``, ``sessionId``)."""
    message: dict[str, Any] = {"type": message_type, "streamId": stream_id, "payload": payload}
    message.update((key, value) for key, value in extra.items() if value is not None)
    return json.dumps(message, separators=(",", ":"))


def answer(stream_id: str, sdp: str, session_id: str | None = None) -> str:
    return encode("answer", stream_id, sdp, sessionId=session_id)


def error(
    code: ErrorCode,
    message: str,
    stream_id: str | None,
    session_id: str | None = None,
    member: str | None = None,
) -> str:
    """``member``: on a shared peer connection (``stream_id`` its ``~`` id), the stream the
    error is about (top-level ``stream``); None when it is about the whole connection."""
    return encode("error", stream_id, message, code=str(code), sessionId=session_id, stream=member)


def state(
    stream_id: str,
    state_name: str,
    detail: str | None = None,
    session_id: str | None = None,
    member: str | None = None,
) -> str:
    payload: dict[str, Any] = {"state": state_name}
    if detail:
        payload["detail"] = detail
    if member is not None:
        payload["stream"] = member
    return encode("state", stream_id, payload, sessionId=session_id)


def quality(
    stream_id: str,
    playing: str,
    *,
    requested: str,
    reason: str,
    qualities: list[dict[str, Any]],
    session_id: str | None = None,
) -> str:
    """Which quality the viewer is playing now (after the answer, and on every change)."""
    payload = {"quality": playing, "requested": requested, "reason": reason, "qualities": qualities}
    return encode("quality", stream_id, payload, sessionId=session_id)


def pong(payload: Any) -> str:
    return encode("pong", None, payload)


def welcome(payload: dict[str, Any]) -> str:
    return encode("welcome", None, payload)


def authenticated(expires_at: float | None) -> str:
    return encode("auth", None, {"ok": True, "expiresAt": expires_at})
