"""The SQL of a flush, per kind, over the staging tables of ``rows.py``.

Every flush is one transaction on a committer connection:

1. binary COPY into per-connection temporary staging tables
   (``ON COMMIT DELETE ROWS``, made from the row contracts; the writer creates
   a kind's table on a connection only when a flush first holds that kind,
   because every COMMIT truncates all of them);
2. events, steps: the ids go into the key tables (unique indexes), then the
   rows into the partitioned raw tables; optimistically as plain INSERTs of
   every staged row (``*_FAST_SQL``); when an id exists already, the writer
   redoes the flush with ``INSERT ... ON CONFLICT DO NOTHING RETURNING``,
   which finds the new ids, and only those are stored;
3. metrics: the latest value per ``(name, metric_id)`` wins. ``metric_keys``
   holds the current value, its partition timestamp, page, sketch bin and
   rating; a changed report updates the raw row in place and moves the rollup
   contribution (old bin/rating/value out, new in; the count is unchanged) in
   the 5-minute rollups and in the hourly sketch alike. Sums are ``numeric``:
   exact, so moving a value back restores them to the digit, and they cannot
   overflow;
4. revenue, task ends: one row per key (small volumes: ON CONFLICT directly);
5. the rollups are updated from the same staged rows, aggregated in SQL: per
   5 minutes (with page, effect) and per hour (without), both from the same new
   rows, so an hour's row is always the sum of its 5-minute rows;
6. events, steps, task ends: what the new rows change is appended to the
   pre-aggregation's change log (``preagg_changes``, ``services/analytics/preagg.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.analytics.vitals import SCORED_STEP_COUNTS

from .rows import EVENTS, REVENUE, STEPS, TASK_ENDS, Kind

SESSION_SETUP = """
SET plan_cache_mode = force_custom_plan;
SET synchronous_commit = on;  -- acknowledged means durable, whatever the database's default
"""

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
    stage: str, keys: str, key: str, raw: str, columns: Sequence[str], rollups: str, changes: str
) -> tuple[str, str]:
    """The two statements of a kind stored once per id (events, steps).

    ``rollups`` holds the rollup CTEs, ``changes`` the pre-aggregation's change log
    CTE (``preagg_changes``), both reading the new rows from ``{src}``.

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
), {rollups.format(src="raw")}, {changes.format(src="raw")}
SELECT s.seq, count(*)::int FROM pg_temp.{stage} s JOIN new ON new.{key} = s.{key}
GROUP BY s.seq LIMIT $1
"""
    optimistic = f"""
WITH new AS (
    {insert_keys}
), raw AS (
    {insert_raw}
), {rollups.format(src=f"pg_temp.{stage}")}, {changes.format(src=f"pg_temp.{stage}")}
SELECT
"""
    return on_conflict, optimistic


# What the new rows change for the pre-aggregation (services/analytics/preagg.py): one row
# per UTC day, session and user (events: with the group's count and first event; steps: its
# counts by step), appended to preagg_changes in the flush's transaction.
# The group's count is a window over the whole group, ordered as DISTINCT ON wants: one sort.
_DAY = "date_bin('1 day', occurred_at, timestamptz 'epoch')"
EVENT_CHANGES = f"""
changes AS (
    INSERT INTO preagg_changes (day_start, session_id, user_id, events, first_at, first_id, properties)
    SELECT DISTINCT ON (day, session_id, user_id)
           day, session_id, user_id,
           count(*) OVER (PARTITION BY day, session_id, user_id ORDER BY occurred_at, event_id
                          ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING),
           occurred_at, event_id, properties
    FROM (SELECT {_DAY} AS day, session_id, coalesce(user_id, '') COLLATE "C" AS user_id,
                 occurred_at, event_id COLLATE "C" AS event_id, properties FROM {{src}}) c
    ORDER BY day, session_id, user_id, occurred_at, event_id
)"""
STEP_CHANGES = f"""
changes AS (
    INSERT INTO preagg_changes (day_start, session_id, user_id, steps, uploads, browser_runs, downloads,
                                shares)
    SELECT {_DAY}, session_id, coalesce(user_id, ''), count(*), {SCORED_STEP_COUNTS}
    FROM {{src}} GROUP BY 1, 2, 3
)"""


EVENTS_SQL, EVENTS_FAST_SQL = _stored_once_sql(
    "stage_events",
    "event_keys",
    "event_id",
    "events",
    (*EVENTS.names, "received_at"),
    f"""
counts AS (
    INSERT INTO rollup_events AS r (bucket_start, event_type, page, count)
    SELECT {BUCKET.format(col="occurred_at")}, event_type, coalesce(page, ''), count(*)
    FROM {{src}} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (bucket_start, event_type, page) DO UPDATE SET count = r.count + excluded.count
), counts_hourly AS (
    INSERT INTO rollup_events_hourly AS r (hour_start, event_type, count)
    SELECT {HOUR.format(col="occurred_at")}, event_type, count(*)
    FROM {{src}} GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (hour_start, event_type) DO UPDATE SET count = r.count + excluded.count
), sessions AS (
    INSERT INTO rollup_sessions AS r (hour_start, session_id, user_id)
    SELECT {HOUR.format(col="occurred_at")}, session_id, max(user_id)
    FROM {{src}} GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (hour_start, session_id) DO UPDATE SET user_id = excluded.user_id
    WHERE r.user_id IS NULL AND excluded.user_id IS NOT NULL
)""",
    EVENT_CHANGES,
)

STEPS_SQL, STEPS_FAST_SQL = _stored_once_sql(
    "stage_steps",
    "step_keys",
    "step_id",
    "funnel_steps",
    (*STEPS.names, "received_at"),
    f"""
counts AS (
    INSERT INTO rollup_funnel AS r (bucket_start, step, effect_id, count)
    SELECT {BUCKET.format(col="occurred_at")}, step, coalesce(effect_id, ''), count(*)
    FROM {{src}} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (bucket_start, step, effect_id) DO UPDATE SET count = r.count + excluded.count
), counts_hourly AS (
    INSERT INTO rollup_funnel_hourly AS r (hour_start, step, count)
    SELECT {HOUR.format(col="occurred_at")}, step, count(*)
    FROM {{src}} GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (hour_start, step) DO UPDATE SET count = r.count + excluded.count
)""",
    STEP_CHANGES,
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


def _once_by_key_sql(
    stage: str, table: str, key: str, columns: Sequence[str], returning: str = "", changes: str = ""
) -> str:
    """Store each new key once (unpartitioned table with the key as primary key); {seq: n}.
    ``changes``: a CTE reading the new rows from ``new`` (their key and ``returning``)."""
    names = ", ".join((*columns, "received_at"))
    return f"""
WITH new AS (
    INSERT INTO {table} ({names})
    SELECT {names} FROM pg_temp.{stage} ORDER BY {key}
    ON CONFLICT DO NOTHING
    RETURNING {key}{returning}
){changes}
SELECT s.seq, count(*)::int FROM pg_temp.{stage} s JOIN new ON new.{key} = s.{key}
GROUP BY s.seq LIMIT $1
"""


REVENUE_SQL = _once_by_key_sql(REVENUE.stage, "revenue", "order_id", REVENUE.names)
TASK_ENDS_SQL = _once_by_key_sql(
    TASK_ENDS.stage,
    "task_ends",
    "task_id",
    TASK_ENDS.names,
    ", user_id, status, occurred_at",
    f""", changes AS (
    INSERT INTO preagg_changes (day_start, user_id, task_ends, server_runs)
    SELECT {_DAY}, user_id, count(*), count(*) FILTER (WHERE status = 'SUCCEEDED') FROM new GROUP BY 1, 2
)""",
)

# The statements that return {seq: accepted} with ON CONFLICT, per kind (metrics: the
# writer runs METRICS_NEW_SQL and METRICS_OLD_SQL first).
CONFLICT_SQL: dict[Kind, str] = {
    Kind.EVENTS: EVENTS_SQL,
    Kind.METRICS: METRICS_APPLY_SQL,
    Kind.STEPS: STEPS_SQL,
    Kind.REVENUE: REVENUE_SQL,
    Kind.TASK_ENDS: TASK_ENDS_SQL,
}
# The optimistic statements (every id new), for the kinds that have one.
OPTIMISTIC_SQL: dict[Kind, str] = {
    Kind.EVENTS: EVENTS_FAST_SQL,
    Kind.METRICS: METRICS_FAST_SQL,
    Kind.STEPS: STEPS_FAST_SQL,
}
