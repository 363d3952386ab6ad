"""A level-triggered "something changed" signal, to wait on state instead of polling it."""

from __future__ import annotations

from collections.abc import Callable

import trio


class ChangeSignal:
    """Wakes every waiter on :meth:`notify`; waiters re-check their own condition.

    Unlike a bare :class:`trio.Event` it can fire any number of times.
    """

    def __init__(self, parent: ChangeSignal | None = None) -> None:
        self._event = trio.Event()
        self._parent = parent

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()
        if self._parent is not None:
            self._parent.notify()

    async def wait(self) -> None:
        """Wait for the next :meth:`notify`."""
        await self._event.wait()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        """Return as soon as ``condition()`` is true, checking it after every change.

        Cancellation: bound it with ``trio.fail_after`` at the call site.
        """
        while not condition():
            await self.wait()
