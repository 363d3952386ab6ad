"""The server's moving parts, counted: what ``/api/stats`` and ``/metrics`` report.

Plain values only (no import of the parts they count), so that the API, the metrics and the
tests can all read them without importing one another.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import trio


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    open_sockets: int
    sockets_opened: int
    open_sessions: int
    sessions_per_socket: tuple[int, ...]
    open_peer_connections: int
    peer_connections_opened: int
    sources_running: int
    viewers: int
    #: every task in this Trio run (see :func:`task_names`)
    tasks: int
    #: the process's threads (reader threads, worker threads, the main thread)
    threads: int


def task_names() -> list[str]:
    """Every task in this Trio run, by name (for statistics and leak hunting).

    Call from inside the server's Trio run.
    """

    def walk(task: trio.lowlevel.Task) -> list[str]:
        names = [task.name]
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                names.extend(walk(child))
        return names

    root = trio.lowlevel.current_root_task()
    return walk(root) if root is not None else []


def thread_count() -> int:
    """The process's live threads."""
    return threading.active_count()
