"""``mediastream serve --workers N``: N cluster nodes on one machine behind one HTTP port.

    supervise                   the parent: binds the HTTP socket once, serves nothing itself
    └── nursery
        └── keep_worker × N     ``python -m mediastream serve … --worker K --listen-fd FD``:
                                restarted when it dies (backoff 0.5 s … 30 s, logged)

Each worker is a whole MediaStream server and a whole cluster node (its own node id
``…-wK``, registry, aiortc peers and so its own UDP ports, Redis pool and inbox); they
cooperate through the configured Redis exactly as nodes on different machines do.

The parent binds and listens on the HTTP socket, and every worker accepts on that same
socket (inherited, Hypercorn's ``fd://`` bind), rather than each worker binding its own with
``SO_REUSEPORT``: one accept queue, so a connection waits for whichever worker is free
instead of being hashed onto a busy or dead worker's queue (with ``SO_REUSEPORT`` the
connections queued on a worker that dies are reset); the port is bound once, so port 0 and
"address in use" behave as for one process; and no other process of the same user can join
the port. The cost: a worker blocked for a moment accepts nothing, which is what one wants.

Signals: SIGTERM or SIGINT to the parent is forwarded once to every worker (they run in
their own sessions, so a terminal's Ctrl-C reaches them only through the parent), and the
parent waits for them: each drains (hands its streams over to the other workers), closes
its sockets and exits. A worker still running after ``cluster.drain_timeout`` +
``server.graceful_timeout`` + a margin is killed. Each worker also holds the read end of a
pipe whose write end only the parent holds: if the parent dies without a word (SIGKILL),
the workers see the pipe close and shut down, leaving no orphan serving the port.

Exit status: 0 when every worker stopped cleanly after a signal; 2 when a worker reported a
configuration error (restarting it would not help, so all stop); 1 otherwise.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Final

import trio

from .config import Config
from .server import RunningServer

log = logging.getLogger("mediastream.workers")

#: a worker that dies is started again after this, doubled while it keeps dying young.
RESTART_DELAY: Final = 0.5  # seconds
RESTART_DELAY_MAX: Final = 30.0  # seconds
#: a worker that ran this long before dying is restarted after the shortest delay again.
STABLE_AFTER: Final = 30.0  # seconds
#: beyond the drain and the graceful shutdown, how long the parent waits before SIGKILL.
STOP_MARGIN: Final = 5.0  # seconds
#: a worker's exit status for a configuration error (``cli.main``): not restarted.
CONFIG_ERROR_STATUS: Final = 2
LISTEN_BACKLOG: Final = 1024


@dataclass
class _Supervisor:
    config: Config
    #: the ``serve`` arguments every worker gets (the configuration, its overrides)
    serve_args: list[str]
    listen_fd: int
    alive_fd: int
    workers: dict[int, trio.Process] = field(default_factory=dict)
    stopping: trio.Event = field(default_factory=trio.Event)
    status: int = 0

    def command(self, index: int) -> list[str]:
        return [
            sys.executable, "-m", "mediastream", "serve", *self.serve_args,
            "--worker", str(index), "--listen-fd", str(self.listen_fd),
            "--alive-fd", str(self.alive_fd),
        ]  # fmt: skip

    async def keep_worker(self, index: int) -> None:
        """Run worker ``index``, and start it again whenever it dies, until stopping."""
        young_deaths = 0
        while not self.stopping.is_set():
            began = trio.current_time()
            process = await trio.lowlevel.open_process(
                self.command(index),
                pass_fds=(self.listen_fd, self.alive_fd),
                start_new_session=True,
            )
            self.workers[index] = process
            log.info("worker %d started (pid %d)", index, process.pid)
            if self.stopping.is_set():  # stop() came while it was being started
                process.send_signal(signal.SIGTERM)
            await process.wait()
            if self.stopping.is_set():
                return
            status = process.returncode
            if status == CONFIG_ERROR_STATUS:
                log.error("worker %d reported a configuration error; stopping all", index)
                self.status = CONFIG_ERROR_STATUS
                self.stop(signal.SIGTERM)
                return
            ran = trio.current_time() - began
            young_deaths = 0 if ran >= STABLE_AFTER else young_deaths + 1
            delay = min(RESTART_DELAY * 2 ** max(young_deaths - 1, 0), RESTART_DELAY_MAX)
            log.warning(
                "worker %d (pid %d) %s after %.1f s; starting it again in %.1f s",
                index, process.pid, _describe_exit(status), ran, delay,
            )  # fmt: skip
            with trio.move_on_after(delay):
                await self.stopping.wait()

    def stop(self, signum: int) -> None:
        """Forward ``signum`` to every running worker, once; no more restarts."""
        if self.stopping.is_set():
            return
        self.stopping.set()
        for index, process in self.workers.items():
            if process.returncode is None:
                log.info("worker %d (pid %d): forwarding %s", index, process.pid,
                         signal.Signals(signum).name)  # fmt: skip
                process.send_signal(signum)

    async def wait_all(self) -> None:
        """After :meth:`stop`: until every worker exited, SIGKILL for those past the bound."""
        bound = (
            self.config.cluster.drain_timeout + self.config.server.graceful_timeout + STOP_MARGIN
        )
        with trio.move_on_after(bound):
            for process in self.workers.values():
                await process.wait()
        for index, process in self.workers.items():
            if process.returncode is None:
                log.warning("worker %d (pid %d) still running after %.0f s: killed",
                            index, process.pid, bound)  # fmt: skip
                process.kill()
                await process.wait()
                self.status = self.status or 1
            elif process.returncode != 0 and self.status == 0:
                log.warning("worker %d %s", index, _describe_exit(process.returncode))
                self.status = 1


def bind_listening_socket(config: Config) -> socket.socket:
    """The HTTP socket every worker accepts on, bound and listening, inheritable.

    Raises:
        OSError: the address can't be bound.
    """
    host, port = config.server.host, config.server.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(LISTEN_BACKLOG)
        listener.set_inheritable(True)
    except OSError:
        listener.close()
        raise
    return listener


async def supervise(config: Config, count: int, serve_args: list[str]) -> int:
    """Run ``count`` workers on one HTTP socket until SIGTERM/SIGINT; the exit status.

    Raises:
        OSError: the HTTP address can't be bound.
    """
    with bind_listening_socket(config) as listener:
        alive_read, alive_write = os.pipe()
        try:
            supervisor = _Supervisor(config, serve_args, listener.fileno(), alive_read)
            host, port = listener.getsockname()[:2]
            scheme = "https" if config.server.certfile else "http"
            log.info(
                "MediaStream: %d workers on %s://%s:%d (one cluster node each, Redis at %s)",
                count, scheme, host, port, config.cluster.redis_url.rsplit("@", 1)[-1],
            )  # fmt: skip
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    for index in range(count):
                        nursery.start_soon(supervisor.keep_worker, index)

                    async def forward_signals() -> None:
                        async for signum in signals:
                            log.info("%s received, stopping the workers",
                                     signal.Signals(signum).name)  # fmt: skip
                            supervisor.stop(signum)
                            return

                    nursery.start_soon(forward_signals)
                    await supervisor.stopping.wait()
                    await supervisor.wait_all()
                    nursery.cancel_scope.cancel()
        finally:
            os.close(alive_read)
            os.close(alive_write)
    log.info("all workers stopped (exit status %d)", supervisor.status)
    return supervisor.status


async def exit_with_parent(alive_fd: int, running: RunningServer, scope: trio.CancelScope) -> None:
    """In a worker: shut down when the parent's end of the pipe closes (it died), then end
    ``scope`` (the one waiting for signals)."""
    async with trio.lowlevel.FdStream(alive_fd) as pipe:
        while await pipe.receive_some():
            pass  # the parent never writes; anything read is ignored
    log.warning("the supervising process is gone; shutting down")
    running.request_shutdown()
    await running.wait_stopped()
    scope.cancel()


def _describe_exit(status: int | None) -> str:
    if status is not None and status < 0:
        return f"was killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"
