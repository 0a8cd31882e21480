"""GetFunnelReport end to end: steps recorded through RecordFunnelSteps on a real
analytics service (PostgreSQL, Redis), the report read over gRPC and the REST edge."""

from __future__ import annotations

import asyncio
import importlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics.vitals import FUNNEL_STEPS
from services.servicekit.errors import bad_request_violations
from services.servicekit.server import ServiceApp
from tests.conftest import EdgeFactory, StartService

SERVICE = "cosnap.analytics.v1.AnalyticsService"


def analytics_app() -> ModuleType:
    return importlib.import_module("services.analytics.app")


def app_state(app: ServiceApp) -> Any:
    return analytics_app().state(app)


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Analytics:
    app: ServiceApp
    channel: grpc.aio.Channel
    stub: analytics_pb2_grpc.AnalyticsServiceStub
    admin: tuple[tuple[str, str], ...]


@pytest.fixture
async def analytics(start_service: StartService, admin_token: str) -> AsyncIterator[Analytics]:
    app = await start_service(analytics_app())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    yield Analytics(app, channel, analytics_pb2_grpc.AnalyticsServiceStub(channel), auth(admin_token))
    await channel.close()


# --------------------------------------------------------------------------- the data set

NOW = datetime.now(UTC).replace(microsecond=0)
T = NOW - timedelta(hours=3)  # most attempts start here
OLD = T - timedelta(hours=30)  # 33 h ago: inside 7d, outside 24h

# (session, step number, seconds after the base, effect id, base)
Step = tuple[str, int, float, str, datetime]


def _session(session: str, effect: str, *steps: tuple[int, float], base: datetime = T) -> list[Step]:
    return [(session, number, seconds, effect, base) for number, seconds in steps]


STEPS: list[Step] = [
    # A: the whole funnel in order; 10, 20, ..., 80 s between steps.
    *_session(
        "A", "fx-a", (1, 0), (2, 10), (3, 30), (4, 60), (5, 100), (6, 150), (7, 210), (8, 280), (9, 360)
    ),
    # B: stops after step 3.
    *_session("B", "fx-b", (1, 0), (2, 20), (3, 60)),
    # C: step 3 before step 2 -> reaches step 2 only.
    *_session("C", "fx-a", (1, 0), (3, 10), (2, 20)),
    # D: out of order, then step 3 again after step 2 -> reaches step 3 (20 s after step 2).
    *_session("D", "fx-a", (1, 0), (3, 10), (2, 20), (3, 40)),
    # E: step 1 33 h ago, step 2 an hour later, step 3 25 h after step 1 (outside 24 h).
    *_session("E", "fx-b", (1, 0), (2, 3600), (3, 25 * 3600), base=OLD),
    # F: step 1 repeated; step 2 counts from the first step 1.
    *_session("F", "fx-b", (1, 0), (1, 100), (2, 150)),
    # G: step 4 without step 3 -> reaches step 2.
    *_session("G", "fx-a", (1, 0), (2, 5), (4, 10)),
    # I: no step 1 -> not in the funnel.
    *_session("I", "fx-a", (2, 0), (3, 10)),
    # J: steps 1 and 2 in the same instant -> in order, 0 s.
    *_session("J", "fx-b", (1, 0), (2, 0)),
    # L: step 1 33 h ago, again 5 h ago, step 2 4 h ago: with 7d the first step 1 starts the
    # attempt and step 2 is 29 h later (outside 24 h); with 24h the second step 1 is the first
    # inside the window and step 2 counts (3600 s).
    *_session("L", "fx-b", (1, 0), (1, 28 * 3600), (2, 29 * 3600), base=OLD),
]
# K: effects mixed: fx-a, fx-b, fx-a.
STEPS += [("K", 1, 0, "fx-a", T), ("K", 2, 30, "fx-b", T), ("K", 3, 80, "fx-a", T)]


async def record_steps(a: Analytics, steps: list[Step], run: str, first_id: int = 0) -> None:
    """Record `steps` as sessions `<run>-<session>` with step ids `<run>-<first_id + i>`."""
    request = analytics_pb2.RecordFunnelStepsRequest()
    for i, (session, number, seconds, effect, base) in enumerate(steps, start=first_id):
        item = request.steps.add(
            step_id=f"{run}-{i}",
            session_id=f"{run}-{session}",
            user_id=f"user-{session}",
            step=FUNNEL_STEPS[number - 1],
            effect_id=effect,
        )
        item.timestamp.FromDatetime(base + timedelta(seconds=seconds))
    reply = await a.stub.RecordFunnelSteps(request, timeout=10)
    assert reply.accepted == len(steps)


async def report(a: Analytics, **fields: str) -> analytics_pb2.GetFunnelReportResponse:
    return await a.stub.GetFunnelReport(
        analytics_pb2.GetFunnelReportRequest(**fields), metadata=a.admin, timeout=10
    )


def summary(reply: analytics_pb2.GetFunnelReportResponse) -> list[tuple[str, int]]:
    return [(s.step, s.sessions) for s in reply.steps]


def expect_counts(reply: analytics_pb2.GetFunnelReportResponse, counts: list[int]) -> None:
    assert [s.position for s in reply.steps] == list(range(1, 10))
    assert [s.step for s in reply.steps] == list(FUNNEL_STEPS)
    assert [s.sessions for s in reply.steps] == counts + [0] * (9 - len(counts)), summary(reply)


@pytest.fixture
async def loaded(analytics: Analytics) -> Analytics:
    await record_steps(analytics, STEPS, uuid.uuid4().hex[:8])
    return analytics


# --------------------------------------------------------------------------- the numbers


async def test_default_window_ordered_funnel(loaded: Analytics) -> None:
    reply = await report(loaded)
    assert (reply.window, reply.conversion_window, reply.effect_id) == ("7d", "24h", "")
    # Step 1: A B C D E F G J K L; step 2: all but L; step 3: A B D K; then A alone.
    expect_counts(reply, [10, 9, 4, 1, 1, 1, 1, 1, 1])
    s = reply.steps
    assert s[0].conversion_from_start == 1.0 and s[0].conversion_from_previous == 1.0
    assert s[0].drop_off == 0 and s[0].drop_off_rate == 0.0 and s[0].median_seconds_from_previous == 0.0
    assert s[1].conversion_from_start == pytest.approx(0.9)
    assert s[1].conversion_from_previous == pytest.approx(0.9)
    assert (s[1].drop_off, s[1].drop_off_rate) == (1, pytest.approx(0.1))
    assert s[2].conversion_from_start == pytest.approx(0.4)
    assert s[2].conversion_from_previous == pytest.approx(4 / 9)
    assert (s[2].drop_off, s[2].drop_off_rate) == (5, pytest.approx(5 / 9))
    assert (s[3].drop_off, s[3].drop_off_rate) == (3, pytest.approx(0.75))
    assert s[3].conversion_from_start == pytest.approx(0.1)
    assert s[4].conversion_from_previous == 1.0 and s[4].drop_off == 0
    # Medians: step 2 over A10 B20 C20 D20 E3600 F150 G5 J0 K30 -> 20;
    # step 3 over A20 B40 D20 K50 -> (20 + 40) / 2; steps 4..9: A's 30, 40, ..., 80.
    assert s[1].median_seconds_from_previous == pytest.approx(20)
    assert s[2].median_seconds_from_previous == pytest.approx(30)
    assert [x.median_seconds_from_previous for x in s[3:]] == pytest.approx([30, 40, 50, 60, 70, 80])
    assert reply.biggest_drop_off_step == "effect_started"
    assert reply.generated_at.ToDatetime(tzinfo=UTC) >= NOW - timedelta(seconds=5)


async def test_window_24h_starts_at_the_first_step_1_inside_it(loaded: Analytics) -> None:
    reply = await report(loaded, window="24h")
    # E and L's first step 1 are 33 h old; L's second step 1 (5 h ago) opens its attempt.
    expect_counts(reply, [9, 9, 4, 1, 1, 1, 1, 1, 1])
    assert reply.steps[1].drop_off == 0 and reply.steps[1].conversion_from_previous == 1.0
    # Step 2: A10 B20 C20 D20 F150 G5 J0 K30 L3600 -> 20.
    assert reply.steps[1].median_seconds_from_previous == pytest.approx(20)
    assert reply.biggest_drop_off_step == "effect_started"


async def test_short_conversion_window_is_inclusive(loaded: Analytics) -> None:
    reply = await report(loaded, conversion_window="1m")
    # Within 60 s of step 1 (inclusive): step 2 A B C D G J K; step 3 A(30) B(60) D(40);
    # step 4 A(60); A's step 5 at 100 s is too late.
    expect_counts(reply, [10, 7, 3, 1])
    assert reply.conversion_window == "1m"
    assert reply.steps[1].median_seconds_from_previous == pytest.approx(20)  # 0 5 10 20 20 20 30
    assert reply.steps[4].median_seconds_from_previous == 0.0
    assert reply.steps[4].drop_off == 1 and reply.steps[4].drop_off_rate == 1.0
    assert reply.biggest_drop_off_step == "effect_started"  # 7 -> 3


async def test_effect_filter_only_sees_that_effects_steps(loaded: Analytics) -> None:
    reply = await report(loaded, effect_id="fx-a")
    # fx-a steps: A (all), C, D, G, K's steps 1 and 3 (its step 2 is fx-b) -> K stops at 1.
    expect_counts(reply, [5, 4, 2, 1, 1, 1, 1, 1, 1])
    assert reply.effect_id == "fx-a"
    assert reply.steps[1].median_seconds_from_previous == pytest.approx(15)  # 5 10 20 20
    assert reply.steps[2].median_seconds_from_previous == pytest.approx(20)  # A20 D20
    assert reply.biggest_drop_off_step == "effect_started"  # 4 -> 2
    other = await report(loaded, effect_id="fx-b", window="30d")
    # B (1,2,3), E (1,2), F (1,2), J (1,2), L (1 only).
    expect_counts(other, [5, 4, 1])
    assert other.biggest_drop_off_step == "effect_started"
    none = await report(loaded, effect_id="no-such-effect")
    expect_counts(none, [])
    assert none.biggest_drop_off_step == ""
    assert all(x.conversion_from_start == 0.0 and x.drop_off_rate == 0.0 for x in none.steps)


async def test_empty_funnel(analytics: Analytics) -> None:
    reply = await report(analytics, window="15m")
    expect_counts(reply, [])
    assert reply.window == "15m" and reply.biggest_drop_off_step == ""


async def test_reports_are_cached_with_single_flight(analytics: Analytics) -> None:
    """A burst of identical requests costs one computation; the answer is served from the
    cache until its TTL runs out, and each (window, conversion window, effect) is its own entry."""
    funnels = app_state(analytics.app).funnels
    run = uuid.uuid4().hex[:8]
    await record_steps(analytics, _session("A", "fx-a", (1, 0), (2, 10)), run)
    before = funnels.computations
    replies = await asyncio.gather(*(report(analytics, window="24h") for _ in range(20)))
    assert funnels.computations == before + 1
    for reply in replies:
        expect_counts(reply, [1, 1])

    # A later step is not in the cached answer, but a different key computes afresh.
    await record_steps(analytics, [("A", 3, 20, "fx-a", T)], run, first_id=2)
    expect_counts(await report(analytics, window="24h"), [1, 1])
    assert funnels.computations == before + 1
    expect_counts(await report(analytics, window="7d"), [1, 1, 1])
    assert funnels.computations == before + 2


async def test_ttl_zero_disables_the_cache(start_service: StartService, admin_token: str) -> None:
    app = await start_service(analytics_app(), analytics_funnel_ttl_seconds=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        a = Analytics(app, channel, analytics_pb2_grpc.AnalyticsServiceStub(channel), auth(admin_token))
        run = uuid.uuid4().hex[:8]
        await record_steps(a, _session("A", "fx-a", (1, 0)), run)
        expect_counts(await report(a, window="24h"), [1])
        await record_steps(a, [("A", 2, 10, "fx-a", T)], run, first_id=1)
        expect_counts(await report(a, window="24h"), [1, 1])
    assert app_state(app).funnels.computations == 2


# --------------------------------------------------------------------------- errors and access


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"window": "2h"}, "window"),
        ({"window": "7D"}, "window"),
        ({"conversion_window": "0m"}, "conversionWindow"),
        ({"conversion_window": "31d"}, "conversionWindow"),
        ({"conversion_window": "1.5h"}, "conversionWindow"),
        ({"conversion_window": "24"}, "conversionWindow"),
    ],
)
async def test_bad_windows_are_invalid_argument(
    analytics: Analytics, fields: dict[str, str], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await report(analytics, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request_violations(err.value)] == [field]


async def test_accepted_conversion_windows(analytics: Analytics) -> None:
    for text in ("1m", "90m", "36h", "30d", "720h"):
        assert (await report(analytics, conversion_window=text)).conversion_window == text


async def test_admin_only(analytics: Analytics, user_token: str) -> None:
    request = analytics_pb2.GetFunnelReportRequest()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.GetFunnelReport(request, timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await analytics.stub.GetFunnelReport(request, metadata=auth(user_token), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


# --------------------------------------------------------------------------- REST edge


@pytest.fixture
async def edge(analytics: Analytics, make_edge: EdgeFactory) -> TestClient[Any, Any]:
    return await make_edge(backends={SERVICE: f"127.0.0.1:{analytics.app.port}"})


async def test_rest_funnel_report(loaded: Analytics, edge: TestClient[Any, Any], admin_token: str) -> None:
    headers = {"Authorization": f"Bearer {admin_token}"}
    response = await edge.get(
        "/api/analytics/funnel?window=30d&conversionWindow=1m&effectId=fx-a", headers=headers
    )
    assert response.status == 200, await response.text()
    body = await response.json()
    assert (body["window"], body["conversionWindow"], body["effectId"]) == ("30d", "1m", "fx-a")
    # fx-a within 60 s: step 2 A C D G; step 3 A(30) D(40); step 4 A(60).
    sessions = [int(step.get("sessions", "0")) for step in body["steps"]]
    assert sessions == [5, 4, 2, 1, 0, 0, 0, 0, 0]
    assert body["steps"][1]["step"] == "effect_viewed"
    assert body["steps"][1]["medianSecondsFromPrevious"] == pytest.approx(15)
    assert body["biggestDropOffStep"] == "effect_started"
    assert "generatedAt" in body


async def test_rest_errors(
    analytics: Analytics, edge: TestClient[Any, Any], admin_token: str, user_token: str
) -> None:
    response = await edge.get(
        "/api/analytics/funnel?window=2h", headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert response.status == 400
    body = await response.json()
    assert body["code"] == 3
    violations = [v for d in body.get("details", []) for v in d.get("fieldViolations", [])]
    assert [v["field"] for v in violations] == ["window"]
    response = await edge.get(
        "/api/analytics/funnel?conversionWindow=45d", headers={"Authorization": f"Bearer {admin_token}"}
    )
    assert response.status == 400
    assert (await edge.get("/api/analytics/funnel")).status == 401
    response = await edge.get("/api/analytics/funnel", headers={"Authorization": f"Bearer {user_token}"})
    assert response.status == 403
