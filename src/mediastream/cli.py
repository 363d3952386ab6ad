"""The ``mediastream`` command.

    mediastream serve [--config FILE] [--host HOST] [--port PORT] [--log-level LEVEL]
                      [--certfile PEM --keyfile PEM] [--workers N]
    mediastream token --streams PATTERN [--streams …] [--ttl 12h] [--admin] [--config FILE]

Without ``--config`` the server runs three synthetic demo streams. Command-line options
override the file's ``[server]`` values. SIGINT and SIGTERM shut down gracefully (in a
cluster, after draining: ``ClusterNode.drain``). ``--workers N`` runs N cluster nodes sharing
the HTTP port under a supervising parent (``workers.py``); it needs ``[cluster] redis_url``.
``token`` prints an access token signed with the configured ``security.jwt_secret``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import signal
import sys
from pathlib import Path

import trio

from . import __version__
from .api.pages import DEFAULT_STATIC_DIR
from .auth import Authenticator, AuthError, parse_duration
from .config import Config, default_config, load_config
from .errors import ConfigError
from .logs import setup_logging
from .server import RunningServer, Worker, serve

log = logging.getLogger("mediastream")

LOG_LEVELS = ("debug", "info", "warning", "error")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        config = _config_from(args)
    except ConfigError as exc:
        print(f"mediastream: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "token":
        return _print_token(args, config)
    setup_logging(config.server.log_level, config.server.log_format, worker=args.worker)
    if args.config is None and args.worker is None:
        log.info("no --config given: serving the built-in demo streams")
    try:
        if args.workers > 1:
            from . import workers

            return trio.run(workers.supervise, config, args.workers, _worker_args(args))
        worker = None
        if args.worker is not None:
            worker = Worker(args.worker, args.listen_fd)
        trio.run(_serve_until_signalled, config, args.static_dir, worker, args.alive_fd)
    except (ConfigError, OSError, BaseExceptionGroup) as exc:
        cause = _sole_cause(exc)
        if isinstance(cause, ConfigError):
            print(f"mediastream: {cause}", file=sys.stderr)
            return 2
        if isinstance(cause, OSError):
            where = f"{config.server.host}:{config.server.port}"
            reason = cause.strerror or cause
            print(f"mediastream: cannot serve on {where}: {reason}", file=sys.stderr)
            return 1
        raise
    return 0


def _sole_cause(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (Trio nurseries wrap errors)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mediastream",
        description="Live camera streams (RTSP/H.264) in web browsers over WebRTC.",
    )
    parser.add_argument("--version", action="version", version=f"mediastream {__version__}")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("serve", help="run the server")
    run.add_argument("--config", type=Path, help="TOML configuration file (default: demo streams)")
    run.add_argument("--host", help="address to listen on (default 0.0.0.0)")
    run.add_argument("--port", type=int, help="port to listen on (default 8107)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="default: info")
    run.add_argument("--log-format", choices=("text", "json"), help="default: text")
    run.add_argument(
        "--static-dir",
        type=Path,
        default=DEFAULT_STATIC_DIR,
        help="folder of the pages and scripts (default: the source tree's web/static)",
    )
    run.add_argument("--certfile", help="serve HTTPS/WSS with this PEM certificate chain")
    run.add_argument("--keyfile", help="the certificate's PEM private key")
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N cluster nodes sharing the HTTP port, one process each (needs [cluster] "
        "redis_url; default 1: this process alone)",
    )
    # Set by the parent of --workers for each worker it starts; not for people.
    run.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    run.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    run.add_argument("--alive-fd", type=int, help=argparse.SUPPRESS)
    token = commands.add_parser(
        "token", help="print an access token", description="Print a signed access token."
    )
    token.add_argument("--config", type=Path, help="TOML configuration with security.jwt_secret")
    token.add_argument(
        "--streams",
        action="append",
        required=True,
        metavar="PATTERN",
        help="a stream id or pattern the token grants (cam-*); repeat for more",
    )
    token.add_argument("--ttl", default="12h", help="lifetime: 90s, 15m, 12h, 7d (default 12h)")
    token.add_argument("--admin", action="store_true", help="also grant the management API")
    token.add_argument("--subject", help="who the token is for")
    return parser


def _config_from(args: argparse.Namespace) -> Config:
    config = load_config(args.config) if args.config is not None else default_config()
    if args.command != "serve":
        return config
    if bool(args.certfile) != bool(args.keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    overrides = {
        key: value
        for key, value in (
            ("host", args.host),
            ("port", args.port),
            ("log_level", args.log_level),
            ("log_format", args.log_format),
            ("certfile", args.certfile),
            ("keyfile", args.keyfile),
        )
        if value is not None
    }
    if "port" in overrides and not 0 <= overrides["port"] <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {overrides['port']}")
    if args.workers < 1:
        raise ConfigError(f"--workers must be 1 or more, got {args.workers}")
    if args.workers > 1 and not config.cluster.redis_url:
        raise ConfigError(
            f"--workers {args.workers} needs [cluster] redis_url in the configuration: the "
            "workers are cluster nodes and share the streams through Redis (docs/cluster.md)"
        )
    if args.workers > 1 and args.worker is not None:
        raise ConfigError("--workers and --worker do not go together")
    if (args.worker is None) != (args.listen_fd is None):
        raise ConfigError("--worker and --listen-fd go together (set by --workers)")
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **overrides))


def _worker_args(args: argparse.Namespace) -> list[str]:
    """The ``serve`` options each worker of ``--workers`` gets: the parent's, less that one."""
    options = [
        ("--config", args.config),
        ("--host", args.host),
        ("--port", args.port),
        ("--log-level", args.log_level),
        ("--log-format", args.log_format),
        ("--static-dir", args.static_dir),
        ("--certfile", args.certfile),
        ("--keyfile", args.keyfile),
    ]
    return [part for name, value in options if value is not None for part in (name, str(value))]


def _print_token(args: argparse.Namespace, config: Config) -> int:
    try:
        ttl = parse_duration(args.ttl)
        token = Authenticator(config.security).issue(
            args.streams, ttl, admin=args.admin, subject=args.subject
        )
    except ValueError as exc:
        print(f"mediastream: --ttl: {exc}", file=sys.stderr)
        return 2
    except AuthError as exc:
        print(f"mediastream: {exc.message}", file=sys.stderr)
        return 2
    print(token)
    return 0


async def _serve_until_signalled(
    config: Config, static_dir: Path, worker: Worker | None = None, alive_fd: int | None = None
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(
                functools.partial(serve, config, static_dir=static_dir, worker=worker)
            )
            if alive_fd is not None:  # a worker of --workers: ends with its parent
                from .workers import exit_with_parent

                nursery.start_soon(exit_with_parent, alive_fd, running, nursery.cancel_scope)
            async for signum in signals:
                log.info("%s received, shutting down", signal.Signals(signum).name)
                running.request_shutdown()
                break
            if alive_fd is not None:  # the pipe's watcher is all that is left
                await running.wait_stopped()
                nursery.cancel_scope.cancel()
