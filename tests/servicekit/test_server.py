"""The kit's server: health, reflection, auth, error mapping, metrics, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.auth import issue_token
from services.servicekit.errors import ServiceError, bad_request_violations, invalid_argument
from services.servicekit.logs import JsonFormatter, request_id
from services.servicekit.server import ServiceApp
from tests.support import JWT_SECRET

pytestmark = pytest.mark.timeout(60)


class ProbeServicer(monitoring_pb2_grpc.MonitoringServiceServicer):
    """A servicer whose RPCs exercise the kit's behaviour."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.finished = 0

    async def GetSystemHealth(self, request: Any, context: Any) -> monitoring_pb2.GetSystemHealthResponse:
        self.entered.set()
        await self.release.wait()
        self.finished += 1
        return monitoring_pb2.GetSystemHealthResponse(status="healthy")

    async def ReportPerformanceAlerts(self, request: Any, context: Any) -> Any:
        raise invalid_argument([("alerts[0].severity", "must be warning, error or critical")])

    async def GetServiceSummary(self, request: Any, context: Any) -> Any:
        raise RuntimeError("secret detail that must not leak")

    async def ReportServiceStats(self, request: Any, context: Any) -> Any:
        raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "not now")


def probe_module(servicer: ProbeServicer) -> SimpleNamespace:
    async def wire(app: ServiceApp) -> None:
        app.add_service(
            monitoring_app.SERVICE,
            servicer,
            monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
            monitoring_app.ACCESS,
        )

    return SimpleNamespace(
        __name__="probe.app", NAME="probe", SETTINGS=monitoring_app.SETTINGS, MIGRATIONS=None, wire=wire
    )


@pytest.fixture
async def probe(start_service: Any) -> tuple[ServiceApp, ProbeServicer]:
    servicer = ProbeServicer()
    app = await start_service(probe_module(servicer))
    return app, servicer


def channel(app: ServiceApp) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_health_answers_for_every_name_and_reflection_lists_services(probe: Any) -> None:
    app, _ = probe
    async with channel(app) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "liveness", "cosnap.monitoring.v1.MonitoringService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name async for r in call for s in r.list_services_response.service}
        assert {"cosnap.monitoring.v1.MonitoringService", "grpc.health.v1.Health"} <= names


async def test_auth_levels(probe: Any) -> None:
    app, _ = probe
    request = monitoring_pb2.ListPerformanceAlertsRequest()
    async with channel(app) as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        cases = [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer("not-a-jwt"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(issue_token(JWT_SECRET, "u", "admin", ttl_seconds=-10)), grpc.StatusCode.UNAUTHENTICATED),
            (
                bearer(issue_token("another-secret-of-32-bytes-or-more!!", "u", "admin")),
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            (bearer(issue_token(JWT_SECRET, "u", "user")), grpc.StatusCode.PERMISSION_DENIED),
            # Admin passes authentication; the generated base servicer answers UNIMPLEMENTED.
            (bearer(issue_token(JWT_SECRET, "u", "admin")), grpc.StatusCode.UNIMPLEMENTED),
        ]
        for metadata, expected in cases:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListPerformanceAlerts(request, metadata=metadata)
            assert err.value.code() == expected, metadata


async def test_errors_are_mapped(probe: Any) -> None:
    app, _ = probe
    async with channel(app) as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportPerformanceAlerts(monitoring_pb2.ReportPerformanceAlertsRequest())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "alerts[0].severity" in (err.value.details() or "")
        assert bad_request_violations(err.value) == [
            ("alerts[0].severity", "must be warning, error or critical")
        ]
        service = bearer(issue_token(JWT_SECRET, "analytics", "service"))  # internal RPCs
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest(), metadata=service)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert err.value.details() == "internal error"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ReportServiceStats(monitoring_pb2.ReportServiceStatsRequest(), metadata=service)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(), metadata=service)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_metrics_endpoint_counts_rpcs(probe: Any) -> None:
    app, servicer = probe
    servicer.release.set()
    async with channel(app) as ch:
        await monitoring_pb2_grpc.MonitoringServiceStub(ch).GetSystemHealth(
            monitoring_pb2.GetSystemHealthRequest()
        )
    url = f"http://127.0.0.1:{app.metrics_port}/metrics"
    body = (await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())).decode()
    assert 'grpc_server_handled_total{grpc_code="OK",grpc_method="GetSystemHealth"' in body
    assert "grpc_server_handling_seconds_bucket" in body


async def test_graceful_shutdown_finishes_in_flight_rpc(probe: Any) -> None:
    app, servicer = probe
    flushed: list[int] = []

    async def flush() -> None:
        flushed.append(servicer.finished)

    app.on_shutdown(flush)
    async with channel(app) as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        in_flight = asyncio.ensure_future(stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest()))
        await asyncio.wait_for(servicer.entered.wait(), 5)
        stopping = asyncio.ensure_future(app.stop())
        await asyncio.sleep(0.3)
        # Health says NOT_SERVING and new RPCs are refused while the old one runs.
        assert not stopping.done()
        async with channel(app) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await monitoring_pb2_grpc.MonitoringServiceStub(fresh).GetSystemHealth(
                    monitoring_pb2.GetSystemHealthRequest(), timeout=1
                )
            assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        servicer.release.set()
        reply = await asyncio.wait_for(in_flight, 5)
        assert reply.status == "healthy"
        await asyncio.wait_for(stopping, 10)
    # The shutdown hook ran after the in-flight RPC had finished.
    assert flushed == [1]


def test_json_logs_carry_the_request_id() -> None:
    formatter = JsonFormatter("probe")
    token = request_id.set("req-123")
    try:
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("world",), None)
        record.endpoint = "/a/b"
        line = formatter.format(record)
    finally:
        request_id.reset(token)
    import json

    data = json.loads(line)
    assert data["msg"] == "hello world"
    assert data["request_id"] == "req-123"
    assert data["service"] == "probe"
    assert data["endpoint"] == "/a/b"


async def test_auth_errors_through_the_edge_are_json(probe: Any, start_edge: Any) -> None:
    import aiohttp

    app, _ = probe
    base = await start_edge(app)
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/analytics/performance/alerts") as r:
        assert r.status == 401  # admin endpoint, no token
        body = await r.json()
        assert body["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
