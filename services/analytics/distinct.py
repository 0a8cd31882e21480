"""Distinct sessions and users over long windows from mergeable HyperLogLog sketches.

``rollup_sessions`` (one row per hour and session, written by the ingest) is the
exact source. Counting distinct sessions and users over a day or a week of it
costs seconds at 10 M rows a day, so each **sealed hour** (ended more than
:data:`SEAL_DELAY` ago) gets two HLL sketches (Apache DataSketches, ``lg_k`` =
:data:`LG_K`: relative standard error 1.04 / sqrt(2^14) ~ 0.8 %), stored as
compact bytes in ``distinct_sketches`` with the hour's row count when built.

At read time the sketches of the window's sealed hours are unioned; the hours
not sealed yet (the last one or two) and any sealed hour without a sketch are
read exactly from ``rollup_sessions`` and added to the union, so the estimate
covers the whole window. Builder passes (``Sketches.build``, in the
pre-aggregation loop) make the missing sketches and remake those whose hour's
row count moved (a late row with an old timestamp): the last :data:`RECHECK` hours
every pass, and the hours of any older day the pass's change log named (the
ingest logs the day of every new row, ``preagg.py``); until that pass such an
hour's sketch misses the late rows.

Windows of an hour or less are counted exactly (cheap); see ``dashboard.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

import asyncpg
from datasketches import hll_sketch, hll_union, tgt_hll_type

from services.servicekit.db import Connection
from services.servicekit.partitions import midnight

LG_K: Final = 14
HLL_TYPE: Final = tgt_hll_type.HLL_8
SEAL_DELAY: Final = timedelta(minutes=5)
RECHECK: Final = timedelta(hours=24)
HOUR: Final = timedelta(hours=1)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
KINDS: Final = ("sessions", "users")

_HOUR_COUNTS_SQL = """
SELECT hour_start, count(*)::bigint AS n FROM rollup_sessions
WHERE hour_start >= $1 AND hour_start < $2 GROUP BY hour_start
"""
# Per hour, its sessions and its non-empty users as two arrays: decoding one array per hour
# costs about half of decoding one record per session (a 32 k-session hour read and
# sketched in 38 ms instead of 69).
_RANGE_IDS_SQL = """
SELECT hour_start, array_agg(session_id) AS sessions,
       array_agg(user_id) FILTER (WHERE user_id <> '') AS users
FROM rollup_sessions WHERE hour_start = ANY($1::timestamptz[]) GROUP BY hour_start
"""
_STORED_SQL = """
SELECT hour_start, kind, source_rows, sketch FROM distinct_sketches
WHERE hour_start >= $1 AND hour_start <= $2
"""


def floor_hour(moment: datetime) -> datetime:
    return _EPOCH + ((moment - _EPOCH) // HOUR) * HOUR


def sealed_before(now: datetime) -> datetime:
    """Hours starting before this instant are sealed (they ended at least SEAL_DELAY ago)."""
    return floor_hour(now - SEAL_DELAY)


def _hours(start: datetime, end: datetime) -> list[datetime]:
    out, h = [], start
    while h < end:
        out.append(h)
        h += HOUR
    return out


def new_sketch() -> hll_sketch:
    return hll_sketch(LG_K, HLL_TYPE)


def sketches_of(sessions: Iterable[str], users: Iterable[str]) -> tuple[hll_sketch, hll_sketch]:
    session_sketch, user_sketch = new_sketch(), new_sketch()
    for session in sessions:
        session_sketch.update(session)
    for user in users:
        user_sketch.update(user)
    return session_sketch, user_sketch


@dataclass(frozen=True)
class Estimate:
    sessions: int
    users: int
    sketched_hours: int
    exact_hours: int


@dataclass(frozen=True)
class WindowEstimate:
    """What the dashboard needs of one window, in one pass over its hours' sketches."""

    buckets: list[Estimate]  # one per bucket start
    total: Estimate  # the whole window
    hour_sessions: dict[datetime, int]  # exact distinct sessions per hour


def _estimate(unions: dict[str, hll_union], sketched: int, exact: int) -> Estimate:
    return Estimate(
        sessions=round(unions["sessions"].get_estimate()),
        users=round(unions["users"].get_estimate()),
        sketched_hours=sketched,
        exact_hours=exact,
    )


class Sketches:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.built = 0

    async def build(self, now: datetime, since: datetime, recheck_days: Iterable[date] = ()) -> int:
        """Make the sketches due for the sealed hours from `since`; returns how many hours.

        The hours of the last :data:`RECHECK`, and those of ``recheck_days`` (days that got
        new rows), are recounted and remade when their row count moved; other hours are
        made once when they have no sketch (an empty hour gets an empty sketch, so it is
        not looked at again).
        """
        sealed = sealed_before(now)
        start = floor_hour(since)
        recheck_from = max(start, sealed - RECHECK)
        ranges = [(recheck_from, sealed)]
        for day in sorted(set(recheck_days)):
            day_start = max(midnight(day), start)
            day_end = min(midnight(day + timedelta(days=1)), recheck_from)
            if day_start < day_end:
                ranges.append((day_start, day_end))
        made = 0
        async with self._pool.acquire() as conn:
            stored = {
                r["hour_start"]: int(r["source_rows"])
                for r in await conn.fetch(_STORED_SQL, start, sealed)
                if r["kind"] == "sessions"
            }
            counts = {
                r["hour_start"]: int(r["n"])
                for low, high in ranges
                for r in await conn.fetch(_HOUR_COUNTS_SQL, low, high)
            }
            due = [h for h, n in counts.items() if stored.get(h) != n]
            due += [h for h in _hours(start, sealed) if h not in counts and h not in stored]
            for hour in sorted(due):
                async with conn.transaction(isolation="repeatable_read"):
                    ids = await conn.fetchrow(_RANGE_IDS_SQL, [hour])
                    hour_sessions, hour_users = (ids["sessions"], ids["users"] or []) if ids else ([], [])
                    sessions, users = sketches_of(hour_sessions, hour_users)
                    await conn.executemany(
                        """INSERT INTO distinct_sketches (hour_start, kind, source_rows, sketch)
                           VALUES ($1, $2, $3, $4)
                           ON CONFLICT (hour_start, kind) DO UPDATE SET source_rows = excluded.source_rows,
                               sketch = excluded.sketch""",
                        [
                            (hour, "sessions", len(hour_sessions), sessions.serialize_compact()),
                            (hour, "users", len(hour_sessions), users.serialize_compact()),
                        ],
                    )
                made += 1
            await conn.execute("DELETE FROM distinct_sketches WHERE hour_start < $1", start)
        self.built += made
        return made

    async def window(self, conn: Connection, starts: Sequence[datetime], now: datetime) -> WindowEstimate:
        """Distinct sessions and users per bucket and over the whole window, and the exact
        sessions per hour, from the hours starting at ``starts[0]`` to the one holding `now`;
        bucket i covers the hours from ``starts[i]`` to ``starts[i + 1]`` (the last one to the
        hour holding `now`).

        One read of the stored sketches and one of the unsketched hours' rows (the hours not
        sealed yet, and any sealed hour without its sketch); every hour contributes one
        sketch (stored, or made from its rows), added in hour order to its bucket's union and
        to the window's. An HLL union's estimate depends on how its inputs are grouped, not
        only on their union; hour by hour in order, the window's total is the same whatever
        the buckets (a 7d window's total equals that of the same hours in one bucket).
        """
        last_hour = floor_hour(now)
        sealed = sealed_before(now)
        by_hour: dict[datetime, dict[str, bytes]] = {}
        hour_sessions: dict[datetime, int] = {}
        for r in await conn.fetch(_STORED_SQL, starts[0], last_hour):
            if r["hour_start"] < sealed:
                by_hour.setdefault(r["hour_start"], {})[r["kind"]] = r["sketch"]
                if r["kind"] == "sessions":
                    hour_sessions[r["hour_start"]] = int(r["source_rows"])
        hours = _hours(starts[0], last_hour + HOUR)
        exact = [h for h in hours if len(by_hour.get(h, {})) < len(KINDS)]
        exact_ids: dict[datetime, tuple[list[str], list[str]]] = {h: ([], []) for h in exact}
        if exact:
            for r in await conn.fetch(_RANGE_IDS_SQL, exact):
                exact_ids[r["hour_start"]] = (r["sessions"], r["users"] or [])
        for h in exact:
            hour_sessions[h] = len(exact_ids[h][0])  # one row per (hour, session)

        def hour_sketches(hour: datetime) -> tuple[hll_sketch, hll_sketch]:
            if hour in exact_ids:
                return sketches_of(*exact_ids[hour])
            stored = by_hour[hour]
            return hll_sketch.deserialize(stored["sessions"]), hll_sketch.deserialize(stored["users"])

        total = {kind: hll_union(LG_K) for kind in KINDS}
        ends = [*starts[1:], last_hour + HOUR]
        buckets = []
        for start, end in zip(starts, ends, strict=True):
            bucket_hours = _hours(start, end)
            unions = {kind: hll_union(LG_K) for kind in KINDS}
            for h in bucket_hours:
                for kind, hour_sketch in zip(KINDS, hour_sketches(h), strict=True):
                    unions[kind].update(hour_sketch)
                    total[kind].update(hour_sketch)
            bucket_exact = sum(1 for h in bucket_hours if h in exact_ids)
            buckets.append(_estimate(unions, len(bucket_hours) - bucket_exact, bucket_exact))
        return WindowEstimate(
            buckets=buckets,
            total=_estimate(total, len(hours) - len(exact), len(exact)),
            hour_sessions=hour_sessions,
        )
