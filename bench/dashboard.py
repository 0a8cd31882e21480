"""Benchmark of the admin performance dashboard at volume.

`python -m bench.dashboard [--scale S]` (or `await run(scale)`):

1. starts a real analytics service (its own schema and Redis prefix, no monitoring);
2. loads ``1 M x scale`` performance-metric rows spread over the last 24 h into the raw
   ``metrics`` table with binary COPY (two connections in parallel);
3. builds the rollups from them, one ``INSERT ... SELECT ... GROUP BY`` per rollup table
   (sketch bins computed in SQL with ``sketch.bin_of``'s formula ``ceil(ln(v) / ln(gamma))``;
   the hourly sketch summed from the 5-minute one, as ingest keeps it);
   events and funnel rollups get a synthetic, realistically sized fill;
4. measures the dashboard through gRPC: cold (the dashboard cache cleared before every call;
   PostgreSQL's buffers are warm) and warm (served from the cache), p50 / p99, for the 1h
   (5-minute rollups), 24h and 7d (hourly sketch) windows, and the warm throughput of
   concurrent callers;
5. times each query of the 24h dashboard alone (and the sketch query on the 5-minute table,
   for comparison);
6. prints the figures, drops its schema and deletes its Redis keys.

Needs PostgreSQL and Redis (``BENCH_DATABASE_URL`` / ``BENCH_REDIS_URL``, defaulting to the
test instances).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics import dashboard, sketch, vitals
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp

DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
SECRET = "bench-secret-0123456789-0123456789-abcdef"
BASE_ROWS = 1_000_000
CHUNK = 50_000
COPIERS = 2
LONG = 3600.0  # seconds: loading and rollup statements at scale outlast the pool's command timeout
SPAN = timedelta(hours=24)
WINDOWS = ("1h", "24h", "7d")  # 1h: the 5-minute tables; 24h and 7d: the hourly sketch
PAGES = [f"/page/{i}" for i in range(20)]
COPY_COLUMNS = (
    "name",
    "metric_id",
    "session_id",
    "user_id",
    "value",
    "delta",
    "rating",
    "navigation_type",
    "page",
    "occurred_at",
)
# name -> (share of rows, lognormal median, sigma, share of exact zeros)
MIX: dict[str, tuple[float, float, float, float]] = {
    "LCP": (0.20, 2000.0, 0.6, 0.0),
    "FCP": (0.15, 1400.0, 0.5, 0.0),
    "TTFB": (0.12, 500.0, 0.7, 0.0),
    "CLS": (0.15, 0.05, 1.0, 0.2),
    "INP": (0.15, 150.0, 0.8, 0.0),
    "FID": (0.02, 40.0, 0.8, 0.0),
    "API_RESPONSE": (0.10, 200.0, 0.9, 0.0),
    "COMPONENT_RENDER": (0.05, 8.0, 0.9, 0.0),
    "RESOURCE_LOAD": (0.06, 300.0, 0.9, 0.0),
}

BINS_ROLLUP = """
INSERT INTO rollup_metric_bins (bucket_start, name, page, bin, count)
SELECT date_bin('5 minutes', occurred_at, timestamptz 'epoch'), name, coalesce(page, ''),
       CASE WHEN value < $1 THEN $2 ELSE ceil(ln(value) / ln($3::float8))::int END, count(*)
FROM metrics
GROUP BY 1, 2, 3, 4
"""
METRICS_ROLLUP = """
INSERT INTO rollup_metrics (bucket_start, name, page, count, sum, good, needs_improvement, poor)
SELECT date_bin('5 minutes', occurred_at, timestamptz 'epoch'), name, coalesce(page, ''),
       count(*), sum(value),
       count(*) FILTER (WHERE rating = 'good'),
       count(*) FILTER (WHERE rating = 'needs-improvement'),
       count(*) FILTER (WHERE rating = 'poor')
FROM metrics
GROUP BY 1, 2, 3
"""
# The hourly, page-less sketch: the sum of the 5-minute rows per hour (what ingest keeps equal).
BINS_HOURLY_ROLLUP = """
INSERT INTO rollup_metric_bins_hourly (hour_start, name, bin, count)
SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch'), name, bin, sum(count)
FROM rollup_metric_bins
GROUP BY 1, 2, 3
"""
SESSIONS_ROLLUP = """
INSERT INTO rollup_sessions (hour_start, session_id, user_id)
SELECT date_bin('1 hour', occurred_at, timestamptz 'epoch'), session_id, max(user_id)
FROM metrics
GROUP BY 1, 2
"""
# Synthetic engagement and funnel rollups, sized like a busy day (10 event types x 20 pages).
EVENTS_ROLLUP = """
INSERT INTO rollup_events (bucket_start, event_type, page, count)
SELECT b, 'event_' || t, '/page/' || p, 1 + (random() * 50)::int
FROM generate_series(date_bin('5 minutes', $1::timestamptz, timestamptz 'epoch'), $2::timestamptz,
                     interval '5 minutes') AS b,
     generate_series(0, 9) AS t, generate_series(0, 19) AS p
"""
FUNNEL_ROLLUP = """
INSERT INTO rollup_funnel (bucket_start, step, effect_id, count)
SELECT b, s, 'fx-' || e, greatest(0, (200 - s * 20 + random() * 10)::int)
FROM generate_series(date_bin('5 minutes', $1::timestamptz, timestamptz 'epoch'), $2::timestamptz,
                     interval '5 minutes') AS b,
     generate_series(1, 9) AS s, generate_series(0, 29) AS e
"""


def _value_pools(rng: random.Random, size: int = 65_536) -> dict[str, list[tuple[float, str | None]]]:
    """Per metric, a pool of (value, rating) to draw rows from (keeps generation cheap)."""
    pools: dict[str, list[tuple[float, str | None]]] = {}
    for name, (_, median, sigma, zeros) in MIX.items():
        values = [
            0.0 if rng.random() < zeros else rng.lognormvariate(math.log(median), sigma) for _ in range(size)
        ]
        pools[name] = [(v, vitals.rate(name, v)) for v in values]
    return pools


def _rows(
    start: int, count: int, sessions: int, now: datetime, pools: dict[str, list[tuple[float, str | None]]]
) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(start)
    names = list(MIX)
    weights = [share for share, *_ in MIX.values()]
    span = SPAN.total_seconds() - 1
    chosen = rng.choices(names, weights, k=count)
    mask = len(next(iter(pools.values()))) - 1
    for i in range(count):
        name = chosen[i]
        value, rating = pools[name][rng.getrandbits(16) & mask]
        session = rng.randrange(sessions)
        # A session lives up to 30 minutes from a start spread over the span.
        offset = min(span, (session * 7919 % sessions) / sessions * span + rng.random() * 1800)
        yield (
            name,
            f"m{start + i}",
            f"s{session}",
            f"u{session}" if session % 2 else None,
            value,
            value,
            rating,
            "navigate",
            PAGES[session % len(PAGES)],
            now - timedelta(seconds=offset),
        )


async def _load(pool: asyncpg.Pool, rows: int, now: datetime) -> float:
    """COPY `rows` metric rows; returns seconds."""
    pools = _value_pools(random.Random(7))
    sessions = max(1, rows // 20)
    chunks = [(start, min(CHUNK, rows - start)) for start in range(0, rows, CHUNK)]
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for chunk in chunks:
        queue.put_nowait(chunk)

    async def copier() -> None:
        async with pool.acquire() as conn:
            while not queue.empty():
                start, count = queue.get_nowait()
                await conn.copy_records_to_table(
                    "metrics",
                    records=list(_rows(start, count, sessions, now, pools)),
                    columns=COPY_COLUMNS,
                    timeout=LONG,
                )

    started = time.perf_counter()
    await asyncio.gather(*(copier() for _ in range(COPIERS)))
    return time.perf_counter() - started


async def _build_rollups(pool: asyncpg.Pool, now: datetime) -> dict[str, float]:
    timings: dict[str, float] = {}
    async with pool.acquire() as conn:
        await conn.execute("SET work_mem = '256MB'")
        await conn.execute("ANALYZE metrics", timeout=LONG)
        for label, sql, args in (
            ("rollup_metric_bins", BINS_ROLLUP, (sketch.MIN_VALUE, sketch.ZERO_BIN, sketch.GAMMA)),
            ("rollup_metric_bins_hourly", BINS_HOURLY_ROLLUP, ()),
            ("rollup_metrics", METRICS_ROLLUP, ()),
            ("rollup_sessions", SESSIONS_ROLLUP, ()),
            ("rollup_events", EVENTS_ROLLUP, (now - SPAN, now)),
            ("rollup_funnel", FUNNEL_ROLLUP, (now - SPAN, now)),
        ):
            started = time.perf_counter()
            await conn.execute(sql, *args, timeout=LONG)
            timings[label] = round(time.perf_counter() - started, 2)
        await conn.execute(
            "ANALYZE rollup_metric_bins; ANALYZE rollup_metric_bins_hourly; ANALYZE rollup_metrics; "
            "ANALYZE rollup_sessions; "
            "ANALYZE rollup_events; ANALYZE rollup_funnel",
            timeout=LONG,
        )
        await conn.execute("RESET work_mem")
    return timings


async def _query_ms(pool: asyncpg.Pool, sql: str, *args: Any) -> float:
    """Median of 5 runs of one dashboard query (as the dashboard runs it), in ms."""
    timings = []
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute(f"SET LOCAL work_mem = '{dashboard.WORK_MEM}'")
        for _ in range(5):
            started = time.perf_counter()
            await conn.fetch(sql, *args, timeout=LONG)
            timings.append(time.perf_counter() - started)
    return round(statistics.median(timings) * 1000, 1)


async def _queries_24h_ms(pool: asyncpg.Pool) -> dict[str, float]:
    """Each query of the 24h dashboard alone (they run in parallel, one connection each), and
    the sketch and rating queries on the 5-minute tables for comparison."""
    now = datetime.now(UTC)
    since = now - SPAN
    hour = dashboard._floor(since, dashboard.HOUR)
    five = dashboard._floor(since, dashboard.ROLLUP_BUCKET)
    size = timedelta(hours=1)
    names = list(vitals.WEB_VITALS)
    return {
        "bins (hourly)": await _query_ms(pool, dashboard._BINS_HOURLY_SQL, hour, now, size, names),
        "bins (5 min, per page)": await _query_ms(pool, dashboard._BINS_SQL, five, now, size, names),
        "ratings (rollup_metrics)": await _query_ms(pool, dashboard._RATINGS_SQL, hour, now, names),
        "events": await _query_ms(pool, dashboard._EVENTS_SQL, hour, now, size),
        "sessions per hour": await _query_ms(pool, dashboard._SESSIONS_HOURLY_SQL, hour, now),
        "visitors": await _query_ms(pool, dashboard._VISITORS_SQL, hour, now),
        "funnel": await _query_ms(pool, dashboard._FUNNEL_SQL, hour, now),
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50_ms": round(at(0.50) * 1000, 2),
        "p99_ms": round(at(0.99) * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2),
    }


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
    )
    app = ServiceApp(analytics_app.NAME, settings, analytics_app.MIGRATIONS)
    await app.connect()
    await analytics_app.wire(app)
    await app.start()
    return app


async def run(scale: float = 1.0, cold_calls: int = 20, warm_calls: int = 500) -> dict[str, Any]:
    """Load ``1 M x scale`` metric rows, build rollups, time the dashboard; see the module doc."""
    rows = max(1000, int(BASE_ROWS * scale))
    schema = f"bench_dashboard_{uuid.uuid4().hex[:8]}"
    app = await _start_service(schema)
    result: dict[str, Any] = {"rows": rows, "schema": schema}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        assert app.pool is not None
        now = datetime.now(UTC)
        load_s = await _load(app.pool, rows, now)
        result["copy_seconds"] = round(load_s, 2)
        result["copy_rows_per_second"] = round(rows / load_s)
        result["rollup_seconds"] = await _build_rollups(app.pool, now)
        result["rollup_rows"] = {
            table: await app.pool.fetchval(f"SELECT count(*) FROM {table}", timeout=LONG)
            for table in (
                "rollup_metric_bins",
                "rollup_metric_bins_hourly",
                "rollup_metrics",
                "rollup_sessions",
                "rollup_events",
            )
        }

        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        metadata = (("authorization", f"Bearer {issue_token(SECRET, 'bench', role='admin')}"),)
        cache = next(c for c in app.caches if c.name == "dashboard")

        async def call(window: str) -> tuple[float, analytics_pb2.GetPerformanceDashboardResponse]:
            started = time.perf_counter()
            reply = await stub.GetPerformanceDashboard(
                analytics_pb2.GetPerformanceDashboardRequest(window=window), metadata=metadata, timeout=60
            )
            return time.perf_counter() - started, reply

        for window in WINDOWS:
            await cache.clear()
            _, reply = await call(window)  # first call: plans, connections
            lcp = next(v for v in reply.web_vitals if v.name == "LCP")
            cold: list[float] = []
            for _ in range(cold_calls):
                await cache.clear()
                cold.append((await call(window))[0])
            warm = [(await call(window))[0] for _ in range(warm_calls)]
            started = time.perf_counter()
            concurrent = 0
            for _ in range(10):
                await asyncio.gather(*(call(window) for _ in range(50)))
                concurrent += 50
            throughput = concurrent / (time.perf_counter() - started)
            result[window] = {
                "cold": _percentiles(cold),
                "warm": _percentiles(warm),
                "warm_rps_50_concurrent": round(throughput),
                "lcp_samples": lcp.samples,
                "lcp_p75": round(lcp.p75, 1),
                "sessions": reply.engagement.sessions,
                "trend_points": len(reply.trend),
            }
        # p75 from the sketch against the exact percentile_disc over the raw rows.
        exact = await app.pool.fetchval(
            "SELECT percentile_disc(0.75) WITHIN GROUP (ORDER BY value) FROM metrics WHERE name = 'LCP'",
            timeout=LONG,
        )
        result["lcp_p75_exact"] = round(exact, 1)
        result["lcp_p75_relative_error"] = round(abs(result["24h"]["lcp_p75"] - exact) / exact, 5)

        result["queries_24h_ms"] = await _queries_24h_ms(app.pool)
    finally:
        await channel.close()
        await app.stop()
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
    print(f"dashboard benchmark: {result['rows']:,} metric rows over 24 h")
    print(f"  COPY: {result['copy_seconds']} s ({result['copy_rows_per_second']:,} rows/s)")
    print(f"  rollups built (s): {result['rollup_seconds']}")
    print(f"  rollup rows: {result['rollup_rows']}")
    for window in WINDOWS:
        w = result[window]
        print(
            f"  {window}: cold p50 {w['cold']['p50_ms']} ms p99 {w['cold']['p99_ms']} ms | "
            f"warm p50 {w['warm']['p50_ms']} ms p99 {w['warm']['p99_ms']} ms | "
            f"warm {w['warm_rps_50_concurrent']} req/s at 50 concurrent"
        )
    print(
        f"  LCP p75: sketch {result['24h']['lcp_p75']} vs exact {result['lcp_p75_exact']} "
        f"(relative error {result['lcp_p75_relative_error']})"
    )
    print(f"  each 24h query alone (median of 5, ms): {result['queries_24h_ms']}")
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dashboard")
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = 1 M metric rows")
    parser.add_argument("--cold", type=int, default=20, help="cold calls per window")
    parser.add_argument("--warm", type=int, default=500, help="warm calls per window")
    args = parser.parse_args()
    print_result(asyncio.run(run(args.scale, args.cold, args.warm)))


if __name__ == "__main__":
    main()
