"""The hourly engagement and funnel rollups (``rollup_events_hourly``,
``rollup_funnel_hourly``): written by the ingest in the same transaction as the
5-minute rows, so an hour's row always equals the sum of its 5-minute rows and
the raw rows' count for that hour, through the optimistic and the ON CONFLICT
flushes, duplicates and late rows; built from the 5-minute rows by the
migration that adds them; aged out by whole hours with them."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit import db
from services.servicekit.server import ServiceApp
from tests.conftest import StartService

HOURLY_VERSION = 24

# Per (table, hourly table, key): the hours and keys where the hourly count differs
# from the 5-minute rows summed per hour, or from the raw rows counted per hour.
_MISMATCHES = """
WITH five AS (
    SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch') AS hour_start, {key} AS k, sum(count) AS n
    FROM {five} GROUP BY 1, 2
), raw AS (
    SELECT date_bin('1 hour', occurred_at, timestamptz 'epoch') AS hour_start, {raw_key} AS k, count(*) AS n
    FROM {raw} GROUP BY 1, 2
)
SELECT hour_start, k, five.n AS five, h.count AS hourly, raw.n AS raw
FROM five
FULL JOIN (SELECT hour_start, {key} AS k, count FROM {hourly}) AS h USING (hour_start, k)
FULL JOIN raw USING (hour_start, k)
WHERE coalesce(five.n, 0) <> coalesce(h.count, 0) OR coalesce(raw.n, 0) <> coalesce(h.count, 0)
"""
EVENTS_MISMATCHES = _MISMATCHES.format(
    key="event_type", raw_key="event_type", five="rollup_events", hourly="rollup_events_hourly", raw="events"
)
FUNNEL_MISMATCHES = _MISMATCHES.format(
    key="step", raw_key="step", five="rollup_funnel", hourly="rollup_funnel_hourly", raw="funnel_steps"
)


@pytest.fixture
async def app(start_service: StartService) -> ServiceApp:
    return await start_service(analytics_app)


@pytest.fixture
async def stub(app: ServiceApp) -> AsyncIterator[analytics_pb2_grpc.AnalyticsServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield analytics_pb2_grpc.AnalyticsServiceStub(channel)
    await channel.close()


def _event(event_id: str, at: datetime, rng: random.Random) -> analytics_pb2.Event:
    e = analytics_pb2.Event(
        event_id=event_id,
        session_id=f"s{rng.randrange(5)}",
        event_type=rng.choice(["page_view", "click", "scroll"]),
        page=rng.choice(["/", "/a", "/b", ""]),
    )
    e.timestamp.FromDatetime(at)
    return e


def _step(step_id: str, at: datetime, rng: random.Random) -> analytics_pb2.FunnelStep:
    s = analytics_pb2.FunnelStep(
        step_id=step_id,
        session_id=f"s{rng.randrange(5)}",
        step=rng.choice(FUNNEL_STEPS),
        effect_id=rng.choice(["fx-1", "fx-2", ""]),
    )
    s.timestamp.FromDatetime(at)
    return s


async def test_hourly_rows_equal_the_five_minute_rows_and_the_raw_rows(
    app: ServiceApp, stub: analytics_pb2_grpc.AnalyticsServiceStub
) -> None:
    rng = random.Random(7)
    now = datetime.now(UTC)
    # Spread over the last three days (late rows), several per 5-minute bucket and hour.
    moments = [now - timedelta(minutes=rng.randrange(0, 3 * 24 * 60)) for _ in range(400)]
    event_ids = [f"ev-{uuid.uuid4().hex}" for _ in moments]
    step_ids = [f"st-{uuid.uuid4().hex}" for _ in moments]

    async def send(lo: int, hi: int) -> None:
        await stub.RecordEvents(
            analytics_pb2.RecordEventsRequest(
                events=[_event(event_ids[i], moments[i], rng) for i in range(lo, hi)]
            )
        )
        await stub.RecordFunnelSteps(
            analytics_pb2.RecordFunnelStepsRequest(
                steps=[_step(step_ids[i], moments[i], rng) for i in range(lo, hi)]
            )
        )

    # Concurrent requests (grouped into flushes, optimistic form), then the same ids again
    # mixed with new ones (the ON CONFLICT form: only the new ones are counted).
    await asyncio.gather(*(send(i, i + 10) for i in range(0, 300, 10)))
    await asyncio.gather(*(send(i, i + 20) for i in range(200, 400, 20)))

    assert app.pool is not None
    async with app.pool.acquire() as conn:
        assert await conn.fetch(EVENTS_MISMATCHES) == []
        assert await conn.fetch(FUNNEL_MISMATCHES) == []
        assert await conn.fetchval("SELECT sum(count) FROM rollup_events_hourly") == 400
        assert await conn.fetchval("SELECT sum(count) FROM rollup_funnel_hourly") == 400
        hours = await conn.fetchval("SELECT count(DISTINCT hour_start) FROM rollup_events_hourly")
    assert hours > 20  # the rows really span many hours


async def test_the_migration_builds_the_hourly_rows_from_the_five_minute_rows(
    admin_pg: asyncpg.Connection, schema: str
) -> None:
    migrations = db.load_migrations(analytics_app.MIGRATIONS)
    before = [m for m in migrations if m.version < HOURLY_VERSION]
    await db.migrate(admin_pg, schema, before)
    hour = datetime(2026, 11, 30, 10, tzinfo=UTC)
    await admin_pg.executemany(
        f'INSERT INTO "{schema}".rollup_events (bucket_start, event_type, page, count) VALUES ($1, $2, $3, $4)',
        [
            (hour, "click", "/", 2),
            (hour + timedelta(minutes=5), "click", "/a", 3),
            (hour + timedelta(minutes=55), "view", "", 4),
            (hour + timedelta(minutes=60), "click", "/", 5),
        ],
    )
    await admin_pg.executemany(
        f'INSERT INTO "{schema}".rollup_funnel (bucket_start, step, effect_id, count) VALUES ($1, $2, $3, $4)',
        [(hour, 1, "fx", 6), (hour + timedelta(minutes=30), 1, "", 7), (hour, 2, "fx", 1)],
    )
    assert await db.migrate(admin_pg, schema, migrations) == [
        m.version for m in migrations if m.version >= HOURLY_VERSION
    ]
    events = await admin_pg.fetch(
        f'SELECT hour_start, event_type, count FROM "{schema}".rollup_events_hourly ORDER BY 1, 2'
    )
    assert [tuple(r) for r in events] == [
        (hour, "click", 5),
        (hour, "view", 4),
        (hour + timedelta(hours=1), "click", 5),
    ]
    steps = await admin_pg.fetch(
        f'SELECT hour_start, step, count FROM "{schema}".rollup_funnel_hourly ORDER BY 1, 2'
    )
    assert [tuple(r) for r in steps] == [(hour, 1, 13), (hour, 2, 1)]


async def test_retention_deletes_the_same_whole_hours_of_both(
    start_service: StartService,
) -> None:
    app = await start_service(analytics_app, analytics_retention_days=2, analytics_partition_days_ahead=1)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
    rng = random.Random(3)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1)
    moments = [hour + timedelta(minutes=m) for m in (-50, -5, 10, 20, 40, 55, 65, 100)]
    try:
        await stub.RecordEvents(
            analytics_pb2.RecordEventsRequest(
                events=[_event(f"ev-{uuid.uuid4().hex}", at, rng) for at in moments]
            )
        )
        await stub.RecordFunnelSteps(
            analytics_pb2.RecordFunnelStepsRequest(
                steps=[_step(f"st-{uuid.uuid4().hex}", at, rng) for at in moments]
            )
        )
    finally:
        await channel.close()
    # The cutoff at hour + 30 min, i.e. the day the retention reaches.
    await analytics_app.state(app).maintainer.run_once(hour + timedelta(days=2, minutes=30))
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        for table in ("rollup_events_hourly", "rollup_funnel_hourly"):
            rows = await conn.fetch(f"SELECT hour_start, sum(count) AS n FROM {table} GROUP BY 1 ORDER BY 1")
            assert [(r["hour_start"], r["n"]) for r in rows] == [(hour, 4), (hour + timedelta(hours=1), 2)]
        for five in ("rollup_events", "rollup_funnel"):
            kept = await conn.fetchval(f"SELECT sum(count) FROM {five}")
            assert kept == 6  # the hour holding the cutoff is kept whole, in both grains
