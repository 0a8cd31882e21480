"""Revenue (admin token, idempotent by orderId, exact decimals) and
server facts from effects (service token only: a browser cannot forge one), on a
real analytics service through gRPC and the REST edge."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp
from tests.conftest import StartService
from tests.support import JWT_SECRET

SERVICE = issue_token(JWT_SECRET, "effects", role="service")
ADMIN = issue_token(JWT_SECRET, "admin-1", role="admin")
USER = issue_token(JWT_SECRET, "user-1", role="user")


def auth(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
async def app(start_service: StartService) -> AsyncIterator[ServiceApp]:
    yield await start_service(analytics_app)


@pytest.fixture
async def stub(app: ServiceApp) -> AsyncIterator[analytics_pb2_grpc.AnalyticsServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield analytics_pb2_grpc.AnalyticsServiceStub(channel)


async def fetch(app: ServiceApp, query: str, *args: Any) -> list[Any]:
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        return list(await conn.fetch(query, *args))


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def test_revenue_is_stored_exactly_once_per_order(
    app: ServiceApp, stub: analytics_pb2_grpc.AnalyticsServiceStub
) -> None:
    orders = [
        analytics_pb2.Revenue(order_id=uid("o"), user_id="u-1", amount="9.9", currency="USD", effect_id="fx"),
        analytics_pb2.Revenue(order_id=uid("o"), user_id="u-1", amount="500", currency="JPY"),
        analytics_pb2.Revenue(
            order_id=uid("o"), user_id="u-2", amount="1.250", currency="KWD", session_id="s"
        ),
    ]
    request = analytics_pb2.RecordRevenueRequest(revenue=orders)
    reply = await stub.RecordRevenue(request, metadata=auth(ADMIN))
    assert (reply.accepted, reply.duplicates) == (3, 0)
    # The payment side re-sends (a retry): duplicates, nothing new;
    # and a changed amount under the same orderId does not overwrite the first report.
    changed = analytics_pb2.Revenue(order_id=orders[0].order_id, user_id="u-1", amount="1", currency="USD")
    reply = await stub.RecordRevenue(
        analytics_pb2.RecordRevenueRequest(revenue=[*orders, changed]), metadata=auth(ADMIN)
    )
    assert (reply.accepted, reply.duplicates) == (0, 4)
    rows = await fetch(
        app, "SELECT order_id, amount, currency, effect_id, session_id FROM revenue ORDER BY amount"
    )
    assert [(r["amount"], r["currency"]) for r in rows] == [
        (Decimal("1.250"), "KWD"),
        (Decimal("9.90"), "USD"),
        (Decimal("500"), "JPY"),
    ]
    assert [str(r["amount"]) for r in rows] == ["1.250", "9.90", "500"]  # the currency's minor units
    # Exact sums: ten thousand cents add up to the cent.
    cents = [
        analytics_pb2.Revenue(order_id=uid("c"), user_id="u-3", amount="0.01", currency="EUR")
        for _ in range(300)
    ]
    await stub.RecordRevenue(analytics_pb2.RecordRevenueRequest(revenue=cents), metadata=auth(ADMIN))
    (total,) = await fetch(app, "SELECT sum(amount) AS s FROM revenue WHERE currency = 'EUR'")
    assert total["s"] == Decimal("3.00")


async def test_revenue_needs_an_admin_or_a_service_token(
    app: ServiceApp, stub: analytics_pb2_grpc.AnalyticsServiceStub
) -> None:
    """Issue 11: admin or service token (the payment side); a user token, even one whose
    subject is the revenue's user, and no token are refused, and nothing is stored."""

    def request() -> analytics_pb2.RecordRevenueRequest:
        return analytics_pb2.RecordRevenueRequest(
            revenue=[analytics_pb2.Revenue(order_id=uid("o"), user_id="user-1", amount="1", currency="USD")]
        )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordRevenue(request())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordRevenue(request(), metadata=auth(USER))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await fetch(app, "SELECT 1 FROM revenue") == []

    by_admin, by_service = request(), request()
    assert (await stub.RecordRevenue(by_admin, metadata=auth(ADMIN))).accepted == 1
    assert (await stub.RecordRevenue(by_service, metadata=auth(SERVICE))).accepted == 1
    rows = await fetch(app, "SELECT order_id FROM revenue ORDER BY order_id")
    assert sorted(r["order_id"] for r in rows) == sorted(
        [by_admin.revenue[0].order_id, by_service.revenue[0].order_id]
    )


async def test_task_ends_are_server_facts_only_a_service_can_write(
    app: ServiceApp, stub: analytics_pb2_grpc.AnalyticsServiceStub
) -> None:
    task = analytics_pb2.TaskEnd(
        task_id=uid("t"),
        effect_id="fx-1",
        user_id="u-1",
        status="SUCCEEDED",
        cost_seconds=42.5,
        cost_coins="1.25",
        region="cn",
    )
    request = analytics_pb2.RecordTaskEndsRequest(task_ends=[task])
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (USER, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordTaskEnds(request, metadata=auth(token) if token else None)
        assert err.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as err:  # not even an admin: only the effects service
        await stub.RecordTaskEnds(request, metadata=auth(ADMIN))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await fetch(app, "SELECT 1 FROM task_ends") == []

    reply = await stub.RecordTaskEnds(request, metadata=auth(SERVICE))
    assert (reply.accepted, reply.duplicates) == (1, 0)
    reply = await stub.RecordTaskEnds(request, metadata=auth(SERVICE))  # the effects side retried
    assert (reply.accepted, reply.duplicates) == (0, 1)
    (row,) = await fetch(app, "SELECT * FROM task_ends")
    assert (row["task_id"], row["effect_id"], row["user_id"], row["status"]) == (
        task.task_id,
        "fx-1",
        "u-1",
        "SUCCEEDED",
    )
    assert (row["cost_seconds"], row["cost_coins"], row["region"]) == (
        Decimal("42.500"),
        Decimal("1.25"),
        "cn",
    )


async def test_revenue_through_the_edge_and_no_rest_path_for_task_ends(
    app: ServiceApp, start_edge: Any
) -> None:
    base = await start_edge(app)
    body = {"revenue": [{"orderId": uid("o"), "userId": "u-1", "amount": "19.99", "currency": "EUR"}]}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/api/analytics/revenue", json=body) as resp:
            assert resp.status == 401
        async with http.post(
            f"{base}/api/analytics/revenue", json=body, headers={"Authorization": f"Bearer {USER}"}
        ) as resp:
            assert resp.status == 403
        async with http.post(
            f"{base}/api/analytics/revenue", json=body, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            assert resp.status == 200
            assert await resp.json() == {"accepted": 1, "duplicates": 0}
        bad = {"revenue": [{"orderId": uid("o"), "userId": "u-1", "amount": "19.999", "currency": "EUR"}]}
        async with http.post(
            f"{base}/api/analytics/revenue", json=bad, headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            assert resp.status == 400
            payload = await resp.json()
        assert [v["field"] for v in payload["details"][0]["fieldViolations"]] == ["revenue[0].amount"]
        # A browser cannot reach the internal RPC through the edge, whatever it sends.
        fact = {"taskEnds": [{"taskId": "forged", "effectId": "fx", "userId": "u", "status": "SUCCEEDED"}]}
        for path in ("/api/analytics/task-ends", "/cosnap.analytics.v1.AnalyticsService/RecordTaskEnds"):
            async with http.post(
                f"{base}{path}", json=fact, headers={"Authorization": f"Bearer {SERVICE}"}
            ) as resp:
                assert resp.status in (404, 405, 415), (path, resp.status)
    assert await fetch(app, "SELECT 1 FROM task_ends") == []
