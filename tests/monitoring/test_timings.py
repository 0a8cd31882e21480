"""RecordApiTimings and ReportServiceStats into a real monitoring service:
raw rows in the day's partition, per-minute rollups with the threshold
bucket edges, GetServiceSummary's percentiles, and every kind of bad input
refused whole."""

from __future__ import annotations

import asyncio
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from cosnap.monitoring.v1 import monitoring_pb2
from services.monitoring import app as monitoring_app
from services.monitoring import histogram
from services.servicekit.errors import bad_request_violations
from tests.conftest import StartService
from tests.monitoring.conftest import Connect

ENDPOINT = "/cosnap.analytics.v1.AnalyticsService/RecordEvents"


def ts(moment: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(moment)
    return out


def timing(ms: float, code: str = "OK", at: datetime | None = None, **kw: Any) -> monitoring_pb2.ApiTiming:
    t = monitoring_pb2.ApiTiming(
        service=kw.get("service", "analytics"),
        endpoint=kw.get("endpoint", ENDPOINT),
        status_code=code,
        duration_ms=ms,
        instance=kw.get("instance", "analytics-0"),
    )
    if at is not None:
        t.observed_at.CopyFrom(ts(at))
    return t


def test_histogram_edges_hold_the_thresholds_and_quantiles_interpolate() -> None:
    for edge in (2500.0, 3000.0, 4000.0, 5000.0):
        assert edge in histogram.EDGES_MS
    counts = [0] * histogram.BUCKETS
    counts[histogram.bucket_of(1.0)] = 95  # [0, 5]
    counts[histogram.bucket_of(3500.0)] = 5  # (3000, 4000]
    assert histogram.quantile(counts, 0.95) == pytest.approx(5.0)  # rank 95 is the last of the first bucket
    counts[histogram.bucket_of(3500.0)] = 6
    assert 3000.0 < histogram.quantile(counts, 0.95) <= 4000.0  # > 5 % above 3 s: p95 above 3 s
    assert histogram.bucket_of(3000.0) == histogram.EDGES_MS.index(3000.0)  # edges inclusive
    assert histogram.quantile([0] * histogram.BUCKETS, 0.5) == 0.0


async def test_timings_land_raw_and_in_minute_rollups_and_summary(
    start_service: StartService, connect: Connect
) -> None:
    app = await start_service(monitoring_app)
    stub = connect(app, "analytics")
    now = datetime.now(UTC).replace(second=30, microsecond=0) - timedelta(minutes=2)
    batch = [timing(10.0, at=now) for _ in range(90)]
    batch += [timing(3500.0, at=now) for _ in range(8)]
    batch += [timing(20.0, "INTERNAL", at=now), timing(20.0, "INVALID_ARGUMENT", at=now)]
    reply = await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=batch))
    assert reply.accepted == 100
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        raw = await conn.fetchval("SELECT count(*) FROM api_timings WHERE endpoint = $1", ENDPOINT)
        assert raw == 100
        row = await conn.fetchrow("SELECT * FROM api_rollup_minute")
    assert row["bucket_start"] == now.replace(second=0)
    assert (row["requests"], row["errors"]) == (100, 1)  # INVALID_ARGUMENT is the caller's fault
    assert row["buckets"][histogram.bucket_of(3500.0)] == 8
    assert row["max_ms"] == 3500.0
    # a second batch adds into the same minute's row
    await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[timing(3500.0, at=now)]))

    summary = await stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest())
    (e,) = summary.endpoints
    assert (e.service, e.endpoint, e.requests, e.errors) == ("analytics", ENDPOINT, 101, 1)
    assert 5.0 < e.p50_ms <= 10.0
    assert 3000.0 < e.p95_ms <= 4000.0  # 9 of 101 above 3 s
    assert 3000.0 < e.p99_ms <= 4000.0


async def test_stats_and_cache_hit_rates(start_service: StartService, connect: Connect) -> None:
    app = await start_service(monitoring_app)
    stub = connect(app, "analytics")
    for hits, misses in ((30, 10), (50, 10)):
        await stub.ReportServiceStats(
            monitoring_pb2.ReportServiceStatsRequest(
                service="analytics",
                instance="analytics-0",
                heap_used_bytes=850,
                heap_limit_bytes=1000,
                in_flight=3,
                caches=[monitoring_pb2.CacheStats(cache="dashboard", hits=hits, misses=misses)],
            )
        )
    summary = await stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest())
    (c,) = summary.caches
    assert (c.service, c.cache, c.hits, c.misses) == ("analytics", "dashboard", 80, 20)
    assert app.pool is not None
    row = await app.pool.fetchrow("SELECT * FROM instance_stats_minute")
    assert row["samples"] == 2 and row["memory_ratio_sum"] == pytest.approx(1.7)
    assert (row["heap_limit"], row["in_flight_max"]) == (1000, 3)


BAD_TIMINGS = [
    ("timings[0].service", timing(1.0, service="Analytics\x00")),
    ("timings[0].endpoint", timing(1.0, endpoint="/x/y'; DROP TABLE alerts;--")),
    ("timings[0].statusCode", timing(1.0, code="FINE")),
    ("timings[0].durationMs", timing(math.nan)),
    ("timings[0].durationMs", timing(-1.0)),
    ("timings[0].durationMs", timing(1e300)),
    ("timings[0].instance", timing(1.0, instance="a" * 129)),
    ("timings[0].observedAt", timing(1.0, at=datetime.now(UTC) + timedelta(hours=1))),
    ("timings[0].observedAt", timing(1.0, at=datetime.now(UTC) - timedelta(days=30))),
]


@pytest.mark.parametrize(("field", "bad"), BAD_TIMINGS, ids=[f for f, _ in BAD_TIMINGS])
async def test_bad_timings_are_refused_whole(
    start_service: StartService, connect: Connect, field: str, bad: monitoring_pb2.ApiTiming
) -> None:
    app = await start_service(monitoring_app)
    stub = connect(app, "analytics")
    request = monitoring_pb2.RecordApiTimingsRequest(timings=[bad, timing(1.0)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordApiTimings(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in [f for f, _ in bad_request_violations(info.value)]
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM api_timings") == 0  # the good one neither


async def test_out_of_range_timestamps_and_oversized_batches_are_refused(
    start_service: StartService, connect: Connect
) -> None:
    app = await start_service(monitoring_app, monitoring_max_timings=3)
    stub = connect(app, "analytics")
    t = timing(1.0)
    t.observed_at.seconds = 2**62  # beyond any datetime
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[t]))
    assert bad_request_violations(info.value) == [("timings[0].observedAt", "not a valid timestamp")]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[timing(1.0)] * 4))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ReportServiceStats(
            monitoring_pb2.ReportServiceStatsRequest(
                service="analytics",
                instance="",
                heap_used_bytes=-1,
                caches=[monitoring_pb2.CacheStats(cache="c", hits=-5)] * 2,
            )
        )
    fields = {f for f, _ in bad_request_violations(info.value)}
    assert fields == {"instance", "heapUsedBytes", "caches[0].hits", "caches[1].cache", "caches[1].hits"}
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest(window={"seconds": 10**12}))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_raw_partitions_retire_and_rollups_and_resolved_alerts_age_out(
    start_service: StartService, admin_pg: asyncpg.Connection
) -> None:
    app = await start_service(
        monitoring_app, monitoring_raw_retention_days=2, monitoring_rollup_retention_days=15
    )
    maintainer = monitoring_app.state(app).maintainer
    assert app.pool is not None
    now = datetime.now(UTC)
    later = now + timedelta(days=13)
    for age in (16, 14):  # days before `later`: past the retention, and within it
        await app.pool.execute(
            "INSERT INTO api_rollup_minute VALUES ($1, 'a', $2, 1, 0, 1, 1, $3)",
            (later - timedelta(days=age)).replace(second=0, microsecond=0),
            f"/a.B/Age{age}",
            [0] * histogram.BUCKETS,
        )
    for alert_id, state, resolved_age in (
        ("old", "resolved", 16),
        ("recent", "resolved", 14),
        ("open", "open", None),
    ):
        await app.pool.execute(
            "INSERT INTO alerts (alert_id, fingerprint, source, metric, severity, state, first_seen_at, "
            "last_seen_at, resolved_at) VALUES ($1, $1, 'client', 'LCP', 'warning', $2, $3, $3, $4)",
            alert_id,
            state,
            later - timedelta(days=20),
            None if resolved_age is None else later - timedelta(days=resolved_age),
        )
    result = await maintainer.run_once(later)
    today = f"api_timings_p{now:%Y%m%d}"
    assert today in result.dropped  # 13 days later today's raw partition is past 2 days
    assert result.deleted_rows == 2  # the rollup and the alert resolved 16 days before `later`
    assert await app.pool.fetchval("SELECT array_agg(endpoint) FROM api_rollup_minute") == ["/a.B/Age14"]
    kept = await app.pool.fetchval("SELECT array_agg(alert_id ORDER BY alert_id) FROM alerts")
    assert kept == ["open", "recent"]  # an open alert stays whatever its age
    names = {
        r["tablename"]
        for r in await admin_pg.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", app.schema)
    }
    assert f"api_timings_p{later:%Y%m%d}" in names


async def test_concurrent_batches_are_group_committed(start_service: StartService, connect: Connect) -> None:
    app = await start_service(monitoring_app)
    stub = connect(app, "analytics")
    store = monitoring_app.state(app).timings
    before = store.flushes
    replies = await asyncio.gather(
        *(
            stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[timing(float(i))] * 50))
            for i in range(40)
        )
    )
    assert [r.accepted for r in replies] == [50] * 40
    assert store.flushes - before < 40  # batches that met a write under way went in the next one
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM api_timings") == 2000
    assert await app.pool.fetchval("SELECT sum(requests) FROM api_rollup_minute") == 2000


async def test_a_service_reports_only_for_itself(start_service: StartService, connect: Connect) -> None:
    app = await start_service(monitoring_app)
    as_analytics = connect(app, "analytics")
    mixed = [timing(1.0, service="analytics"), timing(1.0, service="effects")]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_analytics.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=mixed))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (info.value.details() or "").startswith("timings[1].service:")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await as_analytics.ReportServiceStats(
            monitoring_pb2.ReportServiceStatsRequest(
                service="effects", instance="effects-0", heap_used_bytes=1
            )
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (info.value.details() or "").startswith("service:")
    assert app.pool is not None
    for table in ("api_timings", "api_rollup_minute", "instance_stats_minute"):
        assert await app.pool.fetchval(f"SELECT count(*) FROM {table}") == 0  # nothing of either batch
    # the same reports under the right token are taken
    reply = await connect(app, "effects").RecordApiTimings(
        monitoring_pb2.RecordApiTimingsRequest(timings=[timing(1.0, service="effects")])
    )
    assert reply.accepted == 1
