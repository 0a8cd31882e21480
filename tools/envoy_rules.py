"""Rewrite the generated blocks of gateway/envoy.yaml from the descriptor set and the access
levels the services declare: the jwt_authn rules and the gRPC route per public RPC (with
its deadline from gateway/timeouts.py). Run it after adding or changing an RPC:

    python -m tools.envoy_rules      # rewrites gateway/envoy.yaml and deploy/k8s/base/envoy.yaml

tests/gateway/test_envoy_jwt.py and test_route_parity.py check the result independently
(they simulate Envoy's matching on every binding), so a hand edit is checked the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from gateway.access import Binding, bindings
from gateway.routes import DOUBLE_STAR, LITERAL, STAR, PathTemplate, build_routes, load_descriptors
from gateway.timeouts import timeout_for
from services.servicekit.auth import Access

ROOT = Path(__file__).resolve().parent.parent
ENVOY = ROOT / "gateway" / "envoy.yaml"
COPY = ROOT / "deploy" / "k8s" / "base" / "envoy.yaml"
DESCRIPTOR_SET = ROOT / "build" / "descriptor.binpb"
RETRY = '{retry_on: "connect-failure,refused-stream", num_retries: 2}'
BEGIN = "# BEGIN generated {name} (python -m tools.envoy_rules)"
END = "# END generated {name}"


def cluster_of(service: str) -> str:
    """cosnap.effects.v1.EffectsService -> effects (the Envoy cluster and k8s Service name)."""
    return service.split(".")[1]


def template_regex(template: PathTemplate) -> str:
    parts = []
    for kind, text in template.segments:
        if kind == LITERAL:
            parts.append(re.escape(text))
        elif kind == STAR:
            parts.append("[^/]+")
        else:
            assert kind == DOUBLE_STAR
            parts.append(".+")
    return "^/" + "/".join(parts) + (re.escape(":" + template.verb) if template.verb else "") + "$"


def _requires(access: Access) -> str:
    if access is Access.PUBLIC:
        return "{allow_missing_or_failed: {}}"
    return "{provider_name: cosnap}"


def jwt_rules(derived: list[Binding], indent: str) -> list[str]:
    lines = []
    # Token-requiring rules first: the first match wins, so a public rule can never shadow them.
    ordered = sorted(derived, key=lambda b: b.access is Access.PUBLIC)
    for binding in ordered:
        template = binding.route.template
        if template.variables or template.verb:
            match = f"safe_regex: {{regex: '{template_regex(template)}'}}"
        else:
            match = f"path: {template.source}"
        method = f'headers: [{{name: ":method", string_match: {{exact: {binding.verb}}}}}]'
        lines += [
            f"{indent}# {binding.access.value}: {binding.verb} {template.source}",
            f"{indent}- match: {{{match}, {method}}}",
            f"{indent}  requires: {_requires(binding.access)}",
        ]
    seen: set[str] = set()
    lines.append(f"{indent}# The same RPCs by their gRPC paths (raw gRPC callers).")
    for binding in ordered:
        path = binding.route.grpc_path
        if path not in seen:
            seen.add(path)
            lines += [
                f"{indent}- match: {{path: {path}}}",
                f"{indent}  requires: {_requires(binding.access)}",
            ]
    return lines


def grpc_routes(derived: list[Binding], indent: str) -> list[str]:
    lines: list[str] = []
    seen: set[str] = set()
    services: list[str] = []
    for binding in derived:
        route = binding.route
        if route.service not in services:
            services.append(route.service)
        if route.grpc_path in seen:
            continue
        seen.add(route.grpc_path)
        seconds = timeout_for(route.grpc_path, route.method.server_streaming)
        timeout = "0s" if seconds is None else f"{seconds:g}s"
        lines += [
            f"{indent}- match: {{path: {route.grpc_path}}}",
            f"{indent}  route: {{cluster: {cluster_of(route.service)}, timeout: {timeout}, retry_policy: {RETRY}}}",
        ]
    for service in services:
        lines += [f"{indent}- match: {{prefix: /{service}/}}", f"{indent}  direct_response: {{status: 404}}"]
    return lines


def rewrite(text: str, name: str, make: Callable[[str], list[str]]) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    pattern = re.compile(rf"^(?P<indent>[ ]*){re.escape(begin)}\n.*?^[ ]*{re.escape(end)}\n", re.M | re.S)
    found = pattern.search(text)
    if found is None:
        raise SystemExit(f"{ENVOY}: markers {begin!r} ... {end!r} not found")
    indent = found.group("indent")
    body = "\n".join(make(indent)) + "\n"
    return text[: found.start()] + f"{indent}{begin}\n{body}{indent}{end}\n" + text[found.end() :]


def main() -> None:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    derived = bindings(build_routes(descriptors.pool, descriptors.services))
    text = ENVOY.read_text()
    text = rewrite(text, "jwt rules", lambda indent: jwt_rules(derived, indent))
    text = rewrite(text, "grpc routes", lambda indent: grpc_routes(derived, indent))
    ENVOY.write_text(text)
    COPY.write_text(text)
    print(f"rewrote {ENVOY.relative_to(ROOT)} and {COPY.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
