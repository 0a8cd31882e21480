"""Fixtures of the monitoring tests: real monitoring apps (PostgreSQL, Redis,
gRPC on a free port) with an injectable clock, stubs to them, and a local
HTTP receiver for webhook notifications."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import pytest
from aiohttp import web

from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.auth import ServiceTokens
from services.servicekit.channels import service_channel
from services.servicekit.clock import Clock
from services.servicekit.server import ServiceApp
from tests.conftest import StartService
from tests.support import JWT_SECRET


class Connect(Protocol):
    def __call__(self, app: ServiceApp, service: str = ...) -> monitoring_pb2_grpc.MonitoringServiceStub: ...


ConnectClient = Callable[[ServiceApp], monitoring_pb2_grpc.MonitoringServiceStub]
StartMonitoring = Callable[..., Awaitable[ServiceApp]]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`stub = connect(app, service="effects")`: a MonitoringService stub to a running
    app as that service calls it: every call carries its `service` token (internal RPCs
    accept nothing else, and a service reports only for itself; the token replaces any
    `authorization` the call sets)."""
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp, service: str = "effects") -> monitoring_pb2_grpc.MonitoringServiceStub:
        channel = service_channel(f"127.0.0.1:{app.port}", ServiceTokens(JWT_SECRET, service))
        channels.append(channel)
        return monitoring_pb2_grpc.MonitoringServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
async def connect_client() -> AsyncIterator[ConnectClient]:
    """`stub = connect_client(app)`: a stub as a browser or admin calls it (no token of its own)."""
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp) -> monitoring_pb2_grpc.MonitoringServiceStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        channels.append(channel)
        return monitoring_pb2_grpc.MonitoringServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


@pytest.fixture
def start_monitoring(start_service: StartService) -> StartMonitoring:
    """`app = await start_monitoring(clock=..., schema=..., **settings)`: the root
    `start_service` for monitoring (apps given the same `schema` are replicas on one
    database), whose evaluation loop runs every 300 s unless told otherwise: tests
    step it by hand."""

    async def start(clock: Clock | None = None, schema: str | None = None, **overrides: Any) -> ServiceApp:
        settings = {"monitoring_eval_interval_seconds": 300, **overrides}
        return await start_service(monitoring_app, clock, schema=schema, **settings)

    return start


@dataclass
class Receiver:
    """A webhook receiver on a free port that answers 503 to its first `fail_first` POSTs."""

    fail_first: int = 0
    attempts: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        self.bodies.append(await request.json())
        self.arrived.set()
        return web.Response(status=200)

    def alerts(self, status: str | None = None) -> list[tuple[str, str, str]]:
        """(status, alertname, severity) of every notification received."""
        out = []
        for body in self.bodies:
            for alert in body["alerts"]:
                if status in (None, alert["status"]):
                    out.append((alert["status"], alert["labels"]["alertname"], alert["labels"]["severity"]))
        return out

    async def wait_for(self, count: int, timeout: float = 20.0) -> None:
        async def enough() -> None:
            while len(self.bodies) < count:
                self.arrived.clear()
                await self.arrived.wait()

        await asyncio.wait_for(enough(), timeout)


@pytest.fixture
async def make_receiver() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    runners: list[web.AppRunner] = []

    async def make(fail_first: int = 0) -> Receiver:
        receiver = Receiver(fail_first=fail_first)
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        receiver.url = f"http://127.0.0.1:{port}/hook"
        return receiver

    yield make
    for runner in runners:
        await runner.cleanup()
