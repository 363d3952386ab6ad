"""Keeping camera credentials out of logs, errors, APIs and pages.

Cameras put credentials in the URL's user-info (``rtsp://admin:secret@host/``) and some in the
query (``?user=admin&password=secret``). Everything that shows a source goes through here.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK: Final = "***"
_SECRET_QUERY_KEYS: Final = frozenset(
    {"user", "username", "usr", "login", "password", "pass", "passwd", "pwd", "token",
     "auth", "key", "secret", "apikey", "api_key", "access_token"}
)  # fmt: skip
_USERINFO_IN_TEXT: Final = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]*@")


def redact_url(url: str) -> str:
    """``url`` with its user-info and credential-like query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """``text`` with the user-info of any URL in it replaced by ``***``."""
    return _USERINFO_IN_TEXT.sub(lambda m: f"{m['scheme']}{MASK}@", text)
