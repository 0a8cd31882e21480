"""RunningHub's own published Python client (`runninghub-sdk` on PyPI) against the simulator.

The SDK takes a `base_url`; its sync client runs in a thread (it blocks), its
async client on the loop. It polls `/task/openapi/status` then reads
`/task/openapi/outputs`, reads the webapp config from `apiCallDemo`, cancels,
reads the account, and uploads through its own upload endpoint.
"""

from __future__ import annotations

import asyncio

import pytest
from runninghub_sdk import RunningHubClient
from runninghub_sdk.exceptions import RunningHubError
from runninghub_sdk.typedefs import TaskStatus

from tests.runninghub_sim.conftest import KEY, KONTEXT, PORTRAIT
from tools.runninghub_sim import RunningSim


def _client(sim: RunningSim) -> RunningHubClient:
    return RunningHubClient(api_key=KEY, base_url=sim.url, timeout=10)


async def test_run_an_ai_app_poll_and_read_outputs(sim: RunningSim) -> None:
    sim.sim.plan([{"outputsLagSeconds": 0}])

    def scenario() -> tuple[str, list[str], list[str]]:
        with _client(sim) as client:
            demo = client.get_ai_app_api_demo(PORTRAIT)
            image = next(n for n in demo.node_info_list if n.field_type == "IMAGE")
            uploaded = client.upload_file(b"\x89PNG\r\n\x1a\n" + b"1" * 32, filename="me.png")
            task = client.run_ai_app(
                PORTRAIT,
                [{"nodeId": image.node_id, "fieldName": image.field_name, "fieldValue": uploaded.file_name}],
            )
            seen: list[str] = []
            outputs = client.wait_for_completion(
                task.task_id, poll_interval=0.02, timeout=30, on_status_change=lambda s: seen.append(s.value)
            )
            return task.task_id, seen, [o.file_url for o in outputs]

    task_id, seen, urls = await asyncio.to_thread(scenario)
    assert seen[-1] == "SUCCESS" and set(seen) <= {"QUEUED", "RUNNING", "SUCCESS"}
    assert urls == [sim.sim.tasks[task_id].outputs()[0]["fileUrl"]]
    assert sim.sim.creates(KEY) == 1


async def test_status_and_outputs_while_running_then_cancel(sim: RunningSim) -> None:
    sim.sim.plan([{"queueSeconds": 0, "runSeconds": 3600}])

    def scenario() -> tuple[TaskStatus, int, TaskStatus, int]:
        with _client(sim) as client:
            task = client.run_ai_app(PORTRAIT)  # no overrides: the app's defaults
            running = client.get_status(task.task_id)
            with pytest.raises(RunningHubError) as busy:
                client.get_outputs(task.task_id)
            client.cancel(task.task_id)
            after = client.get_status(task.task_id)
            with pytest.raises(RunningHubError) as failed:
                client.get_outputs(task.task_id)
            return running, busy.value.code, after, failed.value.code

    running, busy_code, after, failed_code = await asyncio.to_thread(scenario)
    assert running == TaskStatus.RUNNING and busy_code == 804
    assert after == TaskStatus.FAILED and failed_code == 805


async def test_webapp_config_through_the_async_client(sim: RunningSim) -> None:
    async with _client(sim) as client:
        demo = await client.async_get_ai_app_api_demo(KONTEXT)
        assert demo.webapp_name and demo.covers
        fields = {(n.node_id, n.field_name): n.field_type for n in demo.node_info_list}
        assert fields[("194", "seed")] == "INT" and fields[("194", "guidance")] == "FLOAT"
        task = await client.async_run_ai_app(KONTEXT)
        assert task.task_status in (TaskStatus.QUEUED, TaskStatus.RUNNING)
        assert len(task.task_id) == 19
        account = await client.async_get_account_status()
        assert account.api_type == "NORMAL" and account.current_task_counts == "1"
        with pytest.raises(RunningHubError) as missing:
            await client.async_get_ai_app_api_demo("1111111111111111111")
        assert missing.value.code == 901


async def test_the_sdk_meets_outputs_lagging_behind_success(sim: RunningSim) -> None:
    """The SDK reads outputs once on SUCCESS; while they lag (code 0, null data) it gets none."""
    sim.sim.plan([{"queueSeconds": 0, "runSeconds": 0, "outputsLagSeconds": 3600}])

    def scenario() -> tuple[int, int]:
        with _client(sim) as client:
            task = client.run_ai_app(PORTRAIT)
            early = client.wait_for_completion(task.task_id, poll_interval=0.02, timeout=30)
            sim.sim.tasks[task.task_id].outputs_at = 0.0  # the lag is over
            return len(early), len(client.get_outputs(task.task_id))

    early, late = await asyncio.to_thread(scenario)
    assert (early, late) == (0, 1)
