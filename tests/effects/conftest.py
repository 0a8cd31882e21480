"""Effects under test: the real service on PostgreSQL and Redis, the REST edge in
front of it, and two RunningHub simulators (cn, global) on loopback, the only
double the house allows. Webhooks travel sim -> edge -> effects, as in production."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest

from services.effects import app as effects_app
from services.servicekit.auth import issue_token
from services.servicekit.server import ServiceApp
from tests.support import JWT_SECRET, unique_name
from tools.runninghub_sim import RunningSim, SimConfig, start

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def png_bytes() -> bytes:
    """A real 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
        + chunk(b"IEND", b"")
    )


@dataclass
class Env:
    app: ServiceApp
    edge: str
    http: aiohttp.ClientSession
    sims: dict[str, RunningSim]
    keys: dict[str, str]
    settings: dict[str, Any] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    def auth(self, user: str = "alice", role: str = "user") -> dict[str, str]:
        token = self.users.get(f"{user}/{role}")
        if token is None:
            token = self.users[f"{user}/{role}"] = issue_token(JWT_SECRET, user, role=role)
        return {"Authorization": f"Bearer {token}"}

    @property
    def pool(self) -> asyncpg.Pool:
        assert self.app.pool is not None
        return self.app.pool

    @property
    def state(self) -> effects_app.Effects:
        return effects_app.state(self.app)

    def sim(self, region: str = "global") -> Any:
        return self.sims[region].sim

    def creates(self, region: str = "global") -> int:
        return int(self.sim(region).creates(self.keys[region]))

    def calls(self, endpoint: str, region: str = "global") -> int:
        return int(self.sim(region).counters()["calls"].get(endpoint, 0))

    async def request(
        self, method: str, path: str, *, user: str | None = "alice", role: str = "user", **kwargs: Any
    ) -> tuple[int, Any]:
        headers = dict(kwargs.pop("headers", {}))
        if user is not None:
            headers.update(self.auth(user, role))
        async with self.http.request(method, self.edge + path, headers=headers, **kwargs) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body) if body else None
            except ValueError:
                return response.status, body.decode(errors="replace")

    async def upload(self, data: bytes | None = None, user: str = "alice", region: str = "global") -> str:
        status, body = await self.request(
            "POST",
            f"/api/effects/uploads?region={region}",
            user=user,
            data=data if data is not None else png_bytes(),
            headers={"Content-Type": "image/png"},
        )
        assert status == 200, body
        return str(body["fileName"])

    async def start(
        self,
        effect: str = "portrait-upscale",
        request_id: str | None = None,
        user: str = "alice",
        inputs: dict[str, str] | None = None,
        parameters: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        if inputs is None:
            inputs = {"image": await self.upload(user=user)}
        body = {
            "requestId": request_id or unique_name("req"),
            "inputs": inputs,
            "parameters": parameters or {},
        }
        return await self.request("POST", f"/api/effects/{effect}/tasks", user=user, json=body)

    async def poll(self, task_id: str, user: str = "alice", timeout: float = 20.0) -> dict[str, Any]:
        """GetTask until the task ends."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            status, body = await self.request("GET", f"/api/effects/tasks/{task_id}", user=user)
            assert status in (200, 503), body
            if status == 200 and body["status"] in TERMINAL:
                return dict(body)
            assert loop.time() < deadline, f"task {task_id} still {body} after {timeout}s"
            await asyncio.sleep(0.05)


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def effects_env(start_service: Any, start_edge: Any) -> AsyncIterator[EnvFactory]:
    """`env = await effects_env(sim_config=..., **settings)`."""
    sims: list[RunningSim] = []
    sessions: list[aiohttp.ClientSession] = []

    async def make(sim_config: SimConfig | None = None, **settings: Any) -> Env:
        config = sim_config or SimConfig.fast()
        running = {region: await start(region, config) for region in ("cn", "global")}
        sims.extend(running.values())
        keys = {region: unique_name(f"key-{region}").replace("_", "-") for region in running}
        values: dict[str, Any] = {
            "runninghub_cn_url": running["cn"].url,
            "runninghub_cn_api_key": keys["cn"],
            "runninghub_global_url": running["global"].url,
            "runninghub_global_api_key": keys["global"],
            "runninghub_timeout_seconds": 2.0,
            "runninghub_retry_max_wait_seconds": 0.05,
            "runninghub_busy_delay_scale": 0.002,
            "runninghub_breaker_reset_seconds": 0.5,
            "effects_poll_ttl_queued_seconds": 0.2,
            "effects_poll_ttl_running_seconds": 0.2,
            "effects_sweep_interval_seconds": 0.2,
            "effects_recheck_after_seconds": 1.0,
            "effects_reconcile_timeout_seconds": 5.0,
        }
        values.update(settings)
        public = values.pop("public", True)
        app = await start_service(effects_app, **values)
        edge = await start_edge(app)
        if public:  # the edge's address is known only now: RunningHub calls back through it
            effects_app.state(app).tokens.base = edge
        http = aiohttp.ClientSession()
        sessions.append(http)
        return Env(app, edge, http, running, keys, values)

    yield make
    for session in sessions:
        await session.close()
    for running in sims:
        await running.runner.cleanup()
