"""The same path as test_flow against the real RunningHub, opt-in (it spends coins).

    RUNNINGHUB_TEST_REGION=global RUNNINGHUB_TEST_API_KEY=... \\
    RUNNINGHUB_TEST_EFFECT=portrait-upscale [RUNNINGHUB_TEST_PUBLIC_URL=https://...] \\
    .venv/bin/python -m pytest -q tests/effects/test_real_runninghub.py

Without RUNNINGHUB_TEST_API_KEY it is skipped. The effect's parameters come from
the real webapp's config; every IMAGE input gets a small generated PNG. With a
public URL that reaches this machine's edge, RunningHub's callback is used too;
without one the task is followed by polling alone.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import aiohttp
import pytest

from services.effects import app as effects_app
from services.servicekit.auth import issue_token
from tests.effects.conftest import png_bytes
from tests.support import JWT_SECRET

KEY = os.environ.get("RUNNINGHUB_TEST_API_KEY", "")
REGION = os.environ.get("RUNNINGHUB_TEST_REGION", "global")
EFFECT = os.environ.get("RUNNINGHUB_TEST_EFFECT", "portrait-upscale")
PUBLIC = os.environ.get("RUNNINGHUB_TEST_PUBLIC_URL", "")

pytestmark = [
    pytest.mark.timeout(1200),
    pytest.mark.skipif(not KEY, reason="set RUNNINGHUB_TEST_API_KEY to run against the real RunningHub"),
]


async def test_upload_start_poll_outputs_on_the_real_runninghub(start_service: Any, start_edge: Any) -> None:
    app = await start_service(
        effects_app,
        **{f"runninghub_{REGION}_api_key": KEY},
        effects_public_base_url=PUBLIC,
        effects_poll_ttl_queued_seconds=2.0,
        effects_poll_ttl_running_seconds=5.0,
    )
    edge = await start_edge(app)
    auth = {"Authorization": f"Bearer {issue_token(JWT_SECRET, 'real-test', ttl_seconds=3600)}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{edge}/api/effects/{EFFECT}") as reply:
            effect = await reply.json()
        assert reply.status == 200 and effect["region"] == REGION, effect
        images = [p for p in effect["parameters"] if p["type"] == "IMAGE"]
        inputs: dict[str, str] = {}
        for p in images:
            async with http.post(
                f"{edge}/api/effects/uploads?region={REGION}",
                data=png_bytes(),
                headers={**auth, "Content-Type": "image/png"},
            ) as reply:
                body = await reply.json()
            assert reply.status == 200, body
            unique = sum(q["fieldName"] == p["fieldName"] for q in images) == 1
            key = p["fieldName"] if unique else f"{p['nodeId']}:{p['fieldName']}"
            inputs[key] = body["fileName"]
        request = {"requestId": f"real-{os.getpid()}", "inputs": inputs}
        async with http.post(f"{edge}/api/effects/{EFFECT}/tasks", json=request, headers=auth) as reply:
            task = await reply.json()
        assert reply.status == 200, task
        for _ in range(400):
            async with http.get(f"{edge}/api/effects/tasks/{task['taskId']}", headers=auth) as reply:
                task = await reply.json()
            if task["status"] in ("SUCCEEDED", "FAILED", "CANCELLED"):
                break
            await asyncio.sleep(3)
        assert task["status"] == "SUCCEEDED", task
        assert task["outputs"] and task["outputs"][0]["url"].startswith("http")
