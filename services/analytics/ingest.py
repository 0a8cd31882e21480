"""Durable batched ingestion: a group committer.

Requests hand their validated rows to :meth:`GroupCommitter.submit` and wait.
One flusher task takes everything queued (whole requests, up to
``max_rows`` rows) and writes it in ONE transaction on its own connection:

1. binary COPY into per-connection temporary staging tables
   (``ON COMMIT DELETE ROWS``, created once per connection);
2. the ids go into the key tables (unique indexes), then the rows into the
   partitioned raw tables. Optimistically as plain INSERTs of every staged row;
   when an id exists already, the flush is redone with
   ``INSERT ... ON CONFLICT DO NOTHING RETURNING``, which finds the new ids, and
   only those are stored;
3. the rollups are updated from the same staged rows, aggregated in SQL
   (``GROUP BY`` + ``ON CONFLICT DO UPDATE SET count = count + excluded.count``);
4. COMMIT, and only then every waiting request gets its own
   ``(accepted, duplicates)``. A failed flush fails every request in it
   (UNAVAILABLE) and, being one transaction, leaves nothing behind.

Metrics: the latest value per ``(name, metric_id)`` wins. ``metric_keys``
holds the current value, its partition timestamp, page, sketch bin and rating;
a changed report updates the raw row in place and moves the rollup
contribution (old bin/rating/value out, new in; the count is unchanged) in the
5-minute rollups and in the hourly sketch ``rollup_metric_bins_hourly`` alike.
A report with the value already stored is a duplicate.

Within one flush the same id twice is deduplicated in Python: the first wins
for events and steps, the last for metrics (a superseded report counts as
accepted, an identical one as a duplicate).

Flush policy: the flusher flushes as soon as something is queued (no delay
when idle); while a flush runs, new requests queue up and go together in the
next one. ``flush_interval_ms`` > 0 adds a deliberate wait for more rows.
Only under a backlog (``parallel_min_rows`` waiting) does a second flush start
beside the running one (``concurrency``, each on its own connection); two
flushes holding the same id are ordered by PostgreSQL's row locks (the later
one sees the earlier one's commit: a duplicate, or for a metric a move from
the committed value), exactly as between two replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
from prometheus_client import Counter, Histogram

from services.servicekit.errors import ServiceError, unavailable

from .validation import Row

log = logging.getLogger(__name__)

FLUSHES = Counter("analytics_ingest_flushes", "Group-commit flushes, by result.", ["result"])
FLUSH_ROWS = Histogram(
    "analytics_ingest_flush_rows",
    "Rows per group-commit flush.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
)
FLUSH_SECONDS = Histogram(
    "analytics_ingest_flush_seconds",
    "Duration of a group-commit flush (COPY to COMMIT).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ROWS_STORED = Counter("analytics_ingest_rows", "Ingested items, by kind and outcome.", ["kind", "outcome"])


class Kind(enum.IntEnum):
    EVENTS = 0
    METRICS = 1
    STEPS = 2


KIND_NAMES = {Kind.EVENTS: "events", Kind.METRICS: "metrics", Kind.STEPS: "steps"}

STAGING_DDL = """
SET plan_cache_mode = force_custom_plan;
SET synchronous_commit = on;  -- acknowledged means durable, whatever the database's default
CREATE TEMP TABLE IF NOT EXISTS stage_events (
    seq bigint NOT NULL, event_id text COLLATE "C" NOT NULL, session_id text COLLATE "C" NOT NULL, user_id text,
    event_type text NOT NULL, page text, properties jsonb, occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_metrics (
    seq bigint NOT NULL, name text COLLATE "C" NOT NULL, metric_id text COLLATE "C" NOT NULL,
    session_id text NOT NULL,
    user_id text, value double precision NOT NULL, delta double precision NOT NULL, rating text,
    navigation_type text, page text, attributes jsonb, occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(), bin integer NOT NULL,
    is_new boolean NOT NULL DEFAULT false, changed boolean NOT NULL DEFAULT false,
    old_occurred_at timestamptz, old_value double precision, old_page text, old_bin integer,
    old_rating text
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_steps (
    seq bigint NOT NULL, step_id text COLLATE "C" NOT NULL, session_id text COLLATE "C" NOT NULL, user_id text,
    step smallint NOT NULL, effect_id text, properties jsonb, occurred_at timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
) ON COMMIT DELETE ROWS;
"""

EVENT_COLUMNS = (
    "seq",
    "event_id",
    "session_id",
    "user_id",
    "event_type",
    "page",
    "properties",
    "occurred_at",
)
METRIC_COLUMNS = (
    "seq",
    "name",
    "metric_id",
    "session_id",
    "user_id",
    "value",
    "delta",
    "rating",
    "navigation_type",
    "page",
    "attributes",
    "occurred_at",
    "bin",
)
STEP_COLUMNS = (
    "seq",
    "step_id",
    "session_id",
    "user_id",
    "step",
    "effect_id",
    "properties",
    "occurred_at",
)

BUCKET = "date_bin('5 minutes', {col}, timestamptz 'epoch')"
HOUR = "date_bin('1 hour', {col}, timestamptz 'epoch')"

# The flusher's connections plan every statement afresh (plan_cache_mode =
# force_custom_plan; the statements with a result take the flush's row count
# as a parameter so that they are re-planned too): plans follow the staging
# tables' size of this flush, never a generic plan made for another size.
# Keys are inserted in key order so that replicas flushing overlapping ids
# cannot deadlock on each other's insertions; rollup rows are upserted in key
# order for the same reason.


def _stored_once_sql(
    stage: str, keys: str, key: str, raw: str, columns: Sequence[str], rollups: str
) -> tuple[str, str]:
    """The two statements of a kind stored once per id (events, steps).

    ``rollups`` holds the rollup CTEs, reading the new rows from ``{src}``.

    1. The ON CONFLICT form: some ids may exist already. The key insert finds
       the new ones; only those are stored and rolled up (from the raw
       insert's RETURNING), and the result counts them per request (seq).
    2. The optimistic form, for a flush expected to hold only new ids: a plain
       INSERT of the keys (a unique index probe per row, about 2/3 of ON
       CONFLICT's speculative insertion; an anti-join probing the keys first
       costs more than either, and the planner ran it as a hash join over the
       whole key table), and the raw rows and rollups straight from staging,
       no join. An id that exists already, or that another transaction is
       inserting at the same moment, aborts it with a unique violation: the
       flush is then redone with the ON CONFLICT form (which waits for that
       transaction and counts its ids as duplicates), and the next flushes
       start with that form too (see ``GroupCommitter.PESSIMISTIC_FLUSHES``).
    """
    names = ", ".join(columns)
    staged = ", ".join(f"s.{c}" for c in columns)
    insert_keys = f"""INSERT INTO {keys} ({key}, occurred_at)
    SELECT {key}, occurred_at FROM pg_temp.{stage} ORDER BY {key}"""
    insert_raw = f"INSERT INTO {raw} ({names}) SELECT {staged} FROM pg_temp.{stage} s"
    on_conflict = f"""
WITH new AS (
    {insert_keys}
    ON CONFLICT DO NOTHING
    RETURNING {key}
), raw AS (
    {insert_raw} JOIN new ON new.{key} = s.{key}
    RETURNING *
), {rollups.format(src="raw")}
SELECT s.seq, count(*)::int FROM pg_temp.{stage} s JOIN new ON new.{key} = s.{key}
GROUP BY s.seq LIMIT $1
"""
    optimistic = f"""
WITH new AS (
    {insert_keys}
), raw AS (
    {insert_raw}
), {rollups.format(src=f"pg_temp.{stage}")}
SELECT
"""
    return on_conflict, optimistic


EVENTS_SQL, EVENTS_FAST_SQL = _stored_once_sql(
    "stage_events",
    "event_keys",
    "event_id",
    "events",
    (*EVENT_COLUMNS[1:], "received_at"),
    f"""
counts AS (
    INSERT INTO rollup_events AS r (bucket_start, event_type, page, count)
    SELECT {BUCKET.format(col="occurred_at")}, event_type, coalesce(page, ''), count(*)
    FROM {{src}} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (bucket_start, event_type, page) DO UPDATE SET count = r.count + excluded.count
), sessions AS (
    INSERT INTO rollup_sessions AS r (hour_start, session_id, user_id)
    SELECT {HOUR.format(col="occurred_at")}, session_id, max(user_id)
    FROM {{src}} GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (hour_start, session_id) DO UPDATE SET user_id = excluded.user_id
    WHERE r.user_id IS NULL AND excluded.user_id IS NOT NULL
)""",
)

STEPS_SQL, STEPS_FAST_SQL = _stored_once_sql(
    "stage_steps",
    "step_keys",
    "step_id",
    "funnel_steps",
    (*STEP_COLUMNS[1:], "received_at"),
    f"""
counts AS (
    INSERT INTO rollup_funnel AS r (bucket_start, step, effect_id, count)
    SELECT {BUCKET.format(col="occurred_at")}, step, coalesce(effect_id, ''), count(*)
    FROM {{src}} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (bucket_start, step, effect_id) DO UPDATE SET count = r.count + excluded.count
)""",
)

# Metrics, step 1: claim the keys never seen. Rows locked by our insert stay
# ours until COMMIT; a concurrent inserter of the same key waits for us.
METRICS_NEW_SQL = """
WITH ins AS (
    INSERT INTO metric_keys (name, metric_id, occurred_at, value, page, bin, rating)
    SELECT name, metric_id, occurred_at, value, coalesce(page, ''), bin, rating
    FROM pg_temp.stage_metrics ORDER BY name, metric_id
    ON CONFLICT DO NOTHING
    RETURNING name, metric_id
)
UPDATE pg_temp.stage_metrics s SET is_new = true
FROM ins WHERE s.name = ins.name AND s.metric_id = ins.metric_id
"""

# Step 2 (only when some keys already existed): lock them and read the current
# value and where its rollup contribution sits.
METRICS_OLD_SQL = """
WITH old AS (
    SELECT k.name, k.metric_id, k.occurred_at, k.value, k.page, k.bin, k.rating
    FROM metric_keys k
    JOIN pg_temp.stage_metrics s ON s.name = k.name AND s.metric_id = k.metric_id
    WHERE NOT s.is_new
    ORDER BY k.name, k.metric_id
    FOR UPDATE OF k
)
UPDATE pg_temp.stage_metrics s
SET old_occurred_at = old.occurred_at, old_value = old.value, old_page = old.page,
    old_bin = old.bin, old_rating = old.rating, changed = old.value IS DISTINCT FROM s.value
FROM old WHERE s.name = old.name AND s.metric_id = old.metric_id
"""

# Step 3: raw rows (insert new, update changed in place), current values, and
# the rollups: +1 at the new value for new keys; for changed keys +1 at the new
# value and -1 at the old one, in the bucket and page of the first report. The
# hourly, page-less sketch gets the same contributions summed per hour and bin.
# Both joins here look rows up by key in a large table (metrics, metric_keys)
# for a few thousand staged rows: the flusher runs this statement with hash and
# merge joins off (METRICS_JOIN_BY_INDEX). Otherwise the planner, unable to
# prune the metrics partitions at plan time, prices per-row index probes over
# every partition above sorting the whole table, and the flush grows with it.
_METRIC_ROLLUPS = """
bins AS (
    INSERT INTO rollup_metric_bins AS r (bucket_start, name, page, bin, count)
    SELECT bucket, name, page, bin, sum(sign) FROM contrib
    GROUP BY 1, 2, 3, 4 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3, 4
    ON CONFLICT (bucket_start, name, page, bin) DO UPDATE SET count = r.count + excluded.count
), bins_hourly AS (
    INSERT INTO rollup_metric_bins_hourly AS r (hour_start, name, bin, count)
    SELECT {hour}, name, bin, sum(sign) FROM contrib
    GROUP BY 1, 2, 3 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (hour_start, name, bin) DO UPDATE SET count = r.count + excluded.count
), stats AS (
    INSERT INTO rollup_metrics AS r (bucket_start, name, page, count, sum, good, needs_improvement,
                                     poor)
    SELECT bucket, name, page, sum(sign), sum(sign * value::numeric),
           coalesce(sum(sign) FILTER (WHERE rating = 'good'), 0),
           coalesce(sum(sign) FILTER (WHERE rating = 'needs-improvement'), 0),
           coalesce(sum(sign) FILTER (WHERE rating = 'poor'), 0)
    FROM contrib GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (bucket_start, name, page) DO UPDATE
    SET count = r.count + excluded.count, sum = r.sum + excluded.sum,
        good = r.good + excluded.good,
        needs_improvement = r.needs_improvement + excluded.needs_improvement,
        poor = r.poor + excluded.poor
)""".format(hour=HOUR.format(col="bucket"))  # the hour of the 5-minute bucket is the hour of occurred_at

_METRIC_RAW = """
    INSERT INTO metrics (name, metric_id, session_id, user_id, value, delta, rating, navigation_type,
                         page, attributes, occurred_at, received_at)
    SELECT name, metric_id, session_id, user_id, value, delta, rating, navigation_type, page,
           attributes, occurred_at, received_at
    FROM pg_temp.stage_metrics"""

METRICS_APPLY_SQL = f"""
WITH raw_new AS ({_METRIC_RAW} WHERE is_new
), raw_changed AS (
    UPDATE metrics m
    SET value = s.value, delta = s.delta, rating = s.rating, navigation_type = s.navigation_type,
        attributes = s.attributes, received_at = s.received_at
    FROM pg_temp.stage_metrics s
    WHERE s.changed AND m.name = s.name AND m.metric_id = s.metric_id
      AND m.occurred_at = s.old_occurred_at
), keys_changed AS (
    UPDATE metric_keys k SET value = s.value, bin = s.bin, rating = s.rating
    FROM pg_temp.stage_metrics s
    WHERE s.changed AND k.name = s.name AND k.metric_id = s.metric_id
), contrib AS (
    SELECT {BUCKET.format(col="occurred_at")} AS bucket, name, coalesce(page, '') AS page, bin, rating,
           value, 1 AS sign
    FROM pg_temp.stage_metrics WHERE is_new
    UNION ALL
    SELECT {BUCKET.format(col="old_occurred_at")}, name, old_page, bin, rating, value, 1
    FROM pg_temp.stage_metrics WHERE changed
    UNION ALL
    SELECT {BUCKET.format(col="old_occurred_at")}, name, old_page, old_bin, old_rating, old_value, -1
    FROM pg_temp.stage_metrics WHERE changed
), {_METRIC_ROLLUPS}
SELECT seq, count(*)::int FROM pg_temp.stage_metrics WHERE is_new OR changed GROUP BY seq LIMIT $1
"""
METRICS_JOIN_BY_INDEX = "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
METRICS_JOIN_DEFAULT = "RESET enable_hashjoin; RESET enable_mergejoin"

# The optimistic form, for a flush expected to hold only keys never seen (see
# _stored_once_sql): plain key insert, raw rows and rollups straight from
# staging; no steps 1 and 2, no marking of staged rows.
METRICS_FAST_SQL = f"""
WITH new AS (
    INSERT INTO metric_keys (name, metric_id, occurred_at, value, page, bin, rating)
    SELECT name, metric_id, occurred_at, value, coalesce(page, ''), bin, rating
    FROM pg_temp.stage_metrics ORDER BY name, metric_id
), raw AS ({_METRIC_RAW}
), contrib AS (
    SELECT {BUCKET.format(col="occurred_at")} AS bucket, name, coalesce(page, '') AS page, bin, rating,
           value, 1 AS sign
    FROM pg_temp.stage_metrics
), {_METRIC_ROLLUPS}
SELECT
"""

# Retried once more in a fresh transaction: deadlocks between replicas, and a
# row for a partition that does not exist yet (created by the hook first).
_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


STAGING: dict[Kind, tuple[str, tuple[str, ...]]] = {
    Kind.EVENTS: ("stage_events", EVENT_COLUMNS),
    Kind.METRICS: ("stage_metrics", METRIC_COLUMNS),
    Kind.STEPS: ("stage_steps", STEP_COLUMNS),
}
OPTIMISTIC_SQL: dict[Kind, str] = {
    Kind.EVENTS: EVENTS_FAST_SQL,
    Kind.METRICS: METRICS_FAST_SQL,
    Kind.STEPS: STEPS_FAST_SQL,
}


class _KeyConflict(Exception):
    """An optimistic statement met an id that exists (or is being inserted) already."""

    def __init__(self, kind: Kind) -> None:
        super().__init__(kind)
        self.kind = kind


def _one_tuple(microseconds: int) -> tuple[int]:
    return (microseconds,)


def _first(value: tuple[int]) -> int:
    return value[0]


class _Request:
    __slots__ = ("accepted", "future", "kind", "rows", "seq")

    def __init__(self, kind: Kind, rows: Sequence[Row], seq: int, future: asyncio.Future[tuple[int, int]]):
        self.kind = kind
        self.rows = rows
        self.seq = seq
        self.future = future
        self.accepted = 0  # accepted in Python (a metric superseded within the flush)


class GroupCommitter:
    """Queues rows of concurrent requests; a flusher writes them, one transaction per flush.

    A flush first tries the optimistic statements (every id new). When an id
    of one kind (events, metrics, steps) existed already, that kind is redone
    with ON CONFLICT, and so is that kind in its next ``PESSIMISTIC_FLUSHES``
    flushes: a client re-sending batches, or web-vitals re-reporting CLS, then
    costs ON CONFLICT's price, not a failed attempt per flush.

    One flush runs at a time while the backlog is small, so concurrent requests
    group naturally behind it. When at least ``parallel_min_rows`` rows are
    waiting, up to ``concurrency`` flushes run at once, each on its own
    connection, so that PostgreSQL's work on one overlaps the Python work
    (COPY encoding, validation of new requests) of the next.
    """

    PESSIMISTIC_FLUSHES = 16

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_rows: int = 5000,
        flush_interval_ms: float = 0.0,
        concurrency: int = 2,
        parallel_min_rows: int | None = None,
        ensure_partitions: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        self._pool = pool
        self.max_rows = max(1, max_rows)
        self.flush_interval = max(0.0, flush_interval_ms) / 1000.0
        self.concurrency = max(1, concurrency)
        self.parallel_min_rows = (
            parallel_min_rows if parallel_min_rows is not None else max(1, self.max_rows // 5)
        )
        self._ensure_partitions = ensure_partitions
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._idle: list[asyncpg.Connection] = []  # connections with staging tables, not in use
        self._closing = False
        self._seq = 0
        # Counters for tests and the benchmark.
        self.flushes = 0
        self.failed_flushes = 0
        self.rows_flushed = 0
        self.optimistic_fallbacks = 0  # flushes redone with ON CONFLICT (an id existed already)
        self.connections_prepared = 0  # pool connections given staging tables and the codec
        self._pessimistic = dict.fromkeys(Kind, 0)  # per kind, flushes left that start with ON CONFLICT
        self.max_parallel = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="analytics-group-committer")

    async def close(self) -> None:
        """Refuse new rows, flush what is queued, stop the flusher, release the connections."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._release(conn)

    # -- submitting -----------------------------------------------------------------------
    async def submit(self, kind: Kind, rows: Sequence[Row]) -> tuple[int, int]:
        """Queue one request's rows; returns (accepted, duplicates) once committed."""
        if self._closing or self._task is None:
            raise unavailable("analytics ingestion is shutting down")
        self._seq += 1
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(kind, rows, self._seq, future))
        self._queued_rows += len(rows)
        self._wakeup.set()
        return await future

    # -- the flusher ----------------------------------------------------------------------
    def _may_start(self) -> bool:
        running = len(self._flushing)
        if running == 0:
            return True
        return running < self.concurrency and self._queued_rows >= self.parallel_min_rows

    async def _run(self) -> None:
        while True:
            while self._queue and self._may_start():
                if (
                    self.flush_interval
                    and not self._flushing
                    and self._queued_rows < self.max_rows
                    and not self._closing
                ):
                    await asyncio.sleep(self.flush_interval)
                batch = self._take()
                task = asyncio.create_task(self._flush_safely(batch))
                self._flushing.add(task)
                self.max_parallel = max(self.max_parallel, len(self._flushing))
            if self._closing and not self._queue and not self._flushing:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def _flush_safely(self, batch: list[_Request]) -> None:
        try:
            await self._flush(batch)
        except Exception as exc:
            self.failed_flushes += 1
            FLUSHES.labels("error").inc()
            log.error(
                "flush failed",
                extra={"requests": len(batch), "error": repr(exc)},
                exc_info=not isinstance(exc, asyncpg.PostgresError | OSError),
            )
            error = exc if isinstance(exc, ServiceError) else unavailable("could not store the batch")
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._flushing.discard(task)
            self._wakeup.set()

    def _take(self) -> list[_Request]:
        batch: list[_Request] = []
        rows = 0
        queue = self._queue
        while queue and (not batch or rows + len(queue[0].rows) <= self.max_rows):
            request = queue.popleft()
            batch.append(request)
            rows += len(request.rows)
        self._queued_rows -= rows
        return batch

    async def _connection(self) -> asyncpg.Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            await self._release(conn)
        conn = await self._pool.acquire()
        try:
            await conn.execute(STAGING_DDL)
            # Rows carry timestamps as PostgreSQL's int64 microseconds (validation.py): COPY
            # writes them as they are, about 0.7 us less per timestamp than from a datetime.
            await conn.set_type_codec(
                "timestamptz", schema="pg_catalog", encoder=_one_tuple, decoder=_first, format="tuple"
            )
        except BaseException:
            await self._release(conn)
            raise
        self.connections_prepared += 1
        return conn

    async def _release(self, conn: asyncpg.Connection) -> None:
        """Back to the pool with the default timestamptz codec, or closed."""
        try:
            await conn.reset_type_codec("timestamptz", schema="pg_catalog")
        except Exception:
            conn.terminate()  # never lend our codec to the pool's other users
        with contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=5)

    async def _flush(self, batch: list[_Request]) -> None:
        started = time.perf_counter()
        # Dedupe within the flush and tag each row with its request's seq.
        records: dict[Kind, list[tuple[Any, ...]]] = {}
        events: dict[str, None] = {}
        steps: dict[str, None] = {}
        metrics: dict[tuple[str, str], tuple[int, _Request]] = {}
        metric_records: list[tuple[Any, ...] | None] = []
        for request in batch:
            seq = request.seq
            if request.kind is Kind.EVENTS:
                out = records.setdefault(Kind.EVENTS, [])
                for row in request.rows:
                    if row[0] not in events:
                        events[row[0]] = None
                        out.append((seq, *row))
            elif request.kind is Kind.STEPS:
                out = records.setdefault(Kind.STEPS, [])
                for row in request.rows:
                    if row[0] not in steps:
                        steps[row[0]] = None
                        out.append((seq, *row))
            else:
                for row in request.rows:
                    key = (row[0], row[1])
                    seen = metrics.get(key)
                    if seen is None:
                        metrics[key] = (len(metric_records), request)
                        metric_records.append((seq, *row))
                    else:
                        index, earlier = seen
                        previous = metric_records[index]
                        assert previous is not None
                        if previous[5] != row[4]:  # a new value: the last report wins
                            earlier.accepted += 1
                            metric_records[index] = None
                            metrics[key] = (len(metric_records), request)
                            metric_records.append((seq, *row))
        if metric_records:
            records[Kind.METRICS] = [r for r in metric_records if r is not None]

        optimistic: set[Kind] = set()
        for kind in records:
            if self._pessimistic[kind]:
                self._pessimistic[kind] -= 1
            else:
                optimistic.add(kind)
        accepted: dict[int, int] = {}
        retries = 0
        while True:
            try:
                accepted = await self._write(records, optimistic)
                break
            except _KeyConflict as conflict:
                # One of the ids exists already (a re-sent item), or another transaction
                # inserted it meanwhile: redo that kind with ON CONFLICT (at most once per kind).
                optimistic.discard(conflict.kind)
                self._pessimistic[conflict.kind] = self.PESSIMISTIC_FLUSHES
                self.optimistic_fallbacks += 1
            except _RETRYABLE:
                retries += 1
                if retries > 2:
                    raise
            except asyncpg.CheckViolationError as exc:
                # "no partition of relation ... found for row": create, then retry.
                retries += 1
                if retries > 2 or self._ensure_partitions is None or "partition" not in str(exc):
                    raise
                log.warning("row outside the existing partitions; creating partitions")
                await self._ensure_partitions()

        total = 0
        for request in batch:
            n = len(request.rows)
            total += n
            ok = accepted.get(request.seq, 0) + request.accepted
            kind = KIND_NAMES[request.kind]
            ROWS_STORED.labels(kind, "accepted").inc(ok)
            ROWS_STORED.labels(kind, "duplicate").inc(n - ok)
            if not request.future.done():
                request.future.set_result((ok, n - ok))
        self.flushes += 1
        self.rows_flushed += total
        FLUSHES.labels("ok").inc()
        FLUSH_ROWS.observe(total)
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def _write(
        self, records: dict[Kind, list[tuple[Any, ...]]], optimistic: set[Kind]
    ) -> dict[int, int]:
        """One transaction: stage, deduplicate, store, roll up; {seq: accepted}."""
        conn = await self._connection()
        try:
            accepted = await self._transaction(conn, records, optimistic)
        except _KeyConflict:
            self._idle.append(conn)  # rolled back cleanly: the connection is fine
            raise
        except BaseException:
            # The connection may be broken: give it back to the pool, which resets or drops it.
            await self._release(conn)
            raise
        self._idle.append(conn)
        return accepted

    async def _transaction(
        self, conn: asyncpg.Connection, records: dict[Kind, list[tuple[Any, ...]]], optimistic: set[Kind]
    ) -> dict[int, int]:
        accepted: dict[int, int] = {}
        async with conn.transaction():
            for kind in Kind:  # the same table order in every flush
                rows = records.get(kind)
                if not rows:
                    continue
                stage, columns = STAGING[kind]
                await conn.copy_records_to_table(stage, records=rows, columns=columns, schema_name="pg_temp")
                if kind in optimistic:
                    try:
                        await conn.execute(OPTIMISTIC_SQL[kind])
                    except asyncpg.UniqueViolationError as exc:
                        raise _KeyConflict(kind) from exc
                    for row in rows:  # all new: every staged row is accepted
                        accepted[row[0]] = accepted.get(row[0], 0) + 1
                    continue
                if kind is Kind.METRICS:
                    status = await conn.execute(METRICS_NEW_SQL)
                    if int(status.rsplit(" ", 1)[-1]) < len(rows):
                        await conn.execute(METRICS_OLD_SQL)
                    await conn.execute(METRICS_JOIN_BY_INDEX)
                    sql = METRICS_APPLY_SQL
                else:
                    sql = EVENTS_SQL if kind is Kind.EVENTS else STEPS_SQL
                for seq, n in await conn.fetch(sql, len(rows)):
                    accepted[seq] = n
                if kind is Kind.METRICS:
                    await conn.execute(METRICS_JOIN_DEFAULT)
        return accepted
