"""Fixtures: real gRPC backends on free ports, and the edge in front of them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient

from cosnap.analytics.v1 import analytics_pb2_grpc
from cosnap.effects.v1 import effects_pb2_grpc
from cosnap.monitoring.v1 import monitoring_pb2_grpc
from tests.conftest import EdgeFactory
from tests.gateway.backends import (
    ANALYTICS,
    EFFECTS,
    MONITORING,
    UPLOAD_LIMIT,
    Analytics,
    Backend,
    Backends,
    Effects,
    Monitoring,
)


@pytest.fixture(scope="session")
async def backends() -> AsyncIterator[Backends]:
    """One real grpc.aio server per service, like production."""
    backend = Backend()
    servers: list[grpc.aio.Server] = []
    addresses: dict[str, str] = {}
    registrations: list[tuple[str, Callable[[grpc.aio.Server], None]]] = [
        (
            ANALYTICS,
            lambda s: analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server(
                Analytics(backend),
                s,
            ),
        ),
        (
            EFFECTS,
            lambda s: effects_pb2_grpc.add_EffectsServiceServicer_to_server(Effects(backend), s),
        ),
        (
            MONITORING,
            lambda s: monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server(
                Monitoring(backend),
                s,
            ),
        ),
    ]
    for service, register in registrations:
        server = grpc.aio.server()
        register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        addresses[service] = f"127.0.0.1:{port}"
    yield Backends(backend, addresses)
    for server in servers:
        await server.stop(grace=None)


@pytest.fixture
def backend(backends: Backends) -> Backend:
    backends.backend.reset()
    return backends.backend


@pytest.fixture
async def edge(
    backends: Backends,
    backend: Backend,
    make_edge: EdgeFactory,
) -> TestClient[Any, Any]:
    """The edge in front of the test backends, with CORS for one origin."""
    return await make_edge(
        backends=backends.addresses,
        cors_origins="https://app.cosnap.test",
        max_upload_bytes=UPLOAD_LIMIT,
    )
