"""One route table, two edges: the local edge (gateway/) and Envoy (gateway/envoy.yaml) serve
the same REST paths with the same methods and the same deadlines, all derived from the
descriptor set, and both match the public contract in ../shared/API.md.
"""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.access import Binding, bindings
from gateway.app import Edge
from gateway.config import Settings
from gateway.routes import RouteTable, build_routes, load_descriptors
from gateway.timeouts import RUNNINGHUB_SECONDS, timeout_for
from services.effects.app import EffectsSettings
from services.servicekit.auth import Access
from tests.gateway.test_envoy_config import (
    DESCRIPTOR_SET,
    ENVOY_YAML,
    cluster_for_service,
    match,
    parse_bootstrap,
    routes,
)
from tests.support import ROOT

VERBS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Rows where issue 11 widens API.md's auth (API.md is read-only here): the payment side
# records revenue with its service token as well as an admin (a user token stays 403).
WIDER_THAN_API_MD = {("POST", "/api/analytics/revenue"): (Access.ADMIN, Access.ADMIN_OR_SERVICE)}
API_AUTH = {
    "public": Access.PUBLIC,
    "user": Access.USER,
    "admin": Access.ADMIN,
    "shared secret": Access.PUBLIC,
}


@pytest.fixture(scope="module")
def table() -> RouteTable:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    return build_routes(descriptors.pool, descriptors.services)


@pytest.fixture(scope="module")
def derived(table: RouteTable) -> list[Binding]:
    return bindings(table)


@pytest.fixture(scope="module")
def bootstrap() -> Any:
    return parse_bootstrap(yaml.safe_load(ENVOY_YAML.read_text()))


@pytest.fixture(scope="module")
def local_edge() -> Edge:
    return Edge(Settings(descriptor_set=DESCRIPTOR_SET))


def sample(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "x1", template)


def normalised(template: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", template)


def test_the_local_edge_serves_every_binding_with_its_method(
    local_edge: Edge, derived: list[Binding], table: RouteTable
) -> None:
    assert [(r.http_method, r.template.source, r.grpc_path) for r in local_edge.routes.routes] == [
        (r.http_method, r.template.source, r.grpc_path) for r in table.routes
    ]
    for binding in derived:
        path = sample(binding.template)
        found = local_edge.routes.match(binding.verb, path)
        assert found is not None and found.route.grpc_path == binding.route.grpc_path, (
            f"{binding.verb} {binding.template}"
        )
        # Any other method on that path is another binding or nothing (404, like Envoy's
        # reject_unknown_method), never a different RPC by accident.
        for verb in VERBS:
            other = local_edge.routes.match(verb, path)
            if verb != binding.verb and other is not None:
                assert any(b.verb == verb and b.route.grpc_path == other.route.grpc_path for b in derived), (
                    f"{verb} {path} -> {other.route.grpc_path}"
                )


def test_envoy_routes_the_same_rpcs_and_nothing_else(
    bootstrap: Any, derived: list[Binding], local_edge: Edge
) -> None:
    table = routes(bootstrap)
    owner = cluster_for_service(bootstrap)
    bound = {b.route.grpc_path for b in derived}
    for binding in derived:
        rest = match(table, sample(binding.template))
        assert rest is not None and rest.WhichOneof("action") == "route", binding.template
        assert rest.route.cluster == owner[binding.route.service]
        grpc = match(table, binding.route.grpc_path)
        assert grpc is not None and grpc.WhichOneof("action") == "route", binding.route.grpc_path
        assert grpc.route.cluster == owner[binding.route.service]
        assert grpc.match.path == binding.route.grpc_path, "one route per RPC, for its own timeout"
    exact = {
        r.match.path
        for r in table
        if r.match.WhichOneof("path_specifier") == "path" and r.match.path.startswith("/cosnap.")
    }
    assert exact == bound, f"routes without a binding: {exact - bound}; bindings without: {bound - exact}"
    # The local edge has a backend for every service Envoy has a cluster for.
    assert set(local_edge.settings.backends) == set(owner)


def test_both_edges_give_each_rpc_the_same_deadline(
    bootstrap: Any, derived: list[Binding], local_edge: Edge
) -> None:
    table = routes(bootstrap)
    for binding in derived:
        route = binding.route
        want = timeout_for(route.grpc_path, route.method.server_streaming)
        grpc = match(table, route.grpc_path)
        assert grpc is not None
        envoy = grpc.route.timeout.ToTimedelta()
        if want is None:
            assert envoy == timedelta(0), f"{route.grpc_path}: a stream has no route deadline"
        else:
            assert envoy == timedelta(seconds=want), route.grpc_path
            assert local_edge.timeout_for(route) == want, route.grpc_path


def test_deadlines_fit_each_call(derived: list[Binding]) -> None:
    """A task start waits for RunningHub (the effects service's own limit, plus a margin for
    the rest of the call); ingest is short, so a stuck database shows up as a quick 504."""
    runninghub = RUNNINGHUB_SECONDS
    for name, info in EffectsSettings.model_fields.items():
        if "runninghub" in name and "timeout" in name and isinstance(info.default, int | float):
            runninghub = max(runninghub, float(info.default))
    by_method = {b.route.method.full_name: b for b in derived}
    for method in ("CreateTask", "UploadInput", "CancelTask"):
        binding = by_method[f"cosnap.effects.v1.EffectsService.{method}"]
        seconds = timeout_for(binding.route.grpc_path)
        assert seconds is not None and seconds >= runninghub + 10, method
    ingest = [b for b in derived if b.route.method.name.startswith(("Record", "Report")) and b.verb == "POST"]
    assert len(ingest) >= 4
    for binding in ingest:
        seconds = timeout_for(binding.route.grpc_path)
        assert seconds is not None and seconds <= 15, binding.route.grpc_path


# --- API.md --------------------------------------------------------------------------------


def find_api_md() -> Path | None:
    """shared/API.md beside the repository (CI: ../shared), or beside an ancestor (worktrees)."""
    for folder in [ROOT, *ROOT.parents]:
        candidate = folder.parent / "shared" / "API.md"
        if candidate.is_file():
            return candidate
    return None


def api_md_rows(text: str) -> dict[tuple[str, str], Access]:
    rows = {}
    for verb, path, auth in re.findall(
        r"^\|\s*`(GET|POST|PUT|PATCH|DELETE) (/[^`\s]*)`\s*\|\s*([^|]+?)\s*\|", text, re.M
    ):
        assert auth in API_AUTH, f"{verb} {path}: unknown auth {auth!r}"
        rows[(verb, normalised(path))] = API_AUTH[auth]
    return rows


def test_both_edges_match_api_md(derived: list[Binding]) -> None:
    path = find_api_md()
    if path is None:
        pytest.skip("shared/API.md is not beside the repository (CI puts it at ../shared)")
    documented = api_md_rows(path.read_text())
    assert len(documented) >= 10, "API.md's tables were not found: has its format changed?"
    served = {(b.verb, normalised(b.template)): b.access for b in derived}
    wrong = {
        k: (v, documented.get(k))
        for k, v in served.items()
        if documented.get(k) is not v and WIDER_THAN_API_MD.get(k) != (documented.get(k), v)
    }
    assert not wrong, f"served but not in API.md, or with another auth (served, documented): {wrong}"
    missing = set(documented) - set(served)
    assert not missing, f"in API.md but served by neither edge: {sorted(missing)}"


def test_the_generated_blocks_of_envoy_yaml_are_current() -> None:
    """The blocks tools/envoy_rules.py writes (the checks above hold for hand edits too)."""
    from tools import envoy_rules

    descriptors = load_descriptors(DESCRIPTOR_SET)
    derived = bindings(build_routes(descriptors.pool, descriptors.services))
    text = ENVOY_YAML.read_text()
    fresh = envoy_rules.rewrite(text, "jwt rules", lambda indent: envoy_rules.jwt_rules(derived, indent))
    fresh = envoy_rules.rewrite(fresh, "grpc routes", lambda indent: envoy_rules.grpc_routes(derived, indent))
    assert fresh == text, "gateway/envoy.yaml is stale: run `python -m tools.envoy_rules`"
