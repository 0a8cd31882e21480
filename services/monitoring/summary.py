"""Reads of the per-minute rollups over a window: per endpoint (requests,
server errors, merged histogram), per cache (hits, misses) and per replica
(mean memory ratio). The rule evaluator and GetServiceSummary (the analytics
dashboard's monitoring sections) both use them.

A window [since, until) covers the minutes whose start lies in it: minute
rollups are read whole, so a window is exact to the minute. GetServiceSummary's
window ends at the request's `end` (a weekly report asks about a past week:
end = the week's end, window = 7 days) or, without one, now (so the current
minute is in, having started before now). It must start within the rollup retention
(MONITORING_ROLLUP_RETENTION_DAYS, at least 15 days, so the previous ISO week
is always whole). Alert activity counts the alerts (rule and client) first
seen and those resolved within the same [since, until); open alert counts are
the alerts open now.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

import asyncpg

from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.db import Connection
from services.servicekit.errors import FieldViolations, invalid_argument

from . import histogram
from .alerts import SEVERITIES
from .timings import FUTURE_SLACK, timestamp_or

DEFAULT_WINDOW: Final = timedelta(hours=24)

_ENDPOINTS_SQL = """
SELECT service, endpoint, sum(requests)::bigint AS requests, sum(errors)::bigint AS errors,
       max(max_ms) AS max_ms, array_agg(buckets) AS buckets
FROM api_rollup_minute
WHERE bucket_start >= $1 AND bucket_start < $2
GROUP BY service, endpoint
ORDER BY service, endpoint
"""
_CACHES_SQL = """
SELECT service, cache, sum(hits)::bigint AS hits, sum(misses)::bigint AS misses
FROM cache_rollup_minute
WHERE bucket_start >= $1 AND bucket_start < $2
GROUP BY service, cache
ORDER BY service, cache
"""
_MEMORY_SQL = """
SELECT service, instance, sum(memory_ratio_sum) / sum(samples) AS ratio
FROM instance_stats_minute
WHERE bucket_start >= $1 AND bucket_start < $2 AND heap_limit > 0
GROUP BY service, instance
ORDER BY service, instance
"""
_OPEN_ALERTS_SQL = "SELECT severity, count(*)::bigint AS n FROM alerts WHERE state = 'open' GROUP BY severity"
_ACTIVITY_SQL = """
SELECT severity,
       count(*) FILTER (WHERE first_seen_at >= $1 AND first_seen_at < $2)::bigint AS opened,
       count(*) FILTER (WHERE resolved_at >= $1 AND resolved_at < $2)::bigint AS resolved
FROM alerts
WHERE (first_seen_at >= $1 AND first_seen_at < $2) OR (resolved_at >= $1 AND resolved_at < $2)
GROUP BY severity
"""


@dataclass(frozen=True)
class EndpointFigures:
    service: str
    endpoint: str
    requests: int
    errors: int
    max_ms: float
    counts: list[int]

    def quantile(self, q: float) -> float:
        return histogram.quantile(self.counts, q, self.max_ms)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


@dataclass(frozen=True)
class CacheFigures:
    service: str
    cache: str
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 1.0


async def endpoints(conn: Connection, since: datetime, until: datetime) -> list[EndpointFigures]:
    out = []
    for row in await conn.fetch(_ENDPOINTS_SQL, since, until):
        counts = [0] * histogram.BUCKETS
        for minute in row["buckets"]:  # array_agg of arrays: a 2-D array, one row per minute
            histogram.add(counts, minute)
        out.append(
            EndpointFigures(
                row["service"],
                row["endpoint"],
                int(row["requests"]),
                int(row["errors"]),
                row["max_ms"],
                counts,
            )
        )
    return out


async def caches(conn: Connection, since: datetime, until: datetime) -> list[CacheFigures]:
    return [
        CacheFigures(r["service"], r["cache"], int(r["hits"]), int(r["misses"]))
        for r in await conn.fetch(_CACHES_SQL, since, until)
    ]


async def memory(conn: Connection, since: datetime, until: datetime) -> list[tuple[str, str, float]]:
    return [
        (r["service"], r["instance"], float(r["ratio"])) for r in await conn.fetch(_MEMORY_SQL, since, until)
    ]


def parse_window(request: monitoring_pb2.GetServiceSummaryRequest, longest: timedelta) -> timedelta:
    if not request.HasField("window"):
        return DEFAULT_WINDOW
    d = request.window
    if d.seconds < 0 or d.nanos < 0 or d.seconds > longest.total_seconds():
        raise invalid_argument([("window", f"between 1 minute and {longest.days} days")], "invalid window")
    window = d.ToTimedelta()
    if window < timedelta(minutes=1):
        raise invalid_argument([("window", f"between 1 minute and {longest.days} days")], "invalid window")
    return window


def parse_range(
    request: monitoring_pb2.GetServiceSummaryRequest, now: datetime, longest: timedelta
) -> tuple[datetime, datetime]:
    """[since, until) of the request: `window` (default 24 h) ending at `end` (default now);
    INVALID_ARGUMENT when it ends in the future or starts before the retention (`longest`)."""
    window = parse_window(request, longest)
    if not request.HasField("end"):
        return now - window, now
    bad = FieldViolations()
    # Set to the epoch itself (an empty message) is no valid end, not "now".
    end = timestamp_or(request.end, "end", now, bad) if request.end.ByteSize() else None
    if end is None:
        if not bad:
            bad.add("end", "not a valid timestamp")
    elif end > now + FUTURE_SLACK:
        bad.add("end", "not in the future")
    elif end - window < now - longest:
        bad.add("end", f"the window must start within the last {longest.days} days (the retention)")
    bad.raise_if_any("invalid window end")
    assert end is not None  # else a violation was raised
    return end - window, end


class ServiceSummary:
    def __init__(self, pool: asyncpg.Pool, longest: timedelta) -> None:
        self._pool = pool
        self._longest = longest

    async def get(
        self, request: monitoring_pb2.GetServiceSummaryRequest, now: datetime
    ) -> monitoring_pb2.GetServiceSummaryResponse:
        since, until = parse_range(request, now, self._longest)
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            ends = await endpoints(conn, since, until)
            hit = await caches(conn, since, until)
            open_rows = await conn.fetch(_OPEN_ALERTS_SQL)
            activity = {r["severity"]: r for r in await conn.fetch(_ACTIVITY_SQL, since, until)}
        response = monitoring_pb2.GetServiceSummaryResponse()
        for e in ends:
            response.endpoints.add(
                service=e.service,
                endpoint=e.endpoint,
                requests=e.requests,
                errors=e.errors,
                p50_ms=e.quantile(0.5),
                p95_ms=e.quantile(0.95),
                p99_ms=e.quantile(0.99),
            )
        for c in hit:
            response.caches.add(service=c.service, cache=c.cache, hits=c.hits, misses=c.misses)
        counts = {r["severity"]: int(r["n"]) for r in open_rows}
        response.open_warning_alerts = counts.get("warning", 0)
        response.open_error_alerts = counts.get("error", 0)
        response.open_critical_alerts = counts.get("critical", 0)
        for severity in SEVERITIES:
            if severity in activity:
                row = activity[severity]
                response.alert_activity.add(
                    severity=severity, opened=int(row["opened"]), resolved=int(row["resolved"])
                )
        return response
