"""The SQL of the pre-aggregation pass (``services/analytics/preagg.py``).

Two ways to bring the tables up to date, with the same results:

* **from the change log** (``preagg_changes``, appended by the ingest in each
  flush's transaction, see ``services/analytics/ingest/sql.py``): the counts of
  the new rows are added to ``engagement_daily`` and ``preagg_days``, the
  sessions' first events merged into ``session_sources``, the sessions with
  new steps re-walked;
* **a whole day from the raw rows** (the first pass after the migration, rows
  that came without a change row, and the benchmark's baseline).

Both write ``session_sources`` with the same merge: a session's source is that
of its first event, its user that of its first identified event, both by
``(occurred_at, event_id)`` (event ids in byte order), so merging candidates in
any order, or the same candidate twice, gives the row a single computation over
all the session's events gives.
"""

from __future__ import annotations

from services.analytics.vitals import SCORED_STEP_COUNTS

# -- the change log --------------------------------------------------------------------------

# $1: the first day kept (its midnight). What the pass can see of the log, taken out of
# it, with each row's UTC day as a date; rows of expired days are dropped with it.
CONSUME_SQL = """
WITH d AS (DELETE FROM preagg_changes RETURNING *)
INSERT INTO consumed SELECT (d.day_start AT TIME ZONE 'UTC')::date, d.* FROM d WHERE d.day_start >= $1
"""
CONSUMED_DDL = "CREATE TEMP TABLE consumed (day date NOT NULL, LIKE preagg_changes) ON COMMIT DROP"

# $1: refreshed_at of a day first seen. Returns the days touched.
DAYS_ADD_SQL = """
INSERT INTO preagg_days AS p (day, events, steps, task_ends, refreshed_at, stale)
SELECT day, sum(events), sum(steps), sum(task_ends), $1, false FROM consumed GROUP BY day ORDER BY day
ON CONFLICT (day) DO UPDATE SET events = p.events + excluded.events, steps = p.steps + excluded.steps,
    task_ends = p.task_ends + excluded.task_ends
RETURNING day
"""

_EFFECT_RUNS = "CASE WHEN {ends} > 0 THEN {server} ELSE {browser} END"
ENGAGEMENT_ADD_SQL = f"""
INSERT INTO engagement_daily AS e (day, user_id, events, uploads, browser_runs, downloads, shares,
                                   server_ends, server_runs, effect_runs)
SELECT day, user_id, sum(events), sum(uploads), sum(browser_runs), sum(downloads), sum(shares),
       sum(task_ends), sum(server_runs),
       {_EFFECT_RUNS.format(ends="sum(task_ends)", server="sum(server_runs)", browser="sum(browser_runs)")}
FROM consumed WHERE user_id <> '' GROUP BY day, user_id ORDER BY day, user_id
ON CONFLICT (day, user_id) DO UPDATE SET
    events = e.events + excluded.events, uploads = e.uploads + excluded.uploads,
    browser_runs = e.browser_runs + excluded.browser_runs, downloads = e.downloads + excluded.downloads,
    shares = e.shares + excluded.shares, server_ends = e.server_ends + excluded.server_ends,
    server_runs = e.server_runs + excluded.server_runs,
    effect_runs = {
    _EFFECT_RUNS.format(
        ends="e.server_ends + excluded.server_ends",
        server="e.server_runs + excluded.server_runs",
        browser="e.browser_runs + excluded.browser_runs",
    )
}
"""

# The sessions with new steps, to re-walk; the users whose days in [$1, $2] moved, to score.
WALK_SESSIONS_SQL = (
    "CREATE TEMP TABLE walk_sessions ON COMMIT DROP AS"
    " SELECT DISTINCT session_id FROM consumed WHERE steps > 0"
)
SCORE_USERS_SQL = """
CREATE TEMP TABLE score_users ON COMMIT DROP AS
SELECT DISTINCT user_id FROM consumed WHERE user_id <> '' AND day >= $1 AND day <= $2
"""

# -- per day: the stored counts against the ingest's ---------------------------------------

# The ingest's counts of the days in $1 (exact, from its rollups; task ends counted).
_COUNTS = """
SELECT (SELECT coalesce(sum(count), 0)::bigint FROM rollup_events
        WHERE bucket_start >= m.start AND bucket_start < m.start + interval '1 day') AS events,
       (SELECT coalesce(sum(count), 0)::bigint FROM rollup_funnel
        WHERE bucket_start >= m.start AND bucket_start < m.start + interval '1 day') AS steps,
       (SELECT count(*)::bigint FROM task_ends
        WHERE occurred_at >= m.start AND occurred_at < m.start + interval '1 day') AS task_ends
"""
# The days of $1 whose stored counts differ from the ingest's (or are not stored).
DAYS_OFF_SQL = f"""
SELECT d.day, p.refreshed_at
FROM unnest($1::date[]) AS d(day)
CROSS JOIN LATERAL (SELECT d.day::timestamp AT TIME ZONE 'UTC' AS start) m
CROSS JOIN LATERAL ({_COUNTS}) c
LEFT JOIN preagg_days p ON p.day = d.day
WHERE p.day IS NULL OR (p.events, p.steps, p.task_ends) <> (c.events, c.steps, c.task_ends)
"""
# One day's counts ($1: its midnight).
DAY_COUNTS_SQL = _COUNTS.replace("m.start", "$1::timestamptz")

# Every day with rows since $1 (a full check).
ALL_DAYS_SQL = """
SELECT DISTINCT (bucket_start AT TIME ZONE 'UTC')::date AS day FROM rollup_events WHERE bucket_start >= $1
UNION SELECT DISTINCT (bucket_start AT TIME ZONE 'UTC')::date FROM rollup_funnel WHERE bucket_start >= $1
UNION SELECT DISTINCT (occurred_at AT TIME ZONE 'UTC')::date FROM task_ends WHERE occurred_at >= $1
"""

# -- a whole day from the raw rows ---------------------------------------------------------

DAY_ENGAGEMENT_SQL = f"""
INSERT INTO engagement_daily (day, user_id, events, uploads, browser_runs, downloads, shares,
                              server_ends, server_runs, effect_runs)
SELECT $1::date, user_id, sum(events), sum(uploads), sum(browser_runs), sum(downloads), sum(shares),
       sum(server_ends), sum(server_runs),
       {_EFFECT_RUNS.format(ends="sum(server_ends)", server="sum(server_runs)", browser="sum(browser_runs)")}
FROM (
    SELECT user_id, count(*) AS events, 0 AS uploads, 0 AS browser_runs, 0 AS downloads, 0 AS shares,
           0 AS server_ends, 0 AS server_runs
    FROM events
    WHERE occurred_at >= $2 AND occurred_at < $3 AND user_id <> ''
    GROUP BY user_id
    UNION ALL
    SELECT user_id, 0, {SCORED_STEP_COUNTS}, 0, 0
    FROM funnel_steps
    WHERE occurred_at >= $2 AND occurred_at < $3 AND user_id <> ''
    GROUP BY user_id
    UNION ALL
    SELECT user_id, 0, 0, 0, 0, 0, count(*), count(*) FILTER (WHERE status = 'SUCCEEDED')
    FROM task_ends
    WHERE occurred_at >= $2 AND occurred_at < $3 AND user_id <> ''
    GROUP BY user_id
) AS per_user
GROUP BY user_id
"""

# -- session sources -----------------------------------------------------------------------

_REFERRER_HOST = r"""lower(substring(coalesce(properties->>'referrer', properties->>'$referrer')
    FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:www\.)?([^/:?#@]+)'))"""

_EARLIER = "(excluded.first_at, excluded.first_id) < (s.first_at, s.first_id)"
_USER_EARLIER = (
    "excluded.user_at IS NOT NULL AND (s.user_at IS NULL"
    " OR (excluded.user_at, excluded.user_event_id) < (s.user_at, s.user_event_id))"
)


def _sources_sql(rows: str) -> str:
    """Merge the candidates of ``rows`` (session_id, user_id, at, id, properties: events,
    or each a session's first event of a group) into ``session_sources``."""
    first = ", ".join(
        f"{c} = CASE WHEN {_EARLIER} THEN excluded.{c} ELSE s.{c} END"
        for c in ("first_at", "first_id", "source", "medium", "campaign")
    )
    user = ", ".join(
        f"{c} = CASE WHEN {_USER_EARLIER} THEN excluded.{c} ELSE s.{c} END"
        for c in ("user_id", "user_at", "user_event_id")
    )
    return f"""
WITH r AS NOT MATERIALIZED ({rows}
), firsts AS (
    SELECT DISTINCT ON (session_id) session_id, at, id, properties FROM r ORDER BY session_id, at, id
), users AS (
    SELECT DISTINCT ON (session_id) session_id, user_id, at, id
    FROM r WHERE user_id <> '' ORDER BY session_id, at, id
), parsed AS (
    SELECT f.session_id, u.user_id, u.at AS user_at, u.id AS user_event_id, f.at AS first_at,
           f.id AS first_id,
           nullif(lower(left(f.properties->>'utm_source', 200)), '') AS utm_source,
           nullif(lower(left(f.properties->>'utm_medium', 200)), '') AS utm_medium,
           nullif(lower(left(f.properties->>'utm_campaign', 200)), '') AS utm_campaign,
           left({_REFERRER_HOST}, 200) AS referrer
    FROM firsts f LEFT JOIN users u ON u.session_id = f.session_id
)
INSERT INTO session_sources AS s (session_id, user_id, user_at, user_event_id, first_at, first_id,
                                  source, medium, campaign)
SELECT session_id, user_id, user_at, user_event_id, first_at, first_id,
       coalesce(utm_source, referrer, '(direct)'),
       coalesce(utm_medium, CASE WHEN referrer IS NOT NULL THEN 'referral' END, '(none)'),
       coalesce(utm_campaign, '(none)')
FROM parsed
ORDER BY session_id
ON CONFLICT (session_id) DO UPDATE SET {first}, {user}
"""


# $1, $2: the day's bounds.
DAY_SOURCES_SQL = _sources_sql(
    """
    SELECT session_id, user_id, occurred_at AS at, event_id COLLATE "C" AS id, properties
    FROM events WHERE occurred_at >= $1 AND occurred_at < $2"""
)
CHANGED_SOURCES_SQL = _sources_sql(
    """
    SELECT session_id, user_id, first_at AS at, first_id AS id, properties
    FROM consumed WHERE first_at IS NOT NULL"""
)
