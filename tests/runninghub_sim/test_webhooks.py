"""TASK_END webhooks: body shape, retries, failures, replays, refusal of non-loopback URLs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.runninghub_sim.conftest import Api
from tests.support import eventually
from tools.runninghub_sim import RunningSim, SimConfig, running_sim


class Receiver:
    """A webhook endpoint on a free port; answers `statuses` in turn, then 200."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append(await request.json())
        self.arrived.set()
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status == 200}, status=status)

    async def wait_for(self, count: int) -> None:
        for _ in range(500):
            if len(self.received) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{len(self.received)} webhooks arrived, expected {count}")


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    hook = Receiver()
    app = web.Application()
    app.router.add_post("/hook/{token}", hook.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield hook, f"http://{host}:{port}/hook/secret-token"
    await runner.cleanup()


async def test_task_end_body(sim: RunningSim, api: Api, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    task_id = await api.started(webhookUrl=url)
    await hook.wait_for(1)
    event = hook.received[0]
    assert set(event) == {"event", "taskId", "eventData"}
    assert event["event"] == "TASK_END" and event["taskId"] == task_id
    assert isinstance(event["eventData"], str)
    data = json.loads(event["eventData"])
    assert data["code"] == 0 and isinstance(data["data"][0]["taskCostTime"], int)
    # the outputs are there by the time the webhook arrives
    assert (await api.post("/task/openapi/outputs", taskId=task_id))["data"][0]["fileUrl"] == data["data"][0][
        "fileUrl"
    ]
    assert sim.sim.counters()["webhooks"]["webhooks_delivered"] == 1


async def test_failed_and_cancelled_tasks_announce_805(
    sim: RunningSim, api: Api, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    sim.sim.plan([{"outcome": "FAILED"}, {"queueSeconds": 3600}])
    await api.started(webhookUrl=url)
    cancelled = await api.started(webhookUrl=url)
    await api.post("/task/openapi/cancel", taskId=cancelled)
    await hook.wait_for(2)
    for event in hook.received:
        data = json.loads(event["eventData"])
        assert data["code"] == 805 and data["data"]["failedReason"]["exception_message"]


async def test_retries_until_delivered(sim: RunningSim, api: Api, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    hook.statuses = [500, 503]
    await api.started(webhookUrl=url)
    await hook.wait_for(3)
    # the simulator counts the delivery once our 200 reaches it, just after we recorded it
    await eventually(
        lambda: sim.sim.counters()["webhooks"]["webhooks_delivered"] == 1, 10, "the delivery counted"
    )
    assert sim.sim.counters()["webhooks"]["webhook_attempts"] == 3
    assert len(hook.received) == 3


async def test_gives_up_after_the_retries_and_can_be_resent(
    sim: RunningSim, api: Api, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    hook.statuses = [500] * 4
    task_id = await api.started(webhookUrl=url)
    await hook.wait_for(4)
    for _ in range(100):
        detail = await api.post("/task/openapi/getWebhookDetail", taskId=task_id)
        if detail["data"]["callbackStatus"] == "FAILED":
            break
        await asyncio.sleep(0.01)
    assert detail["data"]["retryCount"] == 3 and detail["data"]["callbackStatus"] == "FAILED"
    assert sim.sim.counters()["webhooks"]["webhooks_failed"] == 1
    resent = await api.post("/task/openapi/retryWebhook", webhookId=detail["data"]["id"], webhookUrl=url)
    assert resent["code"] == 0
    await hook.wait_for(5)


async def test_duplicates_and_replays(session: aiohttp.ClientSession, receiver: tuple[Receiver, str]) -> None:
    hook, url = receiver
    async with running_sim(config=SimConfig.fast(webhook_duplicate_rate=1.0)) as sim:
        api = Api(session, sim.url)
        task_id = await api.started(webhookUrl=url)
        await hook.wait_for(2)
        async with session.post(f"{sim.url}/__sim/webhooks/{task_id}/replay") as reply:
            assert reply.status == 200
        await hook.wait_for(4)
        assert len({json.dumps(e, sort_keys=True) for e in hook.received}) == 1


async def test_only_loopback_urls_are_called(sim: RunningSim, api: Api) -> None:
    await api.started(webhookUrl="http://203.0.113.7/hook")
    for _ in range(200):
        if sim.sim.counters()["webhooks"]["webhooks_refused"]:
            break
        await asyncio.sleep(0.01)
    assert sim.sim.counters()["webhooks"]["webhooks_refused"] == 1
    assert sim.sim.counters()["webhooks"]["webhooks_delivered"] == 0


async def test_validation_failures_send_no_webhook(
    sim: RunningSim, api: Api, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    reply = await api.run(
        nodes=[{"nodeId": "42", "fieldName": "scale_by", "fieldValue": "9"}], webhookUrl=url
    )
    assert reply["data"]["taskStatus"] == "FAILED"
    await api.started(webhookUrl=url)  # a good one afterwards: only its webhook arrives
    await hook.wait_for(1)
    await asyncio.sleep(0.1)
    assert len(hook.received) == 1


async def test_dropped_and_delayed_webhooks(
    session: aiohttp.ClientSession, receiver: tuple[Receiver, str]
) -> None:
    hook, url = receiver
    async with running_sim(config=SimConfig.fast(webhook_drop_rate=1.0)) as sim:
        api = Api(session, sim.url)
        task_id = await api.started(webhookUrl=url)
        for _ in range(200):
            if sim.sim.counters()["webhooks"]["webhooks_dropped"]:
                break
            await asyncio.sleep(0.01)
        assert sim.sim.counters()["webhooks"]["webhooks_dropped"] == 1
        assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "SUCCESS"
        assert hook.received == [] and sim.sim.counters()["webhooks"]["webhook_attempts"] == 0
        sim.sim.config = sim.sim.config.updated({"webhookDropRate": 0, "webhookDelaySeconds": 3600})
        held = await api.started(webhookUrl=url)
        for _ in range(200):  # the task ends and its delivery is queued, but held back
            if sim.sim.webhooks.deliveries.get(held):
                break
            await asyncio.sleep(0.01)
        [delivery] = sim.sim.webhooks.deliveries[held]
        assert (delivery.status, delivery.attempts) == ("PENDING", 0) and hook.received == []
