"""Pre-aggregation of the raw events and funnel steps for the business reports.

Three tables are kept from the raw rows, one UTC day at a time:

* ``engagement_daily``: per day and identified user (``user_id`` not empty),
  the counts the engagement score weighs (``services/analytics/engagement.py``):
  engagement events, the funnel steps ``image_uploaded``,
  ``result_downloaded`` and ``result_shared``, and effect runs: the effect
  tasks that ended ``SUCCEEDED`` as the effects service reported them
  (``task_ends``, server facts), or, on a day the server reported no task of
  the user at all, the browser's ``processing_completed`` steps. A user with
  any event, funnel step or task end that day has a row (that is "active").
* ``session_sources``: per session, its user (the first identified event's
  ``user_id``, whatever the day) and its acquisition source from the
  ``properties`` of its first event (earliest ``occurred_at``, then
  ``event_id``): ``source`` = ``utm_source``, else the referrer's host
  (``referrer`` or ``$referrer``; ``www.`` dropped), else ``(direct)``;
  ``medium`` = ``utm_medium``, else ``referral`` with a referrer, else
  ``(none)``; ``campaign`` = ``utm_campaign``, else ``(none)``. Lower-cased,
  at most 200 characters.
* ``funnel_walks``: the ordered funnel's walks per session and step-1
  occurrence (``services/analytics/funnel_walks.py``), for every session
  with a step that day.

**Which days are recomputed.** The ingest's rollups (``rollup_events``,
``rollup_funnel``) hold exact per-bucket counts, written in the same
transaction as the raw rows; ``task_ends`` is counted per day directly (it is
small and indexed on ``occurred_at``). A pass sums them per day and recomputes each day
whose counts differ from the ones stored in ``preagg_days`` when it was last
computed (new rows, late rows with old timestamps alike), unless it was
recomputed less than ``min_age`` seconds ago (today, under constant traffic,
is recomputed at most that often). A day's recomputation deletes and reinserts
its rows in one REPEATABLE READ transaction, so the counts recorded are those
of the rows aggregated. Passes are serialised across replicas by an advisory
lock. Rows older than the retention are deleted by the same pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import asyncpg

from services.analytics import funnel_walks
from services.analytics.distinct import Sketches
from services.servicekit.db import Connection

log = logging.getLogger(__name__)

Preflight = Callable[[], Awaitable[object]]  # what a report awaits before reading the tables

_DAY_COUNTS_SQL = """
WITH e AS (
    SELECT (bucket_start AT TIME ZONE 'UTC')::date AS day, sum(count)::bigint AS n
    FROM rollup_events WHERE bucket_start >= $1 GROUP BY 1
), f AS (
    SELECT (bucket_start AT TIME ZONE 'UTC')::date AS day, sum(count)::bigint AS n
    FROM rollup_funnel WHERE bucket_start >= $1 GROUP BY 1
), t AS (
    SELECT (occurred_at AT TIME ZONE 'UTC')::date AS day, count(*)::bigint AS n
    FROM task_ends WHERE occurred_at >= $1 GROUP BY 1
)
SELECT coalesce(e.day, f.day, t.day) AS day, coalesce(e.n, 0) AS events, coalesce(f.n, 0) AS steps,
       coalesce(t.n, 0) AS task_ends
FROM e FULL JOIN f ON e.day = f.day FULL JOIN t ON t.day = coalesce(e.day, f.day)
"""

# Effect runs: the server's succeeded task ends, or the browser's processing_completed
# steps for a user the server reported no task end of that day (server facts win).
# Per day of a range: the steps the ingest counted, and those pre-aggregated (NULL: never).
_STEPS_CURRENT_SQL = """
SELECT f.day, f.n AS now, coalesce(p.steps, -1) AS stored
FROM (
    SELECT (bucket_start AT TIME ZONE 'UTC')::date AS day, sum(count)::bigint AS n
    FROM rollup_funnel WHERE bucket_start >= $1 AND bucket_start < $2 GROUP BY 1
) f LEFT JOIN preagg_days p ON p.day = f.day
"""

_ENGAGEMENT_SQL = """
INSERT INTO engagement_daily (day, user_id, events, uploads, effect_runs, downloads, shares)
SELECT $1::date, user_id, sum(events), sum(uploads),
       CASE WHEN sum(server_ends) > 0 THEN sum(server_runs) ELSE sum(browser_runs) END,
       sum(downloads), sum(shares)
FROM (
    SELECT user_id, count(*) AS events, 0 AS uploads, 0 AS browser_runs, 0 AS downloads, 0 AS shares,
           0 AS server_ends, 0 AS server_runs
    FROM events
    WHERE occurred_at >= $2 AND occurred_at < $3 AND user_id <> ''
    GROUP BY user_id
    UNION ALL
    SELECT user_id, 0, count(*) FILTER (WHERE step = 4), count(*) FILTER (WHERE step = 7),
           count(*) FILTER (WHERE step = 8), count(*) FILTER (WHERE step = 9), 0, 0
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

_REFERRER_HOST = r"""lower(substring(coalesce(properties->>'referrer', properties->>'$referrer')
    FROM '^[A-Za-z][A-Za-z0-9+.-]*://(?:www\.)?([^/:?#@]+)'))"""

_SOURCES_SQL = f"""
WITH firsts AS (
    SELECT DISTINCT ON (session_id) session_id, occurred_at, properties
    FROM events
    WHERE occurred_at >= $1 AND occurred_at < $2
    ORDER BY session_id, occurred_at, event_id
), users AS (
    SELECT DISTINCT ON (session_id) session_id, user_id
    FROM events
    WHERE occurred_at >= $1 AND occurred_at < $2 AND user_id <> ''
    ORDER BY session_id, occurred_at, event_id
), parsed AS (
    SELECT f.session_id, u.user_id, f.occurred_at,
           nullif(lower(left(f.properties->>'utm_source', 200)), '') AS utm_source,
           nullif(lower(left(f.properties->>'utm_medium', 200)), '') AS utm_medium,
           nullif(lower(left(f.properties->>'utm_campaign', 200)), '') AS utm_campaign,
           left({_REFERRER_HOST}, 200) AS referrer
    FROM firsts f LEFT JOIN users u ON u.session_id = f.session_id
)
INSERT INTO session_sources AS s (session_id, user_id, first_at, source, medium, campaign)
SELECT session_id, user_id, occurred_at,
       coalesce(utm_source, referrer, '(direct)'),
       coalesce(utm_medium, CASE WHEN referrer IS NOT NULL THEN 'referral' END, '(none)'),
       coalesce(utm_campaign, '(none)')
FROM parsed
ORDER BY session_id
ON CONFLICT (session_id) DO UPDATE SET
    user_id = CASE WHEN excluded.first_at < s.first_at
                   THEN coalesce(excluded.user_id, s.user_id) ELSE coalesce(s.user_id, excluded.user_id) END,
    first_at = least(s.first_at, excluded.first_at),
    source = CASE WHEN excluded.first_at < s.first_at THEN excluded.source ELSE s.source END,
    medium = CASE WHEN excluded.first_at < s.first_at THEN excluded.medium ELSE s.medium END,
    campaign = CASE WHEN excluded.first_at < s.first_at THEN excluded.campaign ELSE s.campaign END
"""


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass
class PassResult:
    refreshed: list[date]
    skipped_recent: int = 0


class Preaggregator:
    """Keeps ``engagement_daily``, ``session_sources`` and ``funnel_walks`` in step with the raw rows.

    Args:
        pool: the analytics pool.
        schema: the analytics schema (names the advisory lock).
        retention_days: rows older than this are deleted.
        min_age_seconds: a changed day is recomputed at most this often.
        interval_seconds: the background pass period.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        retention_days: int,
        min_age_seconds: float = 60.0,
        interval_seconds: float = 60.0,
    ) -> None:
        self._pool = pool
        self.retention_days = retention_days
        self.min_age_seconds = min_age_seconds
        self.interval_seconds = interval_seconds
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"analytics-preagg:{schema}".encode()).digest()[:8], "big", signed=True
        )
        self._local = asyncio.Lock()
        self.sketches = Sketches(pool)
        self.passes = 0
        self._last_start = -math.inf  # time.monotonic() of this replica's last pass start

    async def run_once(
        self, now: datetime | None = None, *, min_age_seconds: float | None = None
    ) -> PassResult:
        """One pass: recompute the days whose raw counts changed, delete what expired."""
        now = now or datetime.now(UTC)
        self._last_start = time.monotonic()
        min_age = self.min_age_seconds if min_age_seconds is None else min_age_seconds
        cutoff_day = (now - timedelta(days=self.retention_days)).date()
        result = PassResult(refreshed=[])
        async with self._local, self._pool.acquire() as conn:
            async with conn.transaction():
                # One pass at a time across replicas: the lock is held for the pass.
                await conn.execute("SELECT pg_advisory_lock($1)", self._lock_key)
            try:
                counts = {
                    r["day"]: (int(r["events"]), int(r["steps"]), int(r["task_ends"]))
                    for r in await conn.fetch(_DAY_COUNTS_SQL, _midnight(cutoff_day))
                }
                stored = {
                    r["day"]: (int(r["events"]), int(r["steps"]), int(r["task_ends"]), r["refreshed_at"])
                    for r in await conn.fetch(
                        "SELECT day, events, steps, task_ends, refreshed_at FROM preagg_days"
                    )
                }
                for day in sorted(counts):
                    old = stored.get(day)
                    if old is not None and old[:3] == counts[day]:
                        continue
                    if old is not None and (now - old[3]).total_seconds() < min_age:
                        result.skipped_recent += 1
                        continue
                    await self._refresh_day(conn, day, now)
                    result.refreshed.append(day)
                # The engagement scores of today's windows, when their days moved or a day began.
                from services.analytics import engagement  # here: it imports this module

                today = now.astimezone(UTC).date()
                as_of = await engagement.scores_as_of(conn)
                if result.refreshed or any(as_of.get(w) != today for w in engagement.WINDOW_DAYS):
                    await engagement.store_scores(conn, today)
                gone = [d for d in stored if d not in counts or d < cutoff_day]
                async with conn.transaction():
                    if gone:
                        await conn.execute("DELETE FROM engagement_daily WHERE day = ANY($1::date[])", gone)
                        await conn.execute("DELETE FROM preagg_days WHERE day = ANY($1::date[])", gone)
                    await conn.execute("DELETE FROM engagement_daily WHERE day < $1", cutoff_day)
                    await conn.execute(
                        "DELETE FROM session_sources WHERE first_at < $1", _midnight(cutoff_day)
                    )
                    await conn.execute("DELETE FROM funnel_walks WHERE start < $1", _midnight(cutoff_day))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)
        self.passes += 1
        if result.refreshed:
            log.info("pre-aggregation", extra={"days": [d.isoformat() for d in result.refreshed]})
        return result

    async def preflight(self) -> PassResult | None:
        """What a report awaits before reading the tables: a pass, unless this replica
        started one less than ``min_age`` seconds ago (it would skip the days changed
        since, as recently refreshed, anyway). Reports read tables at most about
        ``min_age`` (plus the background interval) behind the raw rows."""
        if time.monotonic() - self._last_start < self.min_age_seconds:
            return None
        return await self.run_once()

    async def steps_current(self, since: datetime, until: datetime) -> bool:
        """Whether every UTC day of ``[since, until]`` was pre-aggregated from the funnel
        steps it holds now (the ingest's ``rollup_funnel`` counts, exact): a report over
        those days read from ``funnel_walks`` then counts every committed step."""
        first, last = since.astimezone(UTC).date(), until.astimezone(UTC).date()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_STEPS_CURRENT_SQL, _midnight(first), _midnight(last + timedelta(days=1)))
        return all(r["stored"] == r["now"] for r in rows)

    async def _refresh_day(self, conn: Connection, day: date, now: datetime) -> None:
        start, end = _midnight(day), _midnight(day + timedelta(days=1))
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("SET LOCAL work_mem = '64MB'")
            events = await conn.fetchval(
                "SELECT coalesce(sum(count), 0)::bigint FROM rollup_events"
                " WHERE bucket_start >= $1 AND bucket_start < $2",
                start,
                end,
            )
            steps = await conn.fetchval(
                "SELECT coalesce(sum(count), 0)::bigint FROM rollup_funnel"
                " WHERE bucket_start >= $1 AND bucket_start < $2",
                start,
                end,
            )
            task_ends = await conn.fetchval(
                "SELECT count(*)::bigint FROM task_ends WHERE occurred_at >= $1 AND occurred_at < $2",
                start,
                end,
            )
            await conn.execute("DELETE FROM engagement_daily WHERE day = $1", day)
            await conn.execute(_ENGAGEMENT_SQL, day, start, end)
            await conn.execute(_SOURCES_SQL, start, end)
            await funnel_walks.rebuild_day(
                conn, start, end, _midnight(day - timedelta(days=self.retention_days))
            )
            await conn.execute(
                """INSERT INTO preagg_days (day, events, steps, task_ends, refreshed_at)
                VALUES ($1, $2, $3, $4, $5)
                ON CONFLICT (day) DO UPDATE SET events = excluded.events, steps = excluded.steps,
                    task_ends = excluded.task_ends, refreshed_at = excluded.refreshed_at""",
                day,
                events,
                steps,
                task_ends,
                now,
            )

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.run_once()
                await self.build_sketches()
            except Exception as exc:
                log.error("pre-aggregation failed", extra={"error": repr(exc)})

    async def build_sketches(self, now: datetime | None = None) -> int:
        """The hourly distinct-count sketches due (``distinct.py``), under the same lock."""
        now = now or datetime.now(UTC)
        async with self._local, self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", self._lock_key)
            try:
                return await self.sketches.build(now, now - timedelta(days=self.retention_days))
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)
