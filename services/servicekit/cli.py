"""The command line of every service: `python -m services.<name> [serve|migrate]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType

from . import db
from .config import ServiceSettings, load_settings
from .logs import setup_logging
from .server import ListenError, ServiceApp

Wire = Callable[[ServiceApp], Awaitable[None]]


def main(service: ModuleType) -> None:
    """Run a service's wiring module (its `NAME`, `SETTINGS`, `MIGRATIONS` and
    `wire`). `serve` (default) runs until SIGTERM; `migrate` applies the
    migrations and exits (for a Kubernetes Job)."""
    name: str = service.NAME
    migrations: Path | None = service.MIGRATIONS
    parser = argparse.ArgumentParser(prog=f"python -m services.{name}")
    parser.add_argument("command", nargs="?", default="serve", choices=["serve", "migrate"])
    args = parser.parse_args()
    settings = load_settings(service.SETTINGS)
    setup_logging(name, settings.log_level)
    log = logging.getLogger(name)
    try:
        if args.command == "migrate":
            if migrations is not None:
                applied = asyncio.run(
                    db.migrate_dsn(
                        settings.database_url,
                        settings.db_schema or name,
                        migrations,
                        settings.db_connect_timeout_seconds,
                    )
                )
                log.info("migrated", extra={"applied": applied})
            return
        asyncio.run(_serve(name, settings, migrations, service.wire))
    except ListenError as exc:
        log.error(str(exc))
        raise SystemExit(1) from None
    except db.CONNECT_ERRORS as exc:
        log.error("cannot reach postgres", extra={"error": repr(exc)})
        raise SystemExit(1) from None


async def _serve(name: str, settings: ServiceSettings, migrations: Path | None, wire: Wire) -> None:
    app = ServiceApp(name, settings, migrations)
    await app.connect()
    await wire(app)
    # What start-up made (modules, classes, wiring; ~130,000 objects in analytics) lives as
    # long as the process: out of the cyclic collector's sight, a full collection scans only
    # what came after (~80 ms each otherwise, paid at random by whatever runs then).
    gc.collect()
    gc.freeze()
    await app.serve_forever()
