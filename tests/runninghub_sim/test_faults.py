"""Injected faults (latency, 5xx, resets, hangs, scripted codes), the seed, and counters."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.runninghub_sim.conftest import KEY, PORTRAIT, Api
from tools.runninghub_sim import RunningSim, SimConfig, key_id, running_sim

TIMEOUT = aiohttp.ClientTimeout(total=0.3)


async def control(
    session: aiohttp.ClientSession, sim: RunningSim, method: str, path: str, body: Any = None
) -> Any:
    async with session.request(method, sim.url + "/__sim/" + path, json=body) as reply:
        assert reply.status == 200, await reply.text()
        return await reply.json()


async def raw_run(
    session: aiohttp.ClientSession, sim: RunningSim, timeout: aiohttp.ClientTimeout | None = None
) -> aiohttp.ClientResponse:
    body = {"apiKey": KEY, "webappId": PORTRAIT, "nodeInfoList": []}
    async with session.post(sim.url + "/task/openapi/ai-app/run", json=body, timeout=timeout) as reply:
        await reply.read()
        return reply


async def test_http_5xx_before_and_after(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    await control(
        session, sim, "PUT", "faults", {"endpoint": "ai-app/run", "errorRate": 1, "errorStatus": 502}
    )
    assert (await raw_run(session, sim)).status == 502
    assert sim.sim.creates(KEY) == 0  # refused before any work
    await control(session, sim, "PUT", "faults", {"endpoint": "ai-app/run", "errorRate": 1, "phase": "after"})
    assert (await raw_run(session, sim)).status == 503
    assert sim.sim.creates(KEY) == 1  # the task exists though the client saw a 503
    counters = await control(session, sim, "GET", "counters")
    assert counters["events"]["fault_http"] == 2
    assert counters["replies"]["ai-app/run:http503"] == 1


async def test_connection_reset_before_and_after(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    sim.sim.faults.script("ai-app/run", ["reset", "reset:after"])
    for expected_creates in (0, 1):
        with pytest.raises(aiohttp.ClientConnectionError):
            await raw_run(session, sim)
        assert sim.sim.creates(KEY) == expected_creates
    assert (await raw_run(session, sim)).status == 200  # the script is spent
    assert sim.sim.counters()["events"]["fault_reset"] == 2


async def test_hang_until_the_client_gives_up(session: aiohttp.ClientSession) -> None:
    async with running_sim(config=SimConfig.fast(hang_seconds=30)) as sim:
        await control(session, sim, "PUT", "faults", {"endpoint": "status", "timeoutRate": 1})
        api = Api(session, sim.url)
        task_id = await api.started()
        with pytest.raises(TimeoutError):
            async with session.post(
                sim.url + "/task/openapi/status", json={"apiKey": KEY, "taskId": task_id}, timeout=TIMEOUT
            ):
                pass
        sim.sim.faults.script("ai-app/run", ["hang:after"])
        with pytest.raises(TimeoutError):
            await raw_run(session, sim, TIMEOUT)
        for _ in range(100):  # the hung create goes on and creates its task
            if sim.sim.creates(KEY) == 2:
                break
            await asyncio.sleep(0.01)
        assert sim.sim.creates(KEY) == 2


async def test_latency(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    await control(session, sim, "PUT", "faults", {"endpoint": "*", "latencyMs": 2000})
    with pytest.raises(TimeoutError):
        await raw_run(session, sim, TIMEOUT)
    await control(session, sim, "PUT", "faults", {"endpoint": "*", "latencyMs": 1})
    assert (await raw_run(session, sim)).status == 200


async def test_scripted_codes_for_the_next_calls(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    await control(
        session, sim, "POST", "script", {"endpoint": "ai-app/run", "responses": [421, 415, "http:500", "ok"]}
    )
    api = Api(session, sim.url)
    assert (await api.run(nodes=[]))["code"] == 421
    assert (await api.run(nodes=[]))["code"] == 415
    assert (await raw_run(session, sim)).status == 500
    assert (await api.run(nodes=[]))["code"] == 0
    assert (await api.run(nodes=[]))["code"] == 0
    assert sim.sim.creates(KEY) == 2
    task_id = next(iter(sim.sim.tasks))
    sim.sim.faults.script("outputs", [500, 804])
    assert (await api.post("/task/openapi/outputs", taskId=task_id))["code"] == 500
    assert (await api.post("/task/openapi/outputs", taskId=task_id))["code"] == 804
    assert (await api.post("/task/openapi/status", taskId=task_id))["code"] == 0  # other endpoints untouched


async def test_the_seed_makes_faults_repeatable(session: aiohttp.ClientSession) -> None:
    async def pattern(seed: int) -> list[int]:
        async with running_sim(config=SimConfig.fast(seed=seed)) as sim:
            sim.sim.faults.set_rule("status", _rule(error_rate=0.5))
            out = []
            for _ in range(40):
                async with session.post(
                    sim.url + "/task/openapi/status", json={"apiKey": KEY, "taskId": "1"}
                ) as r:
                    out.append(r.status)
            return out

    first, again, other = await pattern(3), await pattern(3), await pattern(4)
    assert first == again and first != other and {200, 503} == set(first)


def _rule(**kwargs: float) -> Any:
    from tools.runninghub_sim.faults import FaultRule

    return FaultRule(**kwargs)


async def test_mixed_faults_over_http_then_cleared(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    await control(
        session,
        sim,
        "PUT",
        "faults",
        {"endpoint": "*", "errorRate": 0.3, "resetRate": 0.3, "timeoutRate": 0.3, "phase": "random"},
    )
    rules = await control(session, sim, "GET", "faults")
    assert rules["rules"]["*"]["resetRate"] == 0.3
    await control(session, sim, "DELETE", "faults")
    assert (await raw_run(session, sim)).status == 200


async def test_bad_control_requests_answer_400(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    bad = [
        ("PUT", "faults", {"endpoint": "nope"}),
        ("PUT", "faults", {"errorRate": 2}),
        ("PUT", "faults", {"errorRate": 0.6, "resetRate": 0.6}),
        ("PUT", "faults", {"errorStatus": 404, "errorRate": 1}),
        ("PUT", "faults", {"phase": "sometimes"}),
        ("POST", "script", {"endpoint": "status", "responses": ["explode"]}),
        ("PUT", "config", {"runSeconds": -1}),
        ("PUT", "config", {"noSuchThing": 1}),
        ("PUT", "config", {"failRate": "half"}),
        ("PUT", "keys", {"key": "k" * 10, "concurrency": "many"}),
        ("POST", "outcomes", {"outcomes": [{"outcome": "MAYBE"}]}),
        ("POST", "reset", {"seed": "x"}),
    ]
    for method, path, body in bad:
        async with session.request(method, f"{sim.url}/__sim/{path}", json=body) as reply:
            assert reply.status == 400, (path, body)
            assert "error" in await reply.json()
    async with session.put(f"{sim.url}/__sim/faults", data=b"{not json") as reply:
        assert reply.status == 400


async def test_counters_over_http_match_the_handle(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    api = Api(session, sim.url)
    other = Api(session, sim.url, key="second-key-0123456789")
    for _ in range(3):
        await api.run(nodes=[])
    await other.run(nodes=[])
    over_http = await control(session, sim, "GET", "counters")
    assert over_http == sim.sim.counters()
    assert over_http["createsByKey"] == {key_id(KEY): 3, key_id("second-key-0123456789"): 1}
    assert over_http["calls"]["ai-app/run"] == 4 and over_http["replies"]["ai-app/run:0"] == 4
    assert KEY not in str(over_http)  # keys never shown
    await control(session, sim, "POST", "reset", {"seed": 9})
    assert (await control(session, sim, "GET", "counters"))["tasksCreated"] == 0
    assert (await control(session, sim, "GET", "config"))["seed"] == 9


async def test_config_and_outcomes_over_http(sim: RunningSim, session: aiohttp.ClientSession) -> None:
    config = await control(session, sim, "PUT", "config", {"queueSeconds": 0, "runSeconds": 3600})
    assert config["runSeconds"] == 3600.0
    await control(session, sim, "POST", "outcomes", {"outcomes": [{"outcome": "FAILED"}], "key": KEY})
    api = Api(session, sim.url)
    task_id = await api.started(nodes=[])
    task = await control(session, sim, "GET", f"tasks/{task_id}")
    assert task["status"] == "RUNNING" and task["outcome"] == "FAILED"
    finished = await control(session, sim, "POST", f"tasks/{task_id}/finish", {"outcome": "FAILED"})
    assert finished["status"] == "FAILED"
    assert (await api.post("/task/openapi/outputs", taskId=task_id))["code"] == 805
    listed = await control(session, sim, "GET", "tasks")
    assert [t["taskId"] for t in listed["tasks"]] == [task_id]
    await control(session, sim, "PUT", "keys", {"key": KEY, "concurrency": 1})
    assert (await api.run(nodes=[]))["code"] == 0  # runs for an hour
    assert (await api.run(nodes=[]))["code"] == 421
