"""Access tokens: what a token grants, and every way a token is refused."""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mediastream.auth import (
    CLOCK_LEEWAY,
    OPEN_GRANT,
    Authenticator,
    AuthError,
    Grant,
    bearer_token,
    parse_duration,
)
from mediastream.config import SecurityConfig
from mediastream.errors import ErrorCode

SECRET = "s" * 40


def hs256() -> Authenticator:
    return Authenticator(SecurityConfig(jwt_secret=SECRET))


def test_without_a_secret_everyone_holds_the_open_grant() -> None:
    authenticator = Authenticator(SecurityConfig())
    assert not authenticator.enabled
    assert authenticator.verify(None) is OPEN_GRANT
    assert OPEN_GRANT.allows("anything") and OPEN_GRANT.admin


def test_an_issued_token_verifies_to_its_grant() -> None:
    grant = hs256().verify(hs256().issue(["lobby", "cam-*"], 60, admin=True, subject="wall"))
    assert grant.streams == ("lobby", "cam-*") and grant.admin and grant.subject == "wall"
    assert grant.allows("lobby") and grant.allows("cam-7") and not grant.allows("cam")
    assert not grant.expired(time.time()) and grant.expired(time.time() + 120)


def test_a_token_admitted_inside_the_leeway_is_not_expired_afterwards() -> None:
    """One notion of time: the leeway that admitted a token applies to later checks too."""
    now = 1_800_000_000.0
    authenticator = Authenticator(SecurityConfig(jwt_secret=SECRET), clock=lambda: now)
    token = jwt.encode({"streams": ["*"], "exp": int(now) - 2}, SECRET)  # 2 s past, leeway 5 s
    grant = authenticator.verify(token)
    assert not authenticator.expired(grant)
    now += CLOCK_LEEWAY
    assert authenticator.expired(grant)
    with pytest.raises(AuthError) as refused:
        authenticator.verify(token)
    assert refused.value.code is ErrorCode.TOKEN_EXPIRED


def test_an_exp_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(AuthError) as refused:
        hs256().verify(jwt.encode({"streams": ["*"], "exp": "tomorrow"}, SECRET))
    assert refused.value.code is ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize(
    ("token", "code"),
    [
        (None, ErrorCode.UNAUTHORIZED),
        ("", ErrorCode.UNAUTHORIZED),
        ("not.a.jwt", ErrorCode.UNAUTHORIZED),
        (jwt.encode({"streams": ["*"]}, SECRET), ErrorCode.UNAUTHORIZED),  # no exp
        (jwt.encode({"streams": ["*"], "exp": 1}, SECRET), ErrorCode.TOKEN_EXPIRED),
        (jwt.encode({"streams": ["*"], "exp": 2**31}, "x" * 40), ErrorCode.UNAUTHORIZED),
        (jwt.encode({"streams": 5, "exp": 2**31}, SECRET), ErrorCode.UNAUTHORIZED),
        (
            jwt.encode({"streams": ["*"], "exp": 2**31}, SECRET * 2, algorithm="HS512"),
            ErrorCode.UNAUTHORIZED,  # an algorithm the server does not take
        ),
    ],
)
def test_bad_tokens_are_refused_with_a_code(token: str | None, code: ErrorCode) -> None:
    with pytest.raises(AuthError) as refused:
        hs256().verify(token)
    assert refused.value.code == code


def test_rs256_tokens_from_another_issuer_and_no_algorithm_confusion(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "issuer.pem").write_bytes(public_pem)
    authenticator = Authenticator(SecurityConfig(jwt_public_key_file=str(tmp_path / "issuer.pem")))
    good = jwt.encode({"streams": ["door"], "exp": 2**31}, key, algorithm="RS256")
    assert authenticator.verify(good).allows("door")
    # An HS256 token "signed" with the public key must not pass as the issuer's.
    signing_input = (
        jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
        + b"."
        + jwt.utils.base64url_encode(b'{"streams":["*"],"exp":2147483648}')
    )
    mac = hmac.new(public_pem, signing_input, hashlib.sha256).digest()
    forged = (signing_input + b"." + jwt.utils.base64url_encode(mac)).decode()
    with pytest.raises(AuthError):
        authenticator.verify(forged)
    with pytest.raises(AuthError, match="jwt_secret"):
        authenticator.issue(["*"], 60)


def test_a_single_stream_string_claim_is_accepted() -> None:
    grant = hs256().verify(jwt.encode({"streams": "lobby", "exp": 2**31}, SECRET))
    assert grant == Grant(streams=("lobby",), expires_at=2**31)


def test_bearer_header_and_durations() -> None:
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token(None) is None
    assert [parse_duration(t) for t in ("90", "90s", "15m", "12h", "7d")] == [
        90,
        90,
        900,
        43200,
        604800,
    ]
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
