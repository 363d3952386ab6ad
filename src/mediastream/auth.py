"""Access tokens: who may watch which streams, and who may administer the server.

Tokens are JWTs (PyJWT). HS256 with a shared secret (``security.jwt_secret``), or RS256/ES256
with a public key (``security.jwt_public_key_file``) when another system issues them. Claims:

    {"sub": "wall-3", "streams": ["lobby", "cam-*"], "admin": false, "exp": 1767225600}

``streams`` are stream ids or shell-style patterns (``*``, ``?``, ``[..]``); ``admin`` grants
the management API; ``exp`` is required. With no secret and no key configured the server is
*open*: everyone may watch everything (the demo), and it says so at start-up.

A browser can't set headers on a WebSocket, so a page passes its token as the ``token`` query
parameter of ``/ws`` (the server reads it at the upgrade, before accepting the socket, and
never logs it); HTTP clients may also use ``Authorization: Bearer``. A page can replace the
token of an open socket with an ``auth`` message before it expires.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import jwt

from .config import SecurityConfig
from .errors import ErrorCode, MediaStreamError

SYMMETRIC_ALGORITHMS: Final = ("HS256",)
ASYMMETRIC_ALGORITHMS: Final = ("RS256", "ES256")
CLOCK_LEEWAY: Final = 5.0  # seconds of clock difference tolerated with a token's issuer

#: Unix time in seconds; injectable so tests needn't wait on the wall clock.
Clock = Callable[[], float]


class AuthError(MediaStreamError):
    """A token is missing, invalid or expired. ``code`` is sent to the client."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one token allows."""

    streams: tuple[str, ...]
    admin: bool = False
    expires_at: float | None = None  # Unix time
    subject: str | None = None

    def allows(self, stream_id: str) -> bool:
        return any(fnmatch.fnmatchcase(stream_id, pattern) for pattern in self.streams)

    def expired(self, now: float) -> bool:
        """Whether the token has expired at ``now`` (Unix time), leeway included: the same
        rule that admitted it, so a token let in inside the leeway is not refused later."""
        return self.expires_at is not None and now >= self.expires_at + CLOCK_LEEWAY


#: What everyone holds when no secret is configured.
OPEN_GRANT: Final = Grant(streams=("*",), admin=True)


class Authenticator:
    """Checks and issues tokens according to ``[security]``.

    Args:
        clock: the time every expiry is judged by, at admission and afterwards.
    """

    def __init__(self, config: SecurityConfig, clock: Clock = time.time) -> None:
        self._secret = config.jwt_secret or _read(config.jwt_secret_file)
        self._public_key = _read(config.jwt_public_key_file)
        self.enabled = bool(self._secret or self._public_key)
        self.clock = clock

    def expired(self, grant: Grant) -> bool:
        """Whether ``grant`` has expired by now (see :meth:`Grant.expired`)."""
        return grant.expired(self.clock())

    def verify(self, token: str | None) -> Grant:
        """The grant a token carries.

        Raises:
            AuthError: ``unauthorized`` (missing, malformed, tampered, wrong key) or
                ``token_expired``.
        """
        if not self.enabled:
            return OPEN_GRANT
        if not token:
            raise AuthError(ErrorCode.UNAUTHORIZED, "This server needs an access token")
        key, algorithms = (
            (self._secret, SYMMETRIC_ALGORITHMS)
            if self._secret
            else (self._public_key, ASYMMETRIC_ALGORITHMS)
        )
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
            if algorithm not in algorithms:
                # Checked before PyJWT touches the key: an unexpected algorithm is refused
                # outright (no key confusion, no warnings about key sizes for it).
                raise AuthError(
                    ErrorCode.UNAUTHORIZED, f"Invalid access token: algorithm {algorithm!r}"
                )
            claims = jwt.decode(
                token,
                key,
                algorithms=list(algorithms),
                leeway=CLOCK_LEEWAY,
                # Expiry is judged below by this authenticator's clock, as it is later.
                options={"require": ["exp"], "verify_exp": False},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(ErrorCode.UNAUTHORIZED, f"Invalid access token: {exc}") from None
        grant = _grant_from(claims)
        if self.expired(grant):
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "The access token has expired")
        return grant

    def issue(
        self,
        streams: Sequence[str],
        ttl: float,
        *,
        admin: bool = False,
        subject: str | None = None,
    ) -> str:
        """A new HS256 token (needs ``jwt_secret``)."""
        if not self._secret:
            raise AuthError(
                ErrorCode.UNAUTHORIZED, "Issuing tokens needs security.jwt_secret in the config"
            )
        now = int(self.clock())
        claims: dict[str, Any] = {"streams": list(streams), "iat": now, "exp": now + int(ttl)}
        if admin:
            claims["admin"] = True
        if subject:
            claims["sub"] = subject
        return jwt.encode(claims, self._secret, algorithm="HS256")


def _grant_from(claims: dict[str, Any]) -> Grant:
    streams = claims.get("streams", [])
    if isinstance(streams, str):
        streams = [streams]
    if not isinstance(streams, list) or not all(isinstance(s, str) for s in streams):
        raise AuthError(ErrorCode.UNAUTHORIZED, 'The token\'s "streams" must be a list of ids')
    subject = claims.get("sub")
    expires_at = claims["exp"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
        raise AuthError(ErrorCode.UNAUTHORIZED, 'The token\'s "exp" must be a number')
    return Grant(
        streams=tuple(streams),
        admin=claims.get("admin") is True,
        expires_at=float(expires_at),
        subject=subject if isinstance(subject, str) else None,
    )


def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip() if path else ""


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, if any."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"12h"``, ``"7d"``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise ValueError(f'"{text}" is not a duration such as 90s, 15m, 12h or 7d') from None
