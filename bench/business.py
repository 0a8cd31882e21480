"""Benchmark of the business reports at volume, and of the live stream's fan-out.

`python -m bench.business [--scale S]` (or `await run(scale)`), scale 1 by default:

1. starts a real analytics service (own schema and Redis prefix, no monitoring);
2. loads ``1 M x scale`` engagement events over the last 7 days (one session every 10
   events, one user every 5 sessions, utm_* or a referrer on a session's first event) and
   ``100 k x scale`` funnel steps with binary COPY, then builds the ingest's rollups from
   them in SQL (as ``bench/dashboard.py`` does); revenue (one order per 20 users) and
   effect task ends (one per 5 steps) are COPYed into their tables;
3. runs the pre-aggregation pass and the hourly HLL sketch builder, as the service's
   background loop would, and times them;
4. measures cold p50 / p99 through gRPC (the report caches cleared before every call) of the
   24h and 7d dashboard, the 7d funnel, the engagement report (7d, 30d), one user's score
   and the attribution report (last touch by source, time decay by effect);
5. compares the sketches' distinct sessions and users over 7 days with exact counts;
6. starts the service as a separate process on the same schema and measures its CPU time
   (``/proc``) while 1 client, then 100 clients, hold a live stream (1 s interval) open.

``--scale 10`` is the issue's volume: 10 M events, 1 M funnel steps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis

from bench.dashboard import DATABASE_URL, LONG, REDIS_URL, SECRET, _percentiles
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp

ROOT = Path(__file__).resolve().parent.parent
BASE_EVENTS = 1_000_000
BASE_STEPS = 100_000
SPAN = timedelta(days=7)
CHUNK = 50_000
SOURCES = [("google", "cpc", "winter"), ("facebook", "social", "launch"), ("newsletter", "email", "weekly")]
REFERRERS = ["https://www.reddit.com/r/photo", "https://news.ycombinator.com/item", "https://t.co/x"]
EVENT_TYPES = [f"event_{i}" for i in range(10)]
PAGES = [f"/page/{i}" for i in range(20)]
EFFECTS = [f"fx-{i}" for i in range(30)]

ROLLUPS = (
    (
        "rollup_events",
        """INSERT INTO rollup_events (bucket_start, event_type, page, count)
           SELECT date_bin('5 minutes', occurred_at, timestamptz 'epoch'), event_type, coalesce(page, ''), count(*)
           FROM events GROUP BY 1, 2, 3""",
    ),
    (
        "rollup_sessions",
        """INSERT INTO rollup_sessions (hour_start, session_id, user_id)
           SELECT date_bin('1 hour', occurred_at, timestamptz 'epoch'), session_id, max(user_id)
           FROM events GROUP BY 1, 2""",
    ),
    (
        "rollup_funnel",
        """INSERT INTO rollup_funnel (bucket_start, step, effect_id, count)
           SELECT date_bin('5 minutes', occurred_at, timestamptz 'epoch'), step, coalesce(effect_id, ''), count(*)
           FROM funnel_steps GROUP BY 1, 2, 3""",
    ),
)


def _events(start: int, count: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(start)
    span = SPAN.total_seconds() - 3600
    for i in range(start, start + count):
        session = i // 10
        user = session // 5
        # A session's events sit within 20 minutes of its start, spread over the span.
        begin = (session * 7919 % 100_003) / 100_003 * span
        at = now - timedelta(seconds=span - begin - (i % 10) * 120 + 1)
        properties = None
        if i % 10 == 0:
            kind = session % 10
            if kind < 4:
                source, medium, campaign = SOURCES[session % len(SOURCES)]
                properties = json.dumps(
                    {"utm_source": source, "utm_medium": medium, "utm_campaign": campaign}
                )
            elif kind < 7:
                properties = json.dumps({"referrer": REFERRERS[session % len(REFERRERS)]})
        yield (
            f"e{i}",
            f"s{session}",
            f"u{user}" if session % 4 else None,  # a quarter of the sessions anonymous
            EVENT_TYPES[rng.randrange(len(EVENT_TYPES))],
            PAGES[session % len(PAGES)],
            properties,
            at,
        )


def _steps(count: int, now: datetime) -> Iterator[tuple[Any, ...]]:
    span = SPAN.total_seconds() - 3600
    i = 0
    session = 0
    while i < count:
        reached = 1 + (session * 31 % 9)
        begin = (session * 7919 % 100_003) / 100_003 * span
        for step in range(1, min(reached, count - i) + 1):
            yield (
                f"f{i}",
                f"fs{session}",
                f"u{session // 3}",
                step,
                EFFECTS[session % len(EFFECTS)],
                now - timedelta(seconds=span - begin - step * 30 + 1),
            )
            i += 1
        session += 1


async def _copy(
    pool: asyncpg.Pool, table: str, columns: tuple[str, ...], rows: Iterator[tuple[Any, ...]]
) -> None:
    async with pool.acquire() as conn:
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) == CHUNK:
                await conn.copy_records_to_table(table, records=batch, columns=columns, timeout=LONG)
                batch = []
        if batch:
            await conn.copy_records_to_table(table, records=batch, columns=columns, timeout=LONG)


async def _load(pool: asyncpg.Pool, events: int, steps: int, now: datetime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    started = time.perf_counter()
    columns = ("event_id", "session_id", "user_id", "event_type", "page", "properties", "occurred_at")
    parts = 2
    per = -(-events // parts)
    await asyncio.gather(
        *(
            _copy(pool, "events", columns, _events(p * per, min(per, events - p * per), now))
            for p in range(parts)
            if p * per < events
        )
    )
    await _copy(
        pool,
        "funnel_steps",
        ("step_id", "session_id", "user_id", "step", "effect_id", "occurred_at"),
        _steps(steps, now),
    )
    out["copy_seconds"] = round(time.perf_counter() - started, 1)
    users = events // 50
    rng = random.Random(11)
    orders = [
        (
            f"o{i}",
            f"u{rng.randrange(users)}",
            Decimal(rng.choice(["4.99", "9.99", "19.99"])),
            "USD" if i % 5 else "EUR",
            now - timedelta(seconds=rng.random() * SPAN.total_seconds()),
        )
        for i in range(max(10, users // 20))
    ]
    tasks = [
        (
            f"t{i}",
            EFFECTS[i % len(EFFECTS)],
            f"u{rng.randrange(users)}",
            "SUCCEEDED",
            Decimal(rng.choice(["0.5", "1", "2"])),
            now - timedelta(seconds=rng.random() * SPAN.total_seconds()),
        )
        for i in range(max(10, steps // 5))
    ]
    async with pool.acquire() as conn:
        await conn.copy_records_to_table(
            "revenue", records=orders, columns=("order_id", "user_id", "amount", "currency", "occurred_at")
        )
        await conn.copy_records_to_table(
            "task_ends",
            records=tasks,
            columns=("task_id", "effect_id", "user_id", "status", "cost_coins", "occurred_at"),
        )
        await conn.execute("SET work_mem = '256MB'")
        for table, sql in ROLLUPS:
            t = time.perf_counter()
            await conn.execute(sql, timeout=LONG)
            out[f"{table}_seconds"] = round(time.perf_counter() - t, 1)
        await conn.execute("ANALYZE", timeout=LONG)
        out["rollup_sessions_rows"] = await conn.fetchval("SELECT count(*) FROM rollup_sessions")
    out["orders"], out["tasks"] = len(orders), len(tasks)
    return out


async def _cold(
    call: Callable[[], Awaitable[Any]], clear: Callable[[], Awaitable[None]], n: int
) -> dict[str, float]:
    await clear()
    await call()  # plans, connections
    samples = []
    for _ in range(n):
        await clear()
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return _percentiles(samples)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _stream_cpu(schema: str, seconds: float) -> dict[str, Any]:
    """Service CPU with 1 and with 100 open streams (interval 1 s), the service in its own process."""
    from tests.support import free_port

    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "DB_SCHEMA": schema,
        "REDIS_PREFIX": schema,
        "AUTH_JWT_SECRET": SECRET,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(port),
        "METRICS_PORT": "0",
        "LOG_LEVEL": "WARNING",
        "ANALYTICS_PREAGG_INTERVAL_SECONDS": "3600",
        "ANALYTICS_REPORT_CHECK_SECONDS": "3600",
        "ANALYTICS_STREAM_MAX_CLIENTS": "200",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.analytics", env=env, cwd=ROOT
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 120
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("stream benchmark service did not start")
            await asyncio.sleep(0.2)
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        metadata = (("authorization", f"Bearer {issue_token(SECRET, 'bench', role='admin')}"),)
        await asyncio.sleep(2)  # start-up work settles

        async def hold(clients: int) -> tuple[float, int]:
            received = 0
            calls = [
                stub.StreamPerformanceDashboard(
                    analytics_pb2.StreamPerformanceDashboardRequest(interval_seconds=1), metadata=metadata
                )
                for _ in range(clients)
            ]

            async def read(call: Any) -> None:
                nonlocal received
                async for _ in call:
                    received += 1

            readers = [asyncio.ensure_future(read(c)) for c in calls]
            await asyncio.sleep(1.5)  # every stream open and past its first message
            before, received = _cpu_seconds(process.pid), 0
            await asyncio.sleep(seconds)
            used = _cpu_seconds(process.pid) - before
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await asyncio.sleep(1)
            return used, received

        idle_before = _cpu_seconds(process.pid)
        await asyncio.sleep(seconds)
        idle = _cpu_seconds(process.pid) - idle_before
        one, one_msgs = await hold(1)
        hundred, hundred_msgs = await hold(100)
        return {
            "seconds": seconds,
            "idle_cpu_s": round(idle, 3),
            "1_client_cpu_s": round(one, 3),
            "100_clients_cpu_s": round(hundred, 3),
            "1_client_messages": one_msgs,
            "100_clients_messages": hundred_msgs,
            "ratio_100_to_1": round(hundred / one, 2) if one else None,
        }
    finally:
        await channel.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def _start_service(schema: str) -> ServiceApp:
    settings = analytics_app.SETTINGS(
        database_url=DATABASE_URL,
        redis_url=REDIS_URL,
        db_schema=schema,
        redis_prefix=schema,
        auth_jwt_secret=SECRET,
        grpc_host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        shutdown_grace_seconds=5,
        db_pool_max=10,
        log_level="WARNING",
        max_connection_age_seconds=36_000,  # the benchmark's channel lives longer than 5 minutes
        analytics_preagg_interval_seconds=36_000,  # the benchmark runs the passes itself
        analytics_report_check_seconds=36_000,
    )
    app = ServiceApp(analytics_app.NAME, settings, analytics_app.MIGRATIONS)
    await app.connect()
    await analytics_app.wire(app)
    await app.start()
    return app


async def run(scale: float = 1.0, cold_calls: int = 10, stream_seconds: float = 10.0) -> dict[str, Any]:
    events = max(10_000, int(BASE_EVENTS * scale))
    steps = max(1_000, int(BASE_STEPS * scale))
    schema = f"bench_business_{uuid.uuid4().hex[:8]}"
    app = await _start_service(schema)
    result: dict[str, Any] = {"events": events, "funnel_steps": steps, "schema": schema}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        assert app.pool is not None
        now = datetime.now(UTC)
        result["load"] = await _load(app.pool, events, steps, now)
        print(f"  loaded: {result['load']}", flush=True)
        business = analytics_app.state(app).business
        started = time.perf_counter()
        refreshed = await business.preagg.run_once(min_age_seconds=0)
        result["preagg_seconds"] = round(time.perf_counter() - started, 2)
        result["preagg_days"] = len(refreshed.refreshed)
        started = time.perf_counter()
        result["sketch_hours_built"] = await business.preagg.build_sketches()
        result["sketch_build_seconds"] = round(time.perf_counter() - started, 2)
        print(
            f"  pre-aggregation {result['preagg_seconds']} s, sketches {result['sketch_build_seconds']} s",
            flush=True,
        )

        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        metadata = (("authorization", f"Bearer {issue_token(SECRET, 'bench', role='admin')}"),)
        caches = {c.name: c for c in app.caches}

        def clearing(*names: str) -> Callable[[], Awaitable[None]]:
            async def clear() -> None:
                for name in names:
                    await caches[name].clear()

            return clear

        calls: dict[str, tuple[Callable[[], Awaitable[Any]], str]] = {
            "dashboard 24h": (
                lambda: stub.GetPerformanceDashboard(
                    analytics_pb2.GetPerformanceDashboardRequest(window="24h"),
                    metadata=metadata,
                    timeout=LONG,
                ),
                "dashboard",
            ),
            "dashboard 7d": (
                lambda: stub.GetPerformanceDashboard(
                    analytics_pb2.GetPerformanceDashboardRequest(window="7d"), metadata=metadata, timeout=LONG
                ),
                "dashboard",
            ),
            "funnel 7d": (
                lambda: stub.GetFunnelReport(
                    analytics_pb2.GetFunnelReportRequest(window="7d"), metadata=metadata, timeout=LONG
                ),
                "funnel",
            ),
            "engagement 7d": (
                lambda: stub.GetEngagementReport(
                    analytics_pb2.GetEngagementReportRequest(window="7d"), metadata=metadata, timeout=LONG
                ),
                "business",
            ),
            "engagement 30d": (
                lambda: stub.GetEngagementReport(
                    analytics_pb2.GetEngagementReportRequest(window="30d"), metadata=metadata, timeout=LONG
                ),
                "business",
            ),
            "user score 30d": (
                lambda: stub.GetUserEngagement(
                    analytics_pb2.GetUserEngagementRequest(user_id="u7"), metadata=metadata, timeout=LONG
                ),
                "business",
            ),
            "attribution last_touch/source": (
                lambda: stub.GetRevenueAttribution(
                    analytics_pb2.GetRevenueAttributionRequest(model="last_touch", group_by="source"),
                    metadata=metadata,
                    timeout=LONG,
                ),
                "business",
            ),
            "attribution time_decay/effect": (
                lambda: stub.GetRevenueAttribution(
                    analytics_pb2.GetRevenueAttributionRequest(model="time_decay", group_by="effect"),
                    metadata=metadata,
                    timeout=LONG,
                ),
                "business",
            ),
        }
        result["cold"] = {}
        for label, (call, cache) in calls.items():
            result["cold"][label] = await _cold(call, clearing(cache), cold_calls)
            print(f"  cold {label}: {result['cold'][label]}", flush=True)

        # Sketch estimates against exact distinct counts over the same hours.
        reply = await stub.GetPerformanceDashboard(
            analytics_pb2.GetPerformanceDashboardRequest(window="7d"), metadata=metadata, timeout=LONG
        )
        since = datetime.fromtimestamp(reply.generated_at.seconds, UTC) - timedelta(days=7)
        since_hour = since.replace(minute=0, second=0, microsecond=0)
        async with app.pool.acquire() as conn:
            exact = await conn.fetchrow(
                """SELECT count(DISTINCT session_id) AS s, count(DISTINCT user_id) FILTER (WHERE user_id <> '') AS u
                   FROM rollup_sessions WHERE hour_start >= $1""",
                since_hour,
                timeout=LONG,
            )
        result["sketch_7d"] = {
            "sessions": reply.engagement.sessions,
            "sessions_exact": exact["s"],
            "sessions_error": round(abs(reply.engagement.sessions - exact["s"]) / exact["s"], 5),
            "users": reply.engagement.users,
            "users_exact": exact["u"],
            "users_error": round(abs(reply.engagement.users - exact["u"]) / exact["u"], 5),
        }
    finally:
        await channel.close()
        await app.stop()
    try:
        result["stream"] = await _stream_cpu(schema, stream_seconds)
    finally:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            async for key in client.scan_iter(match=f"{schema}:*", count=1000):
                await client.delete(key)
        finally:
            await client.aclose()
    return result


def print_result(result: dict[str, Any]) -> None:
    print(
        f"business benchmark: {result['events']:,} events, {result['funnel_steps']:,} funnel steps over 7 days"
    )
    print(f"  load: {result['load']}")
    print(
        f"  pre-aggregation: {result['preagg_seconds']} s for {result['preagg_days']} days; "
        f"sketches: {result['sketch_hours_built']} hours in {result['sketch_build_seconds']} s"
    )
    for label, p in result["cold"].items():
        print(f"  cold {label}: p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms")
    s = result["sketch_7d"]
    print(
        f"  sketch 7d: sessions {s['sessions']} vs exact {s['sessions_exact']} ({s['sessions_error']:.2%}), "
        f"users {s['users']} vs {s['users_exact']} ({s['users_error']:.2%})"
    )
    st = result.get("stream")
    if st:
        print(
            f"  live stream, {st['seconds']} s at 1 s interval: service CPU idle {st['idle_cpu_s']} s, "
            f"1 client {st['1_client_cpu_s']} s, 100 clients {st['100_clients_cpu_s']} s "
            f"(ratio {st['ratio_100_to_1']}; messages {st['1_client_messages']} / {st['100_clients_messages']})"
        )
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.business")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 1 M events, 100 k funnel steps")
    parser.add_argument("--cold", type=int, default=10, help="cold calls per report")
    parser.add_argument("--stream-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print_result(asyncio.run(run(args.scale, args.cold, args.stream_seconds)))


if __name__ == "__main__":
    main()
