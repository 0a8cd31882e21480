"""Pre-aggregation of the raw events and funnel steps for the business reports.

Three tables are kept from the raw rows (and the engagement scores from the first):

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
  with a step.

The session's first event and first identified event are ordered by
``occurred_at``, then ``event_id`` in byte order.

**Incremental passes: the change log.** Each ingest flush appends, in its own
transaction and in the same statement as the raw rows (one CTE per kind,
``services/analytics/ingest/sql.py``), what its *new* rows change to
``preagg_changes`` (migration 0025): per UTC day, session and user, the counts
of events, steps (by step) and task ends (succeeded ones), and for events the
group's first event (``occurred_at``, ``event_id``, ``properties``). Rows the
ingest refuses as duplicates are not in it. A pass, in one REPEATABLE READ
transaction, takes out of the log exactly the rows its snapshot sees
(``DELETE ... RETURNING``); as a flush commits its raw rows, rollups and change
rows together, those are the change rows of the raw rows the pass reads, and a
flush that commits during the pass (or began before it and commits after its
snapshot, whatever its ``received_at``) leaves its change rows to the next
pass. No watermark, no lag. It then

* adds the counts to ``engagement_daily`` (``effect_runs`` from its parts,
  kept per row: ``browser_runs``, ``server_ends``, ``server_runs``) and to
  ``preagg_days`` (the ingest's counts of the day, as applied);
* merges each session's candidates into ``session_sources``: the smaller
  ``(occurred_at, event_id)`` wins, for the first event (source) and for the
  first identified event (user) alike, so a late row with an old timestamp
  moves the session's source or user exactly as a recomputation would;
* re-walks the sessions with new steps from all their steps (``funnel_walks``);
* re-stores the scores of the users whose days in the longest window moved
  (``engagement.store_user_scores``); every user's when a day began.

So a pass's work follows what arrived since the last one, not the day's size.

**Whole days, as a safety net.** In the same snapshot the pass compares, for
the days it changed (and any ``check_days`` a caller names, and days put off
before), the counts it stored with the ingest's exact counts (the rollups
``rollup_events`` / ``rollup_funnel``, written in the flush's transaction;
``task_ends`` counted per day). A day that differs holds rows that came
without a change row (written before migration 0025, which empties the tables
so that the first pass rebuilds every day, or by a replica still running the
older ingest): it is recomputed whole from the raw rows (delete and reinsert
in one REPEATABLE READ transaction that also takes the day's change rows out
of the log), at most every ``min_age`` seconds (a day put off is marked
``stale`` and checked by every pass until done). Every day's counts are
compared at a replica's first pass and then every ``full_check_seconds``.
The oldest day kept is not compared: its rollups are deleted hour by hour.

Passes are serialised across replicas by an advisory lock. Rows older than
the retention are deleted by the same pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from services.analytics import funnel_walks, preagg_sql
from services.analytics.distinct import Sketches
from services.servicekit.db import Connection
from services.servicekit.partitions import midnight

log = logging.getLogger(__name__)

Preflight = Callable[[], Awaitable[object]]  # what a report awaits before reading the tables

# Per day of a range: the steps the ingest counted, and those pre-aggregated (NULL: never).
_STEPS_CURRENT_SQL = """
SELECT f.day, f.n AS now, coalesce(p.steps, -1) AS stored
FROM (
    SELECT (bucket_start AT TIME ZONE 'UTC')::date AS day, sum(count)::bigint AS n
    FROM rollup_funnel WHERE bucket_start >= $1 AND bucket_start < $2 GROUP BY 1
) f LEFT JOIN preagg_days p ON p.day = f.day
"""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class PassResult:
    """What a pass did: the days recomputed whole (``refreshed``), those put off because
    recomputed less than ``min_age`` ago, the change rows applied and their days."""

    refreshed: list[date]
    skipped_recent: int = 0
    changes: int = 0
    changed_days: list[date] = field(default_factory=list)
    full_check: bool = False


class Preaggregator:
    """Keeps ``engagement_daily``, ``session_sources`` and ``funnel_walks`` in step with the raw rows.

    Args:
        pool: the analytics pool.
        schema: the analytics schema (names the advisory lock).
        retention_days: rows older than this are deleted.
        min_age_seconds: a day is recomputed whole at most this often.
        interval_seconds: the background pass period.
        full_check_seconds: how often a pass compares every day's counts with the
            ingest's (the first pass of a replica does).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        retention_days: int,
        min_age_seconds: float = 60.0,
        interval_seconds: float = 60.0,
        full_check_seconds: float = 3600.0,
    ) -> None:
        self._pool = pool
        self.retention_days = retention_days
        self.min_age_seconds = min_age_seconds
        self.interval_seconds = interval_seconds
        self.full_check_seconds = full_check_seconds
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"analytics-preagg:{schema}".encode()).digest()[:8], "big", signed=True
        )
        self._local = asyncio.Lock()
        self.sketches = Sketches(pool)
        self.passes = 0
        self._last_start = -math.inf  # time.monotonic() of this replica's last pass start
        self._last_full = -math.inf  # ... and of its last full check

    async def run_once(
        self,
        now: datetime | None = None,
        *,
        min_age_seconds: float | None = None,
        full_check: bool | None = None,
        check_days: Iterable[date] = (),
    ) -> PassResult:
        """One pass: apply the logged changes, recompute the days whose counts are off (those
        changed, those put off before and ``check_days`` compared; every day when
        ``full_check``, by default every ``full_check_seconds``), delete what expired."""
        from services.analytics import engagement  # here: it imports this module

        now = now or datetime.now(UTC)
        self._last_start = time.monotonic()
        min_age = self.min_age_seconds if min_age_seconds is None else min_age_seconds
        if full_check is None:
            full_check = self._last_start - self._last_full >= self.full_check_seconds
        cutoff_day = (now - timedelta(days=self.retention_days)).date()
        oldest = midnight(cutoff_day)
        today = now.astimezone(UTC).date()
        result = PassResult(refreshed=[], full_check=full_check)
        async with self._local, self._pool.acquire() as conn:
            async with conn.transaction():
                # One pass at a time across replicas: the lock is held for the pass.
                await conn.execute("SELECT pg_advisory_lock($1)", self._lock_key)
            try:
                async with conn.transaction(isolation="repeatable_read"):
                    await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
                    as_of = await engagement.scores_as_of(conn)
                    scores_current = all(as_of.get(w) == today for w in engagement.WINDOW_DAYS)
                    result.changes, result.changed_days = await self._apply_changes(
                        conn, cutoff_day, today, scores_current
                    )
                    # The days to compare with the ingest's counts: those changed, those put
                    # off before, or all. Not the oldest day: its rollups go hour by hour.
                    check = set(result.changed_days)
                    check.update(check_days)
                    check.update(
                        r["day"] for r in await conn.fetch("SELECT day FROM preagg_days WHERE stale")
                    )
                    if full_check:
                        check.update(r["day"] for r in await conn.fetch(preagg_sql.ALL_DAYS_SQL, oldest))
                    off = await conn.fetch(
                        preagg_sql.DAYS_OFF_SQL, sorted(d for d in check if d > cutoff_day)
                    )
                    stored = [r["day"] for r in await conn.fetch("SELECT day FROM preagg_days")]
                for r in sorted(off, key=lambda r: r["day"]):
                    day, refreshed_at = r["day"], r["refreshed_at"]
                    if refreshed_at is not None and (now - refreshed_at).total_seconds() < min_age:
                        result.skipped_recent += 1
                        await conn.execute("UPDATE preagg_days SET stale = true WHERE day = $1", day)
                        continue
                    await self._refresh_day(conn, day, now, oldest)
                    result.refreshed.append(day)
                if result.refreshed:  # rows that came without change rows: their hours too
                    await conn.execute(
                        "INSERT INTO sketch_recheck_days (day) SELECT unnest($1::date[]) ON CONFLICT DO NOTHING",
                        result.refreshed,
                    )
                # Every user's scores when a day was recomputed whole or a day began (the
                # changed users' were stored with the changes).
                if result.refreshed or not scores_current:
                    await engagement.store_scores(conn, today)
                async with conn.transaction():
                    if full_check:  # days whose rows are gone (rollups deleted by the retention)
                        gone = [d for d in stored if d not in check]
                        await conn.execute("DELETE FROM engagement_daily WHERE day = ANY($1::date[])", gone)
                        await conn.execute("DELETE FROM preagg_days WHERE day = ANY($1::date[])", gone)
                    await conn.execute("DELETE FROM preagg_days WHERE day < $1", cutoff_day)
                    await conn.execute("DELETE FROM engagement_daily WHERE day < $1", cutoff_day)
                    await conn.execute("DELETE FROM session_sources WHERE first_at < $1", oldest)
                    await conn.execute("DELETE FROM funnel_walks WHERE start < $1", oldest)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)
        self.passes += 1
        if full_check:
            self._last_full = self._last_start
        if result.refreshed:
            log.info("pre-aggregation", extra={"days": [d.isoformat() for d in result.refreshed]})
        return result

    async def _apply_changes(
        self, conn: Connection, cutoff_day: date, today: date, scores_current: bool
    ) -> tuple[int, list[date]]:
        """Take the change rows this transaction sees out of the log and apply them; the
        changed users' scores too when today's are stored. (rows applied, days changed)"""
        from services.analytics import engagement

        await conn.execute(preagg_sql.CONSUMED_DDL)
        status = await conn.execute(preagg_sql.CONSUME_SQL, midnight(cutoff_day))
        applied = int(status.rsplit(" ", 1)[-1])
        if not applied:
            await conn.execute("DROP TABLE consumed")
            return 0, []
        days = [r["day"] for r in await conn.fetch(preagg_sql.DAYS_ADD_SQL, _EPOCH)]
        # the next sketch build, on any replica, recounts these days' hours
        await conn.execute(
            "INSERT INTO sketch_recheck_days (day) SELECT unnest($1::date[]) ON CONFLICT DO NOTHING", days
        )
        await conn.execute(preagg_sql.ENGAGEMENT_ADD_SQL)
        await conn.execute(preagg_sql.CHANGED_SOURCES_SQL)
        await conn.execute(preagg_sql.WALK_SESSIONS_SQL)
        await funnel_walks.rebuild_sessions(conn, midnight(cutoff_day))
        if scores_current:
            longest = max(engagement.WINDOW_DAYS.values())
            await conn.execute(preagg_sql.SCORE_USERS_SQL, today - timedelta(days=longest - 1), today)
            await engagement.store_user_scores(conn, today)
            await conn.execute("DROP TABLE score_users")
        await conn.execute("DROP TABLE consumed")
        return applied, days

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
        return not await self.steps_behind(since, until)

    async def steps_behind(self, since: datetime, until: datetime) -> list[date]:
        """The UTC days of ``[since, until]`` whose funnel steps now differ in number from
        those pre-aggregated (``steps_current``)."""
        first, last = since.astimezone(UTC).date(), until.astimezone(UTC).date()
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(_STEPS_CURRENT_SQL, midnight(first), midnight(last + timedelta(days=1)))
        return sorted(r["day"] for r in rows if r["stored"] != r["now"])

    async def recompute_day(self, day: date, now: datetime | None = None) -> None:
        """Recompute one day whole from the raw rows, then every user's scores, under the
        pass lock: what a pass did for each changed day before the change log (the
        benchmark's baseline)."""
        from services.analytics import engagement

        now = now or datetime.now(UTC)
        oldest = midnight((now - timedelta(days=self.retention_days)).date())
        async with self._local, self._pool.acquire() as conn:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_lock($1)", self._lock_key)
            try:
                await self._refresh_day(conn, day, now, oldest)
                await engagement.store_scores(conn, now.astimezone(UTC).date())
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)

    async def _refresh_day(self, conn: Connection, day: date, now: datetime, oldest: datetime) -> None:
        """Recompute one day whole from the raw rows, in one REPEATABLE READ transaction
        that also takes the day's change rows out of the log (the rows they stand for are
        among those read), and store the ingest's counts it was made from."""
        start, end = midnight(day), midnight(day + timedelta(days=1))
        async with conn.transaction(isolation="repeatable_read"):
            await conn.execute("SET LOCAL work_mem = '64MB'")
            counts = await conn.fetchrow(preagg_sql.DAY_COUNTS_SQL, start)
            assert counts is not None  # scalar subqueries: one row
            await conn.execute("DELETE FROM preagg_changes WHERE day_start = $1", start)
            await conn.execute("DELETE FROM engagement_daily WHERE day = $1", day)
            await conn.execute(preagg_sql.DAY_ENGAGEMENT_SQL, day, start, end)
            await conn.execute(preagg_sql.DAY_SOURCES_SQL, start, end)
            await funnel_walks.rebuild_day(conn, start, end, oldest)
            await conn.execute(
                """INSERT INTO preagg_days (day, events, steps, task_ends, refreshed_at, stale)
                VALUES ($1, $2, $3, $4, $5, false)
                ON CONFLICT (day) DO UPDATE SET events = excluded.events, steps = excluded.steps,
                    task_ends = excluded.task_ends, refreshed_at = excluded.refreshed_at, stale = false""",
                day,
                counts["events"],
                counts["steps"],
                counts["task_ends"],
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
        """The hourly distinct-count sketches due (``distinct.py``), under the same lock;
        the days passes saw new rows for (``sketch_recheck_days``, written by any replica's
        pass) are rechecked, however old, and forgotten once a build has rechecked them."""
        now = now or datetime.now(UTC)
        async with self._local, self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1)", self._lock_key)
            try:
                days = [r["day"] for r in await conn.fetch("SELECT day FROM sketch_recheck_days")]
                made = await self.sketches.build(now, now - timedelta(days=self.retention_days), days)
                # kept for the next build when this one failed
                await conn.execute("DELETE FROM sketch_recheck_days WHERE day = ANY($1::date[])", days)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1)", self._lock_key)
        return made
