"""`python -m bench [--scale S] [--only NAME]`: every benchmark, small enough
for 2 cores in a few minutes at scale 1; `--scale` scales the work up."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench import business, dashboard, effects, ingest, monitoring, preagg


async def main(scale: float, only: str | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if only in (None, "ingest"):
        results["ingest"] = await ingest.run(scale)
        ingest.print_result(results["ingest"])
    if only in (None, "dashboard"):
        results["dashboard"] = await dashboard.run(scale)
        dashboard.print_result(results["dashboard"])
    if only in (None, "monitoring"):
        results["monitoring"] = await monitoring.run(scale)
        monitoring.print_result(results["monitoring"])
    if only in (None, "effects"):
        results["effects"] = await effects.run(scale)
        effects.print_result(results["effects"])
    if only in (None, "business"):
        results["business"] = await business.run(scale)
        business.print_result(results["business"])
    if only in (None, "preagg"):
        # An incremental pass against the whole-day recomputation, 200 k events of today.
        results["preagg"] = await preagg.run(max(20_000, int(200_000 * scale)), [1_000, 10_000], 1)
        preagg.print_result(results["preagg"])
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the work of every benchmark")
    parser.add_argument(
        "--only", choices=["ingest", "dashboard", "monitoring", "effects", "business", "preagg"], default=None
    )
    args = parser.parse_args()
    asyncio.run(main(args.scale, args.only))
