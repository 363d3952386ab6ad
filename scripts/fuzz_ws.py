"""Frame-level WebSocket fuzzing for as long as you like, against a server of its own or yours.

    .venv/bin/python scripts/fuzz_ws.py --minutes 10               # starts `mediastream serve`
    .venv/bin/python scripts/fuzz_ws.py --url ws://127.0.0.1:8107/ws --cases 100000
    .venv/bin/python scripts/fuzz_ws.py --replay 6455:1234          # one case, in detail

The cases are those of ``tests/integration/test_ws_frames.py`` (``tests/support/ws_fuzz.py``):
seeded, so a finding is reproduced by its seed and index. A real aiortc viewer plays
``demo-1`` on another socket the whole time. Every batch prints the cases per minute so far;
anything wrong is printed at once as a finding:

- ``server died``: the server process ended, or a new socket can't connect;
- ``bystander stopped``: the viewer decoded no frame during a batch, or got an error;
- ``unexpected reaction`` / ``hung`` / ``wrong pongs`` / ``bad reply`` / ``protocol
  violation``: a case's outcome that no right reaction explains (see ``ws_fuzz.predict``);
- ``server error``: the server logged an error or a traceback (servers started here only);
- ``leak``: sockets, sessions, peer connections or tasks not back where they were at the end.

A server given by ``--url`` needs the same ``limits.max_message_bytes`` as ``--max-message-
bytes`` (the hard cap is 4× that), high ``max_messages_per_second`` and
``max_sockets_per_client``, and a ``demo-1`` stream; its leaks are judged from ``/api/stats``
(open mode or an admin token in ``--token``).

Exit status: 0 without findings, 1 with.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.raw_ws import open_raw_websocket  # noqa: E402
from support.viewer import PlayedStream, Viewer, open_viewer  # noqa: E402
from support.ws_fuzz import (  # noqa: E402
    CampaignStats,
    Limits,
    generate_case,
    play_case,
    run_campaign,
)

HARD_CAP_FACTOR = 4  # mediastream.server.HARD_MESSAGE_LIMIT_FACTOR
BATCH = 2000  # cases between two checks of the server and the bystander


@dataclass(frozen=True)
class Target:
    ws_url: str
    #: the server's process and log, for a server started here
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="fuzz this ws:// URL instead of a server started here")
    parser.add_argument("--token", help="admin token for /api/stats (a server with tokens)")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100_000)
    parser.add_argument("--first", type=int, default=0, help="first case index")
    parser.add_argument("--cases", type=int, default=None, help="default: run for --minutes")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--max-message-bytes", type=int, default=4096)
    parser.add_argument("--replay", metavar="SEED:INDEX", help="play one case and describe it")
    parser.add_argument(
        "--bare",
        action="store_true",
        help="cases only: no bystander, newcomer or leak checks (the caller does them); "
        "the last line printed is a JSON summary",
    )
    args = parser.parse_args()
    limits = Limits(args.max_message_bytes, args.max_message_bytes * HARD_CAP_FACTOR)
    with _server(args) as target:
        return trio.run(_fuzz, args, target, limits)


@contextlib.contextmanager
def _server(args: argparse.Namespace) -> Iterator[Target]:
    if args.url:
        yield Target(args.url)
        return
    with tempfile.TemporaryDirectory(prefix="fuzz-ws-") as tmp:
        port = _free_port()
        config = Path(tmp) / "fuzz.toml"
        config.write_text(
            f"""[server]
data_dir = "{tmp}/data"
[limits]
max_message_bytes = {args.max_message_bytes}
max_messages_per_second = 1000000.0
max_sockets_per_client = 1000000
[media]
on_demand_grace = 1.0
[[streams]]
id = "demo-1"
source = "pattern:testsrc2?size=320x180&fps=25&kbps=300&gop=50"
[[streams]]
id = "demo-2"
source = "pattern:testsrc?size=320x180&fps=25&kbps=300&gop=50"
"""
        )
        log_path = Path(tmp) / "server.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [
                    *(sys.executable, "-m", "mediastream", "serve", "--config", str(config)),
                    *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
            try:
                _wait_healthy(f"http://127.0.0.1:{port}/healthz", process)
                yield Target(f"ws://127.0.0.1:{port}/ws", process, log_path)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


async def _fuzz(args: argparse.Namespace, target: Target, limits: Limits) -> int:
    ws_url = target.ws_url
    kinds: collections.Counter[str] = collections.Counter()
    shown: list[str] = []

    def report(kind: str, text: str) -> None:
        kinds[kind] += 1
        if kinds[kind] <= 20:  # one kind can repeat thousands of times: show the first ones
            shown.append(text)
            print(f"\nFINDING {text}\n", flush=True)

    async with trio_asyncio.open_loop():
        if args.replay:
            return await _replay(args.replay, ws_url, limits)
        async with contextlib.AsyncExitStack() as stack:
            playing: PlayedStream | None = None
            bystander: Viewer | None = None
            if not args.bare:
                bystander = await stack.enter_async_context(open_viewer(ws_url))
                playing = await bystander.play("demo-1")
                await playing.wait_frames(5)
            before = None if args.bare else await _stats(ws_url, args.token)
            total = await _batches(args, target, limits, report, kinds, bystander, playing)
            if not args.bare:
                await _check_newcomer(ws_url, report)
                await _check_leaks(ws_url, args.token, before, report)
    print(
        f"\n{total.cases:,} cases in {total.seconds:.0f} s: {total.cases_per_minute:,.0f} "
        f"cases/min on {args.concurrency} connections at a time; verdicts "
        f"{dict(total.verdicts.most_common())}; closed without a close frame (Hypercorn's "
        f"deviation): {total.closed_without_frame:,}; findings {dict(kinds) or 'none'}",
        flush=True,
    )
    if args.bare:  # for a caller (the test): one JSON line
        summary = {
            "cases": total.cases,
            "connections": total.connections,
            "seconds": total.seconds,
            "verdicts": dict(total.verdicts),
            "closed_without_frame": total.closed_without_frame,
            "findings": dict(kinds),
            "shown": shown,
        }
        print(json.dumps(summary), flush=True)
    return 1 if kinds else 0


async def _batches(
    args: argparse.Namespace,
    target: Target,
    limits: Limits,
    report: Callable[[str, str], None],
    kinds: collections.Counter[str],
    bystander: Viewer | None,
    playing: PlayedStream | None,
) -> CampaignStats:
    """Cases in batches; after each, the server, the bystander and the server's log."""
    ws_url = target.ws_url
    total = CampaignStats()
    started = time.monotonic()
    deadline = None if args.cases is not None else started + args.minutes * 60
    index = args.first
    log_offset = 0
    bystander_messages = len(bystander.messages) if bystander else 0
    print(f"fuzzing {ws_url} from seed {args.seed}, case {index}", flush=True)
    while True:
        remaining = None if args.cases is None else args.first + args.cases - index
        if remaining is not None and remaining <= 0:
            break
        if deadline is not None and time.monotonic() >= deadline:
            break
        frames_before = playing.frames if playing else 0
        stats = await run_campaign(
            ws_url,
            seed=args.seed,
            cases=min(BATCH, remaining or BATCH),
            limits=limits,
            concurrency=args.concurrency,
            first_index=index,
            on_finding=lambda finding: report(finding.kind, str(finding)),
            stop_after=None if deadline is None else max(1.0, deadline - time.monotonic()),
        )
        index += stats.cases
        _add(total, stats)
        total.seconds = time.monotonic() - started
        if not await _server_answers(ws_url):
            report("server died", f"server died: no answer after case {index - 1}")
            break
        process = target.process
        if process is not None and process.poll() is not None:
            report("server died", f"server died: exit status {process.returncode}")
            break
        if bystander is not None and playing is not None:
            if playing.frames == frames_before or bystander.closed_reason is not None:
                report(
                    "bystander stopped",
                    f"bystander stopped: {playing.frames} frames, socket "
                    f"{bystander.closed_reason or 'open'}, before case {index}",
                )
            news = bystander.messages[bystander_messages:]
            bystander_messages = len(bystander.messages)
            errors = [m for m in news if m["type"] == "error"]
            if errors:
                report("bystander stopped", f"bystander got errors: {errors[:3]}")
        if target.log_path is not None:
            log_offset = _scan_log(target.log_path, log_offset, report)
        print(
            f"{total.cases:>9,} cases  {total.cases_per_minute:>9,.0f}/min  "
            f"{total.connections:>8,} connections  findings {dict(kinds)}"
            + (f"  bystander {playing.frames} frames" if playing else ""),
            flush=True,
        )
    return total


async def _replay(which: str, ws_url: str, limits: Limits) -> int:
    seed, index = (int(part) for part in which.split(":"))
    case = generate_case(seed, index, limits)
    print(case.reproducer())
    stats = CampaignStats()
    async with open_raw_websocket(ws_url) as ws:
        await play_case(ws, case, stats)
        print(
            f"observed: {dict(stats.verdicts)}; closure {ws.closure}; pongs {len(ws.pong_payloads)}"
        )
        for message in ws.messages:
            print("  message:", str(message)[:200])
    for finding in stats.findings:
        print(f"FINDING {finding}")
    return 1 if stats.findings else 0


def _add(total: CampaignStats, batch: CampaignStats) -> None:
    total.cases += batch.cases
    total.connections += batch.connections
    total.verdicts.update(batch.verdicts)
    total.families.update(batch.families)
    total.closed_without_frame += batch.closed_without_frame
    total.findings += batch.findings


async def _server_answers(ws_url: str) -> bool:
    with trio.move_on_after(20):
        try:
            async with open_raw_websocket(ws_url) as ws:
                return await ws.probe()
        except OSError:
            return False
    return False


async def _check_newcomer(ws_url: str, report: Callable[[str, str], None]) -> None:
    try:
        async with open_viewer(ws_url) as newcomer:
            fresh = await newcomer.play("demo-2")
            await fresh.wait_frames(3)
    except Exception as exc:  # anything at all: that is the finding
        report("server died", f"a new socket could not play: {exc!r}")


async def _stats(ws_url: str, token: str | None) -> dict[str, Any] | None:
    url = ws_url.replace("ws", "http", 1).rsplit("/ws", 1)[0] + "/api/stats"
    request = urllib.request.Request(url, headers={"Connection": "close"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")

    def fetch() -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return dict(json.loads(response.read()))
        except (OSError, ValueError):
            return None

    return await trio.to_thread.run_sync(fetch)


async def _check_leaks(
    ws_url: str,
    token: str | None,
    before: dict[str, Any] | None,
    report: Callable[[str, str], None],
) -> None:
    if before is None:
        print("(no /api/stats: leaks not checked; pass --token for a server with tokens)")
        return
    now: dict[str, Any] | None = None
    for _ in range(30):  # give closing sockets and peers time to go
        now = await _stats(ws_url, token)
        if now is not None and _settled(before, now):
            return
        await trio.sleep(1)
    report("leak", f"leak: before {before}, after {now}")


def _settled(before: dict[str, Any], now: dict[str, Any]) -> bool:
    return (
        now["sockets"]["open"] <= before["sockets"]["open"]
        and now["sessions"] <= before["sessions"]
        and now["peerConnections"]["open"] <= before["peerConnections"]["open"]
        # Tasks come and go (a source hands each frame over in a task of its own).
        and now["tasks"] <= before["tasks"] + 5
    )


def _scan_log(path: Path, offset: int, report: Callable[[str, str], None]) -> int:
    with path.open(errors="replace") as log:
        log.seek(offset)
        text = log.read()
        offset = log.tell()
    # One entry per ERROR line or traceback.
    for entry in re.split(r"\n(?=\S)", text):
        if re.search(r"\bERROR\b|Traceback|CRITICAL", entry):
            report("server error", f"server error: {entry[:3000]}")
    return offset


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited at start-up with status {process.returncode}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.2)
    raise SystemExit("the server did not answer /healthz within 30 s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
