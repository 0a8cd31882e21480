"""The webhook receiver: a forged or replayed callback changes nothing; nothing
in a callback is believed before RunningHub confirms it."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from tests.effects.conftest import Env, EnvFactory
from tools.runninghub_sim import SimConfig

pytestmark = pytest.mark.timeout(120)


def callback(rh_task_id: str, outputs: list[dict[str, Any]] | None = None, code: int = 0) -> bytes:
    event = {"code": code, "msg": "success", "data": outputs}
    return json.dumps({"event": "TASK_END", "taskId": rh_task_id, "eventData": json.dumps(event)}).encode()


FAKE_OUTPUTS = [
    {"fileUrl": "https://evil.example/x.png", "fileType": "png", "taskCostTime": 1, "nodeId": "9"}
]


async def post_webhook(env: Env, region: str, token: str, body: bytes) -> tuple[int, Any]:
    return await env.request(
        "POST",
        f"/api/effects/webhooks/runninghub/{region}?token={token}",
        user=None,
        data=body,
        headers={"Content-Type": "application/json"},
    )


async def row(env: Env, task_id: str) -> Any:
    return await env.pool.fetchrow(
        "SELECT status, outputs, rh_task_id FROM tasks WHERE task_id = $1::uuid", task_id
    )


async def test_forged_tokens_are_refused_and_change_nothing(effects_env: EnvFactory) -> None:
    # No re-reads by the sweeper (it would rightly move the row from QUEUED to RUNNING
    # once the task is a second old, on a slow machine before the check below).
    env = await effects_env(SimConfig.fast(run_seconds=30), effects_recheck_after_seconds=600)
    status, task = await env.start()
    assert status == 200, task
    before = await row(env, task["taskId"])
    tokens = env.state.tokens
    good = tokens.token("global", uuid.UUID(task["taskId"]))
    forged = [
        "",
        "nonsense",
        f"{task['taskId']}.AAAA",
        f"{task['taskId']}.{good.split('.')[1][:-1]}B",
        tokens.token("cn", uuid.UUID(task["taskId"])),  # another region's token
        env.keys["global"],  # the API key is not a token
        "x" * 5000,
    ]
    for token in forged:
        status, _ = await post_webhook(env, "global", token, callback(before["rh_task_id"], FAKE_OUTPUTS))
        assert status in (401, 400), token
    status, _ = await post_webhook(env, "mars", good, callback(before["rh_task_id"], FAKE_OUTPUTS))
    assert status == 400
    await asyncio.sleep(0.3)
    assert await row(env, task["taskId"]) == before


async def test_a_valid_token_with_a_forged_result_is_not_believed(effects_env: EnvFactory) -> None:
    """The URL leaked: the callback claims success, RunningHub says the task still runs."""
    # No re-reads by the sweeper: any call to RunningHub is the callback's confirmation.
    env = await effects_env(SimConfig.fast(run_seconds=30), effects_recheck_after_seconds=600)
    status, task = await env.start()
    assert status == 200, task
    token = env.state.tokens.token("global", uuid.UUID(task["taskId"]))
    before = await row(env, task["taskId"])
    outputs_before = env.calls("outputs")
    status, _ = await post_webhook(env, "global", token, callback(before["rh_task_id"], FAKE_OUTPUTS))
    assert status == 200
    # Another RunningHub task id with this task's token: ignored too.
    status, _ = await post_webhook(env, "global", token, callback("1904000000000000001", FAKE_OUTPUTS))
    assert status == 200
    await asyncio.sleep(1.0)
    after = await row(env, task["taskId"])
    assert after["status"] in ("QUEUED", "RUNNING") and json.loads(after["outputs"]) == []
    # It asked RunningHub (in the background, after the 200: on a slow machine maybe only now).
    for _ in range(200):
        if env.calls("outputs") > outputs_before:
            break
        await asyncio.sleep(0.05)
    assert env.calls("outputs") > outputs_before


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[]", b'{"event": "TASK_END"}', b'{"event": "TASK_END", "taskId": "1", "eventData": "{bad"}',
     b'{"event": "OTHER", "taskId": "1", "eventData": "{}"}', b"\x00" * 10],
)  # fmt: skip
async def test_malformed_callbacks_are_refused(effects_env: EnvFactory, body: bytes) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=30))
    status, task = await env.start()
    assert status == 200, task
    token = env.state.tokens.token("global", uuid.UUID(task["taskId"]))
    status, reply = await post_webhook(env, "global", token, body)
    assert status == 400, reply


async def test_a_replayed_callback_changes_nothing(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=0.2))
    status, task = await env.start()
    assert status == 200, task
    done = await env.poll(task["taskId"])
    assert done["status"] == "SUCCEEDED"
    stored = await row(env, task["taskId"])
    sim_task = env.sim().tasks[stored["rh_task_id"]]
    outputs_before = env.calls("outputs")
    for _ in range(3):
        env.sim().send_webhook(sim_task)
    token = env.state.tokens.token("global", uuid.UUID(task["taskId"]))
    status, _ = await post_webhook(env, "global", token, callback(stored["rh_task_id"], FAKE_OUTPUTS))
    assert status == 200
    await asyncio.sleep(0.5)
    assert await row(env, task["taskId"]) == stored
    assert env.calls("outputs") == outputs_before  # an ended task is never asked about again
    status, body = await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
    assert body["outputs"] == done["outputs"]


async def test_the_webhook_url_carries_an_hmac_never_the_key(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=30))
    status, task = await env.start()
    assert status == 200, task
    sim_task = next(iter(env.sim().tasks.values()))
    assert sim_task.webhook_url.startswith(env.edge + "/api/effects/webhooks/runninghub/global?token=")
    assert env.keys["global"] not in sim_task.webhook_url
    assert task["taskId"] in sim_task.webhook_url
