"""Benchmark of the business reports at volume, and of the live stream's fan-out.

`python -m bench.business [--scale S]` (or `await run(scale)`), scale 1 by default:

1. starts a real analytics service (own schema and Redis prefix, no monitoring);
2. loads, with the generator it shares with ``bench/dashboard.py`` (``bench/datagen.py``),
   ``1 M x scale`` performance-metric rows over the last 24 h and their rollups,
   ``200 k x scale`` engagement events and ``100 k x scale`` funnel steps over the last 7
   days, revenue (one order per 20 users) and effect task ends (one per 5 steps), and the
   ingest's rollups of them;
3. runs the pre-aggregation pass (engagement days, session sources, funnel walks) and the
   hourly HLL sketch builder, as the service's background loop would, and times them; then
   keeps running them every 60 s (the production default) while it measures;
4. measures cold p50 / p99 through gRPC (the report caches cleared before every call) of the
   24h and 7d dashboard, the 7d funnel (all effects, and one effect with a 1 h conversion
   window), the engagement report (7d, 30d), one user's score and the attribution report
   (last touch by source, time decay by effect); and, for comparison, the 7d funnel
   computed from the raw steps as before the pre-aggregation (a few calls);
5. compares the sketches' distinct sessions and users over 7 days with exact counts;
6. measures the live stream's fan-out on the same schema (``bench/stream.py``: the service
   as a separate process, idle / 1 / 100 streams at a 1 s interval, ``--stream-rounds``
   interleaved rounds, service CPU and its PostgreSQL backends' CPU).

``--scale 10`` is the issue's volume: 10 M metric rows, 1 M funnel steps (and 2 M events).
The machine's load average is recorded at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc

from bench import datagen
from bench.datagen import DATABASE_URL, LONG, REDIS_URL, SECRET
from bench.stream import print_stream, stream_cpu
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics.funnel import funnel_between
from services.analytics.funnel_walks import funnel_from_walks
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp

ROOT = Path(__file__).resolve().parent.parent
BASE_METRICS = 1_000_000
BASE_EVENTS = 200_000
BASE_STEPS = 100_000
METRIC_SPAN = timedelta(hours=24)
SPAN = timedelta(days=7)


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
    return datagen.percentiles(samples)


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


async def run(
    scale: float = 1.0, cold_calls: int = 10, stream_seconds: float = 10.0, stream_rounds: int = 3
) -> dict[str, Any]:
    metrics = max(10_000, int(BASE_METRICS * scale))
    events = max(10_000, int(BASE_EVENTS * scale))
    steps = max(1_000, int(BASE_STEPS * scale))
    schema = f"bench_business_{uuid.uuid4().hex[:8]}"
    app = await _start_service(schema)
    result: dict[str, Any] = {
        "metric_rows": metrics,
        "events": events,
        "funnel_steps": steps,
        "schema": schema,
        "load_average_start": os.getloadavg(),
    }
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    try:
        assert app.pool is not None
        now = datetime.now(UTC)
        load: dict[str, Any] = {}
        load["metrics_copy_seconds"] = round(
            await datagen.load_metrics(app.pool, metrics, now, METRIC_SPAN), 1
        )
        load["metric_rollups_seconds"] = await datagen.build_metric_rollups(
            app.pool, now, METRIC_SPAN, synthetic=False
        )
        load.update(await datagen.load_business(app.pool, events, steps, now, SPAN))
        result["load"] = load
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

        # From here on, the service's background loop as in production: a pass (and the
        # sketches) every ANALYTICS_PREAGG_INTERVAL_SECONDS' default, 60 s. Reports skip
        # their own pass when one started less than min_age (60 s) ago.
        interval = analytics_app.SETTINGS.model_fields["analytics_preagg_interval_seconds"].default

        async def background() -> None:
            while True:
                await asyncio.sleep(interval)
                await business.preagg.run_once()
                await business.preagg.build_sketches()

        loop_task = asyncio.ensure_future(background())
        result["background_interval_seconds"] = interval

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
            "funnel 7d fx-3 1h": (
                lambda: stub.GetFunnelReport(
                    analytics_pb2.GetFunnelReportRequest(
                        window="7d", effect_id="fx-3", conversion_window="1h"
                    ),
                    metadata=metadata,
                    timeout=LONG,
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

        # The 7d funnel from the raw steps (the computation before the walks), and the
        # walks' answer for the same window compared with it.
        until = datetime.now(UTC)
        raw_samples = []
        for _ in range(3):
            started = time.perf_counter()
            raw = await funnel_between(app.pool, until - SPAN, until, timedelta(hours=24))
            raw_samples.append(time.perf_counter() - started)
        walked = await funnel_from_walks(app.pool, until - SPAN, until, timedelta(hours=24))
        result["funnel_7d_raw"] = datagen.percentiles(raw_samples)
        result["funnel_walks_equal_raw"] = walked == raw
        print(f"  raw funnel 7d: {result['funnel_7d_raw']}; walks equal: {walked == raw}", flush=True)

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
        loop_task.cancel()
    finally:
        await channel.close()
        await app.stop()
    try:
        result["stream"] = await stream_cpu(schema, stream_seconds, stream_rounds, floor=False)
    finally:
        await datagen.drop(schema)
    result["load_average_end"] = os.getloadavg()
    return result


def print_result(result: dict[str, Any]) -> None:
    print(
        f"business benchmark: {result['metric_rows']:,} metric rows over 24 h, {result['events']:,} events "
        f"and {result['funnel_steps']:,} funnel steps over 7 days; load average "
        f"{result['load_average_start']} at the start, {result.get('load_average_end')} at the end"
    )
    print(f"  load: {result['load']}")
    print(
        f"  pre-aggregation: {result['preagg_seconds']} s for {result['preagg_days']} days; "
        f"sketches: {result['sketch_hours_built']} hours in {result['sketch_build_seconds']} s"
    )
    for label, p in result["cold"].items():
        print(f"  cold {label}: p50 {p['p50_ms']} ms, p99 {p['p99_ms']} ms")
    raw = result["funnel_7d_raw"]
    print(
        f"  funnel 7d from the raw steps: p50 {raw['p50_ms']} ms, p99 {raw['p99_ms']} ms; "
        f"walks give the same answer: {result['funnel_walks_equal_raw']}"
    )
    s = result["sketch_7d"]
    print(
        f"  sketch 7d: sessions {s['sessions']} vs exact {s['sessions_exact']} ({s['sessions_error']:.2%}), "
        f"users {s['users']} vs {s['users_exact']} ({s['users_error']:.2%})"
    )
    if result.get("stream"):
        print_stream(result["stream"])
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.business")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="1.0 = 1 M metric rows, 200 k events, 100 k funnel steps"
    )
    parser.add_argument("--cold", type=int, default=10, help="cold calls per report")
    parser.add_argument("--stream-seconds", type=float, default=10.0, help="one live-stream window")
    parser.add_argument("--stream-rounds", type=int, default=3, help="idle / 1 / 100 stream windows")
    args = parser.parse_args()
    print_result(asyncio.run(run(args.scale, args.cold, args.stream_seconds, args.stream_rounds)))


if __name__ == "__main__":
    main()
