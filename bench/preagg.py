"""Benchmark of the pre-aggregation pass: incremental (the change log) against the whole-day
recomputation it replaces, on the same data in the same run.

`python -m bench.preagg [--day-events M] [--new N1,N2,...] [--rounds R]`:

1. starts a real analytics service (own schema and Redis prefix, no background pass);
2. COPYs ``M`` events and ``M / 2`` funnel steps over today so far (UTC), with the revenue,
   task ends and rollups of ``bench/datagen.py``, and pre-aggregates them (first pass);
3. per round and per ``N``: sends ``N`` new events and ``N / 2`` funnel steps through the
   ingest (gRPC RecordEvents / RecordFunnelSteps, batches of 200, 8 at a time; today's
   sessions and users, and new ones), then times
   * the incremental pass (``run_once``: applies the change rows), and
   * the whole-day recomputation of today and every user's scores (``recompute_day``: what a
     pass did for a changed day before), which the old pass ran on every change of today;
   both on a dedicated one-connection pool, so that the PostgreSQL backend's CPU time
   (``/proc``; parallel query workers not included) is that of the pass; and checks that
   both left the same ``engagement_daily``, ``session_sources`` and ``funnel_walks``;
4. prints wall time, backend CPU and their ratios (whole day / incremental).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench import datagen
from bench.business import _start_service
from bench.cpu import cpu_seconds
from bench.datagen import DATABASE_URL, LONG
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics.ingest import sql
from services.analytics.ingest.rows import EVENTS
from services.analytics.partitions import PartitionMaintainer
from services.analytics.preagg import Preaggregator
from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit import db

BATCH = 200
PARALLEL = 8
# A digest of what the pass keeps, to compare the two ways.
_DIGEST_SQL = """
SELECT (SELECT md5(coalesce(string_agg(e::text, ',' ORDER BY day, user_id), '')) FROM engagement_daily e),
       (SELECT md5(coalesce(string_agg(s::text, ',' ORDER BY session_id), '')) FROM session_sources s),
       (SELECT md5(coalesce(string_agg(w::text, ',' ORDER BY session_id, scope, start), '')) FROM funnel_walks w)
"""


async def _ingest(stub: analytics_pb2_grpc.AnalyticsServiceStub, n: int, tag: str, now: datetime) -> None:
    """``n`` events and ``n / 2`` funnel steps of today: half in sessions and users of the
    loaded data, half in new ones."""
    sem = asyncio.Semaphore(PARALLEL)

    async def send(call: Callable[[], Awaitable[Any]]) -> None:
        async with sem:
            await call()

    calls: list[Callable[[], Awaitable[Any]]] = []
    for start in range(0, n, BATCH):
        events = analytics_pb2.RecordEventsRequest()
        for i in range(start, min(n, start + BATCH)):
            session = f"es{i // 10}" if i % 2 else f"new-{tag}-{i // 10}"
            e = events.events.add(
                event_id=f"{tag}-e{i}",
                session_id=session,
                user_id=f"u{i // 50}" if i % 4 else "",
                event_type=datagen.EVENT_TYPES[i % len(datagen.EVENT_TYPES)],
                page=datagen.PAGES[i % len(datagen.PAGES)],
            )
            if i % 10 == 0:
                e.properties.update({"utm_source": "bench", "utm_campaign": tag})
            e.timestamp.FromDatetime(now - timedelta(seconds=i % 600))
        calls.append(lambda r=events: stub.RecordEvents(r, timeout=LONG))
    for start in range(0, n // 2, BATCH):
        steps = analytics_pb2.RecordFunnelStepsRequest()
        for i in range(start, min(n // 2, start + BATCH)):
            s = steps.steps.add(
                step_id=f"{tag}-f{i}",
                session_id=f"fs{i // 4}" if i % 2 else f"new-{tag}-f{i // 4}",
                user_id=f"u{i // 12}",
                step=FUNNEL_STEPS[i % 4 + (i // 4) % 3],
                effect_id=datagen.EFFECTS[i % len(datagen.EFFECTS)],
            )
            s.timestamp.FromDatetime(now - timedelta(seconds=600 - i % 600))
        calls.append(lambda r=steps: stub.RecordFunnelSteps(r, timeout=LONG))
    await asyncio.gather(*(send(c) for c in calls))


async def _timed(conn_pid: int, work: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    cpu = cpu_seconds(conn_pid)
    started = time.perf_counter()
    out = await work()
    return time.perf_counter() - started, cpu_seconds(conn_pid) - cpu, out


def _before(source: Path) -> Callable[[asyncpg.Pool, int], Any]:
    """The Preaggregator class of the code at ``source`` (a checkout from before the change
    log, e.g. ``git archive 5046951``), with its own ``funnel_walks``: its whole-day pass runs
    on this schema too (the columns migration 0025 added have defaults; ``preagg_days.stale``
    gets one for it)."""
    modules = {}
    for name in ("funnel_walks", "preagg"):
        spec = importlib.util.spec_from_file_location(
            f"before_{name}", source / "services" / "analytics" / f"{name}.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        modules[name] = module
    modules["preagg"].funnel_walks = modules["funnel_walks"]
    preaggregator = modules["preagg"].Preaggregator
    return lambda pool, retention: preaggregator(pool, "before", retention_days=retention)


async def _before_pass(old: Any, pool: asyncpg.Pool, day: date) -> None:
    """What the pass before the change log did when today's counts moved: the whole day,
    then every user's scores."""
    from services.analytics import engagement

    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        await old._refresh_day(conn, day, now)
        await engagement.store_scores(conn, now.date())


async def run(day_events: int, news: list[int], rounds: int, before: Path | None = None) -> dict[str, Any]:
    schema = f"bench_preagg_{uuid.uuid4().hex[:8]}"
    app = await _start_service(schema)
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if now - midnight < timedelta(hours=2):
        raise SystemExit("run it at least 2 h after midnight UTC: today is the day measured")
    result: dict[str, Any] = {"day_events": day_events, "day_steps": day_events // 2, "schema": schema}
    result["load_average_start"] = os.getloadavg()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    pool: asyncpg.Pool | None = None
    try:
        assert app.pool is not None
        result["load"] = await datagen.load_business(
            app.pool, day_events, day_events // 2, now, now - midnight - timedelta(minutes=20)
        )
        print(f"  loaded: {result['load']}", flush=True)
        # A pass of its own on one connection: its backend's CPU is the pass's.
        pool = await db.create_pool(DATABASE_URL, schema, min_size=1, max_size=1)
        async with pool.acquire() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
        retention = analytics_app.SETTINGS.model_fields["analytics_retention_days"].default
        preagg = Preaggregator(pool, schema, retention_days=retention, min_age_seconds=0)
        old = None
        if before is not None:
            old = _before(before)(pool, retention)
            async with pool.acquire() as conn:  # the old pass stores days without this column
                await conn.execute("ALTER TABLE preagg_days ALTER COLUMN stale SET DEFAULT false")
        wall, cpu, first = await _timed(pid, lambda: preagg.run_once(full_check=True))
        result["first_pass"] = {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "days": len(first.refreshed),
        }
        print(f"  first pass (every day whole): {result['first_pass']}", flush=True)
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        runs: list[dict[str, Any]] = []
        for r in range(rounds):
            for n in news:
                await _ingest(stub, n, f"r{r}n{n}", datetime.now(UTC))
                inc_wall, inc_cpu, out = await _timed(
                    pid, lambda: preagg.run_once(min_age_seconds=0, full_check=False)
                )
                assert out.refreshed == [], "the incremental pass recomputed a day whole"
                async with pool.acquire() as conn:
                    incremental = tuple(await conn.fetchrow(_DIGEST_SQL, timeout=LONG))
                today = datetime.now(UTC).date()
                day_wall, day_cpu, _ = await _timed(pid, functools.partial(preagg.recompute_day, today))
                async with pool.acquire() as conn:
                    whole = tuple(await conn.fetchrow(_DIGEST_SQL, timeout=LONG))
                if old is not None:
                    before_wall, before_cpu, _ = await _timed(
                        pid, functools.partial(_before_pass, old, pool, today)
                    )
                    await preagg.recompute_day(today)  # the rows as this code keeps them, again
                row = {
                    "round": r,
                    "new_events": n,
                    "new_steps": n // 2,
                    "change_rows": out.changes,
                    "incremental_wall_ms": round(inc_wall * 1000, 1),
                    "incremental_cpu_ms": round(inc_cpu * 1000, 1),
                    "whole_day_wall_ms": round(day_wall * 1000, 1),
                    "whole_day_cpu_ms": round(day_cpu * 1000, 1),
                    "wall_ratio": round(day_wall / inc_wall, 1),
                    "cpu_ratio": round(day_cpu / inc_cpu, 1) if inc_cpu else None,
                    "equal": incremental == whole,
                }
                if old is not None:
                    row["before_wall_ms"] = round(before_wall * 1000, 1)
                    row["before_cpu_ms"] = round(before_cpu * 1000, 1)
                    row["before_cpu_ratio"] = round(before_cpu / inc_cpu, 1) if inc_cpu else None
                runs.append(row)
                print(f"  {row}", flush=True)
        result["runs"] = runs
    finally:
        if pool is not None:
            await pool.close()
        await channel.close()
        await app.stop()
        await datagen.drop(schema)
    result["load_average_end"] = os.getloadavg()
    return result


async def ingest_cost(flushes: int, batch: int, sessions: bool = False, blocks: int = 10) -> dict[str, Any]:
    """PostgreSQL CPU per events flush (the optimistic statement, then COMMIT) with and
    without the change-log CTE, in alternating blocks of ``flushes // blocks`` flushes on one
    connection. Rows as ``bench/ingest.py`` makes them (session n % 997, a user on every
    fourth event, n % 331: a change row per identified event and per session, the worst
    case), or with ``sessions`` as browsers send them: 20 consecutive events of one session
    and user (a quarter anonymous)."""
    schema = f"bench_preagg_{uuid.uuid4().hex[:8]}"
    await db.migrate_dsn(DATABASE_URL, schema, analytics_app.MIGRATIONS)
    partitions_pool = await db.create_pool(DATABASE_URL, schema, min_size=1, max_size=1)
    try:
        await PartitionMaintainer(partitions_pool, schema, retention_days=3, days_ahead=1).run_once()
    finally:
        await partitions_pool.close()
    with_log = sql.EVENTS_FAST_SQL
    without = with_log.replace(", " + sql.EVENT_CHANGES.format(src="pg_temp.stage_events"), "")
    assert without != with_log
    conn = await asyncpg.connect(DATABASE_URL, server_settings={"search_path": f'"{schema}",public'})
    try:
        await conn.execute(sql.SESSION_SETUP)
        await conn.execute(EVENTS.staging_ddl())
        pid = conn.get_server_pid()
        cpu = {"with": 0.0, "without": 0.0}
        done = {"with": 0, "without": 0}
        now = datetime.now(UTC)
        per_block = max(1, flushes // blocks)
        n = 0
        for b in range(2 * blocks):
            variant = "with" if b % 2 == 0 else "without"
            statement = with_log if variant == "with" else without
            started = cpu_seconds(pid)
            for _ in range(per_block):
                rows = []
                for _ in range(batch):
                    if sessions:
                        session, user = f"sess-{n // 20}", f"user-{n // 60}" if n // 20 % 4 else None
                    else:
                        session, user = f"sess-{n % 997}", f"user-{n % 331}" if n % 4 == 0 else None
                    rows.append(
                        (
                            0,
                            f"c{n}",
                            session,
                            user,
                            datagen.EVENT_TYPES[n % len(datagen.EVENT_TYPES)],
                            datagen.PAGES[n % len(datagen.PAGES)],
                            None,
                            now,
                        )
                    )
                    n += 1
                async with conn.transaction():
                    await conn.copy_records_to_table(
                        EVENTS.stage, records=rows, columns=EVENTS.copy_columns, schema_name="pg_temp"
                    )
                    await conn.execute(statement)
            cpu[variant] += cpu_seconds(pid) - started
            done[variant] += per_block
    finally:
        await conn.close()
        await datagen.drop(schema)
    per = {v: cpu[v] / done[v] / batch * 1e6 for v in cpu}
    return {
        "rows": "20 per session" if sessions else "bench.ingest",
        "batch": batch,
        "flushes_each": done["with"],
        "pg_cpu_us_per_event_with_log": round(per["with"], 2),
        "pg_cpu_us_per_event_without": round(per["without"], 2),
        "ratio": round(per["with"] / per["without"], 3),
    }


def print_result(result: dict[str, Any]) -> None:
    print(
        f"pre-aggregation benchmark: today {result['day_events']:,} events and {result['day_steps']:,} "
        f"funnel steps (COPY); load average {result['load_average_start']} at the start, "
        f"{result['load_average_end']} at the end"
    )
    print(f"  first pass, every day whole: {result['first_pass']}")
    print("  new events (+ steps) | incremental pass wall / CPU | whole day wall / CPU | ratios | equal")
    for r in result["runs"]:
        before = (
            f" | before the change log: {r['before_wall_ms']} / {r['before_cpu_ms']} ms"
            f" (CPU x{r['before_cpu_ratio']})"
            if "before_cpu_ms" in r
            else ""
        )
        print(
            f"  {r['new_events']:>7,} (+{r['new_steps']:,}) | {r['incremental_wall_ms']} / "
            f"{r['incremental_cpu_ms']} ms | {r['whole_day_wall_ms']} / {r['whole_day_cpu_ms']} ms | "
            f"x{r['wall_ratio']} / x{r['cpu_ratio']} | {r['equal']}{before}"
        )
    print(json.dumps(result, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.preagg")
    parser.add_argument("--day-events", type=int, default=600_000, help="events loaded over today")
    parser.add_argument("--new", default="1000,10000", help="new events per pass, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a checkout from before the change log: also time its whole-day pass (git archive 5046951)",
    )
    parser.add_argument(
        "--ingest-cost",
        type=int,
        default=0,
        metavar="FLUSHES",
        help="instead: PostgreSQL CPU per events flush with and without the change log",
    )
    args = parser.parse_args()
    if args.ingest_cost:
        for sessions in (False, True):
            for batch in (200, 3000):
                cost = asyncio.run(ingest_cost(args.ingest_cost, batch, sessions))
                print(json.dumps(cost, default=str), flush=True)
        return
    news = [int(n) for n in args.new.split(",")]
    print_result(asyncio.run(run(args.day_events, news, args.rounds, args.before)))


if __name__ == "__main__":
    main()
