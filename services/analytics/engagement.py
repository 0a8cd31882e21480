"""Engagement: DAU / WAU / MAU, stickiness, returning users and the engagement score.

Everything is read from ``engagement_daily`` (``services/analytics/preagg.py``),
one row per UTC day and identified user, never from raw events.

Definitions
-----------
* **Active**: a user (non-empty ``userId``) with at least one engagement event,
  funnel step or effect task end (server fact) on a UTC day. Anonymous
  sessions are not users.
* **Window**: ``7d`` or ``30d`` is the 7 or 30 UTC days ending today (today,
  still running, included). ``as_of_day`` is today.
* **DAU** (``dau``): the average over the window's days of the day's active
  users; ``daily`` lists each day. **WAU** / **MAU**: distinct active users over
  the 7 / 30 UTC days ending today, whatever the window. **Stickiness**:
  ``dau / mau`` (0 when MAU is 0).
* **Returning-user rate**: the share of the window's active users who were
  active on at least two different days of the window.

The engagement score
--------------------
Over the window's days, per user::

    score = sum over days d and components c of  count_c(d) * weight_c * 0.5 ** (age(d) / 7)

where ``age(d)`` is the number of whole days from ``d`` to ``as_of_day`` (0
today, 1 yesterday, ...): a half-life of 7 days. Components and weights
(:data:`WEIGHTS`):

============  ======  ==========================================================
component     weight  counted from
============  ======  ==========================================================
events        1       engagement events (any ``eventType``), at most 50 a day
uploads       2       funnel step ``image_uploaded``
effect_runs   5       effect tasks that ended ``SUCCEEDED`` (server facts)
downloads     3       funnel step ``result_downloaded``
shares        8       funnel step ``result_shared``
============  ======  ==========================================================

Effect runs are server facts: the task ends the effects service reports
(``RecordTaskEnds``, service token only), so a browser cannot inflate them. On
a day the server reported no task end of the user at all (effects not yet
reporting, or its bounded buffer dropped them), the browser's
``processing_completed`` funnel steps count instead; never both, so a run is
not counted twice.

Each component's ``points`` is its part of the score after the decay; the score
is their sum rounded to 2 decimals. ``percentile`` is the share (0..100) of the
window's active users whose score is strictly lower. ``score_deciles`` are the
scores at the top of each tenth of the active users (nearest rank, like
``percentile_disc`` at 0.1, 0.2, ... 1.0). Top users are ordered by score,
then user id; pages of ``pageSize`` (1..100, default 20) follow
``nextPageToken``.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

import asyncpg

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.preagg import Preflight
from services.servicekit.cache import MultiLevelCache, get_or_load_message
from services.servicekit.db import Connection
from services.servicekit.errors import invalid_argument

WINDOW_DAYS: Final = {"7d": 7, "30d": 30}
DEFAULT_WINDOW: Final = "30d"
HALF_LIFE_DAYS: Final = 7.0
DAILY_EVENT_CAP: Final = 50
# (component, column, weight)
WEIGHTS: Final = (
    ("events", f"least(events, {DAILY_EVENT_CAP})", 1.0),
    ("uploads", "uploads", 2.0),
    ("effect_runs", "effect_runs", 5.0),
    ("downloads", "downloads", 3.0),
    ("shares", "shares", 8.0),
)
DEFAULT_PAGE_SIZE: Final = 20
MAX_PAGE_SIZE: Final = 100
MAX_USER_ID_LENGTH: Final = 128
MAX_OFFSET: Final = 10_000_000

_COUNTS = ", ".join(f"sum({col})::bigint AS {name}_n" for name, col, _ in WEIGHTS)
_POINTS = ", ".join(
    # float8 arithmetic, the day's decay computed once per day (``decay``), not per row.
    f"sum({col} * {weight}::float8 * decay.f)::float8 AS {name}_p"
    for name, col, weight in WEIGHTS
)
_TOTAL = " + ".join(f"{name}_p" for name, _, _ in WEIGHTS)
_SCORES_CTE = f"""
per_user AS (
    SELECT user_id, count(*)::int AS active_days, max(e.day) AS last_day, {_COUNTS}, {_POINTS}
    FROM engagement_daily e
    JOIN (SELECT d::date AS day, power(0.5::float8, ($2::date - d::date)::float8 / {HALF_LIFE_DAYS}::float8) AS f
          FROM generate_series($1::date, $2::date, interval '1 day') AS d) decay ON decay.day = e.day
    WHERE e.day >= $1 AND e.day <= $2 {{user_filter}}
    GROUP BY user_id
), s AS MATERIALIZED (
    SELECT *, round(({_TOTAL})::numeric, 2)::float8 AS score FROM per_user
)"""
_COLUMNS = ", ".join(f"{name}_n, {name}_p" for name, _, _ in WEIGHTS)

# One statement: the summary row (kind 0) and the page of top users (kind 1).
_REPORT_BODY = f"""
SELECT 0 AS kind, NULL::text AS user_id, NULL::int AS active_days, NULL::date AS last_day,
       {", ".join(f"NULL::bigint AS {n}_n, NULL::float8 AS {n}_p" for n, _, _ in WEIGHTS)},
       NULL::float8 AS score, NULL::float8 AS percentile,
       (SELECT count(*) FROM s)::bigint AS users,
       (SELECT count(*) FILTER (WHERE active_days >= 2) FROM s)::bigint AS returning,
       (SELECT percentile_disc(ARRAY[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
            WITHIN GROUP (ORDER BY score) FROM s) AS deciles
UNION ALL
(SELECT 1, user_id, active_days, last_day, {_COLUMNS}, score,
        -- the share of users with a strictly lower score, for the page's rows only
        100.0 * ({{below}}) / (SELECT count(*) FROM s),
        NULL, NULL, NULL
 FROM (SELECT * FROM s ORDER BY score DESC, user_id LIMIT {{limit}} OFFSET {{offset}}) page
 ORDER BY score DESC, user_id)
"""
_REPORT_SQL = f"WITH {_SCORES_CTE.format(user_filter='')}" + _REPORT_BODY.format(
    limit="$3", offset="$4", below="SELECT count(*) FROM s lower WHERE lower.score < page.score"
)
# The same from the scores the pass stored: $1 window, $2 limit, $3 offset.
_STORED = "s AS (SELECT * FROM engagement_scores WHERE window_name = $1)"
# A page row's lower scores are all users but those scoring at least as much, counted
# through the (window_name, score) index: a few entries for the top users, where counting
# the lower ones scanned every user per page row (~8 ms each at 67 k users).
_REPORT_STORED_SQL = f"WITH {_STORED}" + _REPORT_BODY.format(
    limit="$2",
    offset="$3",
    below="(SELECT count(*) FROM s) - (SELECT count(*) FROM engagement_scores h"
    " WHERE h.window_name = $1 AND h.score >= page.score)",
)
_AS_OF_SQL = "SELECT as_of FROM engagement_scores_as_of WHERE window_name = $1"
_STORE_SQL = f"""
INSERT INTO engagement_scores (window_name, user_id, active_days, last_day, {_COLUMNS}, score)
WITH {_SCORES_CTE.format(user_filter="")}
SELECT $3, user_id, active_days, last_day, {_COLUMNS}, score FROM s
"""
# The same for the users in the temporary table score_users only (their days through the
# (user_id, day) index); their old rows are deleted first.
_STORE_USERS_SQL = f"""
INSERT INTO engagement_scores (window_name, user_id, active_days, last_day, {_COLUMNS}, score)
WITH {_SCORES_CTE.format(user_filter="AND e.user_id IN (SELECT user_id FROM score_users)")}
SELECT $3, user_id, active_days, last_day, {_COLUMNS}, score FROM s
"""
# The window wide figures: active users per day, WAU and MAU (today's 7 and 30 days).
_ACTIVE_SQL = """
SELECT (SELECT coalesce(json_object_agg(day, n), '{}'::json)::text FROM
            (SELECT day, count(*) AS n FROM engagement_daily WHERE day >= $1 AND day <= $2 GROUP BY day) d)
           AS daily,
       (SELECT count(*) FROM (SELECT DISTINCT user_id FROM engagement_daily
                              WHERE day > $2 - 7 AND day <= $2) w)::bigint AS wau,
       (SELECT count(*) FROM (SELECT DISTINCT user_id FROM engagement_daily
                              WHERE day > $2 - 30 AND day <= $2) m)::bigint AS mau
"""
_USER_SQL = f"""
WITH {_SCORES_CTE.format(user_filter="")}
SELECT u.*, 100.0 * (SELECT count(*) FROM s WHERE s.score < u.score) / (SELECT count(*) FROM s) AS percentile
FROM s u WHERE u.user_id = $3
"""
_USER_STORED_SQL = f"""
WITH {_STORED}
SELECT u.*, 100.0 * (SELECT count(*) FROM s WHERE s.score < u.score) / (SELECT count(*) FROM s) AS percentile
FROM s u WHERE u.user_id = $2
"""


async def store_scores(conn: Connection, today: date) -> None:
    """Every window's scores as of ``today``, for the reports to read (the pre-aggregation
    pass calls it after refreshing ``engagement_daily``; one transaction)."""
    async with conn.transaction():
        await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
        for window, days in WINDOW_DAYS.items():
            await conn.execute("DELETE FROM engagement_scores WHERE window_name = $1", window)
            await conn.execute(_STORE_SQL, today - timedelta(days=days - 1), today, window)
            await conn.execute(
                "INSERT INTO engagement_scores_as_of (window_name, as_of) VALUES ($1, $2)"
                " ON CONFLICT (window_name) DO UPDATE SET as_of = excluded.as_of",
                window,
                today,
            )


async def store_user_scores(conn: Connection, today: date) -> None:
    """Every window's scores as of ``today`` of the users in the temporary table
    ``score_users`` (``user_id``), the other users' rows left as they are: what
    ``store_scores`` would write when only those users' ``engagement_daily`` rows changed
    since it ran for ``today``. Inside the caller's transaction."""
    await conn.execute("ANALYZE score_users")
    for window, days in WINDOW_DAYS.items():
        await conn.execute(
            "DELETE FROM engagement_scores WHERE window_name = $1"
            " AND user_id IN (SELECT user_id FROM score_users)",
            window,
        )
        await conn.execute(_STORE_USERS_SQL, today - timedelta(days=days - 1), today, window)


async def scores_as_of(conn: Connection) -> dict[str, date]:
    return {r["window_name"]: r["as_of"] for r in await conn.fetch("SELECT * FROM engagement_scores_as_of")}


@dataclass(frozen=True)
class Span:
    """The window's UTC days, first and last (today) included."""

    window: str
    first: date
    last: date

    @property
    def days(self) -> list[date]:
        return [self.first + timedelta(days=i) for i in range((self.last - self.first).days + 1)]


def span(window: str, now: datetime) -> Span:
    text = window or DEFAULT_WINDOW
    days = WINDOW_DAYS.get(text)
    if days is None:
        raise invalid_argument([("window", f"must be 7d or 30d; got {window!r}")], "invalid window")
    today = now.astimezone(UTC).date()
    return Span(text, today - timedelta(days=days - 1), today)


def decode_page_token(token: str, span_: Span) -> int:
    """The offset a page token stands for; it is only valid for the same window and day."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode("ascii") + b"=="))
        offset, window, day = data["o"], data["w"], data["d"]
        valid = (
            isinstance(offset, int)
            and not isinstance(offset, bool)
            and 0 <= offset <= MAX_OFFSET
            and window == span_.window
            and day == span_.last.isoformat()
        )
    except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error):
        valid = False
    if not valid:
        raise invalid_argument([("pageToken", "is not a token of this report")], "invalid page token")
    return int(offset)


def encode_page_token(offset: int, span_: Span) -> str:
    raw = json.dumps({"o": offset, "w": span_.window, "d": span_.last.isoformat()}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def page_size(value: int) -> int:
    if value == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= value <= MAX_PAGE_SIZE:
        raise invalid_argument(
            [("pageSize", f"must be 1..{MAX_PAGE_SIZE}; got {value}")], "invalid page size"
        )
    return value


def check_user_id(user_id: str) -> str:
    if not user_id or len(user_id) > MAX_USER_ID_LENGTH or not user_id.isprintable():
        raise invalid_argument(
            [("userId", f"must be 1..{MAX_USER_ID_LENGTH} printable characters")], "invalid user id"
        )
    return user_id


def _score(row: asyncpg.Record, percentile: float) -> analytics_pb2.UserEngagementScore:
    score = analytics_pb2.UserEngagementScore(
        user_id=row["user_id"],
        score=float(row["score"]),
        percentile=round(percentile, 2),
        active_days=int(row["active_days"]),
        last_active_day=row["last_day"].isoformat() if row["last_day"] else "",
    )
    for name, _, weight in WEIGHTS:
        score.components.add(
            name=name, count=int(row[f"{name}_n"]), weight=weight, points=round(float(row[f"{name}_p"]), 4)
        )
    return score


class EngagementReports:
    """Serves the engagement report and single users' scores (cached ``ttl_seconds``).

    ``refresh`` brings the pre-aggregated days up to date before a computation
    (``Preaggregator.run_once``); None when something else does.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: MultiLevelCache[bytes],
        ttl_seconds: float,
        refresh: Preflight | None = None,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._ttl = ttl_seconds
        self._refresh = refresh
        self.computations = 0

    async def report(
        self, request: analytics_pb2.GetEngagementReportRequest
    ) -> analytics_pb2.GetEngagementReportResponse:
        now = datetime.now(UTC)
        s = span(request.window, now)
        size = page_size(request.page_size)
        offset = decode_page_token(request.page_token, s)

        async def load() -> analytics_pb2.GetEngagementReportResponse:
            return await self.compute_report(s, size, offset, now)

        return await get_or_load_message(
            self._cache,
            f"report|{s.window}|{s.last}|{size}|{offset}",
            analytics_pb2.GetEngagementReportResponse,
            load,
            self._ttl,
        )

    async def user(
        self, request: analytics_pb2.GetUserEngagementRequest
    ) -> analytics_pb2.GetUserEngagementResponse:
        now = datetime.now(UTC)
        s = span(request.window, now)
        user_id = check_user_id(request.user_id)

        async def load() -> analytics_pb2.GetUserEngagementResponse:
            return await self.compute_user(s, user_id, now)

        return await get_or_load_message(
            self._cache,
            f"user|{s.window}|{s.last}|{user_id}",
            analytics_pb2.GetUserEngagementResponse,
            load,
            self._ttl,
        )

    async def compute_report(
        self, s: Span, size: int, offset: int, now: datetime
    ) -> analytics_pb2.GetEngagementReportResponse:
        self.computations += 1
        if self._refresh is not None:
            await self._refresh()
        async with self._pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            # jit off: compiling these plans costs more (~90 ms) than it saves at this size.
            await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
            if await conn.fetchval(_AS_OF_SQL, s.window) == s.last:
                rows = await conn.fetch(_REPORT_STORED_SQL, s.window, size + 1, offset)
            else:  # the pass has not stored today's scores yet
                rows = await conn.fetch(_REPORT_SQL, s.first, s.last, size + 1, offset)
            active = await conn.fetchrow(_ACTIVE_SQL, s.first, s.last)
        assert active is not None  # an aggregate query returns one row
        summary = next(r for r in rows if r["kind"] == 0)
        top = [r for r in rows if r["kind"] == 1]
        users = int(summary["users"])
        daily = {date.fromisoformat(k): int(v) for k, v in json.loads(active["daily"]).items()}
        days = s.days
        dau = sum(daily.get(d, 0) for d in days) / len(days)
        mau = int(active["mau"])
        response = analytics_pb2.GetEngagementReportResponse(
            window=s.window,
            as_of_day=s.last.isoformat(),
            dau=round(dau, 4),
            wau=int(active["wau"]),
            mau=mau,
            stickiness=round(dau / mau, 4) if mau else 0.0,
            returning_user_rate=round(int(summary["returning"]) / users, 4) if users else 0.0,
            active_users=users,
            score_deciles=[float(v) for v in summary["deciles"]] if summary["deciles"] else [],
        )
        response.generated_at.FromDatetime(now)
        for d in days:
            response.daily.add(day=d.isoformat(), users=daily.get(d, 0))
        for row in top[:size]:
            response.top_users.append(_score(row, float(row["percentile"])))
        if len(top) > size:
            response.next_page_token = encode_page_token(offset + size, s)
        return response

    async def compute_user(
        self, s: Span, user_id: str, now: datetime
    ) -> analytics_pb2.GetUserEngagementResponse:
        self.computations += 1
        if self._refresh is not None:
            await self._refresh()
        async with self._pool.acquire() as conn, conn.transaction(readonly=True):
            # jit off: compiling these plans costs more (~90 ms) than it saves at this size.
            await conn.execute("SET LOCAL work_mem = '64MB'; SET LOCAL jit = off")
            if await conn.fetchval(_AS_OF_SQL, s.window) == s.last:
                row = await conn.fetchrow(_USER_STORED_SQL, s.window, user_id)
            else:
                row = await conn.fetchrow(_USER_SQL, s.first, s.last, user_id)
        response = analytics_pb2.GetUserEngagementResponse(window=s.window)
        response.generated_at.FromDatetime(now)
        if row is None:
            response.score.user_id = user_id
            for name, _, weight in WEIGHTS:
                response.score.components.add(name=name, weight=weight)
        else:
            response.score.CopyFrom(_score(row, float(row["percentile"])))
        return response
