"""Distinct counts from hourly HyperLogLog sketches: exact for small sets, within 2 % of
exact for large ones, late rows picked up by the next build, unsealed hours read exactly."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.distinct import SEAL_DELAY, Sketches, floor_hour, sealed_before
from services.analytics.preagg import Preaggregator
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import ADMIN, FRESH, Client, analytics_app, connect  # noqa: F401
from tests.conftest import StartService

HOUR = timedelta(hours=1)


@pytest.fixture
async def client(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> Client:
    return connect(await start_service(analytics_app(), analytics_dashboard_ttl_seconds=0, **FRESH))


def sketches_of(c: Client) -> Sketches:
    sketches: Sketches = analytics_app().state(c.app).business.preagg.sketches
    return sketches


async def dashboard(c: Client, window: str) -> analytics_pb2.GetPerformanceDashboardResponse:
    return await c.stub.GetPerformanceDashboard(
        analytics_pb2.GetPerformanceDashboardRequest(window=window), metadata=ADMIN, timeout=30
    )


def test_sealing() -> None:
    now = datetime(2026, 12, 2, 10, 3, tzinfo=UTC)
    # 10:03: the 09:00 hour ended 3 minutes ago, less than the seal delay: not sealed yet.
    assert sealed_before(now) == datetime(2026, 12, 2, 9, tzinfo=UTC)
    assert sealed_before(now + SEAL_DELAY) == datetime(2026, 12, 2, 10, tzinfo=UTC)
    assert floor_hour(now) == datetime(2026, 12, 2, 10, tzinfo=UTC)


async def test_small_sets_are_exact_and_late_rows_are_picked_up(client: Client) -> None:
    now = datetime.now(UTC)
    five, three = floor_hour(now) - 5 * HOUR, floor_hour(now) - 3 * HOUR
    # Hour -5: sessions a, b (users u1, u2); hour -3: a again, c (anonymous).
    await client.events("u1", five + timedelta(minutes=10), session="a")
    await client.events("u2", five + timedelta(minutes=11), session="b")
    await client.events("u1", three + timedelta(minutes=10), session="a")
    await client.events(None, three + timedelta(minutes=12), session="c")
    sketches = sketches_of(client)
    assert await analytics_app().state(client.app).business.preagg.build_sketches() >= 2
    reply = await dashboard(client, "24h")
    assert (reply.engagement.sessions, reply.engagement.users) == (3, 2)
    hours = {p.bucket_start.ToDatetime(tzinfo=UTC): p.sessions for p in reply.trend}
    assert (hours[five], hours[three]) == (2, 2)
    week = await dashboard(client, "7d")
    assert (week.engagement.sessions, week.engagement.users) == (3, 2)

    # A late row for the sketched hour -5: the next build remakes its sketch.
    await client.events("u3", five + timedelta(minutes=20), session="d")
    built = sketches.built
    await analytics_app().state(client.app).business.preagg.build_sketches()
    assert sketches.built == built + 1
    reply = await dashboard(client, "24h")
    assert (reply.engagement.sessions, reply.engagement.users) == (4, 3)

    # The current hour has no sketch: read exactly, and counted at once.
    await client.events("u4", now, session="e")
    reply = await dashboard(client, "24h")
    assert (reply.engagement.sessions, reply.engagement.users) == (5, 4)


async def test_late_rows_for_days_older_than_the_recheck_are_picked_up(client: Client) -> None:
    """Hours older than RECHECK are not recounted every pass; a late row for one (an offline
    client's batch, accepted up to the retention) names its day in the change log, and the
    pass that applies it has the next build remake that hour's sketch."""
    preagg = analytics_app().state(client.app).business.preagg
    old = floor_hour(datetime.now(UTC)) - 50 * HOUR
    await client.events("u1", old + timedelta(minutes=5), session="a")
    await preagg.run_once()
    await preagg.build_sketches()
    week = await dashboard(client, "7d")
    assert (week.engagement.sessions, week.engagement.users) == (1, 1)

    await client.events("u2", old + timedelta(minutes=6), session="b")
    built = preagg.sketches.built
    await preagg.build_sketches()  # no pass has seen the row: the old hour is not recounted
    assert preagg.sketches.built == built
    week = await dashboard(client, "7d")
    assert (week.engagement.sessions, week.engagement.users) == (1, 1)

    result = await preagg.run_once()
    assert old.date() in result.changed_days
    await preagg.build_sketches()
    assert preagg.sketches.built == built + 1
    week = await dashboard(client, "7d")
    assert (week.engagement.sessions, week.engagement.users) == (2, 2)
    await preagg.build_sketches()  # rechecked once: nothing more to make
    assert preagg.sketches.built == built + 1


async def test_a_pass_s_recheck_reaches_another_replica_s_build(client: Client) -> None:
    """The days a pass names are stored with the pass, not kept by its replica: when that
    replica dies before its build, another replica's build remakes the old hour."""
    preagg = analytics_app().state(client.app).business.preagg
    pool = client.app.pool
    assert pool is not None
    old = floor_hour(datetime.now(UTC)) - 50 * HOUR
    await client.events("u1", old + timedelta(minutes=5), session="a")
    await preagg.run_once()
    await preagg.build_sketches()
    await client.events("u2", old + timedelta(minutes=6), session="b")
    assert old.date() in (await preagg.run_once()).changed_days  # ... and this replica dies here

    other = Preaggregator(pool, client.app.schema, retention_days=preagg.retention_days)
    assert await other.build_sketches() == 1
    week = await dashboard(client, "7d")
    assert (week.engagement.sessions, week.engagement.users) == (2, 2)
    assert await preagg.build_sketches() == 0  # rechecked once, by whichever replica built


async def test_large_sets_within_two_percent(client: Client, admin_pg: asyncpg.Connection) -> None:
    """40 000 sessions over 12 sealed hours, half of them coming back in a second hour."""
    now = datetime.now(UTC)
    schema = client.app.schema
    first = floor_hour(now) - 14 * HOUR
    rows = []
    for i in range(40_000):
        hour = first + (i % 12) * HOUR
        rows.append((hour, f"s{i}", f"u{i // 2}"))
        if i % 2:
            rows.append((hour + HOUR, f"s{i}", f"u{i // 2}"))  # the same session the next hour
    await admin_pg.copy_records_to_table(
        "rollup_sessions", records=rows, columns=("hour_start", "session_id", "user_id"), schema_name=schema
    )
    await analytics_app().state(client.app).business.preagg.build_sketches()
    reply = await dashboard(client, "24h")
    exact_sessions, exact_users = 40_000, 20_000
    assert abs(reply.engagement.sessions - exact_sessions) / exact_sessions < 0.02
    assert abs(reply.engagement.users - exact_users) / exact_users < 0.02
    # An hour's trend point is exact (its row count).
    hours = {p.bucket_start.ToDatetime(tzinfo=UTC): p.sessions for p in reply.trend}
    assert hours[first] == sum(1 for h, _, _ in rows if h == first)


async def test_window_counts_sketched_missing_and_unsealed_hours(
    client: Client, admin_pg: asyncpg.Connection
) -> None:
    """Sketches.window (what the dashboard reads) over sketched hours, a sealed hour whose
    sketch is missing and the current (unsealed) hour: per 6-hour bucket and over the window
    within the sketch's error of exact, the sessions per hour exact, and the window's total
    the same whatever the buckets (each hour's sketch added in hour order)."""
    now = datetime.now(UTC)
    schema = client.app.schema
    first = floor_hour(now) - 20 * HOUR
    rows = []
    for i in range(6_000):
        hour = first + (i % 21) * HOUR  # the last one is the current hour
        rows.append((hour, f"s{i}", f"u{i // 3}" if i % 4 else ""))
        if i % 3 == 0 and hour + HOUR <= floor_hour(now):
            rows.append((hour + HOUR, f"s{i}", f"u{i // 3}" if i % 4 else ""))
    await admin_pg.copy_records_to_table(
        "rollup_sessions", records=rows, columns=("hour_start", "session_id", "user_id"), schema_name=schema
    )
    sketches = sketches_of(client)
    await analytics_app().state(client.app).business.preagg.build_sketches()
    missing = first + 7 * HOUR
    await admin_pg.execute(f'DELETE FROM "{schema}".distinct_sketches WHERE hour_start = $1', missing)
    starts = [first + k * 6 * HOUR for k in range(4)]
    assert client.app.pool is not None
    async with client.app.pool.acquire() as conn:
        one_pass = await sketches.window(conn, starts, now)
        whole = await sketches.window(conn, [first], now)
        hourly = await sketches.window(conn, [first + k * HOUR for k in range(21)], now)
    assert whole.total == hourly.total == one_pass.total
    assert whole.buckets == [whole.total]
    per_hour = {first + k * HOUR: sum(1 for h, _, _ in rows if h == first + k * HOUR) for k in range(21)}
    assert one_pass.hour_sessions == per_hour
    # An hour's own sketch is exact at this size (a few hundred ids: the sketch's list mode).
    assert [b.sessions for b in hourly.buckets] == [per_hour[h] for h in sorted(per_hour)]
    for k, (start, bucket) in enumerate(zip(starts, one_pass.buckets, strict=True)):
        end = starts[k + 1] if k + 1 < len(starts) else floor_hour(now) + HOUR
        exact = len({s for h, s, _ in rows if start <= h < end})
        assert abs(bucket.sessions - exact) / exact < 0.02, (k, bucket, exact)
    exact_sessions = len({s for _, s, _ in rows})
    assert abs(one_pass.total.sessions - exact_sessions) / exact_sessions < 0.02
    # Read exactly: the hour without its sketch and the unsealed ones (the current hour, and
    # the one before during the first minutes of an hour).
    unsealed = sum(1 for k in range(21) if first + k * HOUR >= sealed_before(now))
    assert one_pass.total.exact_hours == 1 + unsealed
    assert one_pass.hour_sessions[missing] == sum(1 for h, _, _ in rows if h == missing)
    exact_users = len({u for _, _, u in rows if u})
    assert abs(one_pass.total.users - exact_users) / exact_users < 0.02
