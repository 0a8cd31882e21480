"""Single-flight loads: concurrent misses of one key share one load.

A :class:`Flight` is one load in progress; :meth:`Flights.join` starts one for a
key or joins the one already running. A flight is marked ``stale`` when its key
is written or invalidated while it runs, so the load does not put its (older)
value in the cache afterwards; it still answers its callers. A finished flight
is forgotten, so the next miss starts a new load.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any


class Flight:
    """One in-progress load; ``stale`` is set when the key is invalidated meanwhile."""

    __slots__ = ("stale", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.stale = False


class Flights:
    """The loads in progress, by key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def join(self, key: str, load: Callable[[Flight], Coroutine[Any, Any, Any]]) -> tuple[Flight, bool]:
        """The flight of `key`: the one in progress (joined: True), else a new task
        running ``load(flight)`` (joined: False). Its task is set either way."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, True
        flight = Flight()
        task = asyncio.create_task(load(flight))
        flight.task = task
        self._flights[key] = flight
        task.add_done_callback(functools.partial(self._done, key, flight))
        return flight, False

    def mark_stale(self, key: str) -> None:
        """`key` changed: its load in progress, if any, must not fill the cache."""
        flight = self._flights.get(key)
        if flight is not None:
            flight.stale = True

    def mark_stale_prefix(self, key_prefix: str) -> None:
        """As :meth:`mark_stale` for every key starting with `key_prefix`."""
        for k, flight in self._flights.items():
            if k.startswith(key_prefix):
                flight.stale = True

    async def cancel_all(self) -> None:
        """Cancel every load in progress and wait for them to end."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _done(self, key: str, flight: Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, so an unawaited failure logs nothing
