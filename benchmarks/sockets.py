"""One socket for 100 streams versus one socket per stream (the write-up's claim, measured).

    python benchmarks/sockets.py [--streams 100] [--idle 500] [--json results.json]

``mediastream serve`` runs in its own process with 100 tiny synthetic streams (64x64 at one
frame a second, always on: their sources cost next to nothing, so what is measured is sockets,
sessions and peer connections). Then, each in turn:

- ``idle``: 500 WebSockets that carry nothing — the server memory each costs;
- ``one socket``: 100 viewers (aiortc, in another process) on one socket, one stream each;
- ``a socket each``: the same 100 viewers with a socket each.

The viewers send all their offers at once, as a camera wall does when it connects its tiles.
For each case: server memory (RSS) above the idle server, Trio tasks, open file descriptors,
and offer→answer latency (p50, p99) as the viewers saw it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    BENCH_LIMITS,
    PYTHON,
    ROOT,
    get_json,
    join_together,
    mediastream_server,
    print_table,
    rss_bytes,
)

#: A camera as light as one can be, so the figures are the sockets' and sessions' own.
TINY_PATTERN = "pattern:testsrc?size=64x64&fps=1&kbps=20&gop=5"


def server_state(url: str, pid: int) -> dict[str, float]:
    stats = get_json(url + "/api/stats")
    return {
        "rss": rss_bytes(pid),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "tasks": stats["tasks"],
        "sockets": stats["sockets"]["open"],
        "sessions": stats["sessions"],
    }


def wait_quiet(url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        stats = get_json(url + "/api/stats")
        if stats["sockets"]["open"] == 0 and stats["peerConnections"]["open"] == 0:
            return
        if time.monotonic() > deadline:
            raise SystemExit("the server did not settle")
        time.sleep(0.5)


def idle_sockets(url: str, pid: int, count: int, baseline: dict[str, float]) -> dict[str, Any]:
    import trio
    from trio_websocket import open_websocket_url

    async def hold() -> dict[str, float]:
        async with trio.open_nursery() as nursery:
            ready = trio.Semaphore(0)
            release = trio.Event()

            async def one() -> None:
                async with open_websocket_url(url.replace("http", "ws") + "/ws") as ws:
                    await ws.get_message()  # the welcome: the server has set the socket up
                    ready.release()
                    await release.wait()

            for _ in range(count):
                nursery.start_soon(one)
            for _ in range(count):
                await ready.acquire()
            await trio.sleep(2)  # let allocations settle before reading RSS
            state = server_state(url, pid)
            release.set()
        return state

    state = trio.run(hold)
    return {
        "case": f"{count} idle sockets",
        "sockets": state["sockets"],
        "sessions": 0,
        "rss_mb": (state["rss"] - baseline["rss"]) / 2**20,
        "per_socket_kb": (state["rss"] - baseline["rss"]) / count / 1024,
        "tasks": state["tasks"] - baseline["tasks"],
        "fds": state["fds"] - baseline["fds"],
    }


def viewers_case(
    url: str, pid: int, streams: int, sockets: str, baseline: dict[str, float]
) -> dict[str, Any]:
    process = subprocess.Popen(
        [
            PYTHON,
            str(ROOT / "benchmarks" / "viewers.py"),
            url.replace("http", "ws") + "/ws",
            "s{i:03d}",
            str(streams),
            "--sockets",
            sockets,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        join_together([process], sockets)
        time.sleep(3)
        state = server_state(url, pid)
        process.stdin.write("stats\n")
        process.stdin.flush()
        answers = sorted(json.loads(process.stdout.readline())["answerSeconds"])
    finally:
        process.stdin.close()
        process.wait(timeout=60)
        process.stdout.close()
    return {
        "case": "one socket" if sockets == "one" else "a socket each",
        "sockets": state["sockets"],
        "sessions": state["sessions"],
        "rss_mb": (state["rss"] - baseline["rss"]) / 2**20,
        "per_socket_kb": None,
        "tasks": state["tasks"] - baseline["tasks"],
        "fds": state["fds"] - baseline["fds"],
        "answer_p50_ms": 1000 * statistics.median(answers),
        "answer_p99_ms": 1000 * answers[min(len(answers) - 1, round(0.99 * (len(answers) - 1)))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--idle", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    config = BENCH_LIMITS + "".join(
        # Always on: both cases meet the same running sources, none started by an offer.
        f'[[streams]]\nid = "s{i:03d}"\nsource = "{TINY_PATTERN}"\non_demand = false\n'
        for i in range(args.streams)
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, mediastream_server(config, Path(tmp)) as (url, pid):
        time.sleep(2)
        baseline = server_state(url, pid)
        rows.append(idle_sockets(url, pid, args.idle, baseline))
        wait_quiet(url)
        for sockets in ("one", "each"):
            rows.append(viewers_case(url, pid, args.streams, sockets, baseline))
            wait_quiet(url)
            print(rows[-1], file=sys.stderr)

    print(
        f"\n{args.streams} streams over one socket vs a socket each"
        " (server side, above the idle server)"
    )
    print_table(
        [
            "case",
            "sockets",
            "sessions",
            "RSS MB",
            "KB/socket",
            "tasks",
            "fds",
            "answer p50 ms",
            "answer p99 ms",
        ],
        [
            [
                r["case"],
                r["sockets"],
                r["sessions"],
                r["rss_mb"],
                r["per_socket_kb"] or "-",
                r["tasks"],
                r["fds"],
                r.get("answer_p50_ms", "-"),
                r.get("answer_p99_ms", "-"),
            ]
            for r in rows
        ],
    )
    if args.json:
        args.json.write_text(json.dumps({"streams": args.streams, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
