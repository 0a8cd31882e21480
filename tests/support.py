"""Helpers shared by the tests: real services on free ports, isolated schemas."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg
import grpc

from tools import embedded

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# Where a run without PostgreSQL / Redis on the default ports keeps its embedded ones.
EMBEDDED_DIR = Path(os.environ.get("COSNAP_LOCAL_DIR") or ROOT / ".local") / "test-servers"
_embedded: list[embedded.Started] = []


def resolve_database_url(
    configured: str | None, default: str, folder: Path, owned: list[embedded.Started] = _embedded
) -> str:
    """The URL the tests use: `configured` (TEST_DATABASE_URL) when set; else `default`
    when something listens there (CI's server); else an embedded PostgreSQL (the one
    `make up` uses) started in `folder`, with its `test` database. What it starts is
    appended to `owned` (stopped by stop_embedded at the end of the run)."""
    if configured:
        return configured
    endpoint = embedded.url_endpoint(default, 5432)
    if endpoint is None or embedded.port_open(*endpoint):
        return default
    print(f"tests: nothing on {endpoint[0]}:{endpoint[1]}; embedded PostgreSQL in {folder}", file=sys.stderr)
    server = embedded.Postgres(folder / "pgdata", durable=False)
    if not server.ready():  # else: still running after an interrupted run; use it
        owned.append(embedded.start_postgres(server.data, durable=False))
    # In a thread of its own: a test may call this from inside the event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _create_database(server.url(), "test")).result()
    return server.url("test")


def resolve_redis_url(
    configured: str | None, default: str, folder: Path, owned: list[embedded.Started] = _embedded
) -> str:
    """Like resolve_database_url, for Redis (an embedded redis-server on a Unix socket)."""
    if configured:
        return configured
    endpoint = embedded.url_endpoint(default, 6379)
    if endpoint is None or embedded.port_open(*endpoint):
        return default
    print(f"tests: nothing on {endpoint[0]}:{endpoint[1]}; embedded Redis in {folder}", file=sys.stderr)
    server = embedded.Redis(folder / "redis")
    if not server.ready():
        owned.append(embedded.start_redis(server.folder))
    return server.url


async def _create_database(url: str, name: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


def stop_embedded() -> None:
    """Stop the embedded servers this run started (at the end of the session)."""
    while _embedded:
        embedded.stop(_embedded.pop())


DATABASE_URL = resolve_database_url(os.environ.get("TEST_DATABASE_URL"), DEFAULT_DATABASE_URL, EMBEDDED_DIR)
REDIS_URL = resolve_redis_url(os.environ.get("TEST_REDIS_URL"), DEFAULT_REDIS_URL, EMBEDDED_DIR)
JWT_SECRET = "test-secret-0123456789-0123456789-abc"

_counter = 0


def unique_name(stem: str) -> str:
    """A schema name / key prefix no other test or test run uses."""
    global _counter
    _counter += 1
    return f"t{RUN_ID}_{stem}_{_counter}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.05,
) -> float:
    """Poll ``check`` (plain or async) until it holds; the seconds that took.

    Raises AssertionError naming ``what`` after ``timeout`` seconds. A loaded machine only
    makes a wait longer, never a test wrong: tests wait for what they need, not for a time.
    """
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(interval)


def service_env(schema: str, **extra: str) -> dict[str, str]:
    """Environment for a service process under test."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update(
        DATABASE_URL=DATABASE_URL,
        REDIS_URL=REDIS_URL,
        DB_SCHEMA=schema,
        REDIS_PREFIX=schema,
        AUTH_JWT_SECRET=JWT_SECRET,
        GRPC_HOST="127.0.0.1",
        METRICS_PORT="0",
        LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def spawn_service(name: str, env: dict[str, str], log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start `python -m services.<name>` as a real process."""
    argv = [sys.executable, "-m", f"services.{name}"]
    if log_path is None:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(log_path, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=out)


def wait_serving(address: str, timeout: float = 30.0, service: str = "") -> None:
    """Block until the gRPC health service at `address` answers SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} not SERVING after {timeout}s")
            time.sleep(0.1)
