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
row count moved (a late row with an old timestamp); until the next pass such an
hour's sketch misses the late rows.

Windows of an hour or less are counted exactly (cheap); see ``dashboard.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

import asyncpg
from datasketches import hll_sketch, hll_union, tgt_hll_type

from services.servicekit.db import Connection

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
_HOUR_IDS_SQL = """
SELECT session_id, user_id FROM rollup_sessions WHERE hour_start = $1
"""
_RANGE_IDS_SQL = """
SELECT session_id, user_id FROM rollup_sessions WHERE hour_start = ANY($1::timestamptz[])
"""
_RANGE_ROWS_SQL = """
SELECT hour_start, session_id, user_id FROM rollup_sessions WHERE hour_start = ANY($1::timestamptz[])
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


def sketches_of(rows: Iterable[asyncpg.Record]) -> tuple[hll_sketch, hll_sketch]:
    sessions, users = new_sketch(), new_sketch()
    for row in rows:
        sessions.update(row["session_id"])
        user = row["user_id"]
        if user:
            users.update(user)
    return sessions, users


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

    async def build(self, now: datetime, since: datetime) -> int:
        """Make the sketches due for the sealed hours from `since`; returns how many hours.

        The hours of the last :data:`RECHECK` are recounted every pass and remade when
        their row count moved; older hours are made once when they have no sketch (an
        empty hour gets an empty sketch, so it is not looked at again).
        """
        sealed = sealed_before(now)
        start = floor_hour(since)
        recheck_from = max(start, sealed - RECHECK)
        made = 0
        async with self._pool.acquire() as conn:
            stored = {
                r["hour_start"]: int(r["source_rows"])
                for r in await conn.fetch(_STORED_SQL, start, sealed)
                if r["kind"] == "sessions"
            }
            counts = {
                r["hour_start"]: int(r["n"]) for r in await conn.fetch(_HOUR_COUNTS_SQL, recheck_from, sealed)
            }
            due = [h for h, n in counts.items() if stored.get(h) != n]
            due += [h for h in _hours(recheck_from, sealed) if h not in counts and h not in stored]
            due += [h for h in _hours(start, recheck_from) if h not in stored]
            for hour in sorted(due):
                async with conn.transaction(isolation="repeatable_read"):
                    rows = await conn.fetch(_HOUR_IDS_SQL, hour)
                    sessions, users = sketches_of(rows)
                    await conn.executemany(
                        """INSERT INTO distinct_sketches (hour_start, kind, source_rows, sketch)
                           VALUES ($1, $2, $3, $4)
                           ON CONFLICT (hour_start, kind) DO UPDATE SET source_rows = excluded.source_rows,
                               sketch = excluded.sketch""",
                        [
                            (hour, "sessions", len(rows), sessions.serialize_compact()),
                            (hour, "users", len(rows), users.serialize_compact()),
                        ],
                    )
                made += 1
            await conn.execute("DELETE FROM distinct_sketches WHERE hour_start < $1", start)
        self.built += made
        return made

    async def hour_counts(self, conn: Connection, start: datetime, now: datetime) -> dict[datetime, int]:
        """Exact distinct sessions per hour from `start`: the row count kept with a sealed
        hour's sketch, ``count(*)`` for the others."""
        sealed = sealed_before(now)
        counts = {
            r["hour_start"]: int(r["source_rows"])
            for r in await conn.fetch(_STORED_SQL, start, floor_hour(now))
            if r["kind"] == "sessions" and r["hour_start"] < sealed
        }
        missing = [h for h in _hours(start, floor_hour(now) + HOUR) if h not in counts]
        if missing:
            for r in await conn.fetch(
                "SELECT hour_start, count(*)::bigint AS n FROM rollup_sessions"
                " WHERE hour_start = ANY($1::timestamptz[]) GROUP BY hour_start",
                missing,
            ):
                counts[r["hour_start"]] = int(r["n"])
        return counts

    async def estimate(self, conn: Connection, start: datetime, now: datetime) -> Estimate:
        """Distinct sessions and users in the hours from `start` (an hour start) to the one holding `now`."""
        return (await self.estimate_buckets(conn, [start], now))[0]

    async def estimate_buckets(
        self, conn: Connection, starts: Sequence[datetime], now: datetime
    ) -> list[Estimate]:
        """One estimate per bucket: bucket i covers the hours from starts[i] to starts[i+1]
        (the last one to the hour holding `now`)."""
        last_hour = floor_hour(now)
        sealed = sealed_before(now)
        stored = await conn.fetch(_STORED_SQL, starts[0], last_hour)
        by_hour: dict[datetime, dict[str, bytes]] = {}
        for r in stored:
            if r["hour_start"] < sealed:
                by_hour.setdefault(r["hour_start"], {})[r["kind"]] = r["sketch"]
        ends = [*starts[1:], last_hour + HOUR]
        out = []
        for start, end in zip(starts, ends, strict=True):
            hours = _hours(start, end)
            unions = {kind: hll_union(LG_K) for kind in KINDS}
            exact = [h for h in hours if len(by_hour.get(h, {})) < len(KINDS)]
            for h in hours:
                if h not in exact:
                    for kind in KINDS:
                        unions[kind].update(hll_sketch.deserialize(by_hour[h][kind]))
            if exact:
                sessions, users = sketches_of(await conn.fetch(_RANGE_IDS_SQL, exact))
                unions["sessions"].update(sessions)
                unions["users"].update(users)
            out.append(
                Estimate(
                    sessions=round(unions["sessions"].get_estimate()),
                    users=round(unions["users"].get_estimate()),
                    sketched_hours=len(hours) - len(exact),
                    exact_hours=len(exact),
                )
            )
        return out

    async def window(self, conn: Connection, starts: Sequence[datetime], now: datetime) -> WindowEstimate:
        """Per bucket (as :meth:`estimate_buckets`), the whole window (as :meth:`estimate`
        from ``starts[0]``) and the exact sessions per hour (as :meth:`hour_counts`) with one
        read of the stored sketches and of the unsketched hours' rows, each hour's sketch
        deserialized once and added to its bucket's union and the window's."""
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
        exact_rows: dict[datetime, list[asyncpg.Record]] = {h: [] for h in exact}
        if exact:
            for r in await conn.fetch(_RANGE_ROWS_SQL, exact):
                exact_rows[r["hour_start"]].append(r)
        for h in exact:
            hour_sessions[h] = len(exact_rows[h])  # one row per (hour, session)
        total = {kind: hll_union(LG_K) for kind in KINDS}
        ends = [*starts[1:], last_hour + HOUR]
        buckets = []
        for start, end in zip(starts, ends, strict=True):
            bucket_hours = _hours(start, end)
            unions = {kind: hll_union(LG_K) for kind in KINDS}
            bucket_exact = [h for h in bucket_hours if h in exact_rows]
            for h in bucket_hours:
                if h not in exact_rows:
                    for kind in KINDS:
                        hour_sketch = hll_sketch.deserialize(by_hour[h][kind])
                        unions[kind].update(hour_sketch)
                        total[kind].update(hour_sketch)
            if bucket_exact:
                sessions, users = sketches_of(r for h in bucket_exact for r in exact_rows[h])
                for kind, exact_sketch in (("sessions", sessions), ("users", users)):
                    unions[kind].update(exact_sketch)
                    total[kind].update(exact_sketch)
            buckets.append(_estimate(unions, len(bucket_hours) - len(bucket_exact), len(bucket_exact)))
        return WindowEstimate(
            buckets=buckets,
            total=_estimate(total, len(hours) - len(exact), len(exact)),
            hour_sessions=hour_sessions,
        )
