"""Funnel pre-aggregation: the walks (services/analytics/funnel_walks.py) give the raw
computation's answers (funnel.funnel_between) on hand-built journeys, for every window,
conversion window and effect filter tried, after late steps too; and the service's funnel
report reads them."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.funnel import funnel_between
from services.analytics.funnel_walks import funnel_from_walks
from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import (
    ADMIN,
    FRESH,
    Client,
    analytics_app,
    connect,  # noqa: F401  (fixture)
)
from tests.conftest import StartService

NOW = datetime.now(UTC).replace(microsecond=0)
T = NOW - timedelta(hours=3)
OLD = T - timedelta(hours=30)

# (session, step, seconds after base, effect, base)
Journey = list[tuple[str, int, float, str, datetime]]


def journey(session: str, effect: str, *steps: tuple[int, float], base: datetime = T) -> Journey:
    return [(session, k, seconds, effect, base) for k, seconds in steps]


JOURNEYS: Journey = [
    *journey("all", "fx-a", *[(k, 10 * k * k) for k in range(1, 10)]),
    *journey("stops", "fx-b", (1, 0), (2, 20), (3, 60)),
    *journey("swapped", "fx-a", (1, 0), (3, 10), (2, 20)),
    *journey("again", "fx-a", (1, 0), (3, 10), (2, 20), (3, 40)),
    *journey("slow", "fx-b", (1, 0), (2, 3600), (3, 25 * 3600), base=OLD),
    *journey("twice", "fx-b", (1, 0), (1, 100), (2, 150)),
    *journey("skips", "fx-a", (1, 0), (2, 5), (4, 10)),
    *journey("headless", "fx-a", (2, 0), (3, 10)),
    *journey("same-instant", "fx-b", (1, 0), (2, 0), (3, 0)),
    *journey("restart", "fx-b", (1, 0), (1, 28 * 3600), (2, 29 * 3600), base=OLD),
    # Exactly at the 1 h conversion limit (counts), and one microsecond past it (does not).
    *journey("edge", "fx-c", (1, 0), (2, 3600), (3, 3600.000001)),
    # Effects mixed inside one session; and a session whose steps name no effect.
    ("mixed", 1, 0, "fx-a", T),
    ("mixed", 2, 30, "fx-b", T),
    ("mixed", 3, 80, "fx-a", T),
    ("mixed", 2, 90, "fx-a", T),
    *journey("no-effect", "", (1, 0), (2, 1), (3, 2)),
    # Step 1 in the future of the window's end: only long windows' ends reach it.
    *journey("late-start", "fx-a", (1, 0), (2, 60), base=NOW - timedelta(minutes=10)),
]
EFFECTS = ["", "fx-a", "fx-b", "fx-c", "fx-none"]
CONVERSIONS = [
    timedelta(minutes=1),
    timedelta(minutes=30),
    timedelta(hours=1),
    timedelta(hours=24),
    timedelta(days=30),
]
WINDOWS = [
    (NOW - timedelta(days=7), NOW),
    (NOW - timedelta(hours=24), NOW),
    (T, NOW),  # starts exactly at the first step 1 of most sessions (inclusive)
    (T + timedelta(seconds=1), NOW),  # just after it: "twice" starts at its second step 1
    (OLD, T - timedelta(seconds=1)),
    (OLD - timedelta(hours=1), OLD + timedelta(hours=29)),
    (NOW - timedelta(minutes=15), NOW),
]


async def record(c: Client, steps: Journey, prefix: str) -> None:
    request = analytics_pb2.RecordFunnelStepsRequest()
    for i, (session, k, seconds, effect, base) in enumerate(steps):
        item = request.steps.add(
            step_id=f"{prefix}-{i}",
            session_id=session,
            user_id=f"user-{session}",
            step=FUNNEL_STEPS[k - 1],
            effect_id=effect,
        )
        item.timestamp.FromDatetime(base + timedelta(seconds=seconds))
    assert (await c.stub.RecordFunnelSteps(request, timeout=10)).accepted == len(steps)


async def compare_everything(c: Client) -> int:
    assert c.app.pool is not None
    await analytics_app().state(c.app).business.preagg.run_once(min_age_seconds=0)
    compared = 0
    for (since, until), conversion, effect in itertools.product(WINDOWS, CONVERSIONS, EFFECTS):
        raw = await funnel_between(c.app.pool, since, until, conversion, effect)
        walked = await funnel_from_walks(c.app.pool, since, until, conversion, effect)
        assert walked == raw, (since, until, conversion, effect)
        compared += 1
    return compared


@pytest.fixture
async def client(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> Client:
    return connect(await start_service(analytics_app(), **FRESH))


async def test_walks_answer_like_the_raw_computation(client: Client) -> None:
    await record(client, JOURNEYS, "a")
    assert client.app.pool is not None
    # The data set is not trivial: the raw answers differ across the cases compared.
    week = await funnel_between(client.app.pool, NOW - timedelta(days=7), NOW, timedelta(hours=24))
    assert [week[k][0] for k in range(1, 10)] == [13, 12, 7, 1, 1, 1, 1, 1, 1]
    hour = await funnel_between(client.app.pool, NOW - timedelta(days=7), NOW, timedelta(hours=1), "fx-c")
    assert [hour[k][0] for k in (1, 2, 3)] == [1, 1, 0]
    assert await compare_everything(client) == len(WINDOWS) * len(CONVERSIONS) * len(EFFECTS)


async def test_late_steps_are_walked_again(client: Client) -> None:
    await record(client, JOURNEYS, "a")
    await compare_everything(client)
    # Late rows, with old timestamps: the missing step 3 of "swapped" and "skips", an earlier
    # step 1 of "twice" (changes its attempt's start), a new session days ago.
    late: Journey = [
        ("swapped", 3, 25, "fx-a", T),
        ("skips", 3, 7, "fx-a", T),
        ("twice", 1, -50, "fx-b", T),
        *journey("new", "fx-b", (1, 0), (2, 10), base=NOW - timedelta(days=3)),
    ]
    await record(client, late, "b")
    await compare_everything(client)
    assert client.app.pool is not None
    walked = await funnel_from_walks(client.app.pool, NOW - timedelta(days=7), NOW, timedelta(hours=24))
    assert [walked[k][0] for k in range(1, 5)] == [14, 13, 9, 2]


async def test_the_funnel_report_reads_the_walks(client: Client) -> None:
    await record(client, JOURNEYS, "a")
    reply = await client.stub.GetFunnelReport(
        analytics_pb2.GetFunnelReportRequest(window="7d", conversion_window="1h"), metadata=ADMIN, timeout=30
    )
    assert client.app.pool is not None
    async with client.app.pool.acquire() as conn:
        walks = await conn.fetchval("SELECT count(*) FROM funnel_walks WHERE scope = ''")
    assert walks == 15  # one per step-1 occurrence (twice and restart have two)
    raw = await funnel_between(
        client.app.pool,
        reply.generated_at.ToDatetime(tzinfo=UTC) - timedelta(days=7),
        reply.generated_at.ToDatetime(tzinfo=UTC),
        timedelta(hours=1),
    )
    assert [(s.sessions, s.median_seconds_from_previous) for s in reply.steps] == [
        (raw[k][0], raw[k][1] or 0.0) for k in range(1, 10)
    ]
