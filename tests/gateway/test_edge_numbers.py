"""`true` is not a number (../shared/API.md): protobuf's Python json_format would store a
JSON `true` given for a double as 1, so the local edge refuses it before parsing, for every
numeric field of every REST body, with a 400 naming the field path in a BadRequest.

(Envoy's transcoder refuses it too: grpc-httpjson-transcoding parses with protobuf's C++
converter, whose DataPiece::ToDouble/ToInt* accept numbers and strings only, so a bool is
INVALID_ARGUMENT there.)"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from aiohttp.test_utils import TestClient
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from gateway.routes import Route, build_routes, load_descriptors
from tests.gateway.backends import Backend
from tests.gateway.test_envoy_config import DESCRIPTOR_SET

Client = TestClient[Any, Any]

_NUMERIC = {
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
}
_NUMERIC_WRAPPERS = {
    f"google.protobuf.{name}Value" for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32")
}
_OPAQUE = {"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"}


def _numeric_leaves(message: Descriptor, depth: int = 0) -> Iterator[list[FieldDescriptor]]:
    """Every chain of fields from `message` down to a numeric value (wrappers included)."""
    if depth > 6:
        return
    for fd in message.fields:
        mt = fd.message_type
        if mt is not None and mt.GetOptions().map_entry:
            value_fd = mt.fields_by_name["value"]
            if value_fd.type in _NUMERIC:
                yield [fd]
            elif value_fd.message_type is not None:
                for rest in _numeric_leaves(value_fd.message_type, depth + 1):
                    yield [fd, *rest]
        elif mt is None:
            if fd.type in _NUMERIC:
                yield [fd]
        elif mt.full_name in _NUMERIC_WRAPPERS:
            yield [fd]
        elif mt.full_name not in _OPAQUE and not mt.full_name.startswith("google.protobuf."):
            for rest in _numeric_leaves(mt, depth + 1):
                yield [fd, *rest]


def _document(chain: list[FieldDescriptor]) -> tuple[Any, str]:
    """A JSON value with `true` at the end of `chain`, and the path the edge must name."""
    value: Any = True
    for fd in reversed(chain):
        mt = fd.message_type
        if mt is not None and mt.GetOptions().map_entry:
            value = {"k": value}
        elif fd.is_repeated:
            value = [value]
        value = {fd.json_name: value}
    path = ""
    for fd in chain:
        path += f".{fd.json_name}" if path else fd.json_name
        mt = fd.message_type
        if mt is not None and mt.GetOptions().map_entry:
            path += "['k']"
        elif fd.is_repeated:
            path += "[0]"
    return value, path


def _url(route: Route) -> str:
    # Every path variable of the contracts is text; "1" is a valid value of any kind.
    return re.sub(r"\{[^}]*\}", "1", route.template.source)


def _body_cases() -> list[tuple[Route, Any, str]]:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    cases = []
    for route in build_routes(descriptors.pool, descriptors.services).routes:
        if not route.body or route.raw_body:
            continue
        bound = {v.field_path[0] for v in route.template.variables}
        if route.body == "*":
            chains = [c for c in _numeric_leaves(route.method.input_type) if c[0].name not in bound]
            for chain in chains:
                document, path = _document(chain)
                cases.append((route, document, path))
        else:
            body_fd = route.method.input_type.fields_by_name[route.body]
            if body_fd.message_type is None:
                continue
            for chain in _numeric_leaves(body_fd.message_type):
                document, path = _document(chain)
                cases.append((route, document, f"{body_fd.json_name}.{path}"))
    return cases


def test_the_contracts_have_numeric_body_fields_to_check() -> None:
    paths = {(route.template.source, path) for route, _, path in _body_cases()}
    # The fields the issue names, so the walk above cannot silently find nothing.
    assert ("/api/analytics/performance/metrics", "metrics[0].value") in paths
    assert ("/api/analytics/performance/metrics", "metrics[0].delta") in paths
    assert len(paths) >= 5, paths


async def test_true_for_any_numeric_body_field_is_a_400_naming_it(edge: Client, backend: Backend) -> None:
    failures = []
    for route, document, path in _body_cases():
        url = _url(route)
        resp = await edge.request(route.http_method, url, json=document)
        text = await resp.text()
        if resp.status != 400 or not resp.headers.get("Content-Type", "").startswith("application/json"):
            failures.append(f"{route.http_method} {url} {path}: {resp.status} {text[:200]}")
            continue
        body = json.loads(text)
        found = {
            v["field"]: v["description"]
            for d in body.get("details", [])
            if d.get("@type") == "type.googleapis.com/google.rpc.BadRequest"
            for v in d["fieldViolations"]
        }
        description = found.get(path, "")
        if body.get("code") != 3 or "a number" not in description or "got true or false" not in description:
            failures.append(f"{route.http_method} {url} {path}: {text[:300]}")
    assert not failures, "\n".join(failures)
    assert backend.requests == []  # nothing reached a service
