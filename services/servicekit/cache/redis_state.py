"""Redis as one cache sees it: reachable or not. Every Redis operation of the
cache goes through :meth:`RedisLink.call`, which bounds it in time, never
raises, and after a failure skips Redis for a backoff window (doubling per
failure in a row) so that an outage costs one timeout, not one per call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..clock import Clock
from .l1 import MISSING
from .metrics import CACHE_REDIS_AVAILABLE, CACHE_REDIS_ERRORS

log = logging.getLogger("services.servicekit.cache")

R = TypeVar("R")

# Errors meaning "Redis is unreachable": the cache degrades to L1 + loader and backs off.
OUTAGE_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)
# Every other Redis error is logged and treated as an L2 miss; none reaches the caller.
L2_ERRORS: Final = (RedisError, OSError)


class RedisLink:
    """Availability of Redis for the cache ``name``, with backoff.

    Args:
        timeout: upper bound in seconds of one operation, whatever the client's retry
            policy; exceeding it counts as an outage. ``None`` leaves it to the client.
        backoff / backoff_max: after a failure Redis is skipped for ``backoff`` seconds
            (of the cache's clock), doubling per further failure up to ``backoff_max``.
    """

    def __init__(
        self, name: str, *, timeout: float | None, backoff: float, backoff_max: float, clock: Clock
    ) -> None:
        self.name = name
        self.timeout = timeout
        self.backoff_initial = backoff
        self._backoff_max = max(backoff_max, backoff)
        self._clock = clock
        self.available = True
        self._backoff = backoff
        self._retry_at = 0.0
        self._m_errors = CACHE_REDIS_ERRORS.labels(name)
        self._m_available = CACHE_REDIS_AVAILABLE.labels(name)
        self._m_available.set(1)

    def allowed(self) -> bool:
        """Whether to try Redis now; while it is down, one probe per backoff window."""
        if self.available:
            return True
        now = self._clock.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff  # other callers keep skipping during the probe
        return True

    async def call(self, op: Callable[[], Awaitable[R]]) -> Any:
        """Run a Redis operation; on failure record it and return MISSING (never raises)."""
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    result = await op()
                except RedisConnectionError:
                    if not self.available:
                        raise
                    # Likely a pooled connection that died (e.g. Redis restarted): redis-py
                    # dropped it, so one immediate retry tells a stale socket from an outage.
                    result = await op()
        except OUTAGE_ERRORS as exc:  # includes TimeoutError from asyncio.timeout
            self.failed(exc)
            return MISSING
        except L2_ERRORS as exc:
            self._m_errors.inc()
            log.warning("cache %s: Redis error: %r", self.name, exc)
            return MISSING
        self.mark_up()
        return result

    def failed(self, exc: BaseException) -> None:
        """An operation failed: count it; an outage error marks Redis down."""
        self._m_errors.inc()
        if isinstance(exc, OUTAGE_ERRORS):
            self.mark_down(exc)
        else:
            log.warning("cache %s: Redis error: %r", self.name, exc)

    def mark_down(self, exc: BaseException) -> None:
        now = self._clock.monotonic()
        if self.available:
            self.available = False
            self._backoff = self.backoff_initial
            self._m_available.set(0)
            log.warning("cache %s: Redis unavailable (%r); serving from L1 and loader", self.name, exc)
        else:
            self._backoff = min(self._backoff * 2, self._backoff_max)
        self._retry_at = now + self._backoff

    def mark_up(self) -> None:
        if not self.available:
            self.available = True
            self._backoff = self.backoff_initial
            self._m_available.set(1)
            log.info("cache %s: Redis available again", self.name)

    @property
    def backoff_max(self) -> float:
        return self._backoff_max
