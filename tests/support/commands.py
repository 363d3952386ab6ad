"""The ``mediastream`` command as a subprocess for tests, and its log read as it comes."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

MEDIASTREAM = [sys.executable, "-m", "mediastream"]
SRC = Path(__file__).parents[2] / "src"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}


class ProcessLog:
    """What a process writes to stderr, read all along by :meth:`pump` (so the process never
    blocks on a full pipe); waits match it from a position on."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stderr is not None
        self._stderr = process.stderr
        self.text = ""
        self.ended = False
        self._grew = trio.Event()

    async def pump(self) -> None:
        async for chunk in self._stderr:
            self.text += chunk.decode(errors="replace")
            self._grew.set()
            self._grew = trio.Event()
        self.ended = True
        self._grew.set()

    async def wait_for(self, pattern: str, *, after: int = 0, timeout: float = 30) -> re.Match[str]:
        """The first match of ``pattern`` in the log at or after offset ``after``."""
        with trio.fail_after(timeout):
            while (found := re.compile(pattern).search(self.text, after)) is None:
                assert not self.ended, f"the process ended before {pattern!r}:\n{self.text}"
                await self._grew.wait()
        return found

    async def read_to_end(self, timeout: float = 30) -> str:
        with trio.fail_after(timeout):
            while not self.ended:
                await self._grew.wait()
        return self.text


@asynccontextmanager
async def running_command(*args: str) -> AsyncIterator[tuple[trio.Process, ProcessLog]]:
    """``mediastream …`` as a subprocess; SIGKILLed by its PID afterwards if still running."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            functools.partial(
                trio.run_process, [*MEDIASTREAM, *args], stderr=subprocess.PIPE, check=False,
                env=ENV,
            )
        )  # fmt: skip
        log = ProcessLog(process)
        nursery.start_soon(log.pump)
        try:
            yield process, log
        finally:
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
