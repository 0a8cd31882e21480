"""RunningHub misbehaving: webapp configs served stale while it is down and
loaded once under a burst, the circuit opening and recovering, upstream
health for monitoring, and the API key kept out of logs, errors and metrics."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import grpc
import pytest

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.servicekit.auth import issue_token
from tests.effects.conftest import Env, EnvFactory
from tests.support import JWT_SECRET
from tools.runninghub_sim.faults import FaultRule

pytestmark = pytest.mark.timeout(120)


def calls(env: Env, endpoint: str, region: str = "global") -> int:
    return env.calls(endpoint, region)


async def test_a_burst_of_cold_requests_loads_a_config_once(effects_env: EnvFactory) -> None:
    env = await effects_env()
    env.sim().faults.set_rule("apiCallDemo", FaultRule(latency_ms=150))
    replies = await asyncio.gather(
        *(env.request("GET", "/api/effects/flux-kontext", user=None) for _ in range(40))
    )
    assert all(status == 200 and len(body["parameters"]) == 6 for status, body in replies)
    assert calls(env, "apiCallDemo") == 1


async def test_webapp_config_is_served_stale_while_runninghub_is_down(effects_env: EnvFactory) -> None:
    # (a high breaker threshold: the failing config reads must not close the whole region here)
    env = await effects_env(effects_webapp_fresh_seconds=0.3, runninghub_breaker_failures=1000)
    status, fresh = await env.request("GET", "/api/effects/portrait-upscale", user=None)
    assert status == 200 and len(fresh["parameters"]) == 2
    image = await env.upload()
    env.sim().faults.set_rule("apiCallDemo", FaultRule(error_rate=1.0, error_status=503))
    await asyncio.sleep(0.4)  # past its freshness: a refresh is tried, fails, the copy stays
    for _ in range(3):
        status, body = await env.request("GET", "/api/effects/portrait-upscale", user=None)
        assert status == 200 and body["parameters"] == fresh["parameters"]
        await asyncio.sleep(0.1)
    assert calls(env, "apiCallDemo") > 1  # it did try to refresh ahead
    # Both cache levels emptied (a Redis flush, a new replica): the database copy serves.
    await env.state.catalog._webapps.clear()
    status, body = await env.request("GET", "/api/effects/portrait-upscale", user=None)
    assert status == 200 and body["parameters"] == fresh["parameters"]
    # Tasks can still start: their parameters are checked against the stale copy.
    status, task = await env.start(inputs={"image": image})
    assert status == 200, task
    # A config never fetched cannot be made up: listed without parameters, tasks unavailable.
    status, body = await env.request("GET", "/api/effects/anime-style", user=None)
    assert status == 200 and body["parameters"] == []
    status, body = await env.start(effect="anime-style", inputs={"image": "api/a.png"})
    assert status == 503, body


async def test_refreshed_ahead_when_runninghub_is_up(effects_env: EnvFactory) -> None:
    env = await effects_env(effects_webapp_fresh_seconds=0.3)
    status, _ = await env.request("GET", "/api/effects/portrait-upscale", user=None)
    assert status == 200 and calls(env, "apiCallDemo") == 1
    await asyncio.sleep(0.3)
    await env.request("GET", "/api/effects/portrait-upscale", user=None)  # served, refresh started
    for _ in range(500):  # the refresh runs in the background: up to 10 s on a loaded machine
        if calls(env, "apiCallDemo") == 2:
            break
        await asyncio.sleep(0.02)
    assert calls(env, "apiCallDemo") == 2


async def upstream_health(env: Env) -> dict[str, effects_pb2.RunningHubHealth]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.app.port}") as channel:
        stub = effects_pb2_grpc.EffectsServiceStub(channel)
        token = issue_token(JWT_SECRET, "monitoring", role="service")
        reply = await stub.GetRunningHubHealth(
            effects_pb2.GetRunningHubHealthRequest(), metadata=[("authorization", f"Bearer {token}")]
        )
    return {f"runninghub-{r.region}": r for r in reply.regions}


async def test_the_circuit_opens_fails_fast_and_recovers(effects_env: EnvFactory) -> None:
    # Open for 3 s: the fail-fast checks below all happen well before it half-opens.
    env = await effects_env(runninghub_breaker_failures=3, runninghub_breaker_reset_seconds=3.0)
    env.state.servicer._health._interval = 0.0  # probe on every health call in this test
    health = await upstream_health(env)
    assert health["runninghub-global"].status == "healthy" and health["runninghub-global"].circuit == "closed"
    env.sim().faults.set_rule("upload", FaultRule(error_rate=1.0, error_status=502))
    status, body = await env.request(
        "POST",
        "/api/effects/uploads",
        data=b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        headers={"Content-Type": "image/png"},
    )
    assert status == 503, body
    assert calls(env, "upload") == 3  # three tries, then the circuit opened
    for _ in range(5):
        status, body = await env.request(
            "POST",
            "/api/effects/uploads",
            data=b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
            headers={"Content-Type": "image/png"},
        )
        assert status == 503 and "circuit open" in body["message"], body
    assert calls(env, "upload") == 3  # failing fast: RunningHub was not asked
    # Other endpoints of the region are behind the same circuit.
    status, body = await env.start(inputs={"image": "api/a.png"})
    assert status == 503, body
    health = await upstream_health(env)
    assert health["runninghub-global"].status == "unhealthy" and health["runninghub-global"].circuit == "open"
    assert health["runninghub-cn"].status == "healthy"
    env.sim().faults.set_rule("upload", FaultRule())
    await asyncio.sleep(3.1)
    name = await env.upload()  # the probe goes through and closes the circuit
    assert name.startswith("api/")
    health = await upstream_health(env)
    assert health["runninghub-global"].circuit == "closed" and health["runninghub-global"].status == "healthy"


async def test_upstream_health_is_internal(effects_env: EnvFactory) -> None:
    env = await effects_env()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.app.port}") as channel:
        stub = effects_pb2_grpc.EffectsServiceStub(channel)
        token = issue_token(JWT_SECRET, "root", role="admin")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetRunningHubHealth(
                effects_pb2.GetRunningHubHealthRequest(), metadata=[("authorization", f"Bearer {token}")]
            )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_unconfigured_region_is_unavailable_not_a_crash(effects_env: EnvFactory) -> None:
    env = await effects_env(runninghub_cn_api_key="")
    status, body = await env.start(effect="ultimate-upscale", inputs={"image": "api/a.png"})
    assert status == 503, body
    health = await upstream_health(env)
    assert health["runninghub-cn"].status == "unhealthy" and "no API key" in health["runninghub-cn"].detail


async def test_the_api_key_never_shows(effects_env: EnvFactory, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env = await effects_env(runninghub_timeout_seconds=0.3, effects_reconcile_timeout_seconds=0.5)
    key = env.keys["global"]
    replies: list[object] = []
    replies.append(await env.request("GET", "/api/effects", user=None))
    env.sim().faults.script("ai-app/run", [802])
    replies.append(await env.start())
    env.sim().faults.script("ai-app/run", ["hang"])
    replies.append(await env.start())
    env.sim().faults.set_rule("*", FaultRule(error_rate=0.5, reset_rate=0.5))
    replies.append(await env.request("GET", "/api/effects/flux-kontext", user=None))
    replies.append(
        await env.request(
            "POST",
            "/api/effects/uploads",
            data=b"\xff\xd8\xff" + b"\0" * 10,
            headers={"Content-Type": "image/jpeg"},
        )
    )
    await asyncio.sleep(1.0)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{env.app.metrics_port}/metrics") as response:
            metrics = await response.text()
    assert "runninghub_requests_total" in metrics
    assert key not in metrics
    assert key not in str(replies)
    assert key not in caplog.text
    assert any("503" in str(r) or "ok" in str(r) for r in replies)
