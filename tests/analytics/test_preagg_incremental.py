"""Incremental pre-aggregation (services/analytics/preagg.py): after any interleaving of
ingests and passes, including late rows (old timestamps), duplicates the ingest refuses,
flushes committed while a pass runs and a flush that began before a pass and commits after
it, the tables the passes keep from the ingest's change log equal a recomputation of every
day from the raw rows; and no pass recomputed a day whole to get there."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.preagg import Preaggregator
from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import Client, analytics_app, connect  # noqa: F401
from tests.conftest import StartService
from tests.support import JWT_SECRET

SERVICE = (("authorization", f"Bearer {issue_token(JWT_SECRET, 'effects', role='service')}"),)
PROPERTIES: list[dict[str, str]] = [
    {},
    {"utm_source": "News", "utm_campaign": "Launch"},
    {"referrer": "https://www.example.com/a"},
    {"utm_medium": "email"},
    {"$referrer": "http://blog.example.org"},
]
_ids = itertools.count()

sessions = st.sampled_from(["s1", "s2", "s3", "s4"])
users = st.sampled_from(["", "u1", "u2", "u3"])
days = st.integers(0, 2)  # days back: 0 is today, older ones are late rows
instants = st.integers(0, 3)  # few instants per day: ties in occurred_at, broken by the id
event = st.tuples(sessions, users, days, instants, st.integers(0, len(PROPERTIES) - 1))
step = st.tuples(sessions, users, days, instants, st.integers(1, 9), st.sampled_from(["", "fx-a", "fx-b"]))
task = st.tuples(
    st.sampled_from(["u1", "u2", "u3"]), days, instants, st.sampled_from(["SUCCEEDED", "FAILED"])
)
ingest = st.one_of(
    st.tuples(st.just("events"), st.lists(event, min_size=1, max_size=6)),
    st.tuples(st.just("steps"), st.lists(step, min_size=1, max_size=6)),
    st.tuples(st.just("tasks"), st.lists(task, min_size=1, max_size=3)),
)
operation = st.one_of(
    ingest,
    st.just(("pass", None)),
    st.tuples(st.just("during"), ingest),  # committed while a pass runs
    st.tuples(st.just("held"), st.lists(event, min_size=1, max_size=4)),  # commits after a pass's snapshot
    st.just(("again", None)),  # a request re-sent, with one new event: duplicates refused
)


def at(now: datetime, day: int, instant: int) -> datetime:
    return (now - timedelta(days=day, minutes=30)).replace(second=instant, microsecond=0)


class Driver:
    def __init__(self, client: Client, preagg: Preaggregator) -> None:
        self.c = client
        self.preagg = preagg
        self.now = datetime.now(UTC)
        self.sent: list[analytics_pb2.RecordEventsRequest] = []

    async def run(self, op: tuple[str, Any]) -> None:
        kind, arg = op
        if kind == "pass":
            await self.incremental_pass()
        elif kind == "during":
            await asyncio.gather(self.incremental_pass(), self.run(arg))
        elif kind == "held":
            await self.held(arg)
        elif kind == "again":
            if self.sent:
                request = analytics_pb2.RecordEventsRequest()
                request.CopyFrom(self.sent[-1])
                request.events.append(self.event_request([("s1", "u1", 0, 0, 0)]).events[0])
                assert (await self.c.stub.RecordEvents(request, timeout=10)).accepted == 1
        elif kind == "events":
            request = self.event_request(arg)
            assert (await self.c.stub.RecordEvents(request, timeout=10)).accepted == len(arg)
            self.sent.append(request)
        elif kind == "steps":
            steps = analytics_pb2.RecordFunnelStepsRequest()
            for session, user, day, instant, k, effect in arg:
                s = steps.steps.add(
                    step_id=f"f{next(_ids)}",
                    session_id=session,
                    user_id=user,
                    step=FUNNEL_STEPS[k - 1],
                    effect_id=effect,
                )
                s.timestamp.FromDatetime(at(self.now, day, instant))
            assert (await self.c.stub.RecordFunnelSteps(steps, timeout=10)).accepted == len(arg)
        else:
            ends = analytics_pb2.RecordTaskEndsRequest()
            for user, day, instant, status in arg:
                t = ends.task_ends.add(
                    task_id=f"t{next(_ids)}", effect_id="fx", user_id=user, status=status, cost_seconds=1
                )
                t.timestamp.FromDatetime(at(self.now, day, instant))
            reply = await self.c.stub.RecordTaskEnds(ends, metadata=SERVICE, timeout=10)
            assert reply.accepted == len(arg)

    def event_request(
        self, events: list[tuple[str, str, int, int, int]]
    ) -> analytics_pb2.RecordEventsRequest:
        request = analytics_pb2.RecordEventsRequest()
        for session, user, day, instant, props in events:
            e = request.events.add(
                event_id=f"e{next(_ids)}", session_id=session, user_id=user, event_type="page_view"
            )
            e.properties.update(PROPERTIES[props])
            e.timestamp.FromDatetime(at(self.now, day, instant))
        return request

    async def incremental_pass(self) -> None:
        result = await self.preagg.run_once(min_age_seconds=0, full_check=False)
        assert result.refreshed == []  # every change came from the log, no day was recomputed

    async def held(self, events: list[tuple[str, str, int, int, int]]) -> None:
        """A flush that is under way when a pass starts and commits while the next one runs:
        blocked on a rollup row this test locks (the bucket of an event sent before)."""
        first = events[0]
        await self.run(("events", [first]))
        pool = self.c.app.pool
        assert pool is not None
        async with pool.acquire() as lock:
            transaction = lock.transaction()
            await transaction.start()
            await lock.execute(
                "SELECT 1 FROM rollup_events WHERE bucket_start = date_bin('5 minutes', $1, timestamptz 'epoch')"
                " AND event_type = 'page_view' AND page = '' FOR UPDATE",
                at(self.now, first[2], first[3]),
            )
            request = self.event_request(events)
            call = asyncio.ensure_future(self.c.stub.RecordEvents(request, timeout=30))
            pid = lock.get_server_pid()
            for _ in range(3000):  # until the flush waits for this lock
                waiting = await lock.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
                )
                if waiting:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the flush never waited for the locked rollup row")
            await self.incremental_pass()

            async def release() -> None:
                await asyncio.sleep(0.02)
                await transaction.rollback()

            await asyncio.gather(self.incremental_pass(), release())
        assert (await call).accepted == len(events)
        self.sent.append(request)


_TABLES = {
    "engagement_daily": "SELECT * FROM engagement_daily ORDER BY day, user_id",
    "session_sources": "SELECT * FROM session_sources ORDER BY session_id",
    "funnel_walks": "SELECT * FROM funnel_walks ORDER BY session_id, scope, start",
    "preagg_days": "SELECT day, events, steps, task_ends FROM preagg_days ORDER BY day",
    "engagement_scores": "SELECT * FROM engagement_scores ORDER BY window_name, user_id",
    "engagement_scores_as_of": "SELECT * FROM engagement_scores_as_of ORDER BY window_name",
}


async def snapshot(pool: asyncpg.Pool) -> dict[str, list[dict[str, Any]]]:
    async with pool.acquire() as conn:
        return {name: [dict(r) for r in await conn.fetch(sql)] for name, sql in _TABLES.items()}


def same(a: Any, b: Any) -> bool:
    """Equal; floats (the scores' points, summed in another order) within 1e-12 relative."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return bool(a == b)


async def recompute_everything(pool: asyncpg.Pool, preagg: Preaggregator) -> None:
    """Forget what was pre-aggregated and recompute every day from the raw rows."""
    async with pool.acquire() as conn:
        await conn.execute(
            "TRUNCATE engagement_daily, session_sources, funnel_walks, preagg_days, preagg_changes,"
            " engagement_scores, engagement_scores_as_of"
        )
    result = await preagg.run_once(min_age_seconds=0, full_check=True)
    assert result.changes == 0


async def assert_incremental_equals_full(pool: asyncpg.Pool, preagg: Preaggregator) -> None:
    incremental = await snapshot(pool)
    await recompute_everything(pool, preagg)
    full = await snapshot(pool)
    for name in _TABLES:
        assert len(incremental[name]) == len(full[name]), name
        for a, b in zip(incremental[name], full[name], strict=True):
            assert a.keys() == b.keys()
            assert all(same(a[k], b[k]) for k in a), (name, a, b)


Setup = tuple[Client, Preaggregator]


@pytest.fixture
async def setup(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> Setup:
    """One service for all of a test's examples (each starts from tables equal to a full
    recomputation: the previous example ended with one). No background pass."""
    app = await start_service(
        analytics_app(), analytics_preagg_interval_seconds=36_000, analytics_business_ttl_seconds=0
    )
    preagg: Preaggregator = analytics_app().state(app).business.preagg
    await preagg.run_once(full_check=True)  # today's scores stored: changed users' are re-stored
    return connect(app), preagg


async def play(setup: Setup, operations: list[tuple[str, Any]]) -> asyncpg.Pool:
    client, preagg = setup
    driver = Driver(client, preagg)
    for op in operations:
        await driver.run(op)
    await driver.incremental_pass()
    assert client.app.pool is not None
    await assert_incremental_equals_full(client.app.pool, preagg)
    return client.app.pool


@settings(  # how many examples, and whether new ones each run: the profile (tests/conftest.py)
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(operations=st.lists(operation, min_size=1, max_size=8))
async def test_incremental_passes_equal_a_full_recomputation(
    setup: Setup, operations: list[tuple[str, Any]]
) -> None:
    await play(setup, operations)


async def test_every_kind_of_change(setup: Setup) -> None:
    """One fixed interleaving with every kind of operation, on data that is not trivial."""
    events = [("s1", "", 0, 1, 1), ("s1", "u1", 0, 1, 0), ("s2", "u2", 1, 0, 2), ("s3", "u3", 2, 3, 3)]
    steps = [("s1", "u1", 0, 1, 1, "fx-a"), ("s1", "u1", 0, 2, 2, "fx-a"), ("s2", "u2", 1, 0, 4, "")]
    late = [("s1", "u2", 1, 0, 4), ("s2", "", 2, 0, 1)]  # older than the session's first event
    pool = await play(
        setup,
        [
            ("events", events),
            ("steps", steps),
            ("tasks", [("u1", 0, 0, "SUCCEEDED"), ("u2", 1, 0, "FAILED")]),
            ("pass", None),
            ("events", late),
            ("steps", [("s1", "u1", 0, 0, 1, "fx-b"), ("s2", "u2", 1, 1, 7, "")]),
            ("during", ("events", [("s4", "u3", 0, 2, 4)])),
            ("during", ("steps", [("s1", "u1", 0, 3, 3, "fx-a")])),
            ("held", [("s3", "u1", 0, 0, 2), ("s4", "", 2, 1, 1)]),
            ("again", None),
            ("tasks", [("u3", 2, 1, "SUCCEEDED")]),
        ],
    )
    tables = await snapshot(pool)
    assert [r["events"] for r in tables["preagg_days"]] == [3, 2, 6]  # 2 days ago, yesterday, today
    assert len({r["user_id"] for r in tables["engagement_daily"]}) == 3
    # Late first events moved s1 and s2 to their sources; a held flush's moved s4's.
    sources = {r["session_id"]: (r["source"], r["user_id"]) for r in tables["session_sources"]}
    assert sources == {
        "s1": ("blog.example.org", "u2"),
        "s2": ("news", "u2"),
        "s3": ("(direct)", "u3"),
        "s4": ("news", "u3"),
    }
    assert any(r["o2"] is not None for r in tables["funnel_walks"])


async def insert_unlogged(pool: asyncpg.Pool, session: str, user: str, when: datetime) -> None:
    """An event stored as an older replica (or the ingest before migration 0025) stores it:
    raw row and rollup, no change row."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "INSERT INTO events (event_id, session_id, user_id, event_type, occurred_at)"
            " VALUES ($1, $2, $3, 'page_view', $4)",
            f"old{next(_ids)}",
            session,
            user,
            when,
        )
        await conn.execute(
            "INSERT INTO rollup_events AS r (bucket_start, event_type, page, count)"
            " VALUES (date_bin('5 minutes', $1, timestamptz 'epoch'), 'page_view', '', 1)"
            " ON CONFLICT (bucket_start, event_type, page) DO UPDATE SET count = r.count + 1",
            when,
        )


async def test_rows_without_change_rows_are_recomputed(setup: Setup) -> None:
    """A day whose stored counts differ from the ingest's is recomputed whole: a day with
    changes at the next pass, a day put off (min_age) at a later one, another day when a
    report asks for it (check_days) or at the full check."""
    client, preagg = setup
    assert client.app.pool is not None
    pool = client.app.pool
    driver = Driver(client, preagg)
    now = driver.now
    today, yesterday, before = (at(now, d, 0).date() for d in (0, 1, 2))
    await driver.run(("events", [("s1", "u1", 0, 0, 1), ("s2", "u2", 1, 0, 0), ("s3", "u3", 2, 0, 0)]))
    await driver.incremental_pass()
    for day in (0, 1, 2):
        await insert_unlogged(pool, f"old-{day}", "u9", at(now, day, 5))
    assert (await preagg.run_once(min_age_seconds=0, full_check=False)).refreshed == []  # not seen
    await driver.run(("events", [("s1", "u1", 0, 1, 0)]))
    result = await preagg.run_once(min_age_seconds=0, full_check=False)
    assert result.changed_days == [today]
    assert result.refreshed == [today]
    assert (await preagg.run_once(min_age_seconds=0, full_check=False, check_days=[yesterday])).refreshed == [
        yesterday
    ]
    # Put off: recomputed less than min_age ago; then stale, and recomputed by a pass without changes.
    await insert_unlogged(pool, "old-0b", "u8", at(now, 0, 6))
    await driver.run(("events", [("s2", "u1", 0, 2, 0)]))
    result = await preagg.run_once(min_age_seconds=3600, full_check=False)
    assert (result.refreshed, result.skipped_recent) == ([], 1)
    assert (await preagg.run_once(min_age_seconds=0, full_check=False)).refreshed == [today]
    assert (await preagg.run_once(min_age_seconds=0, full_check=True)).refreshed == [before]
    await assert_incremental_equals_full(pool, preagg)
    async with pool.acquire() as conn:
        users = await conn.fetch("SELECT day, user_id FROM engagement_daily WHERE user_id IN ('u8', 'u9')")
    assert sorted((r["day"], r["user_id"]) for r in users) == [
        (before, "u9"),
        (yesterday, "u9"),
        (today, "u8"),
        (today, "u9"),
    ]
