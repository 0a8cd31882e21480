"""Weekly performance reports: ISO weeks in UTC, made once by two replicas sharing one
database, e-mailed to a real local SMTP server (aiosmtpd), served as HTML and PDF through
the REST edge, and made without monitoring's sections when monitoring is down."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import grpc
import pytest
from aiosmtpd.controller import Controller

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.report_data import gather
from services.analytics.weeks import Week, last_complete_week, parse_week, week_of
from services.servicekit.clock import ManualClock, SystemClock
from services.servicekit.errors import ServiceError, bad_request_violations
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import (
    ADMIN,
    FRESH,
    Client,
    analytics_app,
    connect,  # noqa: F401  (fixture)
    day_at,
)
from tests.conftest import StartService
from tests.monitoring.conftest import start_monitoring  # noqa: F401  (fixture)
from tests.support import free_port, unique_name

# --------------------------------------------------------------------------- weeks


def test_iso_weeks_in_utc() -> None:
    w = parse_week("2026-W48")
    assert w.start == datetime(2026, 11, 23, tzinfo=UTC) and w.end == datetime(2026, 11, 30, tzinfo=UTC)
    assert w.label == "2026-W48" and w.previous.label == "2026-W47"
    # Sunday 23:59:59.999999 UTC is still the week; Monday 00:00 UTC is the next one.
    assert week_of(datetime(2026, 11, 29, 23, 59, 59, 999999, tzinfo=UTC)) == w
    assert week_of(datetime(2026, 11, 30, tzinfo=UTC)).label == "2026-W49"
    # A moment given in another zone is taken in UTC: Monday 01:00 at UTC+2 is Sunday 23:00 UTC.
    plus_two = datetime(2026, 11, 30, 1, 0, tzinfo=UTC).astimezone(
        __import__("datetime").timezone(timedelta(hours=2))
    ) - timedelta(hours=2)
    assert week_of(plus_two) == w
    # ISO years: 2026 has 53 weeks (it starts on a Thursday), 2025 has 52; 1 Jan 2027 is in 2026-W53.
    assert parse_week("2026-W53").start == datetime(2026, 12, 28, tzinfo=UTC)
    assert week_of(datetime(2027, 1, 1, tzinfo=UTC)).label == "2026-W53"
    assert week_of(datetime(2024, 12, 30, tzinfo=UTC)).label == "2025-W01"
    assert last_complete_week(datetime(2026, 12, 2, 10, tzinfo=UTC)).label == "2026-W48"
    assert last_complete_week(datetime(2026, 11, 30, 0, 0, tzinfo=UTC)).label == "2026-W48"
    for bad in [
        "2025-W53",
        "2026-W00",
        "2026-W54",
        "2026-48",
        "2026-w48",
        "26-W48",
        "2026-W4",
        "",
        "2026-W48\x00",
    ]:
        with pytest.raises(ServiceError):
            parse_week(bad)


# --------------------------------------------------------------------------- SMTP


@dataclass
class Inbox:
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
async def smtp() -> AsyncIterator[tuple[Inbox, int]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    yield inbox, port
    await asyncio.to_thread(controller.stop)


def report_settings(port: int, **extra: Any) -> dict[str, Any]:
    return {
        **FRESH,
        "analytics_smtp_host": "127.0.0.1",
        "analytics_smtp_port": port,
        "analytics_report_recipients": "pm@cosnap.example, cto@cosnap.example",
        "analytics_report_delay_minutes": 0,
        "analytics_report_check_seconds": 3600,  # the tests call tick() themselves
        **extra,
    }


async def record_week(c: Client, week: Week) -> None:
    """Hand-built data: LCP on Tuesday (p75 3000 ms) and Thursday, events, a funnel."""
    from cosnap.analytics.v1 import analytics_pb2 as pb

    tuesday, thursday = week.days[1], week.days[3]
    metrics = pb.RecordPerformanceMetricsRequest()
    for i, (day, value) in enumerate(
        [(tuesday, v) for v in (1000.0, 2000.0, 3000.0, 9000.0)] + [(thursday, v) for v in (500.0, 600.0)]
    ):
        m = metrics.metrics.add(metric_id=f"m{i}-{week.label}", session_id="s1", name="LCP", value=value)
        m.timestamp.FromDatetime(day_at(day))
    assert (await c.stub.RecordPerformanceMetrics(metrics, timeout=10)).accepted == 6
    await c.events("u1", day_at(tuesday), 3)
    await c.events("u2", day_at(thursday), 2)
    await c.steps("u1", day_at(tuesday, 12, 0), "effect_discovered")
    await c.steps("u1", day_at(tuesday, 12, 1), "effect_viewed")


@pytest.fixture
async def two_replicas(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    smtp: tuple[Inbox, int],
) -> tuple[Client, Client]:
    schema = unique_name("reports")
    shared = {"db_schema": schema, "redis_prefix": schema, **report_settings(smtp[1])}
    a = connect(await start_service(analytics_app(), **shared))
    b = connect(await start_service(analytics_app(), **shared))
    return a, b


def reports_of(c: Client) -> Any:
    return analytics_app().state(c.app).business.reports


async def test_report_made_once_by_two_replicas_and_mailed(
    two_replicas: tuple[Client, Client], smtp: tuple[Inbox, int]
) -> None:
    a, b = two_replicas
    week = last_complete_week(datetime.now(UTC))
    await record_week(a, week)
    made = await asyncio.gather(reports_of(a).tick(), reports_of(b).tick(), reports_of(a).tick())
    assert sorted(m for m in made if m) == [week.label]
    assert reports_of(a).generated + reports_of(b).generated == [week.label]
    # Again: nothing more to do.
    assert await asyncio.gather(reports_of(a).tick(), reports_of(b).tick()) == [None, None]

    inbox, _ = smtp
    assert len(inbox.messages) == 1
    sender, rcpts, raw = inbox.messages[0]
    assert sender == "reports@cosnap.local"
    assert sorted(rcpts) == ["cto@cosnap.example", "pm@cosnap.example"]
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert message["Subject"] == f"Cosnap weekly performance {week.label}"
    parts = {part.get_content_type(): part for part in message.walk()}
    assert {"text/plain", "text/html", "image/png", "application/pdf"} <= set(parts)
    pdf = parts["application/pdf"].get_content()
    assert pdf.startswith(b"%PDF") and parts["image/png"].get_content().startswith(b"\x89PNG")
    assert "weekly active users" in parts["text/plain"].get_content()

    listed = await b.stub.ListWeeklyReports(
        analytics_pb2.ListWeeklyReportsRequest(), metadata=ADMIN, timeout=10
    )
    (info,) = listed.reports
    assert (info.week, info.trigger) == (week.label, "scheduled")
    assert sorted(info.sent_to) == ["cto@cosnap.example", "pm@cosnap.example"]
    assert info.week_start.ToDatetime(tzinfo=UTC) == week.start
    assert "2 weekly active users" in info.summary

    # Served by the other replica from the stored row, not made again.
    reply = await b.stub.GetWeeklyReport(
        analytics_pb2.GetWeeklyReportRequest(week=week.label, format="pdf"), metadata=ADMIN, timeout=60
    )
    assert reply.body.content_type == "application/pdf" and reply.body.data == pdf
    assert reports_of(b).generated == [] or reports_of(a).generated == []


async def test_report_figures(two_replicas: tuple[Client, Client]) -> None:
    a, _ = two_replicas
    week = last_complete_week(datetime.now(UTC))
    await record_week(a, week)
    await analytics_app().state(a.app).business.preagg.run_once(min_age_seconds=0)
    assert a.app.pool is not None
    data = await gather(a.app.pool, week, week.end + timedelta(days=3), None)
    lcp = data.vitals[0]
    assert lcp.name == "LCP"
    # Tuesday: 1000, 2000, 3000, 9000 -> p75 (nearest rank) 3000; Thursday 500, 600 -> 600.
    assert lcp.daily_p75[1] == pytest.approx(3000, rel=0.01)
    assert lcp.daily_p75[3] == pytest.approx(600, rel=0.01)
    assert [x is None for x in lcp.daily_p75] == [True, False, True, False, True, True, True]
    assert lcp.p75 == pytest.approx(3000, rel=0.01) and lcp.previous_p75 is None
    assert (lcp.samples, lcp.good, lcp.poor) == (6, pytest.approx(4 / 6), pytest.approx(1 / 6))
    assert data.events == [0, 3, 0, 2, 0, 0, 0]
    assert data.active_users == [0, 1, 0, 1, 0, 0, 0] and data.weekly_users == 2
    assert [s.sessions for s in data.funnel[:3]] == [1, 1, 0]
    # No monitoring configured: its sections are left out, with the reason.
    assert set(data.unavailable) == {"apiLatency", "cacheHitRates", "alerts"}
    assert data.unavailable["alerts"] == "monitoring is not configured" and data.alerts is None


async def test_reports_through_the_edge(
    two_replicas: tuple[Client, Client], start_edge: Callable[..., Any]
) -> None:
    a, _ = two_replicas
    now = datetime.now(UTC)
    week = last_complete_week(now)
    await record_week(a, week)
    base = await start_edge(a.app)
    admin = {"Authorization": ADMIN[0][1]}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/analytics/reports/{week.label}?format=pdf", headers=admin) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"] == "application/pdf"
            assert (await resp.read()).startswith(b"%PDF")
        async with http.get(f"{base}/api/analytics/reports/{week.label}", headers=admin) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/html")
            page = await resp.text()
        assert week.label in page and "What changed" in page and "<svg" in page
        async with http.get(f"{base}/api/analytics/reports", headers=admin) as resp:
            listed = await resp.json()
        assert [(r["week"], r["trigger"], r["sentTo"]) for r in listed["reports"]] == [
            (week.label, "on_demand", [])
        ]
        # Bad or unavailable weeks.
        current = week_of(now).label
        cases = [
            (f"{week.label}?format=docx", 400),
            ("2026-W99", 400),
            ("latest", 400),
            (current, 400),  # not over yet: FAILED_PRECONDITION
            (week_of(now - timedelta(days=120)).label, 404),  # past the retention, never made
        ]
        for path, status in cases:
            async with http.get(f"{base}/api/analytics/reports/{path}", headers=admin) as resp:
                assert resp.status == status, path
        async with http.get(f"{base}/api/analytics/reports/{week.label}") as resp:
            assert resp.status == 401


async def test_report_without_monitoring_and_paging(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    smtp: tuple[Inbox, int],
) -> None:
    c = connect(
        await start_service(
            analytics_app(), monitoring_addr=f"127.0.0.1:{free_port()}", **report_settings(smtp[1])
        )
    )
    week = last_complete_week(datetime.now(UTC))
    # Monday 01:00 after the week: the scheduled run; monitoring is asked (and is down).
    reports_of(c).clock = ManualClock(week.end + timedelta(hours=1))
    made = await reports_of(c).tick()
    assert made == week.label  # no data and monitoring down: made anyway
    page = await c.stub.GetWeeklyReport(
        analytics_pb2.GetWeeklyReportRequest(week=week.label), metadata=ADMIN, timeout=60
    )
    text = page.body.data.decode()
    assert "No traffic was recorded this week." in text
    assert "Not in this report" in text and "monitoring did not answer (UNAVAILABLE)" in text
    reports_of(c).clock = SystemClock()
    # Two more weeks on demand, then pages of one.
    for back in (1, 2):
        await c.stub.GetWeeklyReport(
            analytics_pb2.GetWeeklyReportRequest(
                week=(week.start - timedelta(weeks=back)).strftime("%G-W%V")
            ),
            metadata=ADMIN,
            timeout=60,
        )
    seen, token = [], ""
    while True:
        reply = await c.stub.ListWeeklyReports(
            analytics_pb2.ListWeeklyReportsRequest(page_size=1, page_token=token), metadata=ADMIN, timeout=10
        )
        seen += [r.week for r in reply.reports]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [week.label, week.previous.label, week.previous.previous.label]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await c.stub.ListWeeklyReports(
            analytics_pb2.ListWeeklyReportsRequest(page_token="nonsense"), metadata=ADMIN, timeout=10
        )
    assert bad_request_violations(err.value)[0][0] == "pageToken"


async def seed_monitoring(app: ServiceApp, week: Week) -> None:
    """Hand-built monitoring rollups and alerts, in the week and on both sides of it."""
    before, inside, after = week.start - timedelta(hours=1), week.start + timedelta(days=2), week.end
    bucket_10ms = [0, 1] + [0] * 14  # one request in (5 ms, 10 ms]
    bucket_slow = [0] * 15 + [1]  # one above 30 s
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO api_rollup_minute (bucket_start, service, endpoint, requests, errors, sum_ms,"
            " max_ms, buckets) VALUES ($1, 'analytics', $2, $3, $4, 0, $5, $6)",
            [
                (
                    inside,
                    "/cosnap.analytics.v1.AnalyticsService/RecordEvents",
                    40,
                    2,
                    10.0,
                    [n * 40 for n in bucket_10ms],
                ),
                (
                    before,
                    "/cosnap.analytics.v1.AnalyticsService/RecordEvents",
                    100,
                    50,
                    40000.0,
                    [n * 100 for n in bucket_slow],
                ),
                (
                    after,
                    "/cosnap.analytics.v1.AnalyticsService/RecordEvents",
                    100,
                    50,
                    40000.0,
                    [n * 100 for n in bucket_slow],
                ),
                (
                    after,
                    "/cosnap.analytics.v1.AnalyticsService/GetFunnelReport",
                    5,
                    0,
                    10.0,
                    [n * 5 for n in bucket_10ms],
                ),
            ],
        )
        await conn.executemany(
            "INSERT INTO cache_rollup_minute (bucket_start, service, cache, hits, misses)"
            " VALUES ($1, 'effects', 'task', $2, $3)",
            [(inside, 9, 1), (inside + timedelta(minutes=1), 9, 1), (before, 0, 50), (after, 0, 50)],
        )
        alerts = [
            # (severity, first seen, resolved at): opened in the week and resolved in it,
            ("critical", inside, inside + timedelta(hours=1)),
            # opened before the week, resolved in it; opened in it, resolved after it;
            ("error", before, inside),
            ("error", inside, after + timedelta(hours=1)),
            # opened in it, still open; opened after it, still open; opened and resolved before it.
            ("warning", inside, None),
            ("warning", after + timedelta(hours=2), None),
            ("critical", before - timedelta(days=1), before),
        ]
        await conn.executemany(
            "INSERT INTO alerts (alert_id, fingerprint, source, metric, severity, state, first_seen_at,"
            " last_seen_at, resolved_at) VALUES ($1, $1, 'rule', 'api_latency_p95', $2, $3, $4, $4, $5)",
            [
                (f"a{i}", sev, "resolved" if resolved else "open", seen, resolved)
                for i, (sev, seen, resolved) in enumerate(alerts)
            ],
        )


async def test_report_of_a_past_week_with_a_real_monitoring_service(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    start_monitoring: Any,  # noqa: F811
    smtp: tuple[Inbox, int],
) -> None:
    """Two weeks back, made today: monitoring is asked for that week (end and window), and
    the rows before and after it, and the alerts outside it, are not in the report."""
    monitor = await start_monitoring(monitoring_rollup_retention_days=60)
    c = connect(
        await start_service(
            analytics_app(), monitoring_addr=f"127.0.0.1:{monitor.port}", **report_settings(smtp[1])
        )
    )
    week = last_complete_week(datetime.now(UTC)).previous
    await seed_monitoring(monitor, week)
    assert c.app.pool is not None
    data = await gather(c.app.pool, week, datetime.now(UTC), reports_of(c)._monitoring)
    assert data.unavailable == {}
    assert data.monitoring_span == (week.start, week.end)
    (endpoint,) = data.endpoints  # GetFunnelReport had requests only after the week
    assert endpoint.endpoint.endswith("/RecordEvents") and endpoint.requests == 40
    assert endpoint.p95_ms == pytest.approx(9.75)  # 5 + 5 x 38/40 inside the (5, 10] bucket
    assert endpoint.error_rate == pytest.approx(0.05)
    ((service, cache, hit_rate),) = [(x.service, x.cache, x.hit_rate) for x in data.caches]
    assert (service, cache, hit_rate) == ("effects", "task", pytest.approx(0.9))
    assert data.alerts is not None
    assert [(a.severity, a.opened, a.resolved) for a in data.alerts] == [
        ("critical", 1, 1),
        ("error", 1, 1),
        ("warning", 1, 0),
    ]
    # Open now (whatever the week): the error resolved after the week is closed, two warnings open.
    assert data.open_alerts == (2, 0, 0)

    # The report itself: the chart page, the table and the written summary.
    reply = await c.stub.GetWeeklyReport(
        analytics_pb2.GetWeeklyReportRequest(week=week.label), metadata=ADMIN, timeout=60
    )
    page = reply.body.data.decode()
    assert "Alerts this week" in page
    assert "<tr><td>critical</td><td>1</td><td>1</td></tr>" in page
    assert "3 alerts opened this week (1 critical, 1 error, 1 warning), 2 resolved." in page
    assert "Not in this report" not in page


async def test_monitoring_down_leaves_the_sections_out_with_the_reason(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    start_monitoring: Any,  # noqa: F811
) -> None:
    monitor = await start_monitoring(monitoring_rollup_retention_days=60)
    c = connect(await start_service(analytics_app(), monitoring_addr=f"127.0.0.1:{monitor.port}", **FRESH))
    week = last_complete_week(datetime.now(UTC)).previous
    assert c.app.pool is not None
    # A week older than monitoring keeps its rollups: refused, and said so.
    old = week_of(datetime.now(UTC) - timedelta(days=90))
    data = await gather(c.app.pool, old, datetime.now(UTC), reports_of(c)._monitoring)
    assert set(data.unavailable) == {"apiLatency", "cacheHitRates", "alerts"}
    assert data.unavailable["apiLatency"].startswith("monitoring refused the week")
    await monitor.stop()
    data = await gather(c.app.pool, week, datetime.now(UTC), reports_of(c)._monitoring, monitoring_timeout=2)
    assert set(data.unavailable) == {"apiLatency", "cacheHitRates", "alerts"}
    assert data.unavailable["alerts"].startswith("monitoring did not answer")
    assert data.alerts is None and data.endpoints == [] and data.open_alerts is None
