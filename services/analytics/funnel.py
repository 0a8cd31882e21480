"""The ordered conversion funnel report (``GetFunnelReport``), computed in PostgreSQL.

Semantics (PostHog's "ordered" funnel, counted by session)
-----------------------------------------------------------
The funnel is the nine steps of :data:`services.analytics.vitals.FUNNEL_STEPS`
in that order. For every session:

1. **The attempt starts at the session's first step-1 occurrence inside the
   report window** (``now - window <= t1 <= now``). Later step-1 occurrences
   are ignored: they neither restart the attempt nor open a second one. A
   step 1 before the window does not count (the session may still qualify
   through a step 1 inside the window).
2. **Steps are matched greedily in order**: the session reaches step k (k >= 2)
   at ``t_k`` = the earliest occurrence of step k with
   ``t_(k-1) <= t_k <= t1 + conversion_window``. Ties count ("at or after":
   steps reported in the same instant are in order whatever their arrival).
   Taking the earliest match at every step is optimal: no other choice reaches
   further.
3. **Out-of-order steps**: an occurrence of step k before ``t_(k-1)`` is not a
   match (a session doing 1, 3, 2 reaches step 2 only, unless step 3 happens
   again after that step 2). **Skipped steps** end the walk: a session with
   steps 1, 2 and 4 reaches step 2; its step 4 is not counted.
4. **Repeated steps** count once; a repeat matters only when an earlier
   occurrence was out of order (see 3).
5. **Conversion window**: every later step must happen within
   ``conversion_window`` of the attempt's step 1 (the first step-1 occurrence,
   even if a later one would have fitted).
6. **Effect filter**: with ``effect_id`` set, only steps naming that effect
   exist for the report (step 1 included); other rows are ignored.

Per step the report gives the sessions that reached it, the conversion from
step 1 and from the previous step (shares 0..1; 1.0 for a non-empty step 1, 0
when the base is 0), the drop-off from the previous step (sessions and share;
0 for step 1), and the exact median (interpolated, ``percentile_cont(0.5)``)
of ``t_k - t_(k-1)`` in seconds over the sessions that reached step k.
``biggest_drop_off_step`` is the step (2..9) that lost the most sessions from
its previous step, ties to the higher drop-off rate and then the earlier step;
empty when no step lost any session.

Pre-aggregation: with a ``refresh`` (the service's), reports are read from
``funnel_walks`` (``services/analytics/funnel_walks.py``: the same answers,
without reading the raw steps). Before reading, the days the report can see
(window start to now + conversion window) are checked against the ingest's
exact per-bucket step counts (``rollup_funnel``); when any moved since it was
walked, a pre-aggregation pass re-walks the changed days first. So a computed
report counts every step committed before it, as the raw computation does;
the report cache's TTL is the only staleness. ``funnel_between`` below stays
the reference computation from the raw rows.

Implementation of the raw computation: one statement. The window's rows are read once into a
materialized CTE, then nine set-based steps (``t1`` .. ``t9``) each join the
sessions that reached the previous step with that step's rows (a hash join on
``session_id`` and a ``min``), so the work is linear in the number of rows of
the window whatever the number of sessions, and nothing but nine summary rows
comes back to Python.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.funnel_walks import funnel_from_walks
from services.analytics.vitals import FUNNEL_STEPS
from services.analytics.windows import (
    DEFAULT_FUNNEL_WINDOW,
    Window,
    parse_conversion_window,
    parse_window,
)
from services.servicekit.cache import MultiLevelCache, get_or_load_message
from services.servicekit.errors import invalid_argument

MAX_EFFECT_ID_LENGTH = 128  # the ingest's limit on ids


def _funnel_sql(with_effect: bool) -> str:
    """$1 since, $2 now, $3 conversion window (interval)[, $4 effect id]."""
    effect = "AND effect_id = $4" if with_effect else ""
    ctes = [
        f"""s AS MATERIALIZED (
    SELECT session_id, step, occurred_at
    FROM funnel_steps
    WHERE occurred_at >= $1::timestamptz AND occurred_at <= $2::timestamptz + $3::interval {effect}
)""",
        """t1 AS (
    SELECT session_id, min(occurred_at) AS t, min(occurred_at) AS start, NULL::timestamptz AS prev
    FROM s
    WHERE step = 1 AND occurred_at <= $2
    GROUP BY session_id
)""",
    ]
    for k in range(2, len(FUNNEL_STEPS) + 1):
        ctes.append(
            f"""t{k} AS (
    SELECT p.session_id, min(s.occurred_at) AS t, p.start, p.t AS prev
    FROM t{k - 1} p
    JOIN s ON s.session_id = p.session_id AND s.step = {k}
          AND s.occurred_at >= p.t AND s.occurred_at <= p.start + $3::interval
    GROUP BY p.session_id, p.start, p.t
)"""
        )
    selects = ["SELECT 1 AS step, count(*) AS sessions, NULL::float8 AS median FROM t1"]
    for k in range(2, len(FUNNEL_STEPS) + 1):
        selects.append(
            f"SELECT {k}, count(*), percentile_cont(0.5) WITHIN GROUP "
            f"(ORDER BY extract(epoch FROM t - prev)::float8) FROM t{k}"
        )
    return "WITH " + ",\n".join(ctes) + "\n" + "\nUNION ALL ".join(selects)


_SESSION_SETTINGS = (
    "SET LOCAL enable_nestloop = off; SET LOCAL work_mem = '64MB'; "
    "SET LOCAL plan_cache_mode = force_custom_plan"
)
_SQL = _funnel_sql(with_effect=False)
_SQL_EFFECT = _funnel_sql(with_effect=True)


class FunnelReports:
    """Serves funnel reports through a cache of raw bytes (single-flight, ``ttl_seconds``).

    A report over days of steps costs seconds of PostgreSQL time; an admin page
    reloading it, or several admins at once, cost one computation per key
    (window, conversion window, effect) and TTL. ``computations`` counts them.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: MultiLevelCache[bytes],
        ttl_seconds: float,
        refresh: Callable[[datetime, datetime], Awaitable[object]] | None = None,
    ) -> None:
        """``refresh(since, until)`` brings the pre-aggregated walks of those days up to
        date; without it reports are computed from the raw steps."""
        self._pool = pool
        self._cache = cache
        self._ttl = ttl_seconds
        self._refresh = refresh
        self.computations = 0

    async def get(
        self, request: analytics_pb2.GetFunnelReportRequest
    ) -> analytics_pb2.GetFunnelReportResponse:
        window, conversion, effect_id = parse_request(request)

        async def load() -> analytics_pb2.GetFunnelReportResponse:
            self.computations += 1
            if self._refresh is None:
                return await funnel_report(self._pool, window, conversion, effect_id)
            now = datetime.now(UTC)
            await self._refresh(now - window.length, now + conversion.length)
            return await funnel_report(self._pool, window, conversion, effect_id, funnel_from_walks, now)

        return await get_or_load_message(
            self._cache,
            f"{window.text}|{conversion.text}|{effect_id}",
            analytics_pb2.GetFunnelReportResponse,
            load,
            self._ttl,
        )


def parse_request(request: analytics_pb2.GetFunnelReportRequest) -> tuple[Window, Window, str]:
    """The report's window, conversion window and effect id, validated."""
    window = parse_window(request.window, DEFAULT_FUNNEL_WINDOW)
    conversion = parse_conversion_window(request.conversion_window)
    effect_id = request.effect_id
    if len(effect_id) > MAX_EFFECT_ID_LENGTH:
        raise invalid_argument(
            [("effectId", f"must be at most {MAX_EFFECT_ID_LENGTH} characters")], "invalid effect id"
        )
    if "\x00" in effect_id:  # PostgreSQL text cannot hold NUL
        raise invalid_argument([("effectId", "must not contain NUL (U+0000)")], "invalid effect id")
    return window, conversion, effect_id


async def funnel_between(
    pool: asyncpg.Pool, since: datetime, until: datetime, conversion: timedelta, effect_id: str = ""
) -> dict[int, tuple[int, float | None]]:
    """(sessions, median seconds from the previous step) per step position, for attempts
    whose step 1 falls in ``[since, until]`` (see the module docstring)."""
    async with pool.acquire() as conn, conn.transaction(readonly=True):
        # The CTEs' row estimates shrink step after step (each a fraction of the previous):
        # a nested loop picked on such an estimate turns the deep steps quadratic. Hash joins
        # and in-memory aggregates are right for every size here.
        await conn.execute(_SESSION_SETTINGS)
        if effect_id:
            rows = await conn.fetch(_SQL_EFFECT, since, until, conversion, effect_id)
        else:
            rows = await conn.fetch(_SQL, since, until, conversion)
    return {int(r["step"]): (int(r["sessions"]), r["median"]) for r in rows}


Counts = Callable[
    [asyncpg.Pool, datetime, datetime, timedelta, str], Awaitable[dict[int, tuple[int, float | None]]]
]


async def funnel_report(
    pool: asyncpg.Pool,
    window: Window,
    conversion: Window,
    effect_id: str,
    counts: Counts | None = None,
    now: datetime | None = None,
) -> analytics_pb2.GetFunnelReportResponse:
    """The ordered funnel over `window`, see the module docstring; `effect_id` "" for all;
    `counts` the per-step figures' source (the raw computation by default)."""
    now = now or datetime.now(UTC)
    by_step = await (counts or funnel_between)(pool, now - window.length, now, conversion.length, effect_id)

    response = analytics_pb2.GetFunnelReportResponse(
        window=window.text, conversion_window=conversion.text, effect_id=effect_id
    )
    response.generated_at.FromDatetime(now)
    started = by_step.get(1, (0, None))[0]
    previous = started
    biggest: tuple[int, float, int] | None = None  # (drop-off, rate, -position)
    biggest_step = ""
    for position, name in enumerate(FUNNEL_STEPS, start=1):
        sessions, median = by_step.get(position, (0, None))
        if position == 1:
            from_previous = 1.0 if sessions else 0.0
            drop_off = 0
        else:
            from_previous = sessions / previous if previous else 0.0
            drop_off = previous - sessions
        drop_rate = drop_off / previous if previous and position > 1 else 0.0
        response.steps.add(
            step=name,
            position=position,
            sessions=sessions,
            conversion_from_start=sessions / started if started else 0.0,
            conversion_from_previous=from_previous,
            drop_off=drop_off,
            drop_off_rate=drop_rate,
            median_seconds_from_previous=float(median) if median is not None else 0.0,
        )
        if position > 1 and drop_off > 0:
            rank = (drop_off, drop_rate, -position)
            if biggest is None or rank > biggest:
                biggest, biggest_step = rank, name
        previous = sessions
    response.biggest_drop_off_step = biggest_step
    return response
