"""Client-reported alerts and alert management through the REST edge and
gRPC: validation, deduplication by alertId, grouping by (metric, severity,
page) with occurrences, keyset pagination stable under inserts, resolve with
a note, notifications for new groups and resolutions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
import pytest

from cosnap.monitoring.v1 import monitoring_pb2
from tests.monitoring.conftest import Connect, ConnectClient, Receiver, StartMonitoring

Edge = Callable[..., Awaitable[str]]


def alert(
    alert_id: str, metric: str = "LCP", severity: str = "critical", page: str = "/effects", **kw: Any
) -> dict[str, Any]:
    return {
        "alertId": alert_id,
        "sessionId": kw.pop("sessionId", "s-1"),
        "metric": metric,
        "severity": severity,
        "threshold": 4000,
        "actualValue": kw.pop("actualValue", 5200),
        "page": page,
        **kw,
    }


async def post(
    session: aiohttp.ClientSession, url: str, body: Any, token: str | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(url, json=body, headers=headers) as reply:
        return reply.status, await reply.json()


async def get(
    session: aiohttp.ClientSession, url: str, token: str | None = None, **params: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, params=params, headers=headers) as reply:
        return reply.status, await reply.json()


@pytest.fixture
async def edge(
    start_monitoring: StartMonitoring, start_edge: Edge, make_receiver: Callable[..., Awaitable[Receiver]]
) -> Any:
    receiver = await make_receiver()
    app = await start_monitoring(monitoring_webhook_urls=receiver.url, monitoring_notify_backoff_seconds=0.01)
    base = await start_edge(app)
    async with aiohttp.ClientSession() as session:
        yield app, base, session, receiver


async def test_client_alerts_are_deduplicated_and_grouped(edge: Any, admin_token: str) -> None:
    _, base, session, receiver = edge
    url = f"{base}/api/analytics/performance/alerts"
    status, body = await post(
        session, url, {"alerts": [alert("a-1"), alert("a-2"), alert("a-2"), alert("b-1", page="/home")]}
    )
    assert (status, body) == (200, {"accepted": 3, "duplicates": 1})
    status, body = await post(
        session, url, {"alerts": [alert("a-1"), alert("a-3", actualValue=7000, context={"device": "mobile"})]}
    )
    assert (status, body) == (200, {"accepted": 1, "duplicates": 1})

    status, listing = await get(session, url, admin_token)
    assert status == 200
    groups = {a["page"]: a for a in listing["alerts"]}
    assert set(groups) == {"/effects", "/home"}
    effects = groups["/effects"]
    assert effects["occurrences"] == "3"  # int64 as a JSON string
    assert effects["actualValue"] == 7000 and effects["context"] == {"device": "mobile"}
    assert effects["state"] == "open" and effects["source"] == "client"
    assert effects["firstSeenAt"] <= effects["lastSeenAt"]
    assert groups["/home"].get("occurrences") == "1"
    # one firing notification per new group, none for later occurrences
    await receiver.wait_for(2)
    assert sorted(receiver.alerts()) == [("firing", "ClientPerformanceAlert", "critical")] * 2

    # another severity is another group
    status, body = await post(session, url, {"alerts": [alert("c-1", severity="warning")]})
    assert body == {"accepted": 1, "duplicates": 0}
    status, listing = await get(session, url, admin_token, severity="warning")
    assert [a["alertId"] for a in listing["alerts"]] == [listing["alerts"][0]["alertId"]]
    assert listing["alerts"][0]["severity"] == "warning"


async def test_resolve_with_a_note_then_a_new_report_opens_a_new_alert(
    edge: Any, admin_token: str, user_token: str
) -> None:
    _, base, session, receiver = edge
    url = f"{base}/api/analytics/performance/alerts"
    await post(session, url, {"alerts": [alert("r-1"), alert("r-2")]})
    _, listing = await get(session, url, admin_token)
    (group,) = listing["alerts"]
    # by the client's alertId or the group's: both name the group
    status, _ = await post(session, f"{url}/r-2:resolve", {"note": "x"}, user_token)
    assert status == 403
    status, body = await post(session, f"{url}/r-2:resolve", {"note": "CDN fixed"}, admin_token)
    assert status == 200
    assert body["alert"]["alertId"] == group["alertId"]
    assert (body["alert"]["state"], body["alert"]["resolutionNote"]) == ("resolved", "CDN fixed")
    assert "resolvedAt" in body["alert"]
    status, again = await post(session, f"{url}/{group['alertId']}:resolve", {"note": "other"}, admin_token)
    assert status == 200 and again["alert"]["resolutionNote"] == "CDN fixed"  # already resolved: unchanged
    status, _ = await post(session, f"{url}/nope:resolve", {}, admin_token)
    assert status == 404
    await receiver.wait_for(2)
    assert receiver.alerts() == [
        ("firing", "ClientPerformanceAlert", "critical"),
        ("resolved", "ClientPerformanceAlert", "critical"),
    ]
    await post(session, url, {"alerts": [alert("r-3")]})
    _, open_now = await get(session, url, admin_token)
    assert [a["alertId"] for a in open_now["alerts"]] != [group["alertId"]] and len(open_now["alerts"]) == 1
    _, everything = await get(session, url, admin_token, state="all")
    assert len(everything["alerts"]) == 2
    _, resolved = await get(session, url, admin_token, state="resolved")
    assert [a["alertId"] for a in resolved["alerts"]] == [group["alertId"]]


async def test_pages_are_stable_under_inserts(edge: Any, admin_token: str) -> None:
    _, base, session, _ = edge
    url = f"{base}/api/analytics/performance/alerts"
    await post(session, url, {"alerts": [alert(f"p-{i}", metric=f"M{i}") for i in range(7)]})
    _, everything = await get(session, url, admin_token, pageSize="100")
    expected = [a["metric"] for a in everything["alerts"]]
    assert sorted(expected) == [f"M{i}" for i in range(7)]
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        params = {"pageSize": "3", **({"pageToken": token} if token else {})}
        status, page = await get(session, url, admin_token, **params)
        assert status == 200
        seen += [a["metric"] for a in page["alerts"]]
        pages += 1
        # alerts arriving between pages do not shift what comes next
        await post(session, url, {"alerts": [alert(f"late-{pages}", metric=f"L{pages}")]})
        token = page.get("nextPageToken", "")
        if not token:
            break
    assert seen == expected  # newest first, each once, none of the late ones
    # a token is bound to its filters, and forged ones are refused
    _, first = await get(session, url, admin_token, pageSize="3")
    for params in (
        {"pageToken": first["nextPageToken"], "state": "all"},
        {"pageToken": "bm9wZQ"},
        {"pageToken": "%%%"},
        {"pageToken": "x" * 500},
        {"pageSize": "1000"},
        {"state": "closed"},
        {"severity": "meh"},
    ):
        status, _ = await get(session, url, admin_token, **params)
        assert status == 400, params


BAD = [
    ({"alerts": []}, "alerts"),
    ({"alerts": [alert("a\x00b")]}, "alerts[0].alertId"),
    ({"alerts": [alert("ok", sessionId="")]}, "alerts[0].sessionId"),
    ({"alerts": [alert("ok", metric="bad metric")]}, "alerts[0].metric"),
    ({"alerts": [alert("ok", severity="page-me")]}, "alerts[0].severity"),
    ({"alerts": [alert("ok", actualValue=1e300)]}, "alerts[0].actualValue"),
    ({"alerts": [alert("ok", page="/x\x00")]}, "alerts[0].page"),
    ({"alerts": [alert("ok", page="/" + "x" * 600)]}, "alerts[0].page"),
    ({"alerts": [alert("ok", context={"k": "v\x00"})]}, "alerts[0].context"),
    ({"alerts": [alert("ok", context={"a": {"b": {"c": {"d": {"e": {"f": 1}}}}}})]}, "alerts[0].context"),
    ({"alerts": [alert("ok", context={"big": "x" * 9000})]}, "alerts[0].context"),
    ({"alerts": [alert(f"n-{i}") for i in range(101)]}, "alerts"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f for _, f in BAD])
async def test_bad_client_alerts_are_400_and_store_nothing(edge: Any, body: Any, field: str) -> None:
    app, base, session, _ = edge
    status, reply = await post(
        session,
        f"{base}/api/analytics/performance/alerts",
        {"alerts": [alert("good"), *body["alerts"]]}
        if body["alerts"] and len(body["alerts"]) < 100
        else body,
    )
    assert status == 400, reply
    fields = [v["field"] for d in reply["details"] for v in d.get("fieldViolations", [])]
    shifted = (
        field.replace("alerts[0]", "alerts[1]") if body["alerts"] and len(body["alerts"]) < 100 else field
    )
    assert shifted in fields
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM alerts") == 0
    assert await app.pool.fetchval("SELECT count(*) FROM client_alert_keys") == 0


async def test_resolve_needs_a_valid_id_and_listing_an_admin(
    start_monitoring: StartMonitoring, connect_client: ConnectClient, connect: Connect, admin_token: str
) -> None:
    app = await start_monitoring()
    stub = connect_client(app)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ResolvePerformanceAlert(
            monitoring_pb2.ResolvePerformanceAlertRequest(alert_id="x" * 200, note="\x00"),
            metadata=(("authorization", f"Bearer {admin_token}"),),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ListPerformanceAlerts(monitoring_pb2.ListPerformanceAlertsRequest())
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as info:  # another service is no admin
        await connect(app).ListPerformanceAlerts(monitoring_pb2.ListPerformanceAlertsRequest())
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
