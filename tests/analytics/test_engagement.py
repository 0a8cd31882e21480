"""Engagement report and scores on hand-built data, through a real analytics service
(PostgreSQL, Redis) over gRPC and the REST edge. Expected figures are computed by hand
from the documented formula (services/analytics/engagement.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.auth import issue_token
from services.servicekit.errors import bad_request_violations
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import (
    ADMIN,
    FRESH,
    Client,
    analytics_app,
    auth,
    connect,  # noqa: F401  (fixture)
    day_at,
    today,
)
from tests.conftest import StartService
from tests.support import JWT_SECRET

SERVICE = (("authorization", f"Bearer {issue_token(JWT_SECRET, 'effects', role='service')}"),)
D = 2 ** (-1 / 7)  # one day of decay (half-life 7 days)


@pytest.fixture
async def client(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> Client:
    return connect(await start_service(analytics_app(), **FRESH))


async def build_journeys(c: Client) -> None:
    t = today()
    # u1: today 3 events, 1 effect run, 1 share; 7 days ago 60 events (capped at 50), 2 uploads.
    await c.events("u1", day_at(t, 0, 0, 1), 3)
    await c.steps("u1", day_at(t, 0, 0, 2), "processing_completed")
    await c.steps("u1", day_at(t, 0, 0, 3), "result_shared")
    await c.events("u1", day_at(t - timedelta(days=7)), 60)
    await c.steps("u1", day_at(t - timedelta(days=7)), "image_uploaded", 2)
    # u2: yesterday 2 events and a download.
    await c.events("u2", day_at(t - timedelta(days=1)), 2)
    await c.steps("u2", day_at(t - timedelta(days=1)), "result_downloaded")
    # u3: 2 days ago one event; an anonymous session the same day (not a user).
    await c.events("u3", day_at(t - timedelta(days=2)))
    await c.events(None, day_at(t - timedelta(days=2)), 5)
    # u4: 10 days ago 4 events (inside 30d, outside 7d).
    await c.events("u4", day_at(t - timedelta(days=10)), 4)
    # u5: only a funnel step worth no points (effect_viewed) today: active, score 0.
    await c.steps("u5", day_at(t, 0, 0, 4), "effect_viewed")


U1_30 = (3 * 1 + 5 + 8) + (50 * 1 + 2 * 2) * 0.5  # 43
U2 = (2 * 1 + 3) * D
U3 = 1 * D**2
U4 = 4 * D**10


async def report(c: Client, **fields: object) -> analytics_pb2.GetEngagementReportResponse:
    return await c.stub.GetEngagementReport(
        analytics_pb2.GetEngagementReportRequest(**fields), metadata=ADMIN, timeout=30
    )


async def test_report_30d(client: Client) -> None:
    await build_journeys(client)
    r = await report(client)
    t = today()
    assert (r.window, r.as_of_day) == ("30d", t.isoformat())
    assert r.active_users == 5
    # Active days: today (u1, u5), -1 (u2), -2 (u3), -7 (u1), -10 (u4): 6 user-days over 30 days.
    daily = {d.day: d.users for d in r.daily}
    assert len(daily) == 30 and sum(daily.values()) == 6
    assert daily[t.isoformat()] == 2 and daily[(t - timedelta(days=10)).isoformat()] == 1
    assert r.dau == pytest.approx(round(6 / 30, 4))
    assert (r.wau, r.mau) == (4, 5)  # u1, u2, u3, u5 in the last 7 days; u4 too in 30
    assert r.stickiness == pytest.approx(round((6 / 30) / 5, 4))
    assert r.returning_user_rate == pytest.approx(1 / 5)  # u1 only: 2 active days

    scores = sorted([0.0, round(U3, 2), round(U4, 2), round(U2, 2), round(U1_30, 2)])
    assert scores == [0.0, 0.82, 1.49, 4.53, 43.0]
    # Nearest rank over 5 users: p10, p20 -> 1st; p30, p40 -> 2nd; ... p90, p100 -> 5th.
    assert list(r.score_deciles) == [scores[i] for i in (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)]

    top = list(r.top_users)
    assert [u.user_id for u in top] == ["u1", "u2", "u4", "u3", "u5"]
    assert [u.score for u in top] == [43.0, 4.53, 1.49, 0.82, 0.0]
    assert [u.percentile for u in top] == [80.0, 60.0, 40.0, 20.0, 0.0]
    u1 = top[0]
    assert (u1.active_days, u1.last_active_day) == (2, t.isoformat())
    parts = {p.name: (p.count, p.weight, p.points) for p in u1.components}
    assert parts == {
        "events": (53, 1.0, 3 + 25.0),  # 3 today + 50 capped of 60, the latter at half weight
        "uploads": (2, 2.0, 2.0),
        "effect_runs": (1, 5.0, 5.0),
        "downloads": (0, 3.0, 0.0),
        "shares": (1, 8.0, 8.0),
    }
    assert r.next_page_token == ""


async def test_report_7d_excludes_older_days(client: Client) -> None:
    await build_journeys(client)
    r = await report(client, window="7d")
    assert r.active_users == 4  # u4 (10 days ago) is out
    assert [(u.user_id, u.score) for u in r.top_users] == [
        ("u1", 16.0),  # today's part only: 3 + 5 + 8
        ("u2", round(U2, 2)),
        ("u3", round(U3, 2)),
        ("u5", 0.0),
    ]
    assert r.returning_user_rate == 0.0
    assert r.dau == pytest.approx(round(4 / 7, 4))
    assert len(r.daily) == 7


async def test_top_users_pages(client: Client) -> None:
    await build_journeys(client)
    first = await report(client, page_size=2)
    assert [u.user_id for u in first.top_users] == ["u1", "u2"]
    assert first.next_page_token
    second = await report(client, page_size=2, page_token=first.next_page_token)
    assert [u.user_id for u in second.top_users] == ["u4", "u3"]
    third = await report(client, page_size=2, page_token=second.next_page_token)
    assert [u.user_id for u in third.top_users] == ["u5"] and third.next_page_token == ""
    # A token is tied to its window.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await report(client, window="7d", page_token=first.next_page_token)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request_violations(err.value)] == ["pageToken"]


async def test_day_boundaries_are_utc(client: Client) -> None:
    t = today()
    midnight = day_at(t, 0)
    await client.events("night", midnight - timedelta(microseconds=1))
    await client.events("night", midnight)
    r = await report(client, window="7d")
    daily = {d.day: d.users for d in r.daily}
    assert daily[t.isoformat()] == 1 and daily[(t - timedelta(days=1)).isoformat()] == 1
    (night,) = r.top_users
    assert night.active_days == 2
    assert night.score == round(1 + D, 2)
    assert r.returning_user_rate == 1.0


async def test_new_data_is_aggregated_on_the_next_report(client: Client) -> None:
    await client.events("late", day_at(today() - timedelta(days=3)))
    assert (await report(client)).active_users == 1
    # A late row with an old timestamp changes that day's counts: the day is recomputed.
    await client.events("later", day_at(today() - timedelta(days=3), 13))
    r = await report(client)
    assert r.active_users == 2
    assert {u.user_id for u in r.top_users} == {"late", "later"}


async def test_user_reads_only_own_score(client: Client) -> None:
    await build_journeys(client)
    mine = await client.stub.GetUserEngagement(
        analytics_pb2.GetUserEngagementRequest(user_id="u2"), metadata=auth("u2"), timeout=30
    )
    assert (mine.window, mine.score.user_id, mine.score.score) == ("30d", "u2", round(U2, 2))
    assert mine.score.percentile == 60.0
    assert mine.score.active_days == 1
    assert {p.name: p.count for p in mine.score.components}["downloads"] == 1

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.GetUserEngagement(
            analytics_pb2.GetUserEngagementRequest(user_id="u1"), metadata=auth("u2"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.GetUserEngagement(analytics_pb2.GetUserEngagementRequest(user_id="u1"), timeout=30)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    other = await client.stub.GetUserEngagement(
        analytics_pb2.GetUserEngagementRequest(user_id="u1", window="7d"), metadata=ADMIN, timeout=30
    )
    assert other.score.score == 16.0
    nobody = await client.stub.GetUserEngagement(
        analytics_pb2.GetUserEngagementRequest(user_id="ghost"), metadata=ADMIN, timeout=30
    )
    assert (nobody.score.user_id, nobody.score.score, nobody.score.active_days) == ("ghost", 0.0, 0)


async def test_report_is_admin_only(client: Client) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.GetEngagementReport(
            analytics_pb2.GetEngagementReportRequest(), metadata=auth("u1"), timeout=30
        )
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


BAD_REPORTS: list[tuple[dict[str, object], list[str]]] = [
    ({"window": "1h"}, ["window"]),
    ({"page_size": 101}, ["pageSize"]),
    ({"page_size": -1}, ["pageSize"]),
    ({"page_token": "not a token"}, ["pageToken"]),
    ({"page_token": "eyJvIjotMSwidyI6IjMwZCJ9"}, ["pageToken"]),  # {"o":-1,"w":"30d"}
]


async def test_bad_requests(client: Client) -> None:
    for fields, bad in BAD_REPORTS:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await report(client, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert [f for f, _ in bad_request_violations(err.value)] == bad
    for user_id in ["", "x" * 129, "a\x00b", "tab\tbed"]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stub.GetUserEngagement(
                analytics_pb2.GetUserEngagementRequest(user_id=user_id), metadata=ADMIN, timeout=30
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, user_id
        assert [f for f, _ in bad_request_violations(err.value)] == ["userId"]


async def test_through_the_edge(client: Client, start_edge: Callable[..., object]) -> None:
    import aiohttp

    await build_journeys(client)
    base = await start_edge(client.app)  # type: ignore[misc]
    admin = {"Authorization": ADMIN[0][1]}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/analytics/engagement?window=30d&pageSize=1", headers=admin) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["topUsers"][0]["userId"] == "u1" and body["mau"] == "5"
        assert body["nextPageToken"]
        async with http.get(
            f"{base}/api/analytics/engagement/users/u2", headers={"Authorization": auth("u2")[0][1]}
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["score"]["userId"] == "u2"
        async with http.get(
            f"{base}/api/analytics/engagement/users/u1", headers={"Authorization": auth("u2")[0][1]}
        ) as resp:
            assert resp.status == 403
        async with http.get(f"{base}/api/analytics/engagement?window=2d", headers=admin) as resp:
            assert resp.status == 400


async def task_ends(c: Client, user: str, at: datetime, *statuses: str) -> None:
    """Server facts as the effects service records them (RecordTaskEnds, service token)."""
    request = analytics_pb2.RecordTaskEndsRequest()
    for status in statuses:
        t = request.task_ends.add(
            task_id=f"t-{uuid.uuid4().hex}", effect_id="fx", user_id=user, status=status, cost_seconds=3
        )
        t.timestamp.FromDatetime(at)
    reply = await c.stub.RecordTaskEnds(request, metadata=SERVICE, timeout=10)
    assert reply.accepted == len(statuses)


async def test_effect_runs_are_counted_from_server_facts(client: Client) -> None:
    t = today()
    # srv: the server saw 2 succeeded runs and 1 failed one today; the browser claims 5 runs.
    await task_ends(client, "srv", day_at(t, 1), "SUCCEEDED", "SUCCEEDED", "FAILED")
    await client.steps("srv", day_at(t, 1), "processing_completed", 5)
    # brw: yesterday the browser reported 2 runs, the server none of that user (fallback).
    await client.steps("brw", day_at(t - timedelta(days=1)), "processing_completed", 2)
    # fail: the server reported only a failed task today; the browser claims a run: no run.
    await task_ends(client, "fail", day_at(t, 2), "FAILED")
    await client.steps("fail", day_at(t, 2), "processing_completed")
    # quiet: a succeeded task and nothing from the browser: still an active user.
    await task_ends(client, "quiet", day_at(t, 3), "SUCCEEDED")

    r = await report(client, window="7d")
    runs = {u.user_id: {p.name: p.count for p in u.components}["effect_runs"] for u in r.top_users}
    assert runs == {"srv": 2, "brw": 2, "fail": 0, "quiet": 1}
    scores = {u.user_id: u.score for u in r.top_users}
    assert scores == {"srv": 10.0, "brw": round(10 * D, 2), "fail": 0.0, "quiet": 5.0}
    assert r.active_users == 4

    # A task end arriving late for an aggregated day: that day is recomputed, the server wins.
    await task_ends(client, "brw", day_at(t - timedelta(days=1), 5), "SUCCEEDED")
    r = await report(client, window="7d")
    runs = {u.user_id: {p.name: p.count for p in u.components}["effect_runs"] for u in r.top_users}
    assert runs["brw"] == 1


async def test_stored_scores_equal_the_live_computation(client: Client) -> None:
    """The scores the pass stores (read by the reports) are the ones computed from the days."""
    from services.analytics import engagement

    await build_journeys(client)
    await report(client)  # a pass: days and today's scores stored
    assert client.app.pool is not None
    async with client.app.pool.acquire() as conn:
        for window in ("7d", "30d"):
            s = engagement.span(window, datetime.now(UTC))
            assert await conn.fetchval(engagement._AS_OF_SQL, window) == s.last
            for size, offset in ((2, 0), (2, 2), (10, 0)):
                live = await conn.fetch(engagement._REPORT_SQL, s.first, s.last, size, offset)
                stored = await conn.fetch(engagement._REPORT_STORED_SQL, window, size, offset)
                assert [dict(r) for r in stored] == [dict(r) for r in live]
                assert len(live) == 1 + min(size, max(0, (5 if window == "30d" else 4) - offset))
            for user in ("u1", "u4", "nobody"):
                live_user = await conn.fetchrow(engagement._USER_SQL, s.first, s.last, user)
                stored_user = await conn.fetchrow(engagement._USER_STORED_SQL, window, user)
                if live_user is None:
                    assert stored_user is None and (user, window) in {
                        ("nobody", "7d"),
                        ("nobody", "30d"),
                        ("u4", "7d"),
                    }
                else:
                    assert stored_user is not None
                    assert {k: v for k, v in dict(stored_user).items() if k != "window_name"} == dict(
                        live_user
                    )
