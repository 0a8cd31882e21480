"""GetSystemHealth against real dependencies: a Redis the test starts and
kills, a real effects service, a service that is not there; the overall rule,
the single-flight cache, and no addresses in the answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from cosnap.monitoring.v1 import monitoring_pb2
from services.effects import app as effects_app
from services.monitoring import app as monitoring_app
from services.monitoring.health import Check, overall
from services.servicekit.clock import ManualClock
from tests.conftest import StartService
from tests.monitoring.conftest import Connect, StartMonitoring
from tests.support import free_port, unique_name
from tools.runninghub_sim import SimConfig
from tools.runninghub_sim import start as start_sim


class RedisServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *[
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    async def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            await self.proc.wait()
            self.proc = None


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.kill()


async def poll(
    check: Callable[[], Any], want: str, timeout: float = 15.0
) -> monitoring_pb2.GetSystemHealthResponse:
    reply = None
    for _ in range(int(timeout / 0.2)):
        reply = await check()
        if reply.status == want:
            return reply
        await asyncio.sleep(0.2)
    raise AssertionError(f"health never {want}: {reply}")


def statuses(reply: monitoring_pb2.GetSystemHealthResponse) -> dict[str, str]:
    return {c.name: c.status for c in reply.components}


def test_the_overall_rule() -> None:
    ok = [Check("postgres", "healthy", 1), Check("analytics", "healthy", 1)]
    critical = {"postgres", "analytics"}
    assert overall(ok, critical) == "healthy"
    assert overall([*ok, Check("redis", "degraded", 1)], critical) == "degraded"
    assert overall([*ok, Check("runninghub-cn", "unhealthy", 1)], critical) == "degraded"
    assert overall([Check("postgres", "unhealthy", 1), ok[1]], critical) == "unhealthy"
    assert overall([ok[0], Check("analytics", "unhealthy", 1)], critical) == "unhealthy"


async def test_degraded_while_redis_is_down_and_healthy_when_it_returns(
    start_monitoring: StartMonitoring,
    start_service: StartService,
    start_edge: Callable[..., Any],
    connect: Connect,
    redis_server: RedisServer,
) -> None:
    # effects against the RunningHub simulator (both regions), so its regions read healthy
    sims = {region: await start_sim(region, SimConfig.fast()) for region in ("cn", "global")}
    effects = await start_service(
        effects_app,
        **{f"runninghub_{r}_url": sims[r].url for r in sims},
        **{f"runninghub_{r}_api_key": unique_name(f"key-{r}").replace("_", "-") for r in sims},
    )
    app = await start_monitoring(
        redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
        monitoring_health_targets=f"effects=127.0.0.1:{effects.port}",
        monitoring_health_ttl_seconds=0,
        # Generous: this test is about Redis, not slow checks (a loaded machine may take
        # over the default 1 s to answer for effects, which would read unhealthy).
        monitoring_health_timeout_seconds=10,
        monitoring_health_slow_ms=10_000,
    )
    stub = connect(app)

    async def check() -> monitoring_pb2.GetSystemHealthResponse:
        return await stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest())

    reply = await poll(check, "healthy")
    assert statuses(reply) == {
        "monitoring": "healthy",
        "postgres": "healthy",
        "redis": "healthy",
        "effects": "healthy",
        "runninghub-cn": "healthy",
        "runninghub-global": "healthy",
    }
    assert reply.uptime.ToTimedelta().total_seconds() >= 0 and reply.checked_at.seconds > 0

    await redis_server.kill()
    reply = await poll(check, "degraded")
    assert statuses(reply)["redis"] == "degraded"
    assert statuses(reply)["effects"] == "healthy"

    await redis_server.start()  # the same port
    reply = await poll(check, "healthy")
    assert statuses(reply)["redis"] == "healthy"

    # through the edge: public, and no address, port or error text in it
    base = await start_edge(app)
    async with aiohttp.ClientSession() as session, session.get(f"{base}/api/analytics/system/health") as r:
        assert r.status == 200
        text = await r.text()
    body = json.loads(text)
    assert body["status"] == "healthy"
    for secret in ("127.0.0.1", str(redis_server.port), str(effects.port), "redis://", "Traceback", "Error"):
        assert secret not in text
    for sim in sims.values():
        assert sim.url.rsplit(":", 1)[-1] not in text
        await sim.runner.cleanup()


async def test_a_service_that_does_not_answer_makes_it_unhealthy(
    start_monitoring: StartMonitoring, connect: Connect
) -> None:
    app = await start_monitoring(
        monitoring_health_targets=f"analytics=127.0.0.1:{free_port()}",
        monitoring_health_ttl_seconds=0,
        monitoring_health_timeout_seconds=0.5,
    )
    reply = await connect(app).GetSystemHealth(monitoring_pb2.GetSystemHealthRequest())
    assert reply.status == "unhealthy"
    (analytics,) = [c for c in reply.components if c.name == "analytics"]
    assert analytics.status == "unhealthy" and analytics.detail in ("unreachable", "timeout")


async def test_health_is_cached_and_single_flight(
    start_monitoring: StartMonitoring, connect: Connect
) -> None:
    clock = ManualClock()
    app = await start_monitoring(clock, monitoring_health_ttl_seconds=1.5)
    health = monitoring_app.state(app).health
    stub = connect(app)
    replies = await asyncio.gather(
        *(stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest()) for _ in range(50))
    )
    assert health.computations == 1
    assert len({r.checked_at.ToNanoseconds() for r in replies}) == 1
    clock.advance(1.0)
    await stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest())
    assert health.computations == 1
    clock.advance(1.0)
    await stub.GetSystemHealth(monitoring_pb2.GetSystemHealthRequest())
    assert health.computations == 2
