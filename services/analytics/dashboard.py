"""The admin performance dashboard (``GetPerformanceDashboard``).

Everything comes from the rollups (never from raw rows) and from monitoring's
``GetServiceSummary``; the whole answer is cached, serialized, in a
:class:`~services.servicekit.cache.MultiLevelCache` under the window for a
short TTL, so a burst of requests (or several replicas) costs one computation
per window and TTL.

Sections and their sources, over ``[now - window, now]`` (default 24h):

* ``web_vitals``: per web vital (LCP, INP, CLS, FCP, TTFB always; FID only when
  old clients sent it): ``samples`` and the good / needs-improvement / poor
  shares from ``rollup_metrics`` (shares of the rated samples, exact), and the
  p75 read from the merged sketch (within the sketch's 1 % relative accuracy),
  rated with the web.dev thresholds. The sketch is read from
  ``rollup_metric_bins_hourly`` (per hour, all pages merged) for the 24h, 7d
  and 30d windows, whose trend buckets are an hour or more, and from
  ``rollup_metric_bins`` (per 5 minutes and page) for 15m and 1h, whose trend
  buckets are 5 minutes. The dashboard never shows pages, and the 5-minute,
  per-page table has ~80x the rows of the hourly one (4.9 M against 61 k for a
  day of 10 M metrics; the 24h sketch query alone 4.5 s against 0.23 s,
  ``bench/dashboard.py``), so windows that can use whole hours do. Both tables get the same contributions in the same
  ingest transaction, so they always agree.
* ``engagement``: events from ``rollup_events`` (15m, 1h) or
  ``rollup_events_hourly`` (24h, 7d, 30d: per hour and event type, no page);
  distinct sessions and (non-empty) users from ``rollup_sessions`` or its
  hourly sketches.
* ``funnel``: from ``rollup_funnel`` (15m, 1h) or ``rollup_funnel_hourly``
  (24h, 7d, 30d: per hour and step, no effect). For 7 days at the benchmark's
  volume the hourly tables hold 1,680 and 1,512 rows against 399 k and 441 k
  5-minute ones (``bench/business.py --scale 10``). Step-1 and step-7
  (``processing_completed``) reports, their ratio (capped at 1) and the step
  whose count fell most from the previous step's. The rollup counts step
  reports, not distinct sessions in order: a session sending a step twice
  counts twice. The exact ordered, per-session funnel is ``GetFunnelReport``.
* ``trend``: one point per bucket (15m, 1h: 5 minutes; 24h: 1 hour; 7d: 6
  hours; 30d: 1 day; UTC-aligned), every bucket present (zeros included), with
  events, sessions and the p75 of each web vital with samples in the bucket.
  ``rollup_sessions`` is hourly, so a 5-minute point carries the distinct
  sessions of the hour it falls in.
* ``api_latency``, ``cache_hit_rates``, ``open_alerts``: monitoring's
  ``GetServiceSummary`` over the same window, with a short deadline. When
  monitoring is not configured or does not answer, these three are listed in
  ``unavailable_sections`` (``apiLatency``, ``cacheHitRates``, ``openAlerts``)
  and the rest is served as usual.

Rollups are read from the bucket that contains ``now - window``: for 15m and
1h the 5-minute bucket (the hour, for sessions), for 24h, 7d and 30d the hour
(every section, since the hourly sketch has no finer grain: all sections cover
the same span). A window thus covers at most one 5-minute bucket, or one hour,
more than its length, never less.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import grpc

from cosnap.analytics.v1 import analytics_pb2
from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.analytics import sketch
from services.analytics.distinct import Sketches
from services.analytics.vitals import FUNNEL_STEPS, STEP_NUMBER, WEB_VITALS, rate
from services.analytics.windows import DEFAULT_DASHBOARD_WINDOW, Window, parse_window
from services.servicekit.cache import MultiLevelCache, get_or_load_message
from services.servicekit.clock import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

MONITORING_SECTIONS: Final = ("apiLatency", "cacheHitRates", "openAlerts")
TREND_BUCKETS: Final[dict[str, timedelta]] = {
    "15m": timedelta(minutes=5),
    "1h": timedelta(minutes=5),
    "24h": timedelta(hours=1),
    "7d": timedelta(hours=6),
    "30d": timedelta(days=1),
}
ALWAYS_SHOWN_VITALS: Final = ("LCP", "INP", "CLS", "FCP", "TTFB")
ROLLUP_BUCKET: Final = timedelta(minutes=5)
HOUR: Final = timedelta(hours=1)
COMPLETED_STEP: Final = STEP_NUMBER["processing_completed"]
P75: Final = 0.75
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
WORK_MEM: Final = "64MB"  # per dashboard query (at most one computation per window and TTL)

# The sketch bins per (trend bucket, name), one row each with its bins ascending and their
# counts as two arrays: ~150 rows for a day instead of ~35 k (fetching and looping over those
# in Python cost more than the query itself).
_BINS_SQL = """
SELECT b, name, array_agg(bin ORDER BY bin) AS bins, array_agg(n ORDER BY bin) AS counts
FROM (
    SELECT date_bin($3::interval, bucket_start, timestamptz 'epoch') AS b, name, bin, sum(count)::bigint AS n
    FROM rollup_metric_bins
    WHERE bucket_start >= $1 AND bucket_start <= $2 AND name = ANY($4::text[])
    GROUP BY 1, 2, 3
) AS per_bin
GROUP BY b, name
"""
# The hourly, page-less sketch (windows with trend buckets of an hour or more): its rows are
# already one per (hour, name, bin), so one row per (hour, name) with its bins as arrays; trend
# buckets of more than an hour merge their hours' bins in Python (regrouping ~38 k rows per
# 6 hours in SQL cost ~45 ms more than the Python merge for a 7d window at 10 M metrics).
# $3 (the trend bucket, which the other bins query groups by) is only type-checked here.
_BINS_PER_HOUR_SQL = """
SELECT hour_start AS b, name, array_agg(bin ORDER BY bin) AS bins, array_agg(count ORDER BY bin) AS counts
FROM rollup_metric_bins_hourly
WHERE hour_start >= $1 AND hour_start <= $2 AND name = ANY($4::text[]) AND $3::interval > interval '0'
GROUP BY hour_start, name
"""
_RATINGS_SQL = """
SELECT name, sum(count)::bigint AS samples, sum(good)::bigint AS good,
       sum(needs_improvement)::bigint AS needs_improvement, sum(poor)::bigint AS poor
FROM rollup_metrics
WHERE bucket_start >= $1 AND bucket_start <= $2 AND name = ANY($3::text[])
GROUP BY name
"""
_EVENTS_SQL = """
SELECT date_bin($3::interval, bucket_start, timestamptz 'epoch') AS b, sum(count)::bigint AS n
FROM rollup_events
WHERE bucket_start >= $1 AND bucket_start <= $2
GROUP BY 1
"""
# Distinct sessions per trend bucket (at least an hour) and over the whole window, and
# distinct users: DISTINCT over the hourly rows is hashed (no collation-aware sort).
_SESSIONS_SQL = """
SELECT b, count(*)::bigint AS sessions
FROM (
    SELECT DISTINCT date_bin($3::interval, hour_start, timestamptz 'epoch') AS b, session_id
    FROM rollup_sessions
    WHERE hour_start >= $1 AND hour_start <= $2
) AS per_bucket
GROUP BY b
"""
# rollup_sessions has one row per (hour, session): per hour, a plain count.
_SESSIONS_HOURLY_SQL = """
SELECT hour_start AS b, count(*)::bigint AS sessions
FROM rollup_sessions
WHERE hour_start >= $1 AND hour_start <= $2
GROUP BY hour_start
"""
_VISITORS_SQL = """
SELECT (SELECT count(*) FROM (SELECT DISTINCT session_id FROM rollup_sessions
                              WHERE hour_start >= $1 AND hour_start <= $2) AS s)::bigint AS sessions,
       (SELECT count(*) FROM (SELECT DISTINCT user_id FROM rollup_sessions
                              WHERE hour_start >= $1 AND hour_start <= $2 AND user_id <> '') AS u)::bigint
           AS users
"""
_FUNNEL_SQL = """
SELECT step, sum(count)::bigint AS n
FROM rollup_funnel
WHERE bucket_start >= $1 AND bucket_start <= $2
GROUP BY step
"""
# The same two from the hourly, page-less and effect-less rollups (hourly trend buckets).
_EVENTS_HOURLY_SQL = """
SELECT date_bin($3::interval, hour_start, timestamptz 'epoch') AS b, sum(count)::bigint AS n
FROM rollup_events_hourly
WHERE hour_start >= $1 AND hour_start <= $2
GROUP BY 1
"""
_FUNNEL_HOURLY_SQL = """
SELECT step, sum(count)::bigint AS n
FROM rollup_funnel_hourly
WHERE hour_start >= $1 AND hour_start <= $2
GROUP BY step
"""


def _floor(moment: datetime, size: timedelta) -> datetime:
    """The start of the `size` bucket (aligned on the Unix epoch, like date_bin) holding `moment`."""
    return _EPOCH + ((moment - _EPOCH) // size) * size


def _bins_sql(size: timedelta) -> str:
    """The sketch query for trend buckets of `size`."""
    return _BINS_PER_HOUR_SQL if size >= HOUR else _BINS_SQL


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class Dashboard:
    """Builds, caches and serves the performance dashboard.

    Args:
        pool: the analytics pool (search_path = the analytics schema).
        cache: a cache of raw bytes (:data:`~services.servicekit.cache.RAW_BYTES`); key = window.
        monitoring: stub for ``GetServiceSummary``; None disables the monitoring sections.
        ttl_seconds: how long an answer is served from the cache.
        monitoring_timeout: deadline of the ``GetServiceSummary`` call, seconds.
        clock: what "now" is (the app's clock; tests pin it with a ManualClock).

    ``computations`` counts the answers actually computed (cache misses).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: MultiLevelCache[bytes],
        monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None,
        ttl_seconds: float,
        monitoring_timeout: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._monitoring = monitoring
        self._ttl = ttl_seconds
        self._monitoring_timeout = monitoring_timeout
        self._clock = clock
        self._sketches = Sketches(pool)
        self.computations = 0

    async def get(
        self, request: analytics_pb2.GetPerformanceDashboardRequest
    ) -> analytics_pb2.GetPerformanceDashboardResponse:
        window = parse_window(request.window, DEFAULT_DASHBOARD_WINDOW)
        return await get_or_load_message(
            self._cache,
            window.text,
            analytics_pb2.GetPerformanceDashboardResponse,
            lambda: self.compute(window),
            self._ttl,
        )

    async def compute(self, window: Window) -> analytics_pb2.GetPerformanceDashboardResponse:
        """A fresh answer for `window`, bypassing the cache."""
        self.computations += 1
        now = self._clock.now()
        since = now - window.length
        since_hour = _floor(since, HOUR)
        size = TREND_BUCKETS[window.text]
        hourly = size >= HOUR
        # Hourly trend buckets: every rollup from the hour holding `since` (whole trend buckets).
        start = since_hour if hourly else _floor(since, ROLLUP_BUCKET)
        names = list(WEB_VITALS)

        queries, distinct, summary = await asyncio.gather(
            self._queries(hourly, start, now, size, names),
            self._distinct(hourly, since_hour, now, size),
            self._service_summary(window),
        )
        bins, ratings, events, funnel = queries
        sessions_by_bucket, window_sessions, window_users = distinct

        response = analytics_pb2.GetPerformanceDashboardResponse(window=window.text)
        response.generated_at.FromDatetime(now)

        # Web vitals: the p75 per (trend bucket, name) from its bins; per name, from all
        # its buckets' bins merged.
        # Rows are per trend bucket, or per hour when the trend bucket is longer (merged here).
        bucket_p75: dict[tuple[datetime, str], float] = {}
        window_bins: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        merging = size > HOUR
        bucket_bins: dict[tuple[datetime, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        for row in bins:
            merged = window_bins[row["name"]]
            if merging:
                into = bucket_bins[(_floor(row["b"], size), row["name"])]
                for bin_, count in zip(row["bins"], row["counts"], strict=True):
                    merged[bin_] += count
                    into[bin_] += count
                continue
            value = sketch.quantile_sorted(row["bins"], row["counts"], P75)
            if value is not None:
                bucket_p75[(row["b"], row["name"])] = value
            for bin_, count in zip(row["bins"], row["counts"], strict=True):
                merged[bin_] += count
        for key, merged_bins in bucket_bins.items():
            value = sketch.quantile(merged_bins, P75)
            if value is not None:
                bucket_p75[key] = value
        by_name = {row["name"]: row for row in ratings}
        for name in WEB_VITALS:
            rated_row = by_name.get(name)
            samples = int(rated_row["samples"]) if rated_row else 0
            if name not in ALWAYS_SHOWN_VITALS and samples == 0:
                continue
            good = int(rated_row["good"]) if rated_row else 0
            middle = int(rated_row["needs_improvement"]) if rated_row else 0
            poor = int(rated_row["poor"]) if rated_row else 0
            rated = good + middle + poor
            p75 = sketch.quantile(window_bins.get(name, {}), P75)
            response.web_vitals.add(
                name=name,
                samples=samples,
                p75=p75 if p75 is not None else 0.0,
                rating=(rate(name, p75) or "") if p75 is not None else "",
                good_share=_share(good, rated),
                needs_improvement_share=_share(middle, rated),
                poor_share=_share(poor, rated),
            )

        # Engagement.
        events_by_bucket = {row["b"]: int(row["n"]) for row in events}
        response.engagement.sessions = window_sessions
        response.engagement.users = window_users
        response.engagement.events = sum(events_by_bucket.values())

        # Funnel summary.
        steps = {int(row["step"]): int(row["n"]) for row in funnel}
        started, completed = steps.get(1, 0), steps.get(COMPLETED_STEP, 0)
        response.funnel.started_sessions = started
        response.funnel.completed_sessions = completed
        response.funnel.overall_conversion = min(1.0, _share(completed, started))
        biggest, biggest_step = 0, ""
        for position in range(2, len(FUNNEL_STEPS) + 1):
            lost = steps.get(position - 1, 0) - steps.get(position, 0)
            if lost > biggest:
                biggest, biggest_step = lost, FUNNEL_STEPS[position - 1]
        response.funnel.biggest_drop_off_step = biggest_step

        # Trend: every bucket from the one holding `since` to the one holding `now`.
        bucket = _floor(since, size)
        last = _floor(now, size)
        while bucket <= last:
            point = response.trend.add(
                events=events_by_bucket.get(bucket, 0),
                sessions=sessions_by_bucket.get(_floor(bucket, HOUR) if size < HOUR else bucket, 0),
            )
            point.bucket_start.FromDatetime(bucket)
            for name in WEB_VITALS:
                value = bucket_p75.get((bucket, name))
                if value is not None:
                    point.web_vitals_p75[name] = value
            bucket += size

        # Monitoring sections.
        if summary is None:
            response.unavailable_sections.extend(MONITORING_SECTIONS)
        else:
            for e in summary.endpoints:
                response.api_latency.add(
                    service=e.service,
                    endpoint=e.endpoint,
                    requests=e.requests,
                    p50_ms=e.p50_ms,
                    p95_ms=e.p95_ms,
                    p99_ms=e.p99_ms,
                    error_rate=_share(e.errors, e.requests),
                )
            for c in summary.caches:
                response.cache_hit_rates.add(
                    service=c.service,
                    cache=c.cache,
                    hits=c.hits,
                    misses=c.misses,
                    hit_rate=_share(c.hits, c.hits + c.misses),
                )
            response.open_alerts.warning = summary.open_warning_alerts
            response.open_alerts.error = summary.open_error_alerts
            response.open_alerts.critical = summary.open_critical_alerts
        return response

    async def _queries(
        self, hourly: bool, start: datetime, now: datetime, size: timedelta, names: list[str]
    ) -> tuple[list[Any], ...]:
        """The rollup reads of one dashboard, concurrently: bins, ratings, events, funnel."""
        return tuple(
            await asyncio.gather(
                self._fetch(_bins_sql(size), start, now, size, names),
                self._fetch(_RATINGS_SQL, start, now, names),
                self._fetch(_EVENTS_HOURLY_SQL if hourly else _EVENTS_SQL, start, now, size),
                self._fetch(_FUNNEL_HOURLY_SQL if hourly else _FUNNEL_SQL, start, now),
            )
        )

    async def _distinct(
        self, hourly: bool, since_hour: datetime, now: datetime, size: timedelta
    ) -> tuple[dict[datetime, int], int, int]:
        """Distinct sessions per trend bucket (an hour's for buckets under an hour), and
        distinct sessions and users over the window: from the sketches for hourly trend
        buckets, exact (``rollup_sessions``) for the short windows."""
        if hourly:
            starts = []
            bucket = _floor(since_hour, size)
            while bucket <= now:
                starts.append(max(bucket, since_hour))
                bucket += size
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                estimate = await self._sketches.window(conn, starts, now)
            if size == HOUR:
                per_bucket = estimate.hour_sessions
            else:
                per_bucket = {
                    _floor(start, size): e.sessions for start, e in zip(starts, estimate.buckets, strict=True)
                }
            return per_bucket, estimate.total.sessions, estimate.total.users
        sessions, visitors = await asyncio.gather(
            self._fetch(_SESSIONS_HOURLY_SQL, since_hour, now), self._fetch(_VISITORS_SQL, since_hour, now)
        )
        return (
            {row["b"]: int(row["sessions"]) for row in sessions},
            int(visitors[0]["sessions"]),
            int(visitors[0]["users"]),
        )

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """One read-only query with room to hash its aggregates in memory."""
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            await conn.execute(f"SET LOCAL work_mem = '{WORK_MEM}'")
            return await conn.fetch(sql, *args)

    async def _service_summary(self, window: Window) -> monitoring_pb2.GetServiceSummaryResponse | None:
        """Monitoring's summary, or None when it is not configured or does not answer in time."""
        if self._monitoring is None:
            return None
        request = monitoring_pb2.GetServiceSummaryRequest()
        request.window.FromTimedelta(window.length)
        try:
            return await self._monitoring.GetServiceSummary(request, timeout=self._monitoring_timeout)
        except grpc.aio.AioRpcError as exc:
            log.warning(
                "monitoring summary unavailable",
                extra={"code": exc.code().name, "error": exc.details()},
            )
        except Exception as exc:  # a closed channel or the like: degrade, never fail the dashboard
            log.warning("monitoring summary failed", extra={"error": repr(exc)})
        return None
