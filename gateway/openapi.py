"""OpenAPI 3.1 for the public REST API, generated from the descriptor set (never by hand).

Paths and methods come from the `google.api.http` bindings (the route table both edges
use), parameters from the path variables and the request fields left for the query,
bodies and replies from the messages in the proto3 JSON mapping as the transcoder prints
them (64-bit integers as strings, enums by name, well-known types in their JSON forms),
auth from the access level each service declares, and every error as `google.rpc.Status`.

    python -m gateway.openapi > openapi.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool

from gateway.access import Binding, bindings, declared_access
from gateway.routes import DOUBLE_STAR, HTTP_BODY, Route, RouteTable, build_routes, load_descriptors
from services.servicekit.auth import Access

Schema = dict[str, Any]

INT64_PATTERN = r"^-?[0-9]+$"
UINT64_PATTERN = r"^[0-9]+$"
STATUS = "google.rpc.Status"
BEARER = "bearerAuth"

_F = FieldDescriptor
_SCALARS: dict[int, Schema] = {
    _F.TYPE_STRING: {"type": "string"},
    _F.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    _F.TYPE_BOOL: {"type": "boolean"},
    _F.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _F.TYPE_FLOAT: {"type": "number", "format": "float"},
    _F.TYPE_INT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SINT32: {"type": "integer", "format": "int32"},
    _F.TYPE_SFIXED32: {"type": "integer", "format": "int32"},
    _F.TYPE_UINT32: {"type": "integer", "minimum": 0, "maximum": 4294967295},
    _F.TYPE_FIXED32: {"type": "integer", "minimum": 0, "maximum": 4294967295},
    # proto3 JSON prints 64-bit integers as strings (JavaScript cannot hold them).
    _F.TYPE_INT64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _F.TYPE_SINT64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _F.TYPE_SFIXED64: {"type": "string", "format": "int64", "pattern": INT64_PATTERN},
    _F.TYPE_UINT64: {"type": "string", "format": "uint64", "pattern": UINT64_PATTERN},
    _F.TYPE_FIXED64: {"type": "string", "format": "uint64", "pattern": UINT64_PATTERN},
}
_WRAPPERS = {
    "google.protobuf.DoubleValue": _F.TYPE_DOUBLE,
    "google.protobuf.FloatValue": _F.TYPE_FLOAT,
    "google.protobuf.Int64Value": _F.TYPE_INT64,
    "google.protobuf.UInt64Value": _F.TYPE_UINT64,
    "google.protobuf.Int32Value": _F.TYPE_INT32,
    "google.protobuf.UInt32Value": _F.TYPE_UINT32,
    "google.protobuf.BoolValue": _F.TYPE_BOOL,
    "google.protobuf.StringValue": _F.TYPE_STRING,
    "google.protobuf.BytesValue": _F.TYPE_BYTES,
}
_WELL_KNOWN: dict[str, Schema] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$"},
    "google.protobuf.FieldMask": {"type": "string"},
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array"},
    "google.protobuf.Empty": {"type": "object", "additionalProperties": False},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
    },
}


class SchemaBuilder:
    """JSON Schemas of messages, collected once each under components/schemas."""

    def __init__(self) -> None:
        self.components: dict[str, Schema] = {}

    def message(self, descriptor: Descriptor, omit: frozenset[str] = frozenset()) -> Schema:
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name in _WRAPPERS:
            return {**_SCALARS[_WRAPPERS[name]]}
        if omit:  # a request body without the fields the path binds: inline
            return self._object(descriptor, omit)
        if name not in self.components:
            self.components[name] = {}  # placeholder: recursive messages refer to it
            self.components[name] = self._object(descriptor, frozenset())
        return {"$ref": f"#/components/schemas/{name}"}

    def _object(self, descriptor: Descriptor, omit: frozenset[str]) -> Schema:
        properties = {fd.json_name: self.field(fd) for fd in descriptor.fields if fd.name not in omit}
        schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
        if descriptor.full_name == STATUS:
            schema["description"] = "The error body of every failed call (google.rpc.Status)."
        return schema

    def field(self, fd: FieldDescriptor) -> Schema:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value = fd.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        single = self.single(fd)
        if fd.is_repeated:
            return {"type": "array", "items": single}
        return single

    def single(self, fd: FieldDescriptor) -> Schema:
        if fd.message_type is not None:
            return self.message(fd.message_type)
        if fd.enum_type is not None:
            return _enum(fd.enum_type)
        return dict(_SCALARS[fd.type])


def _enum(descriptor: EnumDescriptor) -> Schema:
    return {"type": "string", "enum": [value.name for value in descriptor.values]}


def _query_fields(
    message: Descriptor, prefix: str, bound: set[str], depth: int = 0
) -> list[tuple[str, FieldDescriptor]]:
    """Request fields a query parameter may set: scalars and enums, repeated ones too, and
    the leaves of singular nested messages by dotted name."""
    out: list[tuple[str, FieldDescriptor]] = []
    for fd in message.fields:
        path = f"{prefix}{fd.name}"
        if path in bound:
            continue
        if (
            fd.message_type is None
            or fd.message_type.full_name in _WRAPPERS
            or (fd.message_type.full_name in {"google.protobuf.Timestamp", "google.protobuf.Duration"})
        ):
            out.append((f"{prefix}{fd.json_name}", fd))
        elif not fd.is_repeated and not fd.message_type.GetOptions().map_entry and depth < 3:
            out += _query_fields(fd.message_type, f"{path}.", bound, depth + 1)
    return out


def _openapi_path(route: Route) -> tuple[str, list[tuple[str, FieldDescriptor, bool]]]:
    """`/api/effects/{effect_id}` -> `/api/effects/{effectId}`, and its path variables."""
    template = route.template
    variables = {var.start: var for var in template.variables}
    parts: list[str] = []
    params: list[tuple[str, FieldDescriptor, bool]] = []
    index = 0
    literal = dict(enumerate(template.segments))
    while index < len(template.segments):
        var = variables.get(index)
        if var is None:
            parts.append(literal[index][1])
            index += 1
            continue
        message: Descriptor | None = route.method.input_type
        fd: FieldDescriptor | None = None
        for name in var.field_path:
            assert message is not None
            fd = message.fields_by_name[name]
            message = fd.message_type
        assert fd is not None
        name = ".".join(var.field_path)
        json_name = fd.json_name if len(var.field_path) == 1 else name
        multi = var.end - var.start > 1 or template.segments[var.start][0] == DOUBLE_STAR
        parts.append("{" + json_name + "}")
        params.append((json_name, fd, multi))
        index = var.end
    path = "/" + "/".join(parts) + (f":{template.verb}" if template.verb else "")
    return path, params


def _operation(binding: Binding, schemas: SchemaBuilder, primary: bool) -> tuple[str, Schema]:
    """`primary`: the method's first binding (additional bindings get a suffixed operationId)."""
    route = binding.route
    method = route.method
    path, path_params = _openapi_path(route)
    bound = {".".join(v.field_path) for v in route.template.variables}
    parameters: list[Schema] = [
        {"name": name, "in": "path", "required": True, "schema": _path_schema(schemas, fd, multi)}
        for name, fd, multi in path_params
    ]
    if route.body != "*":
        body_field = {route.body} if route.body else set()
        for name, fd in _query_fields(method.input_type, "", bound | body_field):
            parameters.append({"name": name, "in": "query", "required": False, "schema": schemas.field(fd)})

    operation: Schema = {
        "operationId": f"{method.containing_service.name}.{method.name}"
        + ("" if primary else f".{route.http_method.lower()}"),
        "tags": [method.containing_service.full_name],
        "summary": f"{method.containing_service.name}.{method.name}",
        "description": f"gRPC `{method.full_name}`. Access: **{binding.access.value}**.",
        "parameters": parameters,
        "responses": _responses(route, binding.access, schemas),
    }
    if route.body:
        operation["requestBody"] = _request_body(route, bound, schemas)
    if binding.access is Access.PUBLIC:
        # Public: a token is optional, and a missing or bad one is ignored (never a 401).
        operation["security"] = [{}, {BEARER: []}]
    else:
        operation["security"] = [{BEARER: []}]
    return path, operation


def _path_schema(schemas: SchemaBuilder, fd: FieldDescriptor, multi: bool) -> Schema:
    schema = schemas.single(fd)
    if fd.type == _F.TYPE_STRING:
        # A segment: never empty, and no '/' unless the variable spans segments.
        schema["minLength"] = 1
        if not multi:
            schema["pattern"] = "^[^/]+$"
    return schema


def _request_body(route: Route, bound: set[str], schemas: SchemaBuilder) -> Schema:
    message = route.method.input_type
    if route.body == "*":
        target: Descriptor | None = message
        schema = schemas.message(message, omit=frozenset(b.split(".")[0] for b in bound))
    else:
        fd = message.fields_by_name[route.body]
        target = fd.message_type
        schema = schemas.field(fd)
    if target is not None and target.full_name == HTTP_BODY:
        return {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def _responses(route: Route, access: Access, schemas: SchemaBuilder) -> Schema:
    reply: Descriptor = route.method.output_type
    if route.response_body:
        fd = reply.fields_by_name[route.response_body]
        schema = schemas.field(fd)
        reply_type = fd.message_type
    else:
        schema = schemas.message(reply)
        reply_type = reply
    error = {"application/json": {"schema": {"$ref": f"#/components/schemas/{STATUS}"}}}
    if reply_type is not None and reply_type.full_name == HTTP_BODY:
        ok: Schema = {
            "description": "OK",
            "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
        }
    else:
        ok = {"description": "OK", "content": {"application/json": {"schema": schema}}}
    responses: Schema = {"200": ok}
    if access is not Access.PUBLIC:
        responses["401"] = {"description": "No valid token.", "content": error}
    if access in (Access.ADMIN, Access.ADMIN_OR_SERVICE):
        responses["403"] = {"description": "A valid token without the admin role.", "content": error}
    responses["default"] = {
        "description": "An error: the gRPC status mapped to HTTP as Envoy does (API.md).",
        "content": error,
    }
    return responses


def build_document(
    pool: DescriptorPool, table: RouteTable, access: dict[str, dict[str, Access]] | None = None
) -> Schema:
    """The OpenAPI document of `table` (routes built from `pool`)."""
    schemas = SchemaBuilder()
    schemas.message(pool.FindMessageTypeByName(STATUS))
    paths: dict[str, Schema] = {}
    seen: set[str] = set()
    for binding in bindings(table, declared_access() if access is None else access):
        name = binding.route.method.full_name
        path, operation = _operation(binding, schemas, primary=name not in seen)
        seen.add(name)
        paths.setdefault(path, {})[binding.verb.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Cosnap API",
            "version": "v1",
            "description": (
                "Generated from the descriptor set (protos/). JSON is the proto3 JSON mapping: "
                "lowerCamel names (snake_case accepted in requests), 64-bit integers as strings, "
                "timestamps in RFC 3339. Errors are google.rpc.Status."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {BEARER: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def main() -> None:
    from gateway.config import Settings

    descriptors = load_descriptors(Settings().descriptor_set)
    document = build_document(descriptors.pool, build_routes(descriptors.pool, descriptors.services))
    json.dump(document, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
