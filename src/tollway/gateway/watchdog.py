"""A coarse timer for the wait on an upstream's response headers: one background task checks
every ``tick_s`` for attempts past their deadline and cancels them, instead of a timer per
request (``asyncio.timeout`` costs several µs of CPU per request; arming here is a dict insert).
A deadline fires up to ``tick_s`` late, fine for a timeout of seconds."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time


class Watchdog:
    def __init__(self, tick_s: float = 0.05) -> None:
        self.tick_s = tick_s
        self._pending: dict[int, tuple[float, asyncio.Task[object]]] = {}
        self._fired: set[int] = set()
        self._ids = itertools.count()
        self._task: asyncio.Task[None] | None = None

    def arm(self, deadline: float) -> int:
        """Cancel the current task at ``deadline`` (``time.monotonic()``) unless disarmed."""
        ticket = next(self._ids)
        task = asyncio.current_task()
        assert task is not None
        self._pending[ticket] = (deadline, task)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch())
        return ticket

    def disarm(self, ticket: int) -> bool:
        """Forget ``ticket``; True when it fired (its task was cancelled for the deadline:
        the caller uncancels the task and treats the wait as timed out)."""
        self._pending.pop(ticket, None)
        if ticket in self._fired:
            self._fired.discard(ticket)
            return True
        return False

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self._pending:
                continue
            now = time.monotonic()
            for ticket, (deadline, task) in list(self._pending.items()):
                if deadline <= now:
                    del self._pending[ticket]
                    self._fired.add(ticket)
                    task.cancel()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
