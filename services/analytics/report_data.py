"""What a weekly performance report shows, gathered for one ISO week and the one before.

Sources (all UTC):

* web vitals: the hourly sketch (``rollup_metric_bins_hourly``) merged per day
  and per week (p75, within the sketch's 1 % relative accuracy), rated with the
  web.dev thresholds; the good / needs-improvement / poor shares of the week
  from ``rollup_metrics``;
* traffic: events per day (``rollup_events_hourly``), active users per day and
  distinct over the week (``engagement_daily``);
* funnel: the ordered funnel (``funnel.py``) of attempts started in each week
  (conversion window 24 h), steps 1 to 7 (processing completed), read from the
  pre-aggregated walks (``funnel_walks.py``; the report refreshes them first);
* API latency p95 and error rate per endpoint, cache hit rates, alerts opened
  and resolved per severity within the week, and alerts open when the report is
  made: monitoring's ``GetServiceSummary`` asked for the week itself
  (``end`` = the week's end, ``window`` = 7 days), so any past week has them
  as long as monitoring keeps its rollups (``monitoring_rollup_retention_days``).
  When monitoring is not configured, does not answer, or refuses the window
  (older than its retention), these sections are listed in ``unavailable``
  with the reason and the report is made without them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

import asyncpg
import grpc

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.analytics import sketch
from services.analytics.funnel_walks import funnel_from_walks
from services.analytics.vitals import FUNNEL_STEPS, rate
from services.analytics.weeks import Week

log = logging.getLogger(__name__)

REPORT_VITALS = ("LCP", "INP", "CLS", "FCP", "TTFB")
FUNNEL_LAST_STEP = 7  # processing_completed: the effect ran
CONVERSION_WINDOW = timedelta(hours=24)
MONITORING_SECTIONS = ("apiLatency", "cacheHitRates", "alerts")
SEVERITIES = ("critical", "error", "warning")

_BINS_SQL = """
SELECT (hour_start AT TIME ZONE 'UTC')::date AS day, name, bin, sum(count)::bigint AS n
FROM rollup_metric_bins_hourly
WHERE hour_start >= $1 AND hour_start < $2 AND name = ANY($3::text[])
GROUP BY 1, 2, 3
"""
_RATINGS_SQL = """
SELECT name, sum(count)::bigint AS samples, sum(good)::bigint AS good,
       sum(needs_improvement)::bigint AS needs_improvement, sum(poor)::bigint AS poor
FROM rollup_metrics
WHERE bucket_start >= $1 AND bucket_start < $2 AND name = ANY($3::text[])
GROUP BY name
"""
_EVENTS_SQL = """
SELECT (hour_start AT TIME ZONE 'UTC')::date AS day, sum(count)::bigint AS n
FROM rollup_events_hourly WHERE hour_start >= $1 AND hour_start < $2 GROUP BY 1
"""
_USERS_SQL = """
SELECT day, count(*)::bigint AS n FROM engagement_daily WHERE day >= $1 AND day < $2 GROUP BY day
"""
_WEEKLY_USERS_SQL = """
SELECT count(DISTINCT user_id)::bigint FROM engagement_daily WHERE day >= $1 AND day < $2
"""


@dataclass
class Vital:
    name: str
    daily_p75: list[float | None]
    p75: float | None
    previous_p75: float | None
    samples: int = 0
    good: float = 0.0
    needs_improvement: float = 0.0
    poor: float = 0.0

    @property
    def rating(self) -> str:
        return (rate(self.name, self.p75) or "") if self.p75 is not None else ""

    def rating_of(self, value: float | None) -> str:
        return (rate(self.name, value) or "") if value is not None else ""


@dataclass
class Endpoint:
    service: str
    endpoint: str
    requests: int
    p95_ms: float
    error_rate: float


@dataclass
class Cache:
    service: str
    cache: str
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class AlertActivity:
    severity: str  # "warning", "error" or "critical"
    opened: int  # first seen within the week
    resolved: int  # resolved within the week


@dataclass
class FunnelStep:
    name: str
    sessions: int
    previous_sessions: int


@dataclass
class WeeklyData:
    week: Week
    generated_at: datetime
    vitals: list[Vital]
    days: list[date]
    events: list[int]
    active_users: list[int]
    weekly_users: int
    previous_weekly_users: int
    previous_events: int
    funnel: list[FunnelStep]
    endpoints: list[Endpoint] = field(default_factory=list)
    caches: list[Cache] = field(default_factory=list)
    open_alerts: tuple[int, int, int] | None = None  # warning, error, critical; at report time
    alerts: list[AlertActivity] | None = None  # opened / resolved within the week, per severity
    monitoring_span: tuple[datetime, datetime] | None = None
    unavailable: dict[str, str] = field(default_factory=dict)  # section -> why

    @property
    def conversion(self) -> float | None:
        return _conversion([s.sessions for s in self.funnel])

    @property
    def previous_conversion(self) -> float | None:
        return _conversion([s.previous_sessions for s in self.funnel])


def _conversion(sessions: list[int]) -> float | None:
    if not sessions or sessions[0] == 0:
        return None
    return sessions[FUNNEL_LAST_STEP - 1] / sessions[0]


async def gather(
    pool: asyncpg.Pool,
    week: Week,
    now: datetime,
    monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None,
    monitoring_timeout: float = 2.0,
) -> WeeklyData:
    previous = week.previous
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("SET LOCAL work_mem = '64MB'")
        bins = await conn.fetch(_BINS_SQL, previous.start, week.end, list(REPORT_VITALS))
        ratings = await conn.fetch(_RATINGS_SQL, week.start, week.end, list(REPORT_VITALS))
        events = {r["day"]: int(r["n"]) for r in await conn.fetch(_EVENTS_SQL, previous.start, week.end)}
        users = {
            r["day"]: int(r["n"])
            for r in await conn.fetch(_USERS_SQL, previous.start.date(), week.end.date())
        }
        weekly_users = await conn.fetchval(_WEEKLY_USERS_SQL, week.start.date(), week.end.date())
        previous_users = await conn.fetchval(_WEEKLY_USERS_SQL, previous.start.date(), week.start.date())
    this_funnel = await funnel_from_walks(pool, week.start, week.end, CONVERSION_WINDOW)
    last_funnel = await funnel_from_walks(pool, previous.start, previous.end, CONVERSION_WINDOW)

    per_day: dict[tuple[str, date], dict[int, int]] = defaultdict(dict)
    per_week: dict[tuple[str, bool], dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for r in bins:
        per_day[(r["name"], r["day"])][r["bin"]] = int(r["n"])
        per_week[(r["name"], r["day"] >= week.start.date())][r["bin"]] += int(r["n"])
    by_name = {r["name"]: r for r in ratings}
    vitals = []
    for name in REPORT_VITALS:
        v = Vital(
            name=name,
            daily_p75=[sketch.quantile(per_day.get((name, d), {}), 0.75) for d in week.days],
            p75=sketch.quantile(per_week.get((name, True), {}), 0.75),
            previous_p75=sketch.quantile(per_week.get((name, False), {}), 0.75),
        )
        row = by_name.get(name)
        if row is not None:
            rated = int(row["good"]) + int(row["needs_improvement"]) + int(row["poor"])
            v.samples = int(row["samples"])
            if rated:
                v.good = int(row["good"]) / rated
                v.needs_improvement = int(row["needs_improvement"]) / rated
                v.poor = int(row["poor"]) / rated
        vitals.append(v)

    data = WeeklyData(
        week=week,
        generated_at=now,
        vitals=vitals,
        days=week.days,
        events=[events.get(d, 0) for d in week.days],
        active_users=[users.get(d, 0) for d in week.days],
        weekly_users=int(weekly_users or 0),
        previous_weekly_users=int(previous_users or 0),
        previous_events=sum(events.get(d, 0) for d in previous.days),
        funnel=[
            FunnelStep(name, this_funnel.get(i, (0, None))[0], last_funnel.get(i, (0, None))[0])
            for i, name in enumerate(FUNNEL_STEPS[:FUNNEL_LAST_STEP], start=1)
        ],
    )
    await _monitoring(data, monitoring, monitoring_timeout)
    return data


async def _monitoring(
    data: WeeklyData,
    monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None,
    timeout: float,
) -> None:
    week = data.week
    if monitoring is None:
        data.unavailable.update(dict.fromkeys(MONITORING_SECTIONS, "monitoring is not configured"))
        return
    request = monitoring_pb2.GetServiceSummaryRequest()
    request.window.FromTimedelta(week.end - week.start)
    request.end.FromDatetime(week.end)
    try:
        summary = await monitoring.GetServiceSummary(request, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        log.warning("monitoring summary unavailable", extra={"code": exc.code().name})
        why = f"monitoring did not answer ({exc.code().name})"
        if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
            why = f"monitoring refused the week ({exc.details()}); it may be older than monitoring keeps"
        data.unavailable.update(dict.fromkeys(MONITORING_SECTIONS, why))
        return
    except Exception as exc:  # a closed channel or the like: the report goes on without it
        log.warning("monitoring summary failed", extra={"error": repr(exc)})
        data.unavailable.update(dict.fromkeys(MONITORING_SECTIONS, "monitoring did not answer"))
        return
    data.monitoring_span = (week.start, week.end)
    data.endpoints = [
        Endpoint(e.service, e.endpoint, e.requests, e.p95_ms, e.errors / e.requests if e.requests else 0.0)
        for e in summary.endpoints
    ]
    data.caches = [Cache(c.service, c.cache, c.hits, c.misses) for c in summary.caches]
    data.open_alerts = (
        summary.open_warning_alerts,
        summary.open_error_alerts,
        summary.open_critical_alerts,
    )
    activity = {a.severity: a for a in summary.alert_activity}
    data.alerts = [
        AlertActivity(
            severity,
            activity[severity].opened if severity in activity else 0,
            activity[severity].resolved if severity in activity else 0,
        )
        for severity in SEVERITIES
    ]
