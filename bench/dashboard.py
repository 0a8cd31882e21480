"""Benchmark of the admin performance dashboard at volume.

`python -m bench.dashboard [--scale S]` (or `await run(scale)`):

1. starts a real analytics service (its own schema and Redis prefix, no monitoring);
2. loads ``1 M x scale`` performance-metric rows spread over the last 24 h and builds the
   rollups from them (``bench/datagen.py``, shared with ``bench/business.py``); events and
   funnel rollups get a synthetic, realistically sized fill;
3. measures the dashboard through gRPC: cold (the dashboard cache cleared before every call;
   PostgreSQL's buffers are warm) and warm (served from the cache), p50 / p99, for the 1h
   (5-minute rollups), 24h and 7d (hourly sketch) windows, and the warm throughput of
   concurrent callers;
4. times each query of the 24h dashboard alone (and the sketch query on the 5-minute table,
   for comparison);
5. prints the figures, drops its schema and deletes its Redis keys.

Needs PostgreSQL and Redis (``BENCH_DATABASE_URL`` / ``BENCH_REDIS_URL``, defaulting to the
test instances).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc

from bench import datagen
from bench.datagen import DATABASE_URL, LONG, REDIS_URL, SECRET
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics import dashboard, vitals
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp

BASE_ROWS = 1_000_000
SPAN = timedelta(hours=24)
WINDOWS = ("1h", "24h", "7d")  # 1h: the 5-minute tables; 24h and 7d: the hourly sketch


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
        "bins (hourly)": await _query_ms(pool, dashboard._BINS_PER_HOUR_SQL, hour, now, size, names),
        "bins (5 min, per page)": await _query_ms(pool, dashboard._BINS_SQL, five, now, size, names),
        "ratings (rollup_metrics)": await _query_ms(pool, dashboard._RATINGS_SQL, hour, now, names),
        "events": await _query_ms(pool, dashboard._EVENTS_SQL, hour, now, size),
        "sessions per hour": await _query_ms(pool, dashboard._SESSIONS_HOURLY_SQL, hour, now),
        "visitors": await _query_ms(pool, dashboard._VISITORS_SQL, hour, now),
        "funnel": await _query_ms(pool, dashboard._FUNNEL_SQL, hour, now),
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
        load_s = await datagen.load_metrics(app.pool, rows, now, SPAN)
        result["copy_seconds"] = round(load_s, 2)
        result["copy_rows_per_second"] = round(rows / load_s)
        result["rollup_seconds"] = await datagen.build_metric_rollups(app.pool, now, SPAN)
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
                "cold": datagen.percentiles(cold),
                "warm": datagen.percentiles(warm),
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
        await datagen.drop(schema)
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
