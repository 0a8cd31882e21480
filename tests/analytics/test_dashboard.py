"""GetPerformanceDashboard end to end: data recorded through the ingest RPCs of a real
analytics service (PostgreSQL, Redis), the dashboard read over gRPC and the REST edge,
with and without a real monitoring gRPC server answering GetServiceSummary."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.analytics.dashboard import Dashboard
from services.analytics.sketch import RELATIVE_ACCURACY
from services.analytics.vitals import FUNNEL_STEPS
from services.analytics.windows import parse_window
from services.servicekit.clock import ManualClock
from services.servicekit.errors import bad_request_violations
from services.servicekit.server import ServiceApp
from tests.conftest import EdgeFactory, StartService
from tests.support import free_port

SERVICE = "cosnap.analytics.v1.AnalyticsService"
Metadata = tuple[tuple[str, str], ...]


def analytics_app() -> ModuleType:
    return importlib.import_module("services.analytics.app")


def auth(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


def find_dashboard(app: ServiceApp) -> Dashboard:
    """The Dashboard the wiring built."""
    dashboard: Dashboard = analytics_app().state(app).dashboard
    return dashboard


# --------------------------------------------------------------------------- monitoring stand-in


@dataclass
class Monitoring(monitoring_pb2_grpc.MonitoringServiceServicer):
    """A real gRPC MonitoringService answering GetServiceSummary with fixed figures."""

    requests: list[monitoring_pb2.GetServiceSummaryRequest] = field(default_factory=list)

    async def GetServiceSummary(
        self, request: monitoring_pb2.GetServiceSummaryRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.GetServiceSummaryResponse:
        self.requests.append(request)
        return monitoring_pb2.GetServiceSummaryResponse(
            endpoints=[
                monitoring_pb2.EndpointSummary(
                    service="analytics",
                    endpoint="/cosnap.analytics.v1.AnalyticsService/RecordEvents",
                    requests=1000,
                    errors=25,
                    p50_ms=3.5,
                    p95_ms=12.0,
                    p99_ms=40.0,
                ),
                monitoring_pb2.EndpointSummary(
                    service="effects",
                    endpoint="/cosnap.effects.v1.EffectsService/GetTask",
                    requests=0,
                    errors=0,
                ),
            ],
            caches=[
                monitoring_pb2.CacheSummary(service="effects", cache="task", hits=90, misses=10),
                monitoring_pb2.CacheSummary(service="analytics", cache="dashboard", hits=0, misses=0),
            ],
            open_warning_alerts=3,
            open_error_alerts=2,
            open_critical_alerts=1,
        )


@pytest.fixture
async def monitoring() -> AsyncIterator[tuple[Monitoring, str]]:
    servicer = Monitoring()
    server = grpc.aio.server()
    monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(grace=None)


# --------------------------------------------------------------------------- service fixtures


@dataclass
class Analytics:
    app: ServiceApp
    stub: analytics_pb2_grpc.AnalyticsServiceStub
    admin: Metadata


@pytest.fixture
async def connect(admin_token: str) -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp) -> Analytics:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return Analytics(app, analytics_pb2_grpc.AnalyticsServiceStub(channel), auth(admin_token))

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
def clock() -> ManualClock:
    """The service's clock, pinned at NOW: the dashboard's "now" and its cache's expiry."""
    return ManualClock(NOW)


@pytest.fixture
async def with_monitoring(
    start_service: StartService, connect: Any, monitoring: tuple[Monitoring, str], clock: ManualClock
) -> Analytics:
    return connect(await start_service(analytics_app(), monitoring_addr=monitoring[1], clock=clock))


@pytest.fixture
async def monitoring_down(start_service: StartService, connect: Any, clock: ManualClock) -> Analytics:
    return connect(
        await start_service(analytics_app(), monitoring_addr=f"127.0.0.1:{free_port()}", clock=clock)
    )


# --------------------------------------------------------------------------- the data set

NOW = datetime.now(UTC)
# Two trend hours, 10 minutes into each: everything recorded at them (up to 40 s
# later) stays inside its hour whatever the time of day the tests run.
_HOUR_NOW = NOW.replace(minute=0, second=0, microsecond=0)
EARLY = _HOUR_NOW - timedelta(hours=5) + timedelta(minutes=10)  # 4h50m to 5h50m ago
LATE = _HOUR_NOW - timedelta(hours=2) + timedelta(minutes=10)  # 1h50m to 2h50m ago

# LCP: 12 good (<= 2500, the edge included), 5 needs-improvement (4000 included), 3 poor.
LCP_EARLY = [800.0, 900.0, 1000.0, 1100.0, 1200.0, 1300.0, 1400.0, 1500.0, 1600.0, 1700.0]
LCP_LATE = [1800.0, 2500.0, 2600.0, 2800.0, 3000.0, 3500.0, 4000.0, 4100.0, 5000.0, 9000.0]
CLS_LATE = [0.05, 0.05, 0.05, 0.3]
FID_LATE = [50.0, 400.0]
SESSIONS = {"s1": "u1", "s2": "u2", "s3": ""}  # s3 is anonymous


def p75(values: list[float]) -> float:
    """Lower nearest rank, like the sketch and percentile_disc."""
    ordered = sorted(values)
    return ordered[-(-len(ordered) * 3 // 4) - 1]


async def record_all(a: Analytics) -> None:
    run = uuid.uuid4().hex[:8]
    sessions = list(SESSIONS)
    metrics = analytics_pb2.RecordPerformanceMetricsRequest()
    samples = [
        *(("LCP", v, EARLY) for v in LCP_EARLY),
        *(("LCP", v, LATE) for v in LCP_LATE),
        *(("CLS", v, LATE) for v in CLS_LATE),
        *(("FID", v, LATE) for v in FID_LATE),
        ("API_RESPONSE", 120.0, LATE),
    ]
    for i, (name, value, at) in enumerate(samples):
        session = sessions[i % 2] if at == EARLY else sessions[i % 3]  # s3 only late
        m = metrics.metrics.add(
            metric_id=f"{run}-m{i}",
            session_id=f"{run}-{session}",
            user_id=SESSIONS[session],
            name=name,
            value=value,
            page="/effects",
            attributes={"endpoint": "/api/effects"} if name == "API_RESPONSE" else {},
        )
        m.timestamp.FromDatetime(at + timedelta(seconds=i))
    reply = await a.stub.RecordPerformanceMetrics(metrics, timeout=10)
    assert reply.accepted == len(samples)

    events = analytics_pb2.RecordEventsRequest()
    # 3 events early (s1, s2), 4 late (s1, s2, s3).
    for i, (session, at) in enumerate(
        [("s1", EARLY), ("s1", EARLY), ("s2", EARLY), ("s1", LATE), ("s2", LATE), ("s3", LATE), ("s3", LATE)]
    ):
        e = events.events.add(
            event_id=f"{run}-e{i}",
            session_id=f"{run}-{session}",
            user_id=SESSIONS[session],
            event_type="effect_click",
            page="/effects",
        )
        e.timestamp.FromDatetime(at + timedelta(seconds=i))
    assert (await a.stub.RecordEvents(events, timeout=10)).accepted == 7

    steps = analytics_pb2.RecordFunnelStepsRequest()
    # s1 reaches processing_completed; s2 and s3 stop after effect_started.
    reached = {"s1": 7, "s2": 3, "s3": 3}
    for session, last in reached.items():
        for number in range(1, last + 1):
            s = steps.steps.add(
                step_id=f"{run}-{session}-{number}",
                session_id=f"{run}-{session}",
                user_id=SESSIONS[session],
                step=FUNNEL_STEPS[number - 1],
                effect_id="fx-1",
            )
            s.timestamp.FromDatetime(LATE + timedelta(seconds=number))
    assert (await a.stub.RecordFunnelSteps(steps, timeout=10)).accepted == 13


async def dashboard(a: Analytics, window: str = "") -> analytics_pb2.GetPerformanceDashboardResponse:
    return await a.stub.GetPerformanceDashboard(
        analytics_pb2.GetPerformanceDashboardRequest(window=window), metadata=a.admin, timeout=10
    )


def check_own_sections(reply: analytics_pb2.GetPerformanceDashboardResponse) -> None:
    """Web vitals, engagement, funnel and trend against the hand-computed figures."""
    vitals = {v.name: v for v in reply.web_vitals}
    assert list(vitals) == ["LCP", "INP", "CLS", "FCP", "TTFB", "FID"]

    lcp = vitals["LCP"]
    assert lcp.samples == 20
    assert p75(LCP_EARLY + LCP_LATE) == 3000.0
    assert lcp.p75 == pytest.approx(3000.0, rel=RELATIVE_ACCURACY)
    assert lcp.rating == "needs-improvement"
    assert (lcp.good_share, lcp.needs_improvement_share, lcp.poor_share) == (0.6, 0.25, 0.15)

    cls = vitals["CLS"]
    assert cls.samples == 4 and cls.rating == "good"
    assert cls.p75 == pytest.approx(0.05, rel=RELATIVE_ACCURACY)
    assert (cls.good_share, cls.needs_improvement_share, cls.poor_share) == (0.75, 0.0, 0.25)

    fid = vitals["FID"]
    assert fid.samples == 2 and fid.rating == "poor"
    assert fid.p75 == pytest.approx(400.0, rel=RELATIVE_ACCURACY)
    assert (fid.good_share, fid.needs_improvement_share, fid.poor_share) == (0.5, 0.0, 0.5)

    for name in ("INP", "FCP", "TTFB"):
        empty = vitals[name]
        assert (empty.samples, empty.p75, empty.rating, empty.good_share) == (0, 0.0, "", 0.0)

    assert (reply.engagement.events, reply.engagement.sessions, reply.engagement.users) == (7, 3, 2)

    assert reply.funnel.started_sessions == 3
    assert reply.funnel.completed_sessions == 1
    assert reply.funnel.overall_conversion == pytest.approx(1 / 3)
    assert reply.funnel.biggest_drop_off_step == "image_uploaded"  # 3 -> 1

    assert reply.generated_at.seconds > 0


def check_trend_24h(reply: analytics_pb2.GetPerformanceDashboardResponse) -> None:
    points = {p.bucket_start.ToDatetime(tzinfo=UTC): p for p in reply.trend}
    starts = sorted(points)
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(starts))
    assert len(starts) == 25  # the partial hours at both ends included
    assert starts[-1] <= NOW < starts[-1] + timedelta(hours=1)
    assert reply.generated_at.ToDatetime(tzinfo=UTC) == NOW
    early = points.pop(EARLY.replace(minute=0, second=0, microsecond=0))
    late = points.pop(LATE.replace(minute=0, second=0, microsecond=0))
    assert (early.events, early.sessions) == (3, 2)
    assert (late.events, late.sessions) == (4, 3)
    assert sum(p.events for p in reply.trend) == 7
    assert early.web_vitals_p75["LCP"] == pytest.approx(p75(LCP_EARLY), rel=RELATIVE_ACCURACY)
    assert set(early.web_vitals_p75) == {"LCP"}
    assert late.web_vitals_p75["LCP"] == pytest.approx(p75(LCP_LATE), rel=RELATIVE_ACCURACY)
    assert late.web_vitals_p75["CLS"] == pytest.approx(0.05, rel=RELATIVE_ACCURACY)
    assert late.web_vitals_p75["FID"] == pytest.approx(400.0, rel=RELATIVE_ACCURACY)
    assert all(p.events == 0 and p.sessions == 0 and not p.web_vitals_p75 for p in points.values())


# --------------------------------------------------------------------------- tests


async def test_dashboard_with_monitoring(
    with_monitoring: Analytics, monitoring: tuple[Monitoring, str]
) -> None:
    await record_all(with_monitoring)
    reply = await dashboard(with_monitoring)
    assert reply.window == "24h"
    check_own_sections(reply)
    check_trend_24h(reply)
    assert list(reply.unavailable_sections) == []

    servicer, _ = monitoring
    assert servicer.requests[-1].window.ToTimedelta() == timedelta(hours=24)
    latency = {e.endpoint: e for e in reply.api_latency}
    events = latency["/cosnap.analytics.v1.AnalyticsService/RecordEvents"]
    assert (events.service, events.requests) == ("analytics", 1000)
    assert (events.p50_ms, events.p95_ms, events.p99_ms) == (3.5, 12.0, 40.0)
    assert events.error_rate == pytest.approx(0.025)
    assert latency["/cosnap.effects.v1.EffectsService/GetTask"].error_rate == 0.0
    caches = {(c.service, c.cache): c for c in reply.cache_hit_rates}
    assert caches["effects", "task"].hit_rate == pytest.approx(0.9)
    assert (caches["effects", "task"].hits, caches["effects", "task"].misses) == (90, 10)
    assert caches["analytics", "dashboard"].hit_rate == 0.0
    assert (reply.open_alerts.warning, reply.open_alerts.error, reply.open_alerts.critical) == (3, 2, 1)


async def test_dashboard_degrades_when_monitoring_is_down(monitoring_down: Analytics) -> None:
    await record_all(monitoring_down)
    started = time.perf_counter()
    reply = await dashboard(monitoring_down)
    assert time.perf_counter() - started < 5
    check_own_sections(reply)
    assert sorted(reply.unavailable_sections) == ["apiLatency", "cacheHitRates", "openAlerts"]
    assert len(reply.api_latency) == 0 and len(reply.cache_hit_rates) == 0
    assert not reply.HasField("open_alerts") or reply.open_alerts.critical == 0


@pytest.mark.parametrize(
    ("window", "bucket", "points"),
    [
        ("15m", timedelta(minutes=5), 4),
        ("1h", timedelta(minutes=5), 13),
        ("7d", timedelta(hours=6), 29),
        ("30d", timedelta(days=1), 31),
    ],
)
async def test_windows_and_trend_buckets(
    monitoring_down: Analytics, window: str, bucket: timedelta, points: int
) -> None:
    await record_all(monitoring_down)
    reply = await dashboard(monitoring_down, window)
    assert reply.window == window
    starts = [p.bucket_start.ToDatetime(tzinfo=UTC) for p in reply.trend]
    assert len(starts) == points  # window / bucket + 1: partial buckets at both ends
    assert all(b - a == bucket for a, b in itertools.pairwise(starts))
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    assert all((s - epoch) % bucket == timedelta(0) for s in starts)
    if window in ("7d", "30d"):
        check_own_sections(reply)
        assert sum(p.events for p in reply.trend) == 7
    else:  # everything is older than an hour
        assert reply.engagement.events == 0
        assert all(v.samples == 0 for v in reply.web_vitals)
        assert reply.funnel.started_sessions == 0 and reply.funnel.biggest_drop_off_step == ""


async def test_windows_read_the_sketch_of_their_grain(monitoring_down: Analytics, clock: ManualClock) -> None:
    """15m and 1h read the 5-minute, per-page sketch; 24h, 7d and 30d the hourly one. Both are
    kept by ingest from the same contributions, so on the same data they give the same p75."""
    a = monitoring_down
    run = uuid.uuid4().hex[:8]
    at = clock.now() - timedelta(minutes=10)
    values = [900.0, 1500.0, 2100.0, 2700.0, 3300.0, 3900.0, 4500.0, 5100.0]
    request = analytics_pb2.RecordPerformanceMetricsRequest()
    for i, value in enumerate(values):
        m = request.metrics.add(
            metric_id=f"{run}-{i}", session_id="s", name="LCP", value=value, page=f"/p{i % 3}"
        )
        m.timestamp.FromDatetime(at)
    assert (await a.stub.RecordPerformanceMetrics(request, timeout=10)).accepted == len(values)
    request.metrics[0].value = 6000.0  # a re-report moves the contribution in both sketches
    del request.metrics[1:]
    assert (await a.stub.RecordPerformanceMetrics(request, timeout=10)).accepted == 1
    expected = p75([6000.0, *values[1:]])

    board = find_dashboard(a.app)

    async def lcp(window: str) -> analytics_pb2.WebVitalSummary:
        reply = await board.compute(parse_window(window, "24h"))
        return next(v for v in reply.web_vitals if v.name == "LCP")

    results = {window: await lcp(window) for window in ("15m", "1h", "24h", "7d", "30d")}
    assert {w: (v.samples, v.p75) for w, v in results.items()} == {
        w: (len(values), results["1h"].p75) for w in results
    }
    assert results["1h"].p75 == pytest.approx(expected, rel=RELATIVE_ACCURACY)

    # Without the hourly sketch only the long windows lose their p75 (samples come from
    # rollup_metrics); without the 5-minute one only the short windows do.
    pool = a.app.pool
    assert pool is not None
    hourly = await pool.fetch("DELETE FROM rollup_metric_bins_hourly RETURNING hour_start, name, bin, count")
    assert len(hourly) > 0
    short, long = await lcp("1h"), await lcp("24h")
    assert (short.samples, short.p75) == (len(values), results["1h"].p75)
    assert (long.samples, long.p75) == (len(values), 0.0)
    async with pool.acquire() as conn:
        await conn.copy_records_to_table("rollup_metric_bins_hourly", records=[tuple(r) for r in hourly])
    await pool.execute("DELETE FROM rollup_metric_bins")
    short, long = await lcp("1h"), await lcp("24h")
    assert (short.samples, short.p75) == (len(values), 0.0)
    assert (long.samples, long.p75) == (len(values), results["1h"].p75)


async def test_burst_computes_once_and_is_cached(with_monitoring: Analytics, clock: ManualClock) -> None:
    await record_all(with_monitoring)
    board = find_dashboard(with_monitoring.app)
    before = board.computations
    replies = await asyncio.gather(*(dashboard(with_monitoring, "7d") for _ in range(50)))
    assert board.computations == before + 1
    assert len({r.generated_at.ToNanoseconds() for r in replies}) == 1
    again = await dashboard(with_monitoring, "7d")
    assert again.generated_at == replies[0].generated_at
    assert board.computations == before + 1
    assert again == replies[0]
    other = await dashboard(with_monitoring, "30d")  # another key: computed
    assert board.computations == before + 2
    assert other.window == "30d"

    # The answer lives the configured TTL on the service's clock, in L1 and in Redis.
    ttl = analytics_app().AnalyticsSettings.model_fields["analytics_dashboard_ttl_seconds"].default
    clock.advance(ttl - 0.5)
    assert (await dashboard(with_monitoring, "7d")).generated_at == replies[0].generated_at
    assert board.computations == before + 2
    clock.advance(1.0)
    fresh = await dashboard(with_monitoring, "7d")
    assert board.computations == before + 3
    assert (
        fresh.generated_at.ToDatetime(tzinfo=UTC)
        == clock.now()
        != replies[0].generated_at.ToDatetime(tzinfo=UTC)
    )


async def test_bad_window_and_access(with_monitoring: Analytics, user_token: str) -> None:
    for bad in ("2h", "24H", "1d", " 24h"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await dashboard(with_monitoring, bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request_violations(err.value)] == ["window"]
    request = analytics_pb2.GetPerformanceDashboardRequest()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await with_monitoring.stub.GetPerformanceDashboard(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await with_monitoring.stub.GetPerformanceDashboard(request, metadata=auth(user_token), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --------------------------------------------------------------------------- REST edge


@pytest.fixture
async def edge(with_monitoring: Analytics, make_edge: EdgeFactory) -> TestClient[Any, Any]:
    return await make_edge(backends={SERVICE: f"127.0.0.1:{with_monitoring.app.port}"})


async def test_rest_dashboard(
    with_monitoring: Analytics, edge: TestClient[Any, Any], admin_token: str, user_token: str
) -> None:
    await record_all(with_monitoring)
    headers = {"Authorization": f"Bearer {admin_token}"}
    response = await edge.get("/api/analytics/dashboard/performance", headers=headers)
    assert response.status == 200, await response.text()
    body = await response.json()
    assert body["window"] == "24h"
    lcp = next(v for v in body["webVitals"] if v["name"] == "LCP")
    assert lcp["p75"] == pytest.approx(3000.0, rel=RELATIVE_ACCURACY)
    assert (lcp["rating"], lcp["goodShare"], lcp["poorShare"]) == ("needs-improvement", 0.6, 0.15)
    assert int(body["engagement"]["events"]) == 7
    assert int(body["funnel"]["startedSessions"]) == 3
    assert int(body["openAlerts"]["critical"]) == 1
    assert body["apiLatency"][0]["p99Ms"] == 40.0
    assert body.get("unavailableSections", []) == []
    assert "generatedAt" in body and body["trend"]

    response = await edge.get("/api/analytics/dashboard/performance?window=2h", headers=headers)
    assert response.status == 400
    violations = [v for d in (await response.json()).get("details", []) for v in d.get("fieldViolations", [])]
    assert [v["field"] for v in violations] == ["window"]
    assert (await edge.get("/api/analytics/dashboard/performance")).status == 401
    response = await edge.get(
        "/api/analytics/dashboard/performance", headers={"Authorization": f"Bearer {user_token}"}
    )
    assert response.status == 403


@pytest.mark.parametrize(("window", "size"), [("7d", timedelta(hours=6)), ("30d", timedelta(days=1))])
async def test_long_windows_merge_the_hours_of_each_trend_bucket(
    monitoring_down: Analytics, window: str, size: timedelta
) -> None:
    """Trend buckets longer than an hour take the p75 of their hours' bins merged: each
    point's LCP p75 is that of the values whose time falls in it (UTC, epoch-aligned)."""
    await record_all(monitoring_down)
    reply = await dashboard(monitoring_down, window)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    by_bucket: dict[datetime, list[float]] = {}
    for values, at in ((LCP_EARLY, EARLY), (LCP_LATE, LATE)):
        by_bucket.setdefault(epoch + (at - epoch) // size * size, []).extend(values)
    points = {p.bucket_start.ToDatetime(tzinfo=UTC): p for p in reply.trend}
    for start, values in by_bucket.items():
        assert points[start].web_vitals_p75["LCP"] == pytest.approx(p75(values), rel=RELATIVE_ACCURACY)
    assert all("LCP" not in p.web_vitals_p75 for s, p in points.items() if s not in by_bucket)
