"""A simulator per test (fast timings, its own free port) and a small raw client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tools.runninghub_sim import RunningSim, SimConfig, running_sim

KEY = "test-key-0123456789abcdef"
PORTRAIT = "1947926545896734722"  # image + LIST scale_by (2, 4)
KONTEXT = "1937084629516193794"  # image, STRING, LIST, INT, FLOAT, BOOLEAN; two output nodes
CN_ONLY = "1907581130097192962"


class Api:
    """RunningHub's wire format, spoken by hand."""

    def __init__(self, session: aiohttp.ClientSession, url: str, key: str = KEY) -> None:
        self.session, self.url, self.key = session, url, key

    async def post(self, path: str, **body: Any) -> dict[str, Any]:
        body.setdefault("apiKey", self.key)
        async with self.session.post(self.url + path, json=body) as reply:
            assert reply.status == 200, await reply.text()
            result: dict[str, Any] = await reply.json()
            assert set(result) == {"code", "msg", "data"}
            return result

    async def upload(self, content: bytes = b"\x89PNG\r\n\x1a\n" + b"0" * 64, name: str = "in.png") -> str:
        form = aiohttp.FormData()
        form.add_field("apiKey", self.key)
        form.add_field("fileType", "image")
        form.add_field("file", content, filename=name, content_type="image/png")
        async with self.session.post(self.url + "/task/openapi/upload", data=form) as reply:
            result = await reply.json()
        assert result["code"] == 0, result
        return str(result["data"]["fileName"])

    async def run(
        self, webapp: str = PORTRAIT, nodes: list[dict[str, Any]] | None = None, **extra: Any
    ) -> dict[str, Any]:
        if nodes is None:
            nodes = [{"nodeId": "15", "fieldName": "image", "fieldValue": await self.upload()}]
        return await self.post("/task/openapi/ai-app/run", webappId=webapp, nodeInfoList=nodes, **extra)

    async def started(self, **kwargs: Any) -> str:
        reply = await self.run(**kwargs)
        assert reply["code"] == 0, reply
        return str(reply["data"]["taskId"])


@pytest.fixture
async def sim() -> AsyncIterator[RunningSim]:
    async with running_sim(config=SimConfig.fast(numeric_id_rate=0.0, running_null_rate=0.0)) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def api(sim: RunningSim, session: aiohttp.ClientSession) -> Api:
    return Api(session, sim.url)
