"""HTTP/JSON <-> protobuf, following the google.api.http rules and the proto3 JSON mapping."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from gateway.jsoncheck import MAX_DEPTH, Violation, check_message, nesting_depth
from gateway.routes import HTTP_BODY, Route

log = logging.getLogger("gateway")

# Well-known types whose JSON form is a string or number, so a query parameter can carry them.
_SCALAR_WKTS = frozenset(
    {
        "google.protobuf.Timestamp",
        "google.protobuf.Duration",
        "google.protobuf.FieldMask",
        "google.protobuf.DoubleValue",
        "google.protobuf.FloatValue",
        "google.protobuf.Int64Value",
        "google.protobuf.UInt64Value",
        "google.protobuf.Int32Value",
        "google.protobuf.UInt32Value",
        "google.protobuf.BoolValue",
        "google.protobuf.StringValue",
        "google.protobuf.BytesValue",
    },
)


class TranscodeError(ValueError):
    """The HTTP request cannot be turned into the gRPC request (answered 400).

    `violations` name each offending field (a google.rpc.BadRequest in the answer)."""

    def __init__(self, message: str, violations: Sequence[Violation] = ()) -> None:
        super().__init__(message)
        self.violations = list(violations)


def _invalid(what: str, violations: list[Violation]) -> TranscodeError:
    fields = ", ".join(field for field, _ in violations[:5])
    more = f" and {len(violations) - 5} more" if len(violations) > 5 else ""
    return TranscodeError(f"{what}: {fields}{more}", violations)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _field(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its lowerCamel JSON name."""
    fd = message.fields_by_name.get(name)
    if fd is not None:
        return fd
    for candidate in message.fields:
        if candidate.json_name == name:
            return candidate
    return None


def _resolve(message: Descriptor, dotted: str, source: str) -> list[FieldDescriptor]:
    """Resolve `a.b.c` to the chain of fields it names; leaf must hold a scalar value."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = message
    for part in dotted.split("."):
        fd = _field(current, part) if current is not None else None
        if fd is None:
            raise TranscodeError(f"{source} {dotted!r}: no such field in {message.full_name}")
        if chain and chain[-1].is_repeated:
            raise TranscodeError(f"{source} {dotted!r} goes through a repeated field")
        chain.append(fd)
        current = fd.message_type
    leaf = chain[-1]
    if leaf.message_type is not None and leaf.message_type.full_name not in _SCALAR_WKTS:
        kind = "a map" if leaf.message_type.GetOptions().map_entry else "a message"
        raise TranscodeError(f"{source} {dotted!r} names {kind} field; it cannot be set from text")
    return chain


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def _text_value(fd: FieldDescriptor, value: str, path: str) -> Any:
    """A path or query text as the JSON value json_format expects (numbers may stay strings)."""
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if value.lower() not in _BOOLS:
            raise TranscodeError(
                f"invalid parameter: {path}", [(path, f"expected true or false, got {value[:64]!r}")]
            )
        return _BOOLS[value.lower()]
    return value


def _nested(chain: list[FieldDescriptor], values: list[str]) -> dict[str, Any]:
    path = ".".join(fd.json_name for fd in chain)
    texts = [_text_value(chain[-1], v, path) for v in values]
    leaf: Any = texts if chain[-1].is_repeated else texts[-1]
    nested: dict[str, Any] = {}
    for fd in reversed(chain):
        nested = {fd.json_name: leaf}
        leaf = nested
    return nested


def _leaf_value(message: Message, chain: list[FieldDescriptor]) -> tuple[bool, Any]:
    """(present, value) of the leaf of `chain` in `message`."""
    current = message
    for fd in chain[:-1]:
        if not current.HasField(fd.name):
            return False, None
        current = getattr(current, fd.name)
    leaf = chain[-1]
    value = getattr(current, leaf.name)
    if leaf.is_repeated:
        return len(value) > 0, list(value)
    if leaf.has_presence:
        return current.HasField(leaf.name), value
    return value != leaf.default_value, value


def _clear_leaf(message: Message, chain: list[FieldDescriptor]) -> None:
    current = message
    for fd in chain[:-1]:
        if not current.HasField(fd.name):
            return
        current = getattr(current, fd.name)
    current.ClearField(chain[-1].name)


class Transcoder:
    def __init__(self, pool: DescriptorPool) -> None:
        self.pool = pool

    def message_class(self, descriptor: Descriptor) -> type[Message]:
        return GetMessageClass(descriptor)

    # -- requests ---------------------------------------------------------------------------

    def build_request(
        self,
        route: Route,
        bindings: dict[str, str],
        query: Iterable[tuple[str, str]],
        body: bytes,
        content_type: str,
    ) -> Message:
        request = self.message_class(route.method.input_type)()
        if route.body:
            self._apply_body(request, route, body, content_type)
        input_type = route.method.input_type

        path_values: dict[str, tuple[list[FieldDescriptor], list[str]]] = {}
        for dotted, value in bindings.items():
            chain = _resolve(input_type, dotted, "path variable")
            path_values[_key(chain)] = (chain, [value])
        # Path bindings win over body values only when they agree
        # (Envoy's reject_binding_body_field_collisions).
        bound = self._parse_values(input_type, path_values.values(), "path variable")
        for chain, _ in path_values.values():
            present, body_value = _leaf_value(request, chain)
            if present and body_value != _leaf_value(bound, chain)[1]:
                name = ".".join(fd.name for fd in chain)
                raise TranscodeError(
                    f"field {name!r} is bound by the path and set to a different value in the body",
                )
            _clear_leaf(request, chain)
        request.MergeFrom(bound)

        query_values: dict[str, tuple[list[FieldDescriptor], list[str]]] = {}
        for name, value in query:
            if route.body == "*":
                raise TranscodeError(
                    f"unknown query parameter {name!r}: this method takes its fields from the body",
                )
            chain = _resolve(input_type, name, "unknown query parameter")
            key = _key(chain)
            if key in path_values or (route.body and chain[0].name == route.body):
                raise TranscodeError(f"query parameter {name!r} is already bound by the path/body")
            entry = query_values.setdefault(key, (chain, []))
            if entry[1] and not chain[-1].is_repeated:
                raise TranscodeError(f"query parameter {name!r} given more than once")
            entry[1].append(value)
        request.MergeFrom(self._parse_values(input_type, query_values.values(), "query parameter"))
        return request

    def _parse_values(
        self,
        message: Descriptor,
        entries: Iterable[tuple[list[FieldDescriptor], list[str]]],
        source: str,
    ) -> Message:
        result = self.message_class(message)()
        violations: list[Violation] = []
        parts: list[dict[str, Any]] = []
        for chain, values in entries:
            nested = _nested(chain, values)
            check_message(nested, message, "", violations)
            parts.append(nested)
        if violations:
            raise _invalid(f"invalid {source}", violations)
        for nested in parts:
            part = self.message_class(message)()
            self._parse(nested, part, f"invalid {source}")
            result.MergeFrom(part)
        return result

    def _parse(self, document: dict[str, Any], message: Message, what: str) -> None:
        """json_format.ParseDict after check_message found nothing: a failure here is a
        case the check does not know; answer without the parser's wording, log it."""
        try:
            json_format.ParseDict(document, message, descriptor_pool=self.pool)
        except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
            log.info("JSON accepted by the check, refused by protobuf: %s", exc)
            raise TranscodeError(what) from None

    def _apply_body(self, request: Message, route: Route, body: bytes, content_type: str) -> None:
        if route.raw_body:
            # A google.api.HttpBody, from the descriptor pool (no static type).
            target: Any = request if route.body == "*" else getattr(request, route.body)
            target.content_type = content_type
            target.data = body
            return
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise TranscodeError("request body is not valid UTF-8") from None
        if not text.strip():
            return  # an empty body is an empty message
        if nesting_depth(body) > MAX_DEPTH:
            raise TranscodeError(f"request body nests arrays or objects deeper than {MAX_DEPTH} levels")
        try:
            value = json.loads(text, parse_constant=_no_constants)
        except json.JSONDecodeError as exc:
            raise TranscodeError(f"malformed JSON in request body: {exc}") from None
        except (ValueError, RecursionError) as exc:
            raise TranscodeError(f"malformed JSON in request body: {exc}") from None
        if route.body == "*":
            document = value
            if not isinstance(document, dict):
                raise TranscodeError("request body must be a JSON object")
        else:
            document = {route.method.input_type.fields_by_name[route.body].json_name: value}
        violations: list[Violation] = []
        check_message(document, route.method.input_type, "", violations)
        if violations:
            raise _invalid("invalid request body", violations)
        self._parse(document, request, "invalid request body")

    # -- responses --------------------------------------------------------------------------

    def render_response(self, route: Route, reply: Message) -> tuple[bytes, str]:
        """The HTTP body and content type of a reply (honours `response_body`)."""
        target: Message = reply
        if route.response_body:
            fd = reply.DESCRIPTOR.fields_by_name[route.response_body]
            if fd.message_type is None or fd.is_repeated:
                # A scalar or repeated field: print it alone, as its JSON value.
                only = type(reply)()
                only.MergeFrom(reply)
                for other in reply.DESCRIPTOR.fields:
                    if other is not fd:
                        only.ClearField(other.name)
                printed = self.to_dict(only, with_defaults=True).get(fd.json_name)
                return _dumps(printed), "application/json"
            target = getattr(reply, fd.name)
        if target.DESCRIPTOR.full_name == HTTP_BODY:
            http_body: Any = target
            content_type = http_body.content_type or "application/octet-stream"
            return bytes(http_body.data), content_type
        # Replies print zero values too (Envoy's always_print_primitive_fields),
        # so `{"accepted": 1, "duplicates": 0}` keeps the shape API.md promises.
        return _dumps(self.to_dict(target, with_defaults=True)), "application/json"

    def to_dict(self, message: Message, with_defaults: bool = False) -> dict[str, Any]:
        return json_format.MessageToDict(
            message, descriptor_pool=self.pool, always_print_fields_with_no_presence=with_defaults
        )


def _key(chain: list[FieldDescriptor]) -> str:
    return ".".join(fd.name for fd in chain)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
