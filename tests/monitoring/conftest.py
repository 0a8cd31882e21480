"""Fixtures of the monitoring tests: a real monitoring service (PostgreSQL,
Redis, gRPC on a free port) and stubs to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.servicekit.auth import ServiceTokens
from services.servicekit.channels import service_channel
from services.servicekit.server import ServiceApp
from tests.support import JWT_SECRET

Connect = Callable[[ServiceApp], monitoring_pb2_grpc.MonitoringServiceStub]


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """`stub = connect(app)`: a MonitoringService stub to a running app, whose calls carry a
    `service` token (internal RPCs accept nothing else)."""
    channels: list[grpc.aio.Channel] = []

    def make(app: ServiceApp) -> monitoring_pb2_grpc.MonitoringServiceStub:
        channel = service_channel(f"127.0.0.1:{app.port}", ServiceTokens(JWT_SECRET, "tests"))
        channels.append(channel)
        return monitoring_pb2_grpc.MonitoringServiceStub(channel)

    yield make
    for channel in channels:
        await channel.close()


Waiter = Callable[[Callable[[], Awaitable[Any]]], Awaitable[None]]
