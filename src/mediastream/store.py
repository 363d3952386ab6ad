"""Where changes made through the management API are kept: SQLite, in ``server.data_dir``.

Why SQLite beside the config file rather than rewriting the file: the TOML file is the
operator's, with their comments and layout, and a program rewriting it would lose both. So
the file stays the starting point, and the database records what the API changed on top of
it: streams added or edited (their whole definition), streams deleted (a tombstone), streams
stopped. At start-up the server applies those records to the file's streams. Remove a stream
from the database (``DELETE``-then-re-add, or delete the file) to fall back to the file.

Blocking ``sqlite3`` calls: callers run them in a worker thread (:class:`LocalStreamChanges`
does, for the API).

The API records its changes through a :class:`StreamChanges`: :class:`LocalStreamChanges` (this
file) in a single process; in a cluster, ``cluster.stream_store.SharedStreamStore`` (Redis,
seen by every node), which may refuse a change (:class:`ChangeRefused`).
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

import trio

from .errors import ErrorCode, MediaStreamError

SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS streams (
    id TEXT PRIMARY KEY,
    definition TEXT,               -- JSON of the stream's table; NULL: the config file's
    deleted INTEGER NOT NULL DEFAULT 0,
    enabled INTEGER NOT NULL DEFAULT 1,
    updated REAL NOT NULL
)
"""


@dataclass(frozen=True, slots=True)
class StoredStream:
    id: str
    definition: dict[str, Any] | None
    deleted: bool
    enabled: bool


class StreamStore:
    """The API's stream changes, in ``<data_dir>/streams.sqlite3``.

    Args:
        data_dir: created if missing.
    """

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / "streams.sqlite3"
        with self._connect() as db:
            db.execute(SCHEMA)

    def load(self) -> list[StoredStream]:
        with self._connect() as db:
            rows = db.execute("SELECT id, definition, deleted, enabled FROM streams").fetchall()
        return [
            StoredStream(
                id=row[0],
                definition=json.loads(row[1]) if row[1] is not None else None,
                deleted=bool(row[2]),
                enabled=bool(row[3]),
            )
            for row in rows
        ]

    def save(self, stream_id: str, definition: dict[str, Any], *, enabled: bool = True) -> None:
        """Record a stream added or edited through the API."""
        self._upsert(stream_id, json.dumps(definition), deleted=False, enabled=enabled)

    def delete(self, stream_id: str) -> None:
        """Record that a stream was deleted (also hides one defined in the config file)."""
        self._upsert(stream_id, None, deleted=True, enabled=True)

    def set_enabled(self, stream_id: str, enabled: bool) -> None:
        with self._connect() as db:
            updated = db.execute(
                "UPDATE streams SET enabled = ?, updated = ? WHERE id = ?",
                (int(enabled), time.time(), stream_id),
            ).rowcount
            if not updated:
                db.execute(
                    "INSERT INTO streams (id, definition, deleted, enabled, updated) "
                    "VALUES (?, NULL, 0, ?, ?)",
                    (stream_id, int(enabled), time.time()),
                )

    def _upsert(
        self, stream_id: str, definition: str | None, *, deleted: bool, enabled: bool
    ) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT INTO streams (id, definition, deleted, enabled, updated) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                "definition = excluded.definition, deleted = excluded.deleted, "
                "enabled = excluded.enabled, updated = excluded.updated",
                (stream_id, definition, int(deleted), int(enabled), time.time()),
            )

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=5)) as db, db:
            yield db


class ChangeRefused(MediaStreamError):
    """A change the store would not record; the API answers ``status`` with ``code``."""

    status = 500
    code = ErrorCode.INTERNAL_ERROR


class StreamChanged(ChangeRefused):
    """Another node changed the stream since this node last saw it (a cluster only)."""

    status = 409
    code = ErrorCode.STREAM_CHANGED


class StoreUnavailable(ChangeRefused):
    """The shared store cannot be reached (a cluster whose Redis is down)."""

    status = 503
    code = ErrorCode.CLUSTER_UNAVAILABLE


class StreamChanges(Protocol):
    """Where the management API records a change before making it in the registry.

    The API holds :attr:`lock` from its check of the registry to its change of it; whatever
    else changes the registry on the store's behalf (another node's change, in a cluster)
    holds it too, so a check stays true until the change it guards is made.

    Raises (every method): :class:`ChangeRefused` (a subclass) when it is not recorded.
    """

    lock: trio.Lock

    async def save(
        self, stream_id: str, definition: dict[str, Any], *, enabled: bool = True
    ) -> None: ...

    async def delete(self, stream_id: str) -> None: ...

    async def set_enabled(self, stream_id: str, enabled: bool) -> None: ...


class LocalStreamChanges:
    """:class:`StreamChanges` of a single process: its :class:`StreamStore`, in a thread.

    Never refuses a change (an SQLite error is a bug or a full disk: a 500).
    """

    def __init__(self, store: StreamStore) -> None:
        self.store = store
        self.lock = trio.Lock()

    async def save(
        self, stream_id: str, definition: dict[str, Any], *, enabled: bool = True
    ) -> None:
        await trio.to_thread.run_sync(
            functools.partial(self.store.save, stream_id, definition, enabled=enabled)
        )

    async def delete(self, stream_id: str) -> None:
        await trio.to_thread.run_sync(self.store.delete, stream_id)

    async def set_enabled(self, stream_id: str, enabled: bool) -> None:
        await trio.to_thread.run_sync(self.store.set_enabled, stream_id, enabled)
