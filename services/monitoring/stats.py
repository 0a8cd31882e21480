"""ReportServiceStats: each replica's memory against its limit, in-flight RPCs
and cache hits and misses since its previous report, added to per-minute
rollups (the memory and cache-hit-rate rules and the dashboard read those)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.errors import FieldViolations

from .timings import INSTANCE, SERVICE_NAME, check_time, floor_minute, timestamp_or

CACHE_NAME: Final = re.compile(r"^[a-z][a-z0-9_\-]{0,62}$")
MAX_CACHES: Final = 64
MAX_COUNT: Final = 2**53  # far above any real counter; keeps sums exact

_INSTANCE_SQL = """
INSERT INTO instance_stats_minute AS s
    (bucket_start, service, instance, samples, memory_ratio_sum, heap_used_max, heap_limit, in_flight_max)
VALUES ($1, $2, $3, 1, $4, $5, $6, $7)
ON CONFLICT (bucket_start, service, instance) DO UPDATE SET
    samples = s.samples + 1,
    memory_ratio_sum = s.memory_ratio_sum + excluded.memory_ratio_sum,
    heap_used_max = greatest(s.heap_used_max, excluded.heap_used_max),
    heap_limit = excluded.heap_limit,
    in_flight_max = greatest(s.in_flight_max, excluded.in_flight_max)
"""
_CACHE_SQL = """
INSERT INTO cache_rollup_minute AS c (bucket_start, service, cache, hits, misses)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (bucket_start, service, cache) DO UPDATE SET
    hits = c.hits + excluded.hits, misses = c.misses + excluded.misses
"""


def validate_stats(
    request: monitoring_pb2.ReportServiceStatsRequest, now: datetime, retention: timedelta
) -> datetime:
    """The report's time, or INVALID_ARGUMENT naming every bad field."""
    bad = FieldViolations()
    if not SERVICE_NAME.match(request.service):
        bad.add("service", "a lowercase service name of at most 63 characters")
    if not request.instance or not INSTANCE.match(request.instance):
        bad.add("instance", "1 to 128 characters of letters, digits and . _ : -")
    if not 0 <= request.heap_used_bytes < MAX_COUNT:
        bad.add("heapUsedBytes", "0 or more")
    if not 0 <= request.heap_limit_bytes < MAX_COUNT:
        bad.add("heapLimitBytes", "0 (no limit known) or more")
    if not 0 <= request.in_flight < MAX_COUNT:
        bad.add("inFlight", "0 or more")
    if len(request.caches) > MAX_CACHES:
        bad.add("caches", f"at most {MAX_CACHES} caches")
    seen: set[str] = set()
    for i, c in enumerate(request.caches[:MAX_CACHES]):
        if not CACHE_NAME.match(c.cache):
            bad.add(f"caches[{i}].cache", "a lowercase cache name of at most 63 characters")
        elif c.cache in seen:
            bad.add(f"caches[{i}].cache", "named twice")
        seen.add(c.cache)
        if not 0 <= c.hits < MAX_COUNT:
            bad.add(f"caches[{i}].hits", "0 or more")
        if not 0 <= c.misses < MAX_COUNT:
            bad.add(f"caches[{i}].misses", "0 or more")
    observed = timestamp_or(request.observed_at, "observedAt", now, bad)
    check_time(observed, "observedAt", now, now - retention, bad)
    bad.raise_if_any("invalid stats")
    assert observed is not None
    return observed


class StatsStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def store(self, request: monitoring_pb2.ReportServiceStatsRequest, observed: datetime) -> None:
        minute = floor_minute(observed)
        limit = request.heap_limit_bytes
        ratio = request.heap_used_bytes / limit if limit > 0 else 0.0
        caches = sorted((c.cache, c.hits, c.misses) for c in request.caches if c.hits or c.misses)
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                _INSTANCE_SQL,
                minute,
                request.service,
                request.instance,
                ratio,
                request.heap_used_bytes,
                limit,
                request.in_flight,
            )
            if caches:
                await conn.executemany(
                    _CACHE_SQL, [(minute, request.service, name, h, m) for name, h, m in caches]
                )
