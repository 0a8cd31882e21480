"""Who may call what: the access level every service declares for its RPCs, and the REST
bindings of the descriptor set, joined. The edges (Envoy's JWT rules, the OpenAPI document)
and their tests derive from this, so a new RPC cannot be published unprotected."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path

import services
from gateway.routes import Route, RouteTable
from services.servicekit.auth import Access


def declared_access() -> dict[str, dict[str, Access]]:
    """{full service name: {method: Access}} from every `services/<name>/app.py`."""
    out: dict[str, dict[str, Access]] = {}
    for info in pkgutil.iter_modules(services.__path__):
        if not info.ispkg or not (Path(services.__path__[0]) / info.name / "app.py").is_file():
            continue
        module = importlib.import_module(f"services.{info.name}.app")
        service = getattr(module, "SERVICE", None)
        access = getattr(module, "ACCESS", None)
        if service is None or access is None:
            continue
        out[service.full_name] = dict(access)
    return out


@dataclass(frozen=True)
class Binding:
    """One REST binding of one RPC, with the access level its service declares."""

    route: Route
    access: Access

    @property
    def verb(self) -> str:
        return self.route.http_method

    @property
    def template(self) -> str:
        return self.route.template.source


class UndeclaredAccess(LookupError):
    """An RPC with an HTTP binding whose service declares no access level for it."""


def bindings(table: RouteTable, access: dict[str, dict[str, Access]] | None = None) -> list[Binding]:
    levels = declared_access() if access is None else access
    out = []
    for route in table.routes:
        level = levels.get(route.service, {}).get(route.method.name)
        if level is None:
            raise UndeclaredAccess(f"{route.grpc_path}: no access level declared")
        if level is Access.INTERNAL:
            raise UndeclaredAccess(f"{route.grpc_path}: INTERNAL but has an HTTP binding")
        out.append(Binding(route, level))
    return out
