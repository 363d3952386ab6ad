"""Logging set-up: levels from ``--log-level``, plain text or one JSON object per line."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Final

#: Libraries that are chatty at INFO about every connection; kept at WARNING unless debugging.
CHATTY: Final = ("aioice", "aiortc", "hypercorn.error")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the traceback, if any);
    ``worker`` too in a worker of ``serve --workers N``."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, log_format: str = "text", *, worker: int | None = None) -> None:
    """``worker``: this process is worker K of ``serve --workers N``; its lines say so (the
    workers share the parent's stderr)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        who = "" if worker is None else f"[w{worker}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {who}%(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
