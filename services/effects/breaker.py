"""A circuit breaker per RunningHub region.

purgatory (the asyncio breaker named by the issue) was read and left out: its
half-open state lets every concurrent call through instead of one probe, and
each call goes through its message bus. This one is small: `failures`
consecutive failures open the circuit; while open, calls fail fast; after
`reset_seconds` one probe at a time is let through (half-open); a success
closes the circuit, a failure opens it again for another `reset_seconds`.
The clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


class CircuitOpenError(Exception):
    def __init__(self, name: str, retry_in: float) -> None:
        super().__init__(f"RunningHub {name} is unavailable (circuit open, next probe in {retry_in:.0f} s)")
        self.retry_in = retry_in


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        failures: int = 5,
        reset_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        if failures < 1 or reset_seconds <= 0:
            raise ValueError("failures >= 1 and reset_seconds > 0")
        self.name = name
        self._threshold = failures
        self._reset = reset_seconds
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False

    @property
    def state(self) -> str:
        if self._state == OPEN and self._clock() - self._opened_at >= self._reset:
            return HALF_OPEN
        return self._state

    def before_call(self) -> None:
        """Raise CircuitOpenError unless a call may go upstream now; a caller let
        through must then report `success()` or `failure()` exactly once."""
        if self._state == CLOSED:
            return
        now = self._clock()
        if self._state == OPEN:
            remaining = self._opened_at + self._reset - now
            if remaining > 0:
                raise CircuitOpenError(self.name, remaining)
            self._set(HALF_OPEN)
        if self._probing:  # half-open: one probe at a time
            raise CircuitOpenError(self.name, 0.0)
        self._probing = True

    def success(self) -> None:
        self._failures = 0
        self._probing = False
        if self._state != CLOSED:
            self._set(CLOSED)

    def failure(self) -> None:
        self._probing = False
        if self._state == HALF_OPEN:
            self._open()
            return
        self._failures += 1
        if self._state == CLOSED and self._failures >= self._threshold:
            self._open()

    def release(self) -> None:
        """The call ended without saying anything about the region's health."""
        self._probing = False

    def _open(self) -> None:
        self._opened_at = self._clock()
        self._failures = 0
        self._set(OPEN)

    def _set(self, state: str) -> None:
        self._state = state
        if self._on_change is not None:
            self._on_change(state)
