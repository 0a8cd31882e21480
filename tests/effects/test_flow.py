"""The happy path through the REST edge: catalog, upload, start, poll, outputs;
who may see and cancel a task; a webhook makes further polls free."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.effects.envelope import FAILED, Failure, TaskState
from tests.effects.conftest import EnvFactory, png_bytes
from tools.runninghub_sim import SimConfig

pytestmark = pytest.mark.timeout(120)


async def test_catalog_lists_effects_with_their_webapps_parameters(effects_env: EnvFactory) -> None:
    env = await effects_env()
    status, body = await env.request("GET", "/api/effects?region=global", user=None)
    assert status == 200, body
    effects = {e["effectId"]: e for e in body["effects"]}
    assert "portrait-upscale" in effects and "ultimate-upscale" not in effects
    upscale = effects["portrait-upscale"]
    assert upscale["webappId"] == "1947926545896734722"
    params = {p["fieldName"]: p for p in upscale["parameters"]}
    assert params["scale_by"]["type"] == "LIST" and params["scale_by"]["options"] == ["2", "4"]
    assert params["scale_by"]["description"] == "Enlarge by"  # the catalog's label
    assert params["image"]["type"] == "IMAGE"

    status, page = await env.request("GET", "/api/effects?pageSize=2", user=None)
    assert status == 200 and len(page["effects"]) == 2 and page["nextPageToken"]
    status, rest = await env.request(
        "GET", f"/api/effects?pageSize=100&pageToken={page['nextPageToken']}", user=None
    )
    assert status == 200 and len(rest["effects"]) == 5 and not rest.get("nextPageToken")

    status, one = await env.request("GET", "/api/effects/ultimate-upscale", user=None)
    assert status == 200 and one["region"] == "cn" and len(one["parameters"]) == 4
    status, _ = await env.request("GET", "/api/effects/no-such-effect", user=None)
    assert status == 404
    status, bad = await env.request("GET", "/api/effects?region=mars", user=None)
    assert status == 400 and bad["details"][0]["fieldViolations"][0]["field"] == "region"


async def test_upload_start_poll_outputs(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=1.0))
    file_name = await env.upload()
    assert file_name.startswith("api/") and file_name.endswith(".png")
    status, task = await env.start(inputs={"image": file_name}, parameters={"scale_by": "4"})
    assert status == 200, task
    assert task["status"] in ("QUEUED", "RUNNING") and task["effectId"] == "portrait-upscale"
    done = await env.poll(task["taskId"])
    assert done["status"] == "SUCCEEDED", done
    assert done["outputs"] and done["outputs"][0]["url"].startswith("http")
    assert done["outputs"][0]["fileType"] == "png" and done["outputs"][0]["nodeId"] == "9"
    assert done["costSeconds"] == 1.0
    assert env.creates() == 1
    sent = next(iter(env.sim().tasks.values()))
    assert sent.values == {"15:image": file_name, "42:scale_by": "4"}
    coins = await env.pool.fetchval("SELECT cost_coins FROM tasks WHERE task_id = $1::uuid", done["taskId"])
    assert coins == "12"


async def test_after_the_webhook_polls_need_no_upstream_call(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=0.3))
    status, task = await env.start()
    assert status == 200, task
    # Wait for the TASK_END callback to be confirmed and stored, without polling.
    for _ in range(200):
        row = await env.pool.fetchrow("SELECT status FROM tasks WHERE task_id = $1::uuid", task["taskId"])
        if row["status"] == "SUCCEEDED":
            break
        await asyncio.sleep(0.05)
    assert row["status"] == "SUCCEEDED"
    assert env.sim().counters()["webhooks"]["webhooks_delivered"] >= 1
    before = env.calls("outputs")
    for _ in range(20):
        status, body = await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
        assert status == 200 and body["status"] == "SUCCEEDED" and body["outputs"]
    assert env.calls("outputs") == before


async def test_the_interruption_runninghub_reports_after_a_cancel_is_recorded_as_cancelled(
    effects_env: EnvFactory,
) -> None:
    """RunningHub reports a cancelled task as FAILED (interrupted). A poll's refresh or
    a callback may learn that before CancelTask records its end: once the user asked to
    cancel, that failure is the cancel."""
    env = await effects_env(SimConfig.fast(run_seconds=30))
    store = env.state.tasks._store
    interrupted = TaskState(FAILED, failure=Failure("", "InterruptProcessingException", "Task cancelled"))
    outcomes = {}
    for cancel_asked in (True, False):
        status, task = await env.start()
        assert status == 200, task
        tid = uuid.UUID(task["taskId"])
        await store.request_cancel(tid, True)
        if not cancel_asked:  # asked, then withdrawn (RunningHub refused the cancel)
            await store.request_cancel(tid, False)
        row, ended = await store.apply(tid, interrupted)
        assert ended and row is not None
        outcomes[cancel_asked] = (row.status, row.failure)
    assert outcomes[True] == ("CANCELLED", None)
    assert outcomes[False] == (
        "FAILED",
        {"nodeName": "", "exceptionType": "InterruptProcessingException", "message": "Task cancelled"},
    )


async def test_a_user_cannot_see_or_cancel_another_users_task(effects_env: EnvFactory) -> None:
    env = await effects_env(SimConfig.fast(run_seconds=30))
    status, task = await env.start(user="alice")
    assert status == 200, task
    path = f"/api/effects/tasks/{task['taskId']}"
    status, _ = await env.request("GET", path, user="mallory")
    assert status == 404
    status, _ = await env.request("POST", path + ":cancel", user="mallory", json={})
    assert status == 404
    status, _ = await env.request("GET", path, user=None)
    assert status == 401
    status, body = await env.request("GET", path, user="root", role="admin")
    assert status == 200 and body["taskId"] == task["taskId"]
    status, body = await env.request("GET", path, user="alice")
    assert status == 200 and body["status"] in ("QUEUED", "RUNNING")
    status, _ = await env.request("GET", "/api/effects/tasks/not-a-uuid", user="alice")
    assert status == 404

    status, cancelled = await env.request("POST", path + ":cancel", user="alice", json={})
    assert status == 200 and cancelled["status"] == "CANCELLED", cancelled
    assert env.calls("cancel") == 1
    status, again = await env.request("GET", path, user="alice")
    assert status == 200 and again["status"] == "CANCELLED"
    # Cancelling again is harmless; the task stays cancelled even after RunningHub's callback.
    status, again = await env.request("POST", path + ":cancel", user="alice", json={})
    assert status == 200 and again["status"] == "CANCELLED"
    await asyncio.sleep(0.5)
    status, again = await env.request("GET", path, user="alice")
    assert again["status"] == "CANCELLED"


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (b"GIF89a" + b"\0" * 100, "image/png"),
        (b"%PDF-1.7 not an image", "image/jpeg"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/webp"),
        (b"RIFF\0\0\0\0WAVEfmt ", "image/webp"),
        (b"", "image/png"),
    ],
)
async def test_a_non_image_upload_is_refused(effects_env: EnvFactory, data: bytes, content_type: str) -> None:
    env = await effects_env()
    status, body = await env.request(
        "POST", "/api/effects/uploads", data=data, headers={"Content-Type": content_type}
    )
    assert status == 400, body
    assert body["details"][0]["fieldViolations"][0]["field"] == "file"
    assert env.calls("upload") == 0


async def test_upload_type_comes_from_the_bytes_and_size_is_bounded(effects_env: EnvFactory) -> None:
    env = await effects_env(effects_upload_max_bytes=1024)
    jpeg = b"\xff\xd8\xff\xe0" + b"\0" * 100
    status, body = await env.request(
        "POST", "/api/effects/uploads?region=cn", data=jpeg, headers={"Content-Type": "image/png"}
    )
    assert status == 200 and body["fileName"].endswith(".jpg") and body["region"] == "cn", body
    assert body["sizeBytes"] == str(len(jpeg))
    status, body = await env.request(
        "POST", "/api/effects/uploads", data=png_bytes() + b"\0" * 2000, headers={"Content-Type": "image/png"}
    )
    assert status == 400, body
    status, _ = await env.request(
        "POST", "/api/effects/uploads", user=None, data=png_bytes(), headers={"Content-Type": "image/png"}
    )
    assert status == 401


async def test_cancel_of_a_task_runninghub_no_longer_knows(effects_env: EnvFactory) -> None:
    """807 on cancel: RunningHub forgot the task; it is cancelled here all the same."""
    env = await effects_env(SimConfig.fast(run_seconds=30))
    status, task = await env.start()
    assert status == 200, task
    env.sim().tasks.clear()  # RunningHub forgot it (its results expire after about a day)
    status, body = await env.request("POST", f"/api/effects/tasks/{task['taskId']}:cancel", json={})
    assert status == 200 and body["status"] == "CANCELLED", body
    assert env.sim().counters()["replies"].get("cancel:807") == 1


async def test_cancel_of_an_ended_task_is_refused(effects_env: EnvFactory) -> None:
    env = await effects_env()
    status, task = await env.start()
    assert status == 200, task
    assert (await env.poll(task["taskId"]))["status"] == "SUCCEEDED"
    status, body = await env.request("POST", f"/api/effects/tasks/{task['taskId']}:cancel", json={})
    assert status == 400 and "already ended" in body["message"], body
    assert env.calls("cancel") == 0


@pytest.mark.parametrize(
    ("replies", "http", "calls"),
    [
        (["http:503", "ok"], 200, 2),  # a failed upload is retried
        ([808, "ok"], 200, 2),  # 808 upload failed: retried
        (["reset", "ok"], 200, 2),
        ([809], 400, 1),  # too large for RunningHub: the user's to fix
        ([802], 503, 1),  # key invalid: ours, not the user's
    ],
)
async def test_upload_codes_are_handled_as_the_reference_says(
    effects_env: EnvFactory, replies: list[object], http: int, calls: int
) -> None:
    env = await effects_env()
    env.sim().faults.script("upload", replies)
    status, body = await env.request(
        "POST", "/api/effects/uploads", data=png_bytes(), headers={"Content-Type": "image/png"}
    )
    assert status == http, body
    assert env.calls("upload") == calls
    if http == 200:
        assert body["fileName"].startswith("api/") and body["fileName"].endswith(".png")
    else:
        assert env.keys["global"] not in body["message"]


async def test_outputs_states_and_transient_errors_while_polling(effects_env: EnvFactory) -> None:
    """813 queued and 804 running are states, code 0 with null data is still running, and
    500 / 5xx / a reset are retried or served from the last known state: a poll never
    answers an error for them, and the task still ends with its outputs."""
    env = await effects_env(
        SimConfig.fast(queue_seconds=0.3, run_seconds=1.5, outputs_lag_seconds=0.5, running_null_rate=0.5)
    )
    status, task = await env.start()
    assert status == 200, task
    env.sim().faults.script("outputs", [813, 804, 500, "http:502", "reset", 0, 500, 500, 500, 500])
    seen = set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        status, body = await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
        assert status == 200, body
        seen.add(body["status"])
        if body["status"] == "SUCCEEDED":
            break
        assert body["status"] in ("QUEUED", "RUNNING"), body
        assert loop.time() < deadline, body
        await asyncio.sleep(0.05)
    assert body["outputs"] and body["costSeconds"] >= 1
    assert not env.sim().faults.scripts.get("outputs"), "every scripted reply was met"
    replies = env.sim().counters()["replies"]
    for code in (813, 804, 500):
        assert replies.get(f"outputs:{code}", 0) >= 1, (code, replies)


async def test_a_task_runninghub_no_longer_knows_fails_after_the_reconcile_timeout(
    effects_env: EnvFactory,
) -> None:
    """807 on outputs: not retried; the last known state is served while the task is
    young (RunningHub may not list it yet), then it fails with a clear reason rather
    than staying open forever."""
    env = await effects_env(SimConfig.fast(run_seconds=600), effects_reconcile_timeout_seconds=1.0)
    status, task = await env.start()
    assert status == 200, task
    env.sim().faults.script("outputs", [807] * 1000)
    status, body = await env.request("GET", f"/api/effects/tasks/{task['taskId']}")
    assert status == 200 and body["status"] in ("QUEUED", "RUNNING"), body
    done = await env.poll(task["taskId"])
    assert done["status"] == "FAILED"
    assert done["failure"]["exceptionType"] == "unknown_task"
    assert "no longer knows" in done["failure"]["message"]
    assert env.sim().counters()["replies"].get("outputs:807", 0) >= 1
    assert env.creates() == 1  # and nothing was started again
