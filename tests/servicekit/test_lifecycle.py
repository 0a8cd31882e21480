"""A service as a real process: configuration errors, PostgreSQL unreachable at
start-up or lost while running, and SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.monitoring import app as monitoring_app
from tests.support import (
    DATABASE_URL,
    ROOT,
    eventually,
    free_port,
    service_env,
    spawn_service,
    unique_name,
    wait_serving,
)

pytestmark = pytest.mark.timeout(90)


def run_service(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.effects"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GRPC_PORT", "not-a-port"),
        ("GRPC_PORT", "70000"),
        ("SHUTDOWN_GRACE_SECONDS", "-1"),
        ("AUTH_JWT_SECRET", "short"),
        ("DB_SCHEMA", "Bad-Schema"),
        ("LOG_LEVEL", "LOUD"),
    ],
)
def test_bad_configuration_stops_with_the_variable_named(variable: str, value: str) -> None:
    result = run_service(service_env(unique_name("cfg"), **{variable: value}))
    assert result.returncode == 2
    assert "configuration error" in result.stderr
    assert variable in result.stderr


def test_unreachable_postgres_at_start_up_is_retried_then_fails_clearly() -> None:
    closed = free_port()
    env = service_env(
        unique_name("nodb"),
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{closed}/test",
        DB_CONNECT_TIMEOUT_SECONDS="2",
        GRPC_PORT=str(free_port()),
    )
    started = time.monotonic()
    result = run_service(env)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert "cannot reach postgres" in result.stderr
    assert "retrying" in result.stderr  # it did back off and try again
    assert elapsed >= 2


def test_sigterm_stops_the_process_gracefully_with_exit_0(tmp_path: Any) -> None:
    port = free_port()
    proc = spawn_service("effects", service_env(unique_name("sig"), GRPC_PORT=str(port)), tmp_path / "log")
    try:
        wait_serving(f"127.0.0.1:{port}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert '"msg": "shutting down"' in log
    assert '"msg": "stopped"' in log


class TcpProxy:
    """A loopback proxy in front of the real PostgreSQL that can cut it off."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Refuse new connections and reset the open ones."""
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.transport.abort()
        await self.server.wait_closed()
        self.server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}


async def readiness(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return reply.status


async def test_postgres_lost_while_running_turns_readiness_off_then_recovers(start_service: Any) -> None:
    target = urlparse(DATABASE_URL)
    proxy = TcpProxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    dsn = DATABASE_URL.replace(f"{target.hostname}:{target.port or 5432}", f"127.0.0.1:{proxy.port}")
    app = await start_service(monitoring_app, database_url=dsn)
    assert await readiness(app.port) == health_pb2.HealthCheckResponse.SERVING
    await proxy.cut()

    async def not_serving() -> bool:
        return await readiness(app.port) == health_pb2.HealthCheckResponse.NOT_SERVING

    await eventually(not_serving, timeout=15)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        live = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="liveness"))
    assert live.status == health_pb2.HealthCheckResponse.SERVING  # alive, just not ready
    await proxy.start()

    async def serving() -> bool:
        return await readiness(app.port) == health_pb2.HealthCheckResponse.SERVING

    await eventually(serving, timeout=15)
    await proxy.cut()


async def test_migrate_command_applies_the_migrations_and_exits(schema: str, admin_pg: Any) -> None:
    async def migrate() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.analytics",
            "migrate",
            env=service_env(schema),
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode or 0, err.decode()

    code, log = await migrate()
    assert code == 0, log
    assert '"msg": "migrated"' in log
    code, log = await migrate()
    assert code == 0, log
    assert '"applied": []' in log  # nothing left to apply
    tables = await admin_pg.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    assert {"events", "metrics", "funnel_steps", "schema_migrations"} <= {r["tablename"] for r in tables}


async def test_redis_down_keeps_serving_and_reports_degraded(start_service: Any) -> None:
    closed = free_port()
    app = await start_service(monitoring_app, redis_url=f"redis://127.0.0.1:{closed}/0")
    cache = await app.cache("probe")
    loads = 0

    async def load() -> str:
        nonlocal loads
        loads += 1
        return "value"

    assert await cache.get_or_load("k", load, ttl=60) == "value"
    assert await cache.get_or_load("k", load, ttl=60) == "value"
    assert loads == 1  # the second answer came from L1, with Redis down
    status = await app.dependency_status()
    assert status["redis"][0] == "degraded"
    assert status["postgres"][0] == "healthy"
    assert await readiness(app.port) == health_pb2.HealthCheckResponse.SERVING
