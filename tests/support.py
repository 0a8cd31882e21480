"""Helpers shared by the tests: real services on free ports, isolated schemas."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
RUN_ID = uuid.uuid4().hex[:8]
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
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
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", f"services.{name}"], env=env, cwd=ROOT, stdout=out, stderr=out
    )


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
