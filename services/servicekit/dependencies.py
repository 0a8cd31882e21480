"""Whether a service's dependencies, PostgreSQL and Redis, answer.

`service_dependency_up{dependency}` is 1 while a dependency answers: Redis by a
PING every interval (:func:`watch_redis`), PostgreSQL by :func:`watch_database`,
which also drives the service's readiness (NOT_SERVING while PostgreSQL is down,
back when it returns). :func:`dependency_status` is the on-demand check behind
the system-health answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
from prometheus_client import Gauge

from . import db
from .redis_client import RedisClient

# The server's logger: "postgres down" / "postgres back" are the server's lines, as before the split.
log = logging.getLogger("services.servicekit.server")

DEPENDENCY_UP = Gauge("service_dependency_up", "1 while a dependency answers.", ["dependency"])


async def watch_redis(redis: Callable[[], RedisClient | None], interval: float = 2.0) -> None:
    """`service_dependency_up{dependency="redis"}` follows a PING every `interval` s
    (of the client `redis()` returns; none counts as down). Runs until cancelled."""
    while True:
        try:
            client = redis()
            assert client is not None
            async with asyncio.timeout(interval):
                await client.ping()
            up = True
        except Exception:  # any failure to answer counts
            up = False
        DEPENDENCY_UP.labels("redis").set(1 if up else 0)
        await asyncio.sleep(interval)


async def watch_database(
    dsn: str,
    stopping: asyncio.Event,
    on_change: Callable[[bool], Awaitable[None]],
    interval: float = 2.0,
    failures_to_trip: int = 2,
) -> None:
    """Checks PostgreSQL every `interval` s until `stopping` is set; awaits
    `on_change(healthy)` each time its health changes (it starts healthy).

    The probe has a connection of its own, so a pool busy with real work
    never reads as an outage, and it takes `failures_to_trip` failed checks
    in a row to call it down (one slow answer under load is not down).
    """
    conn: asyncpg.Connection | None = None
    failures = 0
    reported = True
    try:
        # Ends at shutdown between checks (never cancelled inside a query, which would
        # leave asyncpg's cancel request running past the end of the loop).
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), interval)
            if stopping.is_set():
                break
            try:
                if conn is None or conn.is_closed():
                    conn = await asyncpg.connect(dsn, timeout=interval)
                await conn.fetchval("SELECT 1", timeout=interval)
                failures = 0
            except Exception as exc:  # any failure to answer counts
                failures += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
                if failures == failures_to_trip:
                    log.error("postgres down", extra={"error": repr(exc)})
            healthy = failures < failures_to_trip
            DEPENDENCY_UP.labels("postgres").set(1 if healthy else 0)
            if healthy != reported:
                if healthy:
                    log.info("postgres back")
                reported = healthy
                await on_change(healthy)
    finally:
        if conn is not None:
            conn.terminate()


async def dependency_status(
    pool: asyncpg.Pool | None, redis: RedisClient | None
) -> dict[str, tuple[str, float]]:
    """(status, check latency ms) of PostgreSQL and Redis: healthy,
    degraded (Redis down: serving from L1) or unhealthy."""
    out: dict[str, tuple[str, float]] = {}
    started = time.perf_counter()
    try:
        assert pool is not None
        await db.ping(pool, timeout=1.0)
        out["postgres"] = ("healthy", (time.perf_counter() - started) * 1000)
    except Exception:
        out["postgres"] = ("unhealthy", (time.perf_counter() - started) * 1000)
    started = time.perf_counter()
    try:
        assert redis is not None
        await redis.ping()
        out["redis"] = ("healthy", (time.perf_counter() - started) * 1000)
    except Exception:
        out["redis"] = ("degraded", (time.perf_counter() - started) * 1000)
    DEPENDENCY_UP.labels("redis").set(1 if out["redis"][0] == "healthy" else 0)
    return out
