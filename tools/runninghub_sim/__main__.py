"""`python -m tools.runninghub_sim --port N [--global-port M]`: the simulator as a process.

One port per RunningHub site (cn, and optionally global; their keys and state are
separate, as on the real sites). Logs are JSON lines on stderr. SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from services.servicekit.logs import setup_logging
from tools.runninghub_sim.config import SimConfig
from tools.runninghub_sim.server import RunningSim, start

log = logging.getLogger("runninghub_sim")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.runninghub_sim", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8790, help="the cn site (0: a free port)")
    parser.add_argument("--global-port", type=int, default=None, help="also serve the global site here")
    parser.add_argument("--region", choices=("cn", "global"), default="cn", help="the site on --port")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fast", action="store_true", help="test timings (tasks end in well under a second)")
    parser.add_argument(
        "--config", default="{}", help="JSON overrides of the config, e.g. '{\"runSeconds\": 20}'"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    try:
        overrides = json.loads(args.config)
        if not isinstance(overrides, dict):
            raise ValueError("--config must be a JSON object")
        base = SimConfig.fast() if args.fast else SimConfig()
        config = base.updated({**overrides, "seed": args.seed})
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    sites: list[RunningSim] = [await start(args.region, config, args.host, args.port)]
    if args.global_port is not None:
        sites.append(await start("global", config, args.host, args.global_port))
    for site in sites:
        log.info("RunningHub simulator listening", extra={"region": site.sim.region, "url": site.url})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for site in sites:
        await site.runner.cleanup()
    log.info("RunningHub simulator stopped")
    return 0


def main() -> None:
    args = parse(sys.argv[1:])
    setup_logging("runninghub-sim", args.log_level)
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
