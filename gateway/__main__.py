"""`python -m gateway`: run the local REST edge (settings from EDGE_* variables)."""

from __future__ import annotations

import asyncio
import logging
import sys

from pydantic import ValidationError

from gateway.app import create_app
from gateway.config import Settings
from gateway.routes import TemplateError
from gateway.serving import ListenError, serve


def _settings_or_exit() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        for error in exc.errors():
            variable = "EDGE_" + "_".join(str(p) for p in error["loc"][:1]).upper()
            print(f"gateway: bad {variable}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    settings = _settings_or_exit()
    try:
        app = create_app(settings)
    except (OSError, TemplateError, TypeError, KeyError) as exc:
        print(f"gateway: cannot load EDGE_DESCRIPTOR_SET: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    def listening() -> None:  # only once the port is bound
        backends = ", ".join(f"{k}={v}" for k, v in settings.backends.items())
        print(
            f"gateway: listening on http://{settings.host}:{settings.port} (backends: {backends})",
            file=sys.stderr,
        )

    try:
        asyncio.run(serve(app, settings.host, settings.port, listening))
    except ListenError as exc:
        print(f"gateway: {exc.strerror}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
