"""Under 30 % injected 5xx, connection resets and timeouts on every RunningHub
endpoint, every task still ends in the right state and RunningHub never sees a
duplicate create."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.effects.conftest import Env, EnvFactory
from tests.support import unique_name
from tools.runninghub_sim import SimConfig
from tools.runninghub_sim.faults import FaultRule

pytestmark = pytest.mark.timeout(240)

TASKS = 16
UPSTREAM = {"SUCCESS": "SUCCEEDED", "FAILED": "FAILED"}


async def start_until_answered(env: Env, image: str) -> dict[str, Any]:
    """What a frontend does: re-send the same requestId after a 503 until it gets the task."""
    request_id = unique_name("chaos")
    for _ in range(200):
        status, body = await env.start(request_id=request_id, inputs={"image": image})
        if status == 200:
            return dict(body)
        assert status == 503, body
        await asyncio.sleep(0.1)
    raise AssertionError("never started")


async def test_every_task_ends_right_under_thirty_percent_faults(effects_env: EnvFactory) -> None:
    env = await effects_env(
        SimConfig.fast(run_seconds=0.3, fail_rate=0.25, hang_seconds=5, seed=3),
        runninghub_timeout_seconds=0.5,
        effects_reconcile_timeout_seconds=8.0,
    )
    image = await env.upload()
    await env.request("GET", "/api/effects/portrait-upscale", user=None)  # config cached before the storm
    env.sim().faults.set_rule(
        "*", FaultRule(error_rate=0.1, error_status=503, reset_rate=0.1, timeout_rate=0.1, phase="random")
    )
    tasks = await asyncio.gather(*(start_until_answered(env, image) for _ in range(TASKS)))
    finals = await asyncio.gather(*(env.poll(t["taskId"], timeout=90) for t in tasks))
    env.sim().faults.set_rule("*", FaultRule())

    events = env.sim().counters()["events"]
    faults = {k: v for k, v in events.items() if k.startswith("fault_")}
    assert sum(faults.values()) >= 5, faults
    by_task: dict[str, list[Any]] = {t["taskId"]: [] for t in tasks}
    for sim_task in env.sim().tasks.values():
        for task_id in by_task:
            if sim_task.webhook_url and task_id in sim_task.webhook_url:
                by_task[task_id].append(sim_task)
    assert env.creates() == sum(len(v) for v in by_task.values())
    for final in finals:
        upstream = by_task[final["taskId"]]
        assert len(upstream) <= 1, f"duplicate create for {final['taskId']}"
        if upstream:
            assert final["status"] == UPSTREAM[upstream[0].outcome], (final, upstream[0].outcome)
            if final["status"] == "SUCCEEDED":
                assert final["outputs"]
        else:  # the create never reached RunningHub: failed for want of word, with the reason
            assert final["status"] == "FAILED" and "never confirmed" in final["failure"]["message"], final
    assert any(by_task.values())
