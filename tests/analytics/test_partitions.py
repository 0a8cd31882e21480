"""Daily partitions: created ahead at start-up, expired ones dropped, old keys and
rollups deleted, safe with several replicas running maintenance at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics.partitions import PARTITIONED, PartitionMaintainer, partition_name
from services.servicekit.server import ServiceApp
from tests.analytics.test_ingest import sketch_mismatches
from tests.conftest import StartService


@pytest.fixture
async def connect_analytics() -> AsyncIterator[Any]:
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp) -> analytics_pb2_grpc.AnalyticsServiceStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return analytics_pb2_grpc.AnalyticsServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


async def partitions(pool: asyncpg.Pool, schema: str) -> dict[str, set[str]]:
    rows = await pool.fetch(
        """
        SELECT p.relname AS parent, c.relname AS child FROM pg_inherits i
        JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent
        JOIN pg_namespace n ON n.oid = p.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'
        """,
        schema,
    )
    out: dict[str, set[str]] = {parent: set() for parent in PARTITIONED}
    for row in rows:
        out[row["parent"]].add(row["child"])
    return out


def days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


async def test_partitions_are_created_ahead_at_start_up(start_service: StartService) -> None:
    app = await start_service(analytics_app, analytics_retention_days=5, analytics_partition_days_ahead=2)
    assert app.pool is not None
    today = datetime.now(UTC).date()
    wanted = days(today - timedelta(days=5), today + timedelta(days=2))
    found = await partitions(app.pool, app.schema)
    for parent in PARTITIONED:
        assert found[parent] == {partition_name(parent, d) for d in wanted}, parent
    bounds = await app.pool.fetchval(
        "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = $1 AND c.relname = $2",
        app.schema,
        partition_name("events", today),
    )
    assert f"'{today:%Y-%m-%d} 00:00:00+00'" in bounds and f"'{today + timedelta(days=1):%Y-%m-%d}" in bounds

    # Maintenance is idempotent.
    result = await analytics_app.state(app).maintainer.run_once()
    assert (result.created, result.dropped, result.deleted_rows) == ([], [], 0)


async def test_expired_partitions_keys_and_rollups_go(start_service: StartService) -> None:
    app = await start_service(analytics_app, analytics_retention_days=3, analytics_partition_days_ahead=1)
    pool = app.pool
    assert pool is not None
    now = datetime.now(UTC)
    old_day = (now - timedelta(days=10)).date()
    old = datetime(old_day.year, old_day.month, old_day.day, 12, tzinfo=UTC)
    # An old partition made by hand with a row in it, and old keys and rollups.
    name = partition_name("events", old_day)
    await pool.execute(
        f"CREATE TABLE {name} PARTITION OF events FOR VALUES FROM ('{old_day}') TO ('{old_day + timedelta(days=1)}')"
    )
    await pool.execute(
        "INSERT INTO events (event_id, session_id, event_type, occurred_at) VALUES ('old', 's', 't', $1)", old
    )
    await pool.execute("INSERT INTO event_keys VALUES ('old', $1), ('new', $2)", old, now)
    await pool.execute(
        "INSERT INTO metric_keys (name, metric_id, occurred_at, value, bin) VALUES ('LCP', 'old', $1, 1, 0)",
        old,
    )
    await pool.execute("INSERT INTO rollup_events VALUES ($1, 't', '', 5), ($2, 't', '', 7)", old, now)
    await pool.execute("INSERT INTO rollup_sessions VALUES ($1, 's', NULL)", old)

    maintainer = analytics_app.state(app).maintainer
    result = await maintainer.run_once()
    assert result.dropped == [name]
    assert result.deleted_rows == 4  # event key, metric key, event rollup, session rollup
    assert name not in (await partitions(pool, app.schema))["events"]
    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    assert [r["event_id"] for r in await pool.fetch("SELECT event_id FROM event_keys")] == ["new"]
    assert await pool.fetchval("SELECT sum(count) FROM rollup_events") == 7

    # A day later (simulated): the oldest partition expires, one more is made ahead.
    later = now + timedelta(days=1)
    result = await maintainer.run_once(later)
    oldest = (now - timedelta(days=3)).date()
    assert sorted(result.dropped) == sorted(partition_name(p, oldest) for p in PARTITIONED)
    ahead = later.date() + timedelta(days=1)
    assert sorted(result.created) == sorted(partition_name(p, ahead) for p in PARTITIONED)


async def test_retention_drops_whole_hours_from_5_minute_and_hourly_rollups_alike(
    start_service: StartService, connect_analytics: Any
) -> None:
    """With the cutoff in the middle of an hour, the 5-minute rollups and the hourly sketch keep
    that whole hour (and its metrics' keys) and drop the hour before it entirely: the hourly
    sketch remains the sum of the 5-minute one after retention, as after ingest."""
    app = await start_service(analytics_app, analytics_retention_days=3, analytics_partition_days_ahead=1)
    assert app.pool is not None
    stub = connect_analytics(app)
    now = datetime.now(UTC)
    hour = datetime.fromtimestamp(now.timestamp() // 3600 * 3600, UTC) - timedelta(days=2)
    request = analytics_pb2.RecordPerformanceMetricsRequest()
    for i, minutes in enumerate((-50, -5, 10, 20, 40, 55, 65, 100)):  # hour - 1h .. hour + 1h
        m = request.metrics.add(
            metric_id=f"m{i}", session_id="s", name="LCP", value=1000.0 + 100 * i, page=f"/p{i % 2}"
        )
        m.timestamp.FromDatetime(hour + timedelta(minutes=minutes))
    assert (await stub.RecordPerformanceMetrics(request, timeout=10)).accepted == 8
    # A re-report moves one contribution before retention runs.
    request.metrics[3].value = 7000.0
    del request.metrics[4:]
    del request.metrics[:3]
    assert (await stub.RecordPerformanceMetrics(request, timeout=10)).accepted == 1
    async with app.pool.acquire() as conn:
        assert await sketch_mismatches(conn) == []

    # Later, with the cutoff at hour + 30 min.
    maintainer = analytics_app.state(app).maintainer
    await maintainer.run_once(hour + timedelta(days=3, minutes=30))
    async with app.pool.acquire() as conn:
        assert await sketch_mismatches(conn) == []
        hourly = await conn.fetch(
            "SELECT hour_start, sum(count) AS n FROM rollup_metric_bins_hourly GROUP BY 1 ORDER BY 1"
        )
        five = await conn.fetch(
            "SELECT bucket_start, sum(count) AS n FROM rollup_metric_bins GROUP BY 1 HAVING sum(count) <> 0"
            " ORDER BY 1"
        )
        stats = await conn.fetchval("SELECT sum(count) FROM rollup_metrics")
        keys = await conn.fetchval("SELECT count(*) FROM metric_keys")
    assert [(r["hour_start"], r["n"]) for r in hourly] == [(hour, 4), (hour + timedelta(hours=1), 2)]
    assert [r["bucket_start"] for r in five] == [
        hour + timedelta(minutes=m) for m in (10, 20, 40, 55, 65, 100)
    ]  # 10 and 20 lie before the cutoff, in its hour: kept
    assert stats == keys == 6  # a metric's key lives as long as its contribution


async def test_replicas_run_maintenance_concurrently(start_service: StartService) -> None:
    app = await start_service(analytics_app, analytics_retention_days=2, analytics_partition_days_ahead=1)
    assert app.pool is not None
    replicas = [
        PartitionMaintainer(app.pool, app.schema, retention_days=2, days_ahead=d) for d in (9, 9, 9, 9)
    ]
    results = await asyncio.gather(*(r.run_once() for r in replicas))
    created = [name for result in results for name in result.created]
    today = datetime.now(UTC).date()
    expected = {partition_name(p, today + timedelta(days=d)) for p in PARTITIONED for d in range(2, 10)}
    assert sorted(created) == sorted(expected)  # each made exactly once, by whichever came first
    found = await partitions(app.pool, app.schema)
    assert all(expected & found[p] == {n for n in expected if n.startswith(p + "_p")} for p in PARTITIONED)
