"""Polls of one task on several replicas cause at most one RunningHub call per
task and refresh interval; the state-dependent cache lifetime."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.effects import app as effects_app
from services.effects.taskcache import HOLD_INTERVALS
from tests.effects.conftest import EnvFactory
from tools.runninghub_sim import SimConfig
from tools.runninghub_sim.faults import FaultRule

pytestmark = pytest.mark.timeout(120)


async def test_concurrent_polls_on_two_replicas_share_one_upstream_call(
    effects_env: EnvFactory, start_service: Any
) -> None:
    interval = 1.0
    env = await effects_env(
        SimConfig.fast(run_seconds=120),
        effects_poll_ttl_queued_seconds=interval,
        effects_poll_ttl_running_seconds=interval,
        effects_recheck_after_seconds=600,
    )
    # A second replica: same schema, same Redis prefix, same RunningHub.
    other = await start_service(
        effects_app, **{**env.settings, "db_schema": env.app.schema, "redis_prefix": env.app.redis_prefix}
    )
    status, task = await env.start()
    assert status == 200, task
    await asyncio.sleep(0.3)
    metadata = (("authorization", env.auth()["Authorization"]),)
    request = effects_pb2.GetTaskRequest(task_id=task["taskId"])
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") for a in (env.app, other)]
    stubs = [effects_pb2_grpc.EffectsServiceStub(c) for c in channels]
    before = env.calls("outputs")
    loop = asyncio.get_running_loop()
    began = loop.time()
    for _ in range(12):  # 600 polls, half on each replica, in bursts of 50 at once
        replies = await asyncio.gather(*(stubs[i % 2].GetTask(request, metadata=metadata) for i in range(50)))
        assert all(r.task.status in ("QUEUED", "RUNNING") for r in replies)
        await asyncio.sleep(0.2)
    seconds = loop.time() - began
    upstream = env.calls("outputs") - before
    for channel in channels:
        await channel.close()
    # One call per interval across both replicas (plus one for the interval in progress).
    assert 1 <= upstream <= seconds / interval + 1, (upstream, seconds)


async def test_an_ended_task_is_cached_long_and_a_running_one_refreshed_each_interval(
    effects_env: EnvFactory,
) -> None:
    env = await effects_env(
        SimConfig.fast(run_seconds=3),  # still open at the first look, however slow the machine
        effects_poll_ttl_queued_seconds=0.3,
        effects_poll_ttl_running_seconds=0.3,
        effects_final_ttl_seconds=600,
    )
    status, task = await env.start()
    assert status == 200, task
    cache = env.state.tasks._cache
    key = cache.redis_key(task["taskId"])
    redis = env.app.redis
    assert redis is not None
    await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
    # Open: kept for a few intervals, and due for a refresh after one.
    ttl_open = await redis.pttl(key)
    assert 0 < ttl_open <= HOLD_INTERVALS * 300
    value = await cache.get(task["taskId"])
    assert value is not None and not value.final
    assert value.fresh_until <= time.time() + 0.3
    done = await env.poll(task["taskId"])
    assert done["status"] == "SUCCEEDED"
    await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
    assert await redis.pttl(key) > 500_000
    value = await cache.get(task["taskId"])
    assert value is not None and value.final and not value.due(time.time() + 3600)


async def test_a_poll_due_for_a_refresh_does_not_wait_for_runninghub(effects_env: EnvFactory) -> None:
    """RunningHub answers outputs only after 10 s: the poll that finds the state due
    is answered from the cache while the refresh it started is still waiting on
    RunningHub, more polls start no second call, and later polls see what the
    refresh learnt."""
    env = await effects_env(
        SimConfig.fast(queue_seconds=0.1, run_seconds=600),
        effects_poll_ttl_queued_seconds=0.3,
        effects_poll_ttl_running_seconds=0.3,
        runninghub_timeout_seconds=30,
        effects_recheck_after_seconds=600,
    )
    status, task = await env.start()
    assert status == 200, task
    path = f"/api/effects/tasks/{task['taskId']}"
    tasks = env.state.tasks
    await asyncio.sleep(0.5)  # RUNNING upstream now; our cached state (QUEUED) is due
    cached = await tasks._cache.get(task["taskId"])
    assert cached is not None and cached.status == "QUEUED" and cached.due(time.time())
    env.sim().faults.set_rule("outputs", FaultRule(latency_ms=10_000))
    before = env.calls("outputs")
    for _ in range(20):  # polls over several intervals
        status, body = await env.request("GET", path)
        assert (status, body["status"]) == (200, "QUEUED")  # the last known state
        # ... answered while the refresh it started is still in flight.
        assert tasks.refresher.memory.busy(task["taskId"])
        assert env.calls("outputs") - before <= 1  # and no second call meanwhile
        await asyncio.sleep(0.05)
    assert env.calls("outputs") - before == 1
    env.sim().faults.set_rule("outputs", FaultRule())
    deadline = asyncio.get_running_loop().time() + 30
    while body["status"] != "RUNNING":
        assert asyncio.get_running_loop().time() < deadline, "the background refresh never landed"
        await asyncio.sleep(0.2)
        status, body = await env.request("GET", path)
