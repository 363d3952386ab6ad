"""The pages and their scripts (``web/static``), served so that a browser never runs stale ones."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Final

import trio
from quart import Blueprint, Response, abort, redirect, request
from quart.helpers import send_from_directory
from werkzeug.security import safe_join

DEFAULT_STATIC_DIR: Final = Path(__file__).resolve().parents[3] / "web" / "static"
_ASSET_REFERENCE: Final = re.compile(r'(?P<attr>(?:src|href)=")(?P<path>/static/[^"?#]+)(?P<end>")')


def pages_blueprint(static_dir: Path) -> Blueprint:
    """``/`` (the dashboard), ``/favicon.ico`` and ``/static/…`` from ``static_dir``."""
    pages = Blueprint("pages", __name__)
    assets = _StaticAssets(static_dir)

    @pages.route("/")
    async def index() -> Any:
        return redirect("/static/dashboard.html")

    @pages.route("/favicon.ico")
    async def favicon() -> Any:
        return redirect("/static/favicon.svg")

    @pages.route("/static/<path:filename>")
    async def static(filename: str) -> Any:
        return await assets.send(filename)

    return pages


class _StaticAssets:
    """Static files that a browser can never serve stale after an upgrade.

    Every response says ``Cache-Control: no-cache`` (the browser revalidates with its ETag and
    gets a cheap 304 when nothing changed), and the pages' references to ``/static/…`` carry a
    ``?v=<content hash>`` so a changed script is a new URL, even through caching proxies.
    """

    def __init__(self, root: Path) -> None:
        self._root = root
        self._hashes: dict[Path, tuple[float, str]] = {}

    async def send(self, filename: str) -> Response:
        path = await trio.to_thread.run_sync(self._resolve, filename)
        if path is None:
            abort(404)
        if path.suffix == ".html":
            body = await trio.to_thread.run_sync(self._versioned_page, path)
            response = Response(body, mimetype="text/html")
            response.set_etag(hashlib.sha256(body.encode()).hexdigest()[:32])
            await response.make_conditional(request)
        else:
            response = await send_from_directory(self._root, filename)
        # Quart's default is a 12-hour max-age: exactly the stale-script trap.
        response.headers["Cache-Control"] = "no-cache"
        return response

    def _resolve(self, filename: str) -> Path | None:
        joined = safe_join(str(self._root), filename)
        return Path(joined) if joined is not None and Path(joined).is_file() else None

    def _versioned_page(self, path: Path) -> str:
        def version(match: re.Match[str]) -> str:
            target = self._root / match["path"].removeprefix("/static/")
            digest = self._digest(target)
            suffix = f"?v={digest}" if digest else ""
            return f"{match['attr']}{match['path']}{suffix}{match['end']}"

        return _ASSET_REFERENCE.sub(version, path.read_text(encoding="utf-8"))

    def _digest(self, path: Path) -> str | None:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        cached = self._hashes.get(path)
        if cached is None or cached[0] != mtime:
            cached = (mtime, hashlib.sha256(path.read_bytes()).hexdigest()[:12])
            self._hashes[path] = cached
        return cached[1]
