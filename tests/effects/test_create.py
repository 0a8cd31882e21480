"""Starting tasks through the edge: every create code of the reference, the
back-pressure retries, the ambiguous create reconciled through the webhook,
requestId idempotency under concurrent duplicates, the per-user rate limit,
and validation of inputs and parameters against the webapp's config."""

from __future__ import annotations

import asyncio

import pytest

from tests.effects.conftest import EnvFactory
from tests.support import unique_name
from tools.runninghub_sim import SimConfig
from tools.runninghub_sim.faults import FaultRule

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("code", "http", "words"),
    [
        (301, 400, "refused the inputs"),
        (803, 400, "do not match"),
        (433, 400, "validation failed"),
        (901, 400, "webapp not found"),
        (380, 400, "cannot run"),
        (412, 400, "cannot run"),
        (810, 400, "never saved"),
        (416, 503, "balance"),
        (801, 503, "free"),
        (802, 503, "key invalid"),
        (814, 429, "queue is full"),
    ],
)
async def test_each_create_refusal_is_answered_and_nothing_is_kept(
    effects_env: EnvFactory, code: int, http: int, words: str
) -> None:
    env = await effects_env()
    image = await env.upload()
    env.sim().faults.script("ai-app/run", [code])
    request_id = unique_name("req")
    status, body = await env.start(request_id=request_id, inputs={"image": image})
    assert status == http, body
    assert words in body["message"]
    assert env.keys["global"] not in body["message"]
    assert env.calls("ai-app/run") == 1  # never retried
    # Nothing was created upstream, so the row is gone and the same requestId may be sent again.
    status, body = await env.start(request_id=request_id, inputs={"image": image})
    assert status == 200, body
    assert env.creates() == 1


@pytest.mark.parametrize("code", [421, 415, 804])
async def test_back_pressure_codes_are_retried_after_a_delay(effects_env: EnvFactory, code: int) -> None:
    env = await effects_env()
    env.sim().faults.script("ai-app/run", [code, code])
    status, task = await env.start()
    assert status == 200, task
    assert env.calls("ai-app/run") == 3 and env.creates() == 1
    assert (await env.poll(task["taskId"]))["status"] == "SUCCEEDED"


async def test_back_pressure_that_lasts_is_unavailable(effects_env: EnvFactory) -> None:
    env = await effects_env(runninghub_busy_max_wait_seconds=0.1, runninghub_busy_delay_scale=0.002)
    env.sim().faults.script("ai-app/run", [421] * 20)
    status, body = await env.start()
    assert status == 503 and "concurrency limit" in body["message"], body
    assert env.creates() == 0


@pytest.mark.parametrize("fault", ["http:502:after", "reset:after"])
async def test_an_ambiguous_create_is_reconciled_through_the_webhook(
    effects_env: EnvFactory, fault: str
) -> None:
    """The create reached RunningHub but its reply was lost: no second create;
    the webhook carrying our task id brings the task back."""
    env = await effects_env(SimConfig.fast(run_seconds=0.3))
    env.sim().faults.script("ai-app/run", [fault])
    status, task = await env.start()
    assert status == 200, task
    assert task["status"] == "QUEUED"
    done = await env.poll(task["taskId"])
    assert done["status"] == "SUCCEEDED" and done["outputs"], done
    assert env.creates() == 1 and env.calls("ai-app/run") == 1
    rh_id = await env.pool.fetchval("SELECT rh_task_id FROM tasks WHERE task_id = $1::uuid", task["taskId"])
    assert rh_id in env.sim().tasks


@pytest.mark.parametrize("fault", ["http:503", "reset", "hang", 500])
async def test_a_create_that_never_arrived_fails_after_the_no_word_timeout(
    effects_env: EnvFactory, fault: object
) -> None:
    env = await effects_env(runninghub_timeout_seconds=0.5, effects_reconcile_timeout_seconds=1.0)
    env.sim().faults.script("ai-app/run", [fault])
    status, task = await env.start()
    assert status == 200, task
    done = await env.poll(task["taskId"], timeout=15)
    assert done["status"] == "FAILED"
    assert "never confirmed" in done["failure"]["message"]
    assert env.creates() == 0 and env.calls("ai-app/run") == 1  # never sent twice


async def test_concurrent_duplicates_make_one_task(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=0.5))
    env.sim().faults.set_rule("ai-app/run", FaultRule(latency_ms=200))
    image = await env.upload()
    request_id = unique_name("req")
    replies = await asyncio.gather(
        *(env.start(request_id=request_id, inputs={"image": image}) for _ in range(12))
    )
    assert all(status == 200 for status, _ in replies), replies
    assert len({body["taskId"] for _, body in replies}) == 1
    assert env.creates() == 1 and env.calls("ai-app/run") == 1
    count = await env.pool.fetchval("SELECT count(*) FROM tasks WHERE request_id = $1", request_id)
    assert count == 1
    # Another user's same requestId is another task.
    status, other = await env.start(request_id=request_id, user="bob")
    assert status == 200 and other["taskId"] != replies[0][1]["taskId"]
    # The same requestId for another effect is a conflict, not a silent reuse.
    status, body = await env.start(effect="anime-style", request_id=request_id)
    assert status == 409, body


async def test_the_per_user_rate_limit_answers_429(effects_env: EnvFactory) -> None:
    env = await effects_env(effects_rate_limit_tasks=3, effects_rate_limit_window_seconds=60)
    image = await env.upload()
    started = [await env.start(inputs={"image": image}) for _ in range(3)]
    assert [s for s, _ in started] == [200, 200, 200]
    status, body = await env.start(inputs={"image": image})
    assert status == 429, body
    assert any("RetryInfo" in d["@type"] for d in body["details"])
    # A resend of an earlier request is not a new task and is not limited.
    status, again = await env.start(request_id=started[0][1]["requestId"], inputs={"image": image})
    assert status == 200 and again["taskId"] == started[0][1]["taskId"]
    # Another user has a budget of their own.
    status, _ = await env.start(user="bob")
    assert status == 200
    assert env.creates() == 4


@pytest.mark.parametrize(
    ("effect", "inputs", "parameters", "field"),
    [
        ("portrait-upscale", {}, {}, "inputs['image']"),
        ("portrait-upscale", {"image": "../../etc/passwd"}, {}, "inputs['image']"),
        ("portrait-upscale", {"image": "api/a.png"}, {"scale_by": "3"}, "parameters['scale_by']"),
        ("portrait-upscale", {"image": "api/a.png"}, {"nope": "1"}, "parameters['nope']"),
        ("portrait-upscale", {"image": "api/a.png"}, {"image": "api/b.png"}, "parameters['image']"),
        ("portrait-upscale", {"image": "api/a.png\x00"}, {}, "inputs['image']"),
        ("background-change", {"image": "api/a.png"}, {}, "inputs['image']"),
        ("background-change", {"12:image": "api/a.png"}, {}, "inputs['27:image']"),
        ("flux-kontext", {"image": "api/a.png"}, {"seed": "1e99"}, "parameters['seed']"),
        ("flux-kontext", {"image": "api/a.png"}, {"seed": "99999999999999999999"}, "parameters['seed']"),
        ("flux-kontext", {"image": "api/a.png"}, {"guidance": "nan"}, "parameters['guidance']"),
        ("flux-kontext", {"image": "api/a.png"}, {"enabled": "yes"}, "parameters['enabled']"),
        ("flux-kontext", {"image": "api/a.png"}, {"prompt": "x" * 5000}, "parameters['prompt']"),
    ],
)
async def test_inputs_and_parameters_are_checked_against_the_webapp(
    effects_env: EnvFactory, effect: str, inputs: dict[str, str], parameters: dict[str, str], field: str
) -> None:
    env = await effects_env()
    status, body = await env.start(effect=effect, inputs=inputs, parameters=parameters)
    assert status == 400, body
    fields = [v["field"] for v in body["details"][0]["fieldViolations"]]
    assert field in fields, fields
    assert env.calls("ai-app/run") == 0


async def test_request_fields_are_checked(effects_env: EnvFactory) -> None:
    env = await effects_env()
    for body, field in (
        ({"requestId": "", "inputs": {"image": "api/a.png"}}, "requestId"),
        ({"requestId": "x" * 200, "inputs": {"image": "api/a.png"}}, "requestId"),
        ({"requestId": "r\u00e9", "inputs": {"image": "api/a.png"}}, "requestId"),
        ({"requestId": "r-1", "region": "cn", "inputs": {"image": "api/a.png"}}, "region"),
        ({"requestId": "r-1", "instanceType": "huge", "inputs": {"image": "api/a.png"}}, "instanceType"),
    ):
        status, reply = await env.request("POST", "/api/effects/portrait-upscale/tasks", json=body)
        assert status == 400, reply
        assert reply["details"][0]["fieldViolations"][0]["field"] == field
    status, _ = await env.request("POST", "/api/effects/nope/tasks", json={"requestId": "r-1"})
    assert status == 404
    status, _ = await env.request(
        "POST", "/api/effects/portrait-upscale/tasks", user=None, json={"requestId": "r"}
    )
    assert status == 401


async def test_two_fields_with_one_name_take_node_ids(effects_env: EnvFactory) -> None:
    env = await effects_env()
    subject, background = await env.upload(), await env.upload()
    status, task = await env.start(
        effect="background-change",
        inputs={"12:image": subject, "27:image": background},
        parameters={"text": "golden hour"},
    )
    assert status == 200, task
    sent = next(iter(env.sim().tasks.values()))
    assert sent.values == {"12:image": subject, "27:image": background, "31:text": "golden hour"}


async def test_a_failed_task_carries_runninghubs_reason(effects_env: EnvFactory) -> None:
    env = await effects_env()
    reason = {
        "node_id": "42",
        "node_name": "UpscaleModelLoader",
        "exception_type": "torch.OutOfMemoryError",
        "exception_message": "CUDA out of memory",
        "traceback": "...",
    }
    env.sim().plan([{"outcome": "FAILED", "failedReason": reason}], env.keys["global"])
    status, task = await env.start()
    assert status == 200, task
    done = await env.poll(task["taskId"])
    assert done["status"] == "FAILED"
    assert done["failure"] == {
        "nodeName": "UpscaleModelLoader",
        "exceptionType": "torch.OutOfMemoryError",
        "message": "CUDA out of memory",
    }


async def test_a_task_refused_by_the_graphs_validation_fails_at_once(effects_env: EnvFactory) -> None:
    """code 0 with promptTips.node_errors: the task exists but failed validation."""
    env = await effects_env()
    status, task = await env.start(inputs={"image": "api/never-uploaded.png"})
    assert status == 200, task
    assert task["status"] == "FAILED" and task["failure"]["exceptionType"] == "validation", task
    assert env.creates() == 1
