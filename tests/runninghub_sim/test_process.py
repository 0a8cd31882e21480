"""`python -m tools.runninghub_sim` as `make up` runs it: two sites, JSON logs, clean stop."""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import aiohttp

from tests.support import ROOT, free_port
from tools.runninghub_sim import DEV_KEYS


async def test_runs_both_sites_and_stops_on_sigterm() -> None:
    cn, glob = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.runninghub_sim",
        "--port",
        str(cn),
        "--global-port",
        str(glob),
        "--fast",
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as session:
            for port, region in ((cn, "cn"), (glob, "global")):
                for _ in range(300):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/__sim/health") as reply:
                            assert (await reply.json()) == {"ok": True, "region": region}
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"the {region} site did not come up")
            body = {"apiKey": DEV_KEYS["global"], "webappId": "1990000000000000002", "nodeInfoList": []}
            async with session.post(f"http://127.0.0.1:{glob}/task/openapi/ai-app/run", json=body) as reply:
                assert (await reply.json())["code"] == 0
            async with session.post(f"http://127.0.0.1:{cn}/task/openapi/ai-app/run", json=body) as reply:
                assert (await reply.json())["code"] == 901  # a global-only app
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0
    lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    messages = [line["msg"] for line in lines]
    assert messages.count("RunningHub simulator listening") == 2 and "task created" in messages
    assert DEV_KEYS["global"] not in err.decode()  # keys never logged


async def test_bad_config_exits_2() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.runninghub_sim",
        "--port",
        "0",
        "--config",
        '{"runSeconds": -1}',
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2 and b"runSeconds" in err
