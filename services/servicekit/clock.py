"""An injectable clock: monotonic time for durations and deadlines, wall time for
timestamps, and sleeping, so code that waits or expires things can be tested
without waiting in real time.

Production code takes a ``clock: Clock = SYSTEM_CLOCK`` argument; tests pass a
:class:`ManualClock` and move it with :meth:`ManualClock.advance`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (for durations and deadlines)."""
        ...

    def time(self) -> float:
        """Wall time, seconds since the Unix epoch (for timestamps)."""
        ...

    def now(self) -> datetime:
        """Wall time as an aware UTC datetime."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""
        ...


class SystemClock:
    """The real clock (``time.monotonic``, ``time.time``, ``asyncio.sleep``)."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def now(self) -> datetime:
        return datetime.now(UTC)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: SystemClock = SystemClock()


class ManualClock:
    """A clock that moves only when told to.

    ``monotonic()`` starts at 0 (or ``monotonic``) and ``time()`` at ``start``
    (default: the real wall time at creation); both move together by
    :meth:`advance`, which also wakes every :meth:`sleep` whose deadline it
    passed. ``sleep(0)`` (or a negative time) just yields to the loop.
    """

    def __init__(self, start: float | datetime | None = None, monotonic: float = 0.0) -> None:
        if start is None:
            start = time.time()
        elif isinstance(start, datetime):
            start = start.timestamp()
        self._offset = start - monotonic
        self._now = monotonic
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._now + self._offset

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.time(), UTC)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting (cancelled ones excluded)."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, seconds: float) -> None:
        """Move time forward and wake the sleepers whose deadline has come."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, future = heapq.heappop(self._sleepers)
            if not future.done():
                future.set_result(None)

    async def advance_and_settle(self, seconds: float, turns: int = 10) -> None:
        """:meth:`advance`, then let the woken tasks run for a few loop turns."""
        self.advance(seconds)
        for _ in range(turns):
            await asyncio.sleep(0)
