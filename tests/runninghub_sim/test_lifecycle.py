"""Tasks through their life on the simulator, in RunningHub's wire format."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.runninghub_sim.conftest import CN_ONLY, KEY, KONTEXT, PORTRAIT, Api
from tools.runninghub_sim import RunningSim, SimConfig, key_id, running_sim

HOLD = 3600.0  # a phase that lasts until the test ends it


async def test_queued_running_success_with_lagging_outputs(sim: RunningSim, api: Api) -> None:
    sim.sim.plan([{"queueSeconds": HOLD}])
    reply = await api.run()
    assert reply["code"] == 0 and reply["data"]["taskStatus"] == "QUEUED"
    assert reply["data"]["netWssUrl"] is None
    assert len(reply["data"]["taskId"]) == 19 and reply["data"]["clientId"]
    assert json.loads(reply["data"]["promptTips"])["node_errors"] == {}
    task_id = reply["data"]["taskId"]
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "QUEUED"
    queued = await api.post("/task/openapi/outputs", taskId=task_id)
    assert (queued["code"], queued["msg"], queued["data"]) == (813, "APIKEY_TASK_IS_QUEUED", None)

    task = sim.sim.tasks[task_id]
    now = sim.sim.now()
    task.started_at, task.ended_at, task.outputs_at = now, now + HOLD, now + 2 * HOLD
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "RUNNING"
    running = await api.post("/task/openapi/outputs", taskId=task_id)
    assert (running["code"], running["msg"]) == (804, "APIKEY_TASK_IS_RUNNING")

    task.ended_at = now  # SUCCESS, outputs still lagging
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "SUCCESS"
    lagging = await api.post("/task/openapi/outputs", taskId=task_id)
    assert (lagging["code"], lagging["data"]) == (0, None)

    task.outputs_at = now
    done = await api.post("/task/openapi/outputs", taskId=task_id)
    assert done["code"] == 0 and len(done["data"]) == 1
    item = done["data"][0]
    assert item["fileType"] == "png" and item["nodeId"] == "9"
    assert isinstance(item["taskCostTime"], str) and item["consumeCoins"] == "12"
    async with api.session.get(item["fileUrl"]) as image:
        assert image.status == 200 and (await image.read()).startswith(b"\x89PNG")


async def test_a_task_ends_by_the_clock(sim: RunningSim, api: Api) -> None:
    task_id = await api.started()
    seen = []
    for _ in range(200):
        status = (await api.post("/task/openapi/status", taskId=task_id))["data"]
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "SUCCESS":
            break
        await asyncio.sleep(0.01)
    assert seen[-1] == "SUCCESS" and set(seen) <= {"QUEUED", "RUNNING", "SUCCESS"}
    assert seen == sorted(seen, key=["QUEUED", "RUNNING", "SUCCESS"].index)


async def test_running_outputs_sometimes_answer_code_0_with_null(session: aiohttp.ClientSession) -> None:
    config = SimConfig.fast(queue_seconds=0.0, run_seconds=HOLD, running_null_rate=1.0)
    async with running_sim(config=config) as server:
        api = Api(session, server.url)
        task_id = await api.started()
        reply = await api.post("/task/openapi/outputs", taskId=task_id)
        assert (reply["code"], reply["data"]) == (0, None)
        assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "RUNNING"


async def test_failed_task_reports_its_reason(sim: RunningSim, api: Api) -> None:
    reason = {
        "node_id": "7",
        "node_name": "VAEDecode",
        "exception_type": "ValueError",
        "exception_message": "boom",
    }
    sim.sim.plan([{"outcome": "FAILED", "queueSeconds": 0, "runSeconds": 0, "failedReason": reason}])
    task_id = await api.started()
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "FAILED"
    reply = await api.post("/task/openapi/outputs", taskId=task_id)
    assert (reply["code"], reply["msg"]) == (805, "APIKEY_TASK_STATUS_ERROR")
    assert reply["data"]["failedReason"] == reason


async def test_default_failure_reason_has_the_documented_fields(sim: RunningSim, api: Api) -> None:
    sim.sim.plan([{"outcome": "FAILED", "queueSeconds": 0, "runSeconds": 0}])
    task_id = await api.started()
    reason = (await api.post("/task/openapi/outputs", taskId=task_id))["data"]["failedReason"]
    assert {"node_id", "node_name", "exception_type", "exception_message", "traceback"} <= set(reason)


async def test_numeric_task_ids_now_and_then_and_both_forms_accepted(session: aiohttp.ClientSession) -> None:
    async with running_sim(config=SimConfig.fast(numeric_id_rate=0.5, seed=7)) as server:
        api = Api(session, server.url)
        forms = set()
        for _ in range(12):
            reply = await api.run()
            task_id = reply["data"]["taskId"]
            forms.add(type(task_id))
            assert len(str(task_id)) == 19
            for form in (task_id, str(task_id), int(task_id)):
                assert (await api.post("/task/openapi/status", taskId=form))["code"] == 0
        assert forms == {int, str}


async def test_bad_values_give_node_errors_with_code_0(sim: RunningSim, api: Api) -> None:
    image = await api.upload()
    reply = await api.run(
        nodes=[
            {"nodeId": "15", "fieldName": "image", "fieldValue": image},
            {"nodeId": "42", "fieldName": "scale_by", "fieldValue": "8"},
        ]
    )
    assert reply["code"] == 0 and reply["data"]["taskStatus"] == "FAILED"
    tips = json.loads(reply["data"]["promptTips"])
    assert tips["result"] is False
    assert tips["node_errors"]["42"]["errors"][0]["type"] == "value_not_in_list"
    task_id = reply["data"]["taskId"]
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "FAILED"
    assert (await api.post("/task/openapi/outputs", taskId=task_id))["code"] == 805
    assert sim.sim.running_count(KEY) == 0  # it never ran


async def test_unknown_image_and_wrong_types_are_node_errors(sim: RunningSim, api: Api) -> None:
    reply = await api.run(
        webapp=KONTEXT,
        nodes=[
            {"nodeId": "190", "fieldName": "image", "fieldValue": "api/never-uploaded.png"},
            {"nodeId": "194", "fieldName": "seed", "fieldValue": "4.5"},
            {"nodeId": "194", "fieldName": "guidance", "fieldValue": "lots"},
            {"nodeId": "196", "fieldName": "enabled", "fieldValue": "maybe"},
        ],
    )
    errors = json.loads(reply["data"]["promptTips"])["node_errors"]
    assert set(errors) == {"190", "194", "196"}
    assert len(errors["194"]["errors"]) == 2


async def test_valid_values_of_every_type(sim: RunningSim, api: Api) -> None:
    image = await api.upload()
    reply = await api.run(
        webapp=KONTEXT,
        nodes=[
            {"nodeId": "190", "fieldName": "image", "fieldValue": image},
            {"nodeId": "191", "fieldName": "prompt", "fieldValue": "make it snow"},
            {"nodeId": "193", "fieldName": "aspect_ratio", "fieldValue": "16:9"},
            {"nodeId": "194", "fieldName": "seed", "fieldValue": 12},
            {"nodeId": "194", "fieldName": "guidance", "fieldValue": "3.5"},
            {"nodeId": "196", "fieldName": "enabled", "fieldValue": False},
        ],
    )
    assert reply["code"] == 0 and reply["data"]["taskStatus"] in ("QUEUED", "RUNNING")
    task_id = reply["data"]["taskId"]
    sim.sim.finish(task_id, "SUCCESS")
    sim.sim.tasks[task_id].outputs_at = sim.sim.now()
    outputs = (await api.post("/task/openapi/outputs", taskId=task_id))["data"]
    assert [o["nodeId"] for o in outputs] == ["136", "137"]


async def test_refusals_with_business_codes(sim: RunningSim, api: Api) -> None:
    image = await api.upload()
    unknown_node = await api.run(nodes=[{"nodeId": "99", "fieldName": "image", "fieldValue": image}])
    assert (unknown_node["code"], unknown_node["msg"]) == (803, "APIKEY_INVALID_NODE_INFO")
    assert (await api.run(webapp="1111111111111111111"))["code"] == 901
    assert (await api.run(webapp="not-a-number"))["code"] == 301
    assert (await api.run(nodes=[{"nodeId": "15"}]))["code"] == 301
    assert (await api.run(nodes="15"))["code"] == 301  # type: ignore[arg-type]
    assert (await api.post("/task/openapi/ai-app/run", apiKey="", webappId=PORTRAIT))["code"] == 802
    assert (await api.post("/task/openapi/status", taskId="1904000000000000000"))["code"] == 807
    assert (await api.post("/task/openapi/nope"))["code"] == 412
    assert sim.sim.creates(KEY) == 0


async def test_webapp_of_the_other_region_is_not_found(session: aiohttp.ClientSession) -> None:
    async with running_sim("global", SimConfig.fast()) as server:
        api = Api(session, server.url)
        image = await api.upload()
        reply = await api.run(
            webapp=CN_ONLY, nodes=[{"nodeId": "10", "fieldName": "image", "fieldValue": image}]
        )
        assert reply["code"] == 901


async def test_strict_keys_and_revoked_keys(session: aiohttp.ClientSession) -> None:
    async with running_sim(config=SimConfig.fast(open_keys=False)) as server:
        api = Api(session, server.url)
        assert (await api.run(nodes=[]))["code"] == 802
        server.sim.register_key(KEY)
        assert (await api.run(nodes=[]))["code"] == 0
        server.sim.register_key(KEY, valid=False)
        assert (await api.run(nodes=[]))["code"] == 802


async def test_concurrency_limit_per_key(sim: RunningSim, api: Api, session: aiohttp.ClientSession) -> None:
    sim.sim.register_key(KEY, concurrency=1)
    sim.sim.plan([{"queueSeconds": 0, "runSeconds": HOLD}], key=KEY)
    first = await api.started()
    busy = await api.run()
    assert (busy["code"], busy["msg"]) == (421, "TASK_QUEUE_MAXED")
    other = Api(session, sim.url, key="another-key-0123456789")
    assert (await other.run())["code"] == 0  # the limit is per key
    sim.sim.register_key(KEY, busy_code=804)
    assert (await api.run())["code"] == 804
    sim.sim.register_key(KEY, api_type="EXCLUSIVE", busy_code=415)
    assert (await api.run())["code"] == 415
    sim.sim.finish(first, "SUCCESS")
    assert (await api.run())["code"] == 0
    assert sim.sim.creates(KEY) == 2


async def test_personal_queue_limit(sim: RunningSim, api: Api) -> None:
    sim.sim.register_key(KEY, api_type="EXCLUSIVE", concurrency=1, personal_queue_limit=2, busy_code=415)
    sim.sim.plan([{"queueSeconds": HOLD}] * 3, key=KEY)
    assert (await api.run(usePersonalQueue=True))["code"] == 0
    assert (await api.run(usePersonalQueue=True))["code"] == 0
    assert (await api.run(usePersonalQueue=True))["code"] == 814
    assert (await api.run())["code"] == 415


async def test_balance_and_free_users(sim: RunningSim, api: Api) -> None:
    sim.sim.register_key(KEY, coins=12)  # one portrait run
    sim.sim.plan([{"queueSeconds": 0, "runSeconds": 0}], key=KEY)
    await api.started()
    status = await api.post("/uc/openapi/accountStatus", apikey=KEY, apiKey=None)
    assert status["data"]["remainCoins"] == "0" and status["data"]["apiType"] == "NORMAL"
    assert (await api.run())["code"] == 416
    sim.sim.register_key(KEY, coins=100, free_user=True)
    assert (await api.run())["code"] == 801


async def test_account_status(sim: RunningSim, api: Api) -> None:
    sim.sim.plan([{"queueSeconds": HOLD}], key=KEY)
    await api.started()
    reply = await api.post("/uc/openapi/accountStatus", apikey=KEY, apiKey=None)
    data = reply["data"]
    assert data["currentTaskCounts"] == "1"
    assert all(isinstance(data[k], str) for k in ("remainCoins", "currentTaskCounts", "apiType"))


async def test_cancel(sim: RunningSim, api: Api, session: aiohttp.ClientSession) -> None:
    sim.sim.plan([{"queueSeconds": 0, "runSeconds": HOLD}], key=KEY)
    task_id = await api.started()
    other = Api(session, sim.url, key="another-key-0123456789")
    assert (await other.post("/task/openapi/cancel", taskId=task_id))["code"] == 807
    reply = await api.post("/task/openapi/cancel", taskId=task_id)
    assert (reply["code"], reply["data"]) == (0, None)
    assert (await api.post("/task/openapi/status", taskId=task_id))["data"] == "FAILED"
    failed = await api.post("/task/openapi/outputs", taskId=task_id)
    assert failed["data"]["failedReason"]["exception_type"] == "InterruptProcessingException"
    assert (await api.post("/task/openapi/cancel", taskId=task_id))["code"] == 0  # already ended: no change
    assert (await api.post("/task/openapi/cancel", taskId="1904000000000000001"))["code"] == 807


async def test_webapp_config(sim: RunningSim, api: Api, session: aiohttp.ClientSession) -> None:
    async def demo(webapp: str, key: str = KEY) -> dict[str, object]:
        params = {"apiKey": key, "webappId": webapp}
        async with session.get(sim.url + "/api/webapp/apiCallDemo", params=params) as reply:
            result: dict[str, object] = await reply.json()
            return result

    reply = await demo(KONTEXT)
    assert reply["code"] == 0
    data = reply["data"]
    assert isinstance(data, dict)
    nodes = data["nodeInfoList"]
    assert {n["fieldType"] for n in nodes} == {"IMAGE", "STRING", "LIST", "INT", "FLOAT", "BOOLEAN"}
    assert sum(n["nodeId"] == "194" for n in nodes) == 2  # one node, two fields
    listed = next(n for n in nodes if n["fieldType"] == "LIST")
    assert json.loads(listed["fieldData"])[0][0] == "original"
    assert data["webappName"] and data["covers"]
    never_run = await demo("1990000000000000001")
    assert never_run["code"] == 0 and never_run["data"]["nodeInfoList"] == []  # type: ignore[index]
    assert (await demo("1111111111111111111"))["code"] == 901
    assert (await demo(KONTEXT, key=""))["code"] == 802


async def test_uploads(session: aiohttp.ClientSession) -> None:
    async with running_sim(config=SimConfig.fast(max_upload_bytes=1024)) as server:
        api = Api(session, server.url)
        name = await api.upload(b"\xff\xd8\xff" + b"1" * 100, "photo.JPG")
        assert name.startswith("api/") and name.endswith(".jpg") and len(name) == 4 + 64 + 4

        async def refused(content: bytes, filename: str) -> int:
            form = aiohttp.FormData()
            form.add_field("apiKey", KEY)
            form.add_field("file", content, filename=filename)
            async with session.post(server.url + "/task/openapi/upload", data=form) as reply:
                return int((await reply.json())["code"])

        assert await refused(b"x" * 2048, "big.png") == 809
        assert await refused(b"MZ", "tool.exe") == 301
        assert await refused(b"", "empty.png") == 301
        async with session.post(server.url + "/task/openapi/upload", json={"apiKey": KEY}) as reply:
            assert (await reply.json())["code"] == 301


async def test_workflow_create(sim: RunningSim, api: Api) -> None:
    ok = await api.post(
        "/task/openapi/create",
        workflowId="1904136902449209346",
        nodeInfoList=[{"nodeId": "6", "fieldName": "text", "fieldValue": "a cat"}],
    )
    assert ok["code"] == 0 and ok["data"]["taskStatus"] == "QUEUED"
    assert (await api.post("/task/openapi/create", workflowId="1111111111111111111"))["code"] == 380
    assert (await api.post("/task/openapi/create", workflowId="1990000000000000810"))["code"] == 810
    assert sim.sim.counters()["createsByKey"] == {key_id(KEY): 1}
