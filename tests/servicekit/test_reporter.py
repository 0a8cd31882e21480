"""The kit's monitoring reporter: every RPC's timing and the instance's stats reach a real
monitoring gRPC server (through the kit, with a service token); a dead or stalled
monitoring never holds an RPC back; drops are counted; what is left is sent at shutdown."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from prometheus_client import REGISTRY

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.auth import current_principal
from services.servicekit.errors import invalid_argument
from services.servicekit.reporter import memory_limit_bytes, memory_used_bytes
from services.servicekit.server import ServiceApp
from tests.servicekit.test_cache import RedisServer
from tests.support import eventually, free_port

pytestmark = pytest.mark.timeout(60)

HEALTH = "/cosnap.monitoring.v1.MonitoringService/GetSystemHealth"
ALERTS = "/cosnap.monitoring.v1.MonitoringService/ReportPerformanceAlerts"


class Receiver(monitoring_pb2_grpc.MonitoringServiceServicer):
    """Monitoring's receiving side: records what arrives; `stall` holds RecordApiTimings."""

    def __init__(self) -> None:
        self.timings: list[monitoring_pb2.ApiTiming] = []
        self.stats: list[monitoring_pb2.ReportServiceStatsRequest] = []
        self.callers: set[tuple[str, str]] = set()
        self.stall: asyncio.Event | None = None
        self.stalled = asyncio.Event()

    def _caller(self) -> None:
        principal = current_principal.get()
        assert principal is not None
        self.callers.add((principal.subject, principal.role))

    async def RecordApiTimings(
        self, request: monitoring_pb2.RecordApiTimingsRequest, context: Any
    ) -> monitoring_pb2.RecordApiTimingsResponse:
        self._caller()
        if self.stall is not None:
            self.stalled.set()
            await self.stall.wait()
        self.timings.extend(request.timings)
        return monitoring_pb2.RecordApiTimingsResponse(accepted=len(request.timings))

    async def ReportServiceStats(
        self, request: monitoring_pb2.ReportServiceStatsRequest, context: Any
    ) -> monitoring_pb2.ReportServiceStatsResponse:
        self._caller()
        self.stats.append(request)
        return monitoring_pb2.ReportServiceStatsResponse()


class Probe(monitoring_pb2_grpc.MonitoringServiceServicer):
    """The reporting service's own RPCs: one that answers, one that fails."""

    async def GetSystemHealth(self, request: Any, context: Any) -> monitoring_pb2.GetSystemHealthResponse:
        return monitoring_pb2.GetSystemHealthResponse(status="healthy")

    async def ReportPerformanceAlerts(self, request: Any, context: Any) -> Any:
        raise invalid_argument([("alerts", "bad")])


def module(name: str, servicer: Any) -> SimpleNamespace:
    async def wire(app: ServiceApp) -> None:
        app.add_service(
            monitoring_app.SERVICE,
            servicer,
            monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
            monitoring_app.ACCESS,
        )

    return SimpleNamespace(
        __name__=f"{name}.app", NAME=name, SETTINGS=monitoring_app.SETTINGS, MIGRATIONS=None, wire=wire
    )


@pytest.fixture
async def receiver(start_service: Any) -> tuple[ServiceApp, Receiver]:
    servicer = Receiver()
    return await start_service(module("monitoring", servicer)), servicer


async def calls(app: ServiceApp, n: int, failing: int = 0) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        for _ in range(n):
            reply = await stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest(), timeout=5)
            assert reply.status == "healthy"
        for _ in range(failing):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ReportPerformanceAlerts(monitoring_pb2.ReportPerformanceAlertsRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def dropped(service: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "monitoring_reporter_dropped_total", {"service": service, "kind": "timings", "reason": reason}
    )
    return value or 0.0


Start = Callable[..., Awaitable[ServiceApp]]


async def test_timings_and_stats_reach_monitoring(receiver: Any, start_service: Start) -> None:
    monitoring, got = receiver
    app = await start_service(
        module("probe", Probe()),
        monitoring_addr=f"127.0.0.1:{monitoring.port}",
        monitoring_report_interval_seconds=0.05,
        monitoring_stats_interval_seconds=0.1,
        instance_name="probe-0",
    )
    things = await app.cache("things")
    await things.set("a", 1, ttl=60)
    assert await things.get("a") == 1  # hit
    assert await things.get("b") is None  # miss
    assert await things.get("c") is None  # miss

    await calls(app, 7, failing=2)
    await eventually(lambda: len(got.timings) >= 9)
    mine = [t for t in got.timings if t.instance == "probe-0"]
    assert sorted((t.endpoint, t.status_code) for t in mine) == sorted(
        [(HEALTH, "OK")] * 7 + [(ALERTS, "INVALID_ARGUMENT")] * 2
    )
    assert all(t.service == "probe" and t.duration_ms >= 0 and t.observed_at.seconds > 0 for t in mine)
    assert ("probe", "service") in got.callers  # through the kit's channel, with a service token

    await eventually(lambda: any(s.instance == "probe-0" and s.caches for s in got.stats))
    reports = [s for s in got.stats if s.instance == "probe-0"]
    assert all(s.service == "probe" for s in reports)
    assert all(0 < s.heap_used_bytes <= s.heap_limit_bytes for s in reports)
    hits = sum(c.hits for s in reports for c in s.caches if c.cache == "things")
    misses = sum(c.misses for s in reports for c in s.caches if c.cache == "things")
    assert (hits, misses) == (1, 2)  # deltas: each counted once over all reports
    await things.get("a")
    await eventually(lambda: sum(c.hits for s in got.stats for c in s.caches if c.cache == "things") == 2)


async def test_in_flight_is_reported(receiver: Any, start_service: Start) -> None:
    monitoring, got = receiver
    release = asyncio.Event()
    entered = asyncio.Event()

    class Slow(Probe):
        async def GetSystemHealth(self, request: Any, context: Any) -> monitoring_pb2.GetSystemHealthResponse:
            entered.set()
            await release.wait()
            return monitoring_pb2.GetSystemHealthResponse(status="healthy")

    app = await start_service(
        module("probe", Slow()),
        monitoring_addr=f"127.0.0.1:{monitoring.port}",
        monitoring_stats_interval_seconds=0.05,
        instance_name="probe-inflight",
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        pending = [
            asyncio.ensure_future(stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest()))
            for _ in range(3)
        ]
        await entered.wait()
        await eventually(lambda: app.in_flight == 3)
        await eventually(lambda: any(s.instance == "probe-inflight" and s.in_flight == 3 for s in got.stats))
        release.set()
        await asyncio.gather(*pending)
    await eventually(lambda: app.in_flight == 0)


async def test_a_stalled_monitoring_never_holds_an_rpc_back(receiver: Any, start_service: Start) -> None:
    monitoring, got = receiver
    got.stall = asyncio.Event()
    app = await start_service(
        module("probe", Probe()),
        monitoring_addr=f"127.0.0.1:{monitoring.port}",
        monitoring_report_interval_seconds=0.01,
        monitoring_send_timeout_seconds=30,
        monitoring_buffer_size=20,
        monitoring_batch_size=5,
    )
    assert app.reporter is not None
    before = dropped("probe", "buffer_full")
    await calls(app, 1)
    await asyncio.wait_for(got.stalled.wait(), 5)  # the reporter's send is now stuck in monitoring
    # 60 RPCs are answered while that send is still stuck: none waited for it.
    await calls(app, 60)
    assert not got.stall.is_set() and got.timings == []
    assert app.reporter.buffered == 20  # bounded ...
    assert app.reporter.dropped == 60 + 1 - 1 - 20 == 40  # ... the rest dropped (1 is in the stuck send)
    assert dropped("probe", "buffer_full") - before == 40
    got.stall.set()  # monitoring recovers: what was kept arrives
    await eventually(lambda: len(got.timings) == 21)


async def test_a_dead_monitoring_never_holds_an_rpc_back(start_service: Start) -> None:
    app = await start_service(
        module("probe", Probe()),
        monitoring_addr=f"127.0.0.1:{free_port()}",  # nothing listens there
        monitoring_report_interval_seconds=0.01,
        monitoring_buffer_size=10,
        monitoring_batch_size=5,
    )
    assert app.reporter is not None
    before = dropped("probe", "buffer_full")
    await calls(app, 40)
    await eventually(lambda: app.reporter is not None and app.reporter.dropped >= 30)
    assert app.reporter.buffered <= 10 and app.reporter.sent_timings == 0
    assert dropped("probe", "buffer_full") - before == app.reporter.dropped
    body = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{app.metrics_port}/metrics", timeout=5).read()
    )
    assert b'monitoring_reporter_dropped_total{kind="timings",reason="buffer_full",service="probe"}' in body


async def test_what_is_buffered_is_sent_at_graceful_shutdown(receiver: Any, start_service: Start) -> None:
    monitoring, got = receiver
    app = await start_service(
        module("probe", Probe()),
        monitoring_addr=f"127.0.0.1:{monitoring.port}",
        monitoring_report_interval_seconds=60,  # nothing is sent before the shutdown
        monitoring_stats_interval_seconds=60,
        instance_name="probe-stop",
    )
    await calls(app, 5, failing=1)
    # A call's timing is recorded when its handler's wrapper ends, which may be just after
    # the client has its answer (the failing call's status goes out at abort): wait for it.
    assert app.reporter is not None
    for _ in range(500):
        if app.reporter.buffered >= 6:
            break
        await asyncio.sleep(0.01)
    assert got.timings == [] and app.reporter.buffered == 6
    await app.stop()
    mine = [t for t in got.timings if t.instance == "probe-stop"]
    assert sorted(t.status_code for t in mine) == ["INVALID_ARGUMENT"] + ["OK"] * 5
    assert [s.instance for s in got.stats] == ["probe-stop"]  # and a last stats report


def test_memory_limit_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "sys"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "kubepods" / "memory.max").write_text("1073741824\n")
    (root / "kubepods" / "pod1" / "memory.max").write_text("536870912\n")
    proc.write_text("0::/kubepods/pod1\n")
    assert memory_limit_bytes(proc, root) == 512 * 1024 * 1024
    (root / "kubepods" / "pod1" / "memory.max").write_text("max\n")
    assert memory_limit_bytes(proc, root) == 1024 * 1024 * 1024  # the parent's is the tighter

    v1 = tmp_path / "v1"
    (v1 / "memory" / "docker" / "abc").mkdir(parents=True)
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("268435456\n")
    proc.write_text("12:cpu,cpuacct:/docker/abc\n11:memory:/docker/abc\n")
    assert memory_limit_bytes(proc, v1) == 256 * 1024 * 1024
    (v1 / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    machine = memory_limit_bytes(proc, v1)  # no limit: the machine's memory
    assert machine == memory_limit_bytes(tmp_path / "missing", v1) > memory_used_bytes() > 0


async def test_redis_dependency_metric_follows_redis(start_service: Start) -> None:
    redis = RedisServer()
    await redis.start()
    try:
        await start_service(module("probe", Probe()), redis_url=redis.url)

        def redis_up() -> float | None:
            return REGISTRY.get_sample_value("service_dependency_up", {"dependency": "redis"})

        await eventually(lambda: redis_up() == 1.0)
        await redis.kill()
        await eventually(lambda: redis_up() == 0.0)
        await redis.start()
        await eventually(lambda: redis_up() == 1.0)
    finally:
        await redis.kill()
