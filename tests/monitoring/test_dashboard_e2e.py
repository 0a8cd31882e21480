"""The analytics dashboard's monitoring sections end to end: a real analytics
service calls a real monitoring service (with its service token) and the
dashboard read through the REST edge has no unavailable section."""

from __future__ import annotations

from typing import Any

import aiohttp
import grpc
import pytest

from cosnap.monitoring.v1 import monitoring_pb2
from services.analytics import app as analytics_app
from tests.conftest import StartService
from tests.monitoring.conftest import Connect, ConnectClient, StartMonitoring

ENDPOINT = "/cosnap.effects.v1.EffectsService/GetTask"


async def test_dashboard_shows_latency_cache_rates_and_open_alerts(
    start_monitoring: StartMonitoring,
    start_service: StartService,
    start_edge: Any,
    connect: Connect,
    admin_token: str,
) -> None:
    monitoring = await start_monitoring()
    analytics = await start_service(
        analytics_app, monitoring_addr=f"127.0.0.1:{monitoring.port}", analytics_dashboard_ttl_seconds=0
    )
    stub = connect(monitoring)
    timings = [
        monitoring_pb2.ApiTiming(service="effects", endpoint=ENDPOINT, status_code="OK", duration_ms=20.0)
    ] * 95 + [
        monitoring_pb2.ApiTiming(
            service="effects", endpoint=ENDPOINT, status_code="INTERNAL", duration_ms=3500.0
        )
    ] * 5
    await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=timings))
    await stub.ReportServiceStats(
        monitoring_pb2.ReportServiceStatsRequest(
            service="effects",
            instance="effects-0",
            caches=[monitoring_pb2.CacheStats(cache="catalog", hits=75, misses=25)],
        )
    )
    base = await start_edge(monitoring, analytics)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/api/analytics/performance/alerts",
            json={
                "alerts": [
                    {
                        "alertId": "x-1",
                        "sessionId": "s",
                        "metric": "LCP",
                        "severity": "critical",
                        "threshold": 4000,
                        "actualValue": 9000,
                    }
                ]
            },
        ) as reply:
            assert reply.status == 200
        async with session.get(
            f"{base}/api/analytics/dashboard/performance",
            params={"window": "1h"},
            headers={"Authorization": f"Bearer {admin_token}"},
        ) as reply:
            assert reply.status == 200
            body = await reply.json()
    assert body.get("unavailableSections", []) == []
    (latency,) = [e for e in body["apiLatency"] if e["endpoint"] == ENDPOINT]
    assert latency["requests"] == "100" and latency["errorRate"] == pytest.approx(0.05)
    assert 10.0 < latency["p50Ms"] <= 25.0 and latency["p99Ms"] > 3000.0
    (rate,) = body["cacheHitRates"]
    assert (rate["service"], rate["cache"], rate["hitRate"]) == ("effects", "catalog", 0.75)
    assert body["openAlerts"]["critical"] == "1"


async def test_internal_rpcs_refuse_anything_but_a_service_token(
    start_monitoring: StartMonitoring, connect_client: ConnectClient, admin_token: str, user_token: str
) -> None:
    app = await start_monitoring()
    stub = connect_client(app)
    request = monitoring_pb2.RecordApiTimingsRequest(
        timings=[monitoring_pb2.ApiTiming(service="x", endpoint="/a.B/C", status_code="OK", duration_ms=1)]
    )
    for metadata, code in (
        ((), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", f"Bearer {user_token}"),), grpc.StatusCode.PERMISSION_DENIED),
        ((("authorization", f"Bearer {admin_token}"),), grpc.StatusCode.PERMISSION_DENIED),
    ):
        for call in (
            stub.RecordApiTimings(request, metadata=metadata),
            stub.ReportServiceStats(
                monitoring_pb2.ReportServiceStatsRequest(service="x", instance="i"), metadata=metadata
            ),
            stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest(), metadata=metadata),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == code
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM api_timings") == 0
