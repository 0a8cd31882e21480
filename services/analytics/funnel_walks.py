"""The ordered funnel from pre-aggregated walks: the same answers as ``funnel.py``'s raw
computation, read from ``funnel_walks`` instead of the raw steps.

Why a walk per step-1 occurrence answers every report exactly
---------------------------------------------------------------
``funnel.py``'s semantics: an attempt starts at the session's first step-1
occurrence ``t1`` inside the window; step k is matched at the earliest
occurrence ``t_k >= t_(k-1)`` with ``t_k <= t1 + conversion_window``.

* **The conversion window only truncates.** Let ``w_k`` be the greedy walk
  without the limit (earliest ``w_k >= w_(k-1)``). If ``w_k <= t1 + c`` it is
  the constrained match too; if ``w_k > t1 + c`` no occurrence of step k fits
  (every other one is later), so the walk ends there. So one walk per
  ``(session, t1)``, stored as offsets ``o_k = w_k - t1`` (microseconds,
  exact), answers every conversion window: the session reaches k iff
  ``o_k <= c`` (offsets never decrease).
* **The window only picks the walk.** The raw computation reads the steps in
  ``[since, until + c]``: steps before ``since`` cannot follow ``t1 >= since``,
  steps after ``until + c`` cannot fit ``t1 + c``. The attempt counted is the
  walk whose ``start`` lies in ``[since, until]`` and whose session's previous
  step-1 occurrence (``prev_start``) is before ``since`` or absent.
* **The effect filter is a scope.** With ``effect_id`` set only that effect's
  steps exist, step 1 included, so walks are also stored per effect
  (``scope`` = the effect id) beside the walk over all steps (``scope`` = '').
* **Medians** are ``percentile_cont(0.5)`` of ``(o_k - o_(k-1)) / 10^6``
  seconds as float8: the same reals as the raw ``extract(epoch ...)``, each
  correctly rounded, so the same medians.

Offsets compare with the conversion window as a fixed number of microseconds
(a day is 86,400 s), as the raw SQL does with a UTC session time zone.

Maintenance (``Preaggregator``): every session the ingest reported new steps
of since the last pass (``preagg_changes``) is recomputed from all its steps
(all its walks, in every scope), in the pass's REPEATABLE READ transaction; a
day recomputed whole re-walks every session with a step that day.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit.db import Connection

STEPS = len(FUNNEL_STEPS)

_SESSIONS_SQL = """
CREATE TEMP TABLE walk_sessions ON COMMIT DROP AS
SELECT DISTINCT session_id FROM funnel_steps WHERE occurred_at >= $1 AND occurred_at < $2
"""
_DELETE_SQL = "DELETE FROM funnel_walks WHERE session_id IN (SELECT session_id FROM walk_sessions)"
# Every kept step of the sessions to walk ($1: the oldest step kept, retention).
_STEPS_SQL = """
CREATE TEMP TABLE walk_steps ON COMMIT DROP AS
SELECT f.session_id, f.step, f.occurred_at, f.effect_id
FROM funnel_steps f JOIN walk_sessions w ON w.session_id = f.session_id
WHERE f.occurred_at >= $1
"""


def _build_sql() -> str:
    """The walks of the steps in ``walk_steps``."""
    ctes = [
        """s AS (SELECT session_id, step, occurred_at, effect_id FROM walk_steps)""",
        """x AS MATERIALIZED (
    SELECT session_id, ''::text COLLATE "C" AS scope, step, occurred_at FROM s
    UNION ALL
    SELECT session_id, effect_id COLLATE "C", step, occurred_at FROM s WHERE effect_id <> ''
)""",
        """t1 AS (
    SELECT session_id, scope, start, lag(start) OVER (PARTITION BY session_id, scope ORDER BY start) AS prev
    FROM (SELECT DISTINCT session_id, scope, occurred_at AS start FROM x WHERE step = 1) d
)""",
    ]
    previous = "p.start"
    for k in range(2, STEPS + 1):
        ctes.append(
            f"""t{k} AS (
    SELECT p.session_id, p.scope, p.start, min(x.occurred_at) AS t
    FROM t{k - 1} p
    JOIN x ON x.session_id = p.session_id AND x.scope = p.scope AND x.step = {k} AND x.occurred_at >= {previous}
    GROUP BY p.session_id, p.scope, p.start
)"""
        )
        previous = "p.t"
    offsets = ", ".join(f"o{k}" for k in range(2, STEPS + 1))
    values = ", ".join(
        f"(extract(epoch FROM t{k}.t - t1.start) * 1000000)::bigint" for k in range(2, STEPS + 1)
    )
    joins = " ".join(f"LEFT JOIN t{k} USING (session_id, scope, start)" for k in range(2, STEPS + 1))
    return (
        "WITH "
        + ",\n".join(ctes)
        + f"\nINSERT INTO funnel_walks (session_id, scope, start, prev_start, {offsets})\n"
        + f"SELECT t1.session_id, t1.scope, t1.start, t1.prev, {values}\nFROM t1 {joins}"
    )


def _query_sql() -> str:
    """$1 since, $2 until, $3 conversion window in microseconds, $4 scope."""
    columns = ["count(*) AS n1", "NULL::float8 AS m1"]
    for k in range(2, STEPS + 1):
        delta = f"o{k}" if k == 2 else f"(o{k} - o{k - 1})"
        columns.append(f"count(*) FILTER (WHERE o{k} <= $3) AS n{k}")
        columns.append(
            f"percentile_cont(0.5) WITHIN GROUP (ORDER BY {delta}::float8 / 1000000::float8)"
            f" FILTER (WHERE o{k} <= $3) AS m{k}"
        )
    return (
        "SELECT " + ",\n       ".join(columns) + "\nFROM funnel_walks\n"
        "WHERE scope = $4 AND start >= $1 AND start <= $2 AND (prev_start IS NULL OR prev_start < $1)"
    )


_BUILD_SQL = _build_sql()
_QUERY_SQL = _query_sql()


async def rebuild_day(conn: Connection, start: datetime, end: datetime, oldest: datetime) -> None:
    """Recompute the walks of every session with a step in ``[start, end)``; inside the
    caller's transaction (the day's REPEATABLE READ one; its settings are LOCAL to it)."""
    await conn.execute(_SESSIONS_SQL, start, end)
    await conn.execute("SET LOCAL enable_nestloop = off")  # a day's sessions: hash joins
    await rebuild_sessions(conn, oldest)


async def rebuild_sessions(conn: Connection, oldest: datetime) -> None:
    """Recompute the walks of the sessions in the temporary table ``walk_sessions``
    (``session_id``) from all their steps since ``oldest``, and drop the table; inside the
    caller's transaction. A few sessions' steps are read through the session index."""
    await conn.execute("ANALYZE walk_sessions")
    await conn.execute(_DELETE_SQL)
    await conn.execute(_STEPS_SQL, oldest)  # no ANALYZE: the plan below hardly depends on it
    await conn.execute("SET LOCAL enable_nestloop = off")
    await conn.execute(_BUILD_SQL)
    await conn.execute("RESET enable_nestloop")
    await conn.execute("DROP TABLE walk_sessions, walk_steps")


async def funnel_from_walks(
    pool: asyncpg.Pool, since: datetime, until: datetime, conversion: timedelta, effect_id: str = ""
) -> dict[int, tuple[int, float | None]]:
    """(sessions, median seconds from the previous step) per step position, for attempts
    whose step 1 falls in ``[since, until]``: ``funnel.funnel_between``'s answer."""
    micros = conversion // timedelta(microseconds=1)
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        await conn.execute("SET LOCAL work_mem = '64MB'")
        row = await conn.fetchrow(_QUERY_SQL, since, until, micros, effect_id)
    assert row is not None  # an aggregate without GROUP BY returns one row
    return {k: (int(row[f"n{k}"]), row[f"m{k}"]) for k in range(1, STEPS + 1)}
