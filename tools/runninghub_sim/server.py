"""The simulator as an aiohttp application, and an in-process server for tests.

async with running_sim(config=SimConfig.fast()) as sim:
    sim.url          # "http://127.0.0.1:<free port>", RunningHub's base URL
    sim.sim          # the Simulator: faults, keys, outcomes, counters
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web

from tools.runninghub_sim import api, control
from tools.runninghub_sim.config import SimConfig
from tools.runninghub_sim.simulator import Simulator

# RunningHub takes files up to 30 MB; anything up to this size is read and answered
# with a business code (809) rather than an HTTP 413.
CLIENT_MAX_SIZE = 64 * 1024 * 1024


def make_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[api.faults_and_counters], client_max_size=CLIENT_MAX_SIZE)
    app[api.SIM] = sim
    api.add_routes(app)
    control.add_routes(app)
    app.router.add_route("*", "/{tail:.*}", api.unknown_path)

    async def close(_: web.Application) -> None:
        await sim.close()

    app.on_cleanup.append(close)
    return app


@dataclass
class RunningSim:
    url: str
    sim: Simulator
    runner: web.AppRunner

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


async def start(
    region: str = "cn", config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningSim:
    sim = Simulator(region, config)
    # A short shutdown timeout: hung (injected) requests must not hold the close.
    runner = web.AppRunner(make_app(sim), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    sim.base_url = f"http://{bound_host}:{bound_port}"
    return RunningSim(sim.base_url, sim, runner)


@contextlib.asynccontextmanager
async def running_sim(
    region: str = "cn", config: SimConfig | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningSim]:
    """A simulator on a free loopback port for the duration of the block."""
    server = await start(region, config, host, port)
    try:
        yield server
    finally:
        await server.runner.cleanup()
