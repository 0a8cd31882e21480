"""The benchmarks' data: one generator for the dashboard and the business benchmarks.

* **Metric rows** (``load_metrics``): ``rows`` performance-metric rows spread over ``span``
  (24 h in both benchmarks) with binary COPY on two connections: a realistic mix of web
  vitals and custom metrics (lognormal values, ratings by the web.dev thresholds), one
  session per 20 rows living up to 30 minutes, every other session identified. The
  rollups are built from them in SQL (``build_metric_rollups``: sketch bins with
  ``sketch.bin_of``'s formula ``ceil(ln(v) / ln(gamma))``, the hourly sketch summed from
  the 5-minute one, as ingest keeps them).
* **Business rows** (``load_business``): engagement events (one session every 10 events,
  one user every 5 sessions, a quarter of the sessions anonymous, ``utm_*`` or a referrer
  on a session's first event) and funnel steps (sessions reaching 1 to 9 steps, 30 s
  apart) over ``span``; revenue (one order per 20 users) and effect task ends (one per 5
  steps); their rollups as the ingest keeps them.

Deterministic: the same arguments give the same rows (timestamps relative to ``now``).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import statistics
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from services.analytics import sketch, vitals

DATABASE_URL = os.environ.get(
    "BENCH_DATABASE_URL", os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
)
REDIS_URL = os.environ.get("BENCH_REDIS_URL", os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
SECRET = "bench-secret-0123456789-0123456789-abcdef"
CHUNK = 50_000
COPIERS = 2
LONG = 3600.0  # seconds: loading and rollup statements at scale outlast the pool's command timeout


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

# The hourly engagement and funnel rollups, from the 5-minute ones (as the ingest keeps them:
# an hour's row is the sum of its 5-minute rows).
HOURLY_ROLLUPS: tuple[tuple[str, str, tuple[Any, ...]], ...] = (
    (
        "rollup_events_hourly",
        """INSERT INTO rollup_events_hourly (hour_start, event_type, count)
           SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch'), event_type, sum(count)
           FROM rollup_events GROUP BY 1, 2""",
        (),
    ),
    (
        "rollup_funnel_hourly",
        """INSERT INTO rollup_funnel_hourly (hour_start, step, count)
           SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch'), step, sum(count)
           FROM rollup_funnel GROUP BY 1, 2""",
        (),
    ),
)


def value_pools(rng: random.Random, size: int = 65_536) -> dict[str, list[tuple[float, str | None]]]:
    """Per metric, a pool of (value, rating) to draw rows from (keeps generation cheap)."""
    pools: dict[str, list[tuple[float, str | None]]] = {}
    for name, (_, median, sigma, zeros) in MIX.items():
        values = [
            0.0 if rng.random() < zeros else rng.lognormvariate(math.log(median), sigma) for _ in range(size)
        ]
        pools[name] = [(v, vitals.rate(name, v)) for v in values]
    return pools


def metric_rows(
    start: int,
    count: int,
    sessions: int,
    now: datetime,
    pools: dict[str, list[tuple[float, str | None]]],
    span: timedelta = timedelta(hours=24),
) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(start)
    names = list(MIX)
    weights = [share for share, *_ in MIX.values()]
    seconds = span.total_seconds() - 1
    chosen = rng.choices(names, weights, k=count)
    mask = len(next(iter(pools.values()))) - 1
    for i in range(count):
        name = chosen[i]
        value, rating = pools[name][rng.getrandbits(16) & mask]
        session = rng.randrange(sessions)
        # A session lives up to 30 minutes from a start spread over the span.
        offset = min(seconds, (session * 7919 % sessions) / sessions * seconds + rng.random() * 1800)
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


async def load_metrics(
    pool: asyncpg.Pool, rows: int, now: datetime, span: timedelta = timedelta(hours=24)
) -> float:
    """COPY `rows` metric rows over `span` before `now`; returns seconds."""
    pools = value_pools(random.Random(7))
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
                    records=list(metric_rows(start, count, sessions, now, pools, span)),
                    columns=COPY_COLUMNS,
                    timeout=LONG,
                )

    started = time.perf_counter()
    await asyncio.gather(*(copier() for _ in range(COPIERS)))
    return time.perf_counter() - started


async def build_metric_rollups(
    pool: asyncpg.Pool, now: datetime, span: timedelta = timedelta(hours=24), synthetic: bool = True
) -> dict[str, float]:
    """The metric rollups (and ``rollup_sessions`` from the metric rows' sessions); with
    `synthetic`, a realistically sized fill of the events and funnel rollups too (the
    dashboard benchmark loads no events or steps)."""
    timings: dict[str, float] = {}
    extra = (
        [
            ("rollup_events", EVENTS_ROLLUP, (now - span, now)),
            ("rollup_funnel", FUNNEL_ROLLUP, (now - span, now)),
            *HOURLY_ROLLUPS,
        ]
        if synthetic
        else []
    )
    async with pool.acquire() as conn:
        await conn.execute("SET work_mem = '256MB'")
        await conn.execute("ANALYZE metrics", timeout=LONG)
        for label, sql, args in (
            ("rollup_metric_bins", BINS_ROLLUP, (sketch.MIN_VALUE, sketch.ZERO_BIN, sketch.GAMMA)),
            ("rollup_metric_bins_hourly", BINS_HOURLY_ROLLUP, ()),
            ("rollup_metrics", METRICS_ROLLUP, ()),
            ("rollup_sessions", SESSIONS_ROLLUP, ()),
            *extra,
        ):
            started = time.perf_counter()
            await conn.execute(sql, *args, timeout=LONG)
            timings[label] = round(time.perf_counter() - started, 2)
        await conn.execute(
            "ANALYZE rollup_metric_bins; ANALYZE rollup_metric_bins_hourly; ANALYZE rollup_metrics; "
            "ANALYZE rollup_sessions; "
            "ANALYZE rollup_events; ANALYZE rollup_funnel; ANALYZE rollup_events_hourly; "
            "ANALYZE rollup_funnel_hourly",
            timeout=LONG,
        )
        await conn.execute("RESET work_mem")
    return timings


def percentiles(samples: list[float]) -> dict[str, float]:
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


SOURCES = [("google", "cpc", "winter"), ("facebook", "social", "launch"), ("newsletter", "email", "weekly")]
REFERRERS = ["https://www.reddit.com/r/photo", "https://news.ycombinator.com/item", "https://t.co/x"]
EVENT_TYPES = [f"event_{i}" for i in range(10)]
PAGES = [f"/page/{i}" for i in range(20)]
EFFECTS = [f"fx-{i}" for i in range(30)]

BUSINESS_ROLLUPS = (
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


def event_rows(
    start: int, count: int, now: datetime, span: timedelta = timedelta(days=7)
) -> Iterator[tuple[Any, ...]]:
    rng = random.Random(start)
    seconds = span.total_seconds() - 3600
    for i in range(start, start + count):
        session = i // 10
        user = session // 5
        # A session's events sit within 20 minutes of its start, spread over the span.
        begin = (session * 7919 % 100_003) / 100_003 * seconds
        at = now - timedelta(seconds=seconds - begin - (i % 10) * 120 + 1)
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
            f"es{session}",
            f"u{user}" if session % 4 else None,  # a quarter of the sessions anonymous
            EVENT_TYPES[rng.randrange(len(EVENT_TYPES))],
            PAGES[session % len(PAGES)],
            properties,
            at,
        )


def step_rows(count: int, now: datetime, span: timedelta = timedelta(days=7)) -> Iterator[tuple[Any, ...]]:
    seconds = span.total_seconds() - 3600
    i = 0
    session = 0
    while i < count:
        reached = 1 + (session * 31 % 9)
        begin = (session * 7919 % 100_003) / 100_003 * seconds
        for step in range(1, min(reached, count - i) + 1):
            yield (
                f"f{i}",
                f"fs{session}",
                f"u{session // 3}",
                step,
                EFFECTS[session % len(EFFECTS)],
                now - timedelta(seconds=seconds - begin - step * 30 + 1),
            )
            i += 1
        session += 1


async def copy_rows(
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


async def load_business(
    pool: asyncpg.Pool, events: int, steps: int, now: datetime, span: timedelta = timedelta(days=7)
) -> dict[str, Any]:
    """COPY the events, funnel steps, revenue and task ends; build their rollups as the
    ingest keeps them; ``ANALYZE``."""
    out: dict[str, Any] = {}
    started = time.perf_counter()
    columns = ("event_id", "session_id", "user_id", "event_type", "page", "properties", "occurred_at")
    parts = 2
    per = -(-events // parts)
    await asyncio.gather(
        *(
            copy_rows(pool, "events", columns, event_rows(p * per, min(per, events - p * per), now, span))
            for p in range(parts)
            if p * per < events
        )
    )
    await copy_rows(
        pool,
        "funnel_steps",
        ("step_id", "session_id", "user_id", "step", "effect_id", "occurred_at"),
        step_rows(steps, now, span),
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
            now - timedelta(seconds=rng.random() * span.total_seconds()),
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
            now - timedelta(seconds=rng.random() * span.total_seconds()),
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
        for table, sql in (*BUSINESS_ROLLUPS, *((table, sql) for table, sql, _ in HOURLY_ROLLUPS)):
            t = time.perf_counter()
            await conn.execute(sql, timeout=LONG)
            out[f"{table}_seconds"] = round(time.perf_counter() - t, 1)
        await conn.execute("ANALYZE", timeout=LONG)
        out["rollup_sessions_rows"] = await conn.fetchval("SELECT count(*) FROM rollup_sessions")
    out["orders"], out["tasks"] = len(orders), len(tasks)
    return out


async def drop(schema: str) -> None:
    """Drop a benchmark's schema and delete its Redis keys."""
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
