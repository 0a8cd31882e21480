"""Fixtures: real PostgreSQL and Redis (CI: 127.0.0.1:5432 `test`, 127.0.0.1:6379; on a
machine with nothing listening there, the embedded servers `make up` uses, see
tests/support.py).

Every test run isolates itself: schemas and key prefixes carry a run id, and
the run drops its schemas and deletes its keys when it ends.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings as hypothesis_settings

from services.servicekit.auth import issue_token
from services.servicekit.clock import Clock
from services.servicekit.config import ServiceSettings
from services.servicekit.server import ServiceApp
from tests.support import DATABASE_URL, JWT_SECRET, REDIS_URL, RUN_ID, stop_embedded, unique_name

# Property tests (hypothesis) draw the same examples on every run by default (`make test`,
# CI), so a failure is reproduced by running again; HYPOTHESIS_PROFILE=explore draws new
# ones, eight times as many, on every run.
hypothesis_settings.register_profile("repeatable", derandomize=True, database=None, max_examples=25)
hypothesis_settings.register_profile("explore", max_examples=200)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the embedded PostgreSQL / Redis a run started when the machine had none."""
    stop_embedded()


@pytest.fixture(scope="session")
async def admin_pg() -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for set-up, checks and clean-up."""
    conn = await asyncpg.connect(DATABASE_URL)
    yield conn
    for row in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"t{RUN_ID}%"):
        await conn.execute(f'DROP SCHEMA IF EXISTS "{row["nspname"]}" CASCADE')
    await conn.close()


@pytest.fixture(scope="session")
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(REDIS_URL)
    yield client
    async for key in client.scan_iter(match=f"t{RUN_ID}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def schema(admin_pg: asyncpg.Connection) -> str:
    """A fresh schema name (dropped at the end of the run)."""
    return unique_name("s")


@pytest.fixture
def admin_token() -> str:
    return issue_token(JWT_SECRET, "admin-1", role="admin")


@pytest.fixture
def user_token() -> str:
    return issue_token(JWT_SECRET, "user-1", role="user")


StartService = Callable[..., Awaitable[ServiceApp]]


@pytest.fixture
async def start_service(
    admin_pg: asyncpg.Connection, redis_client: aioredis.Redis
) -> AsyncIterator[StartService]:
    """Start a service in this process on free ports, with its own schema and
    key prefix: `app = await start_service(module, **settings_overrides)`; apps
    given the same `schema` share their database and key prefix (replicas)."""
    apps: list[ServiceApp] = []

    async def start(
        module: Any,
        clock: Clock | None = None,
        schema: str | None = None,
        auth_clock: Clock | None = None,
        **overrides: Any,
    ) -> ServiceApp:
        name = schema or unique_name(module.__name__.split(".")[-2])
        settings_cls: type[ServiceSettings] = module.SETTINGS
        values: dict[str, Any] = {
            "database_url": DATABASE_URL,
            "redis_url": REDIS_URL,
            "db_schema": name,
            "redis_prefix": name,
            "auth_jwt_secret": JWT_SECRET,
            "grpc_host": "127.0.0.1",
            "grpc_port": 0,
            "metrics_port": 0,
            "shutdown_grace_seconds": 5,
        }
        settings = settings_cls(**{**values, **overrides})
        app = ServiceApp(module.NAME, settings, module.MIGRATIONS)
        if clock is not None:
            app.clock = clock  # the kit's caches and what the wiring builds run on it
        if auth_clock is not None:
            app.auth_clock = auth_clock  # tokens are judged by wall time unless a test steps it
        await app.connect()
        await module.wire(app)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        await app.stop()


EdgeFactory = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def make_edge() -> AsyncIterator[EdgeFactory]:
    """`client = await make_edge(backends={...}, **settings)`: the REST edge on a test server."""
    from gateway.app import create_app
    from gateway.config import Settings
    from gateway.serving import EdgeRunner

    class EdgeTestServer(TestServer):
        """Served by the edge's own runner, as `python -m gateway` serves it."""

        async def _make_runner(self, **kwargs: Any) -> EdgeRunner:
            return EdgeRunner(self.app, **kwargs)

    clients: list[TestClient[Any, Any]] = []

    async def make(**overrides: Any) -> TestClient[Any, Any]:
        client: TestClient[Any, Any] = TestClient(EdgeTestServer(create_app(Settings(**overrides))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def start_edge(make_edge: EdgeFactory) -> Callable[..., Awaitable[str]]:
    """The REST edge in front of running services: `base_url = await start_edge(app, ...)`."""

    async def start(*apps: ServiceApp, **settings: Any) -> str:
        backends = {name: f"127.0.0.1:{app.port}" for app in apps for name in app.service_names}
        client = await make_edge(backends=backends, **settings)
        return str(client.make_url("")).rstrip("/")

    return start
