"""JSON request values checked against the request message before protobuf parses them.

The protobuf JSON parser stops at the first problem and words it its own way
("Failed to parse eventId field: ..."). The edge checks the whole document first,
against the same descriptors, and names every problem by its path the way the
services' validation does (`events[1].eventId: expected a string`), so a client gets
one 400 with a `google.rpc.BadRequest` listing each offending field. Nesting is
bounded before anything recursive runs: a body nested deeper than MAX_DEPTH is
refused by a linear scan of its bytes.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from itertools import accumulate
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

# Deeper than any request of the contracts (analytics `properties` allow 5 levels),
# shallow enough for every recursive step after it (json, protobuf, validation).
MAX_DEPTH = 64

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}

Violation = tuple[str, str]

_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
_FLOAT_MAX = 3.4028234663852886e38
_SPECIAL_FLOATS = ("NaN", "Infinity", "-Infinity")
_WRAPPERS = {
    "google.protobuf.DoubleValue",
    "google.protobuf.FloatValue",
    "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value",
    "google.protobuf.Int32Value",
    "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue",
    "google.protobuf.StringValue",
    "google.protobuf.BytesValue",
}


def nesting_depth(body: bytes) -> int:
    """How deeply arrays and objects nest in a JSON text (strings skipped), in linear time."""
    structure = _STRING.sub(b"", body)
    steps = [_STEP[c] for c in b"".join(_BRACKETS.findall(structure))]
    return max(accumulate(steps), default=0)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _expected(what: str, value: Any) -> str:
    return f"expected {what}, got {_kind(value)}"


def _field(message: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its lowerCamel JSON name or its proto name (both are accepted)."""
    for fd in message.fields:
        if fd.json_name == name or fd.name == name:
            return fd
    return None


def check_message(value: Any, message: Descriptor, path: str, out: list[Violation]) -> None:
    """Append to `out` every problem of `value` as the JSON form of `message`."""
    name = message.full_name
    if name in _WRAPPERS:
        _check_scalar(value, message.fields_by_name["value"], path, out)
        return
    if name == "google.protobuf.Timestamp":
        _check_text(
            value, timestamp_pb2.Timestamp(), "an RFC 3339 timestamp like 2026-12-02T10:00:00Z", path, out
        )
        return
    if name == "google.protobuf.Duration":
        _check_text(value, duration_pb2.Duration(), 'a duration in seconds like "1.5s"', path, out)
        return
    if name == "google.protobuf.FieldMask":
        if not isinstance(value, str):
            out.append((path, _expected("a string of comma-separated field paths", value)))
        return
    if name == "google.protobuf.Value":
        return  # any JSON value (depth is bounded already)
    if name == "google.protobuf.ListValue":
        if not isinstance(value, list):
            out.append((path, _expected("an array", value)))
        return
    if not isinstance(value, dict):
        out.append((path, _expected("an object", value)))
        return
    if name in ("google.protobuf.Struct", "google.protobuf.Any"):
        return  # free-form object; Any is resolved by the parser against the pool
    seen: dict[str, str] = {}
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        fd = _field(message, key)
        if fd is None:
            out.append((where, "unknown field"))
            continue
        field_path = f"{path}.{fd.json_name}" if path else fd.json_name
        if fd.name in seen:
            out.append((field_path, f"set twice (as {seen[fd.name]!r} and {key!r})"))
            continue
        seen[fd.name] = key
        oneof = fd.containing_oneof
        if oneof is not None and item is not None:
            other = next(
                (
                    f
                    for f in oneof.fields
                    if f is not fd and f.name in seen and value.get(seen[f.name]) is not None
                ),
                None,
            )
            if other is not None:
                out.append(
                    (field_path, f"only one of {', '.join(f.json_name for f in oneof.fields)} may be set")
                )
                continue
        _check_field(item, fd, field_path, out)


def _check_field(value: Any, fd: FieldDescriptor, path: str, out: list[Violation]) -> None:
    if value is None:
        return  # null: the field's default
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        if not isinstance(value, dict):
            out.append((path, _expected("an object", value)))
            return
        key_fd = fd.message_type.fields_by_name["key"]
        value_fd = fd.message_type.fields_by_name["value"]
        for key, item in value.items():
            where = f"{path}[{key!r}]"
            if key_fd.type != FieldDescriptor.TYPE_STRING:
                _check_map_key(key, key_fd, where, out)
            if item is None and value_fd.message_type is None:
                out.append((where, "null is not a value"))
            elif item is not None:
                _check_single(item, value_fd, where, out)
        return
    if fd.is_repeated:
        if not isinstance(value, list):
            out.append((path, _expected("an array", value)))
            return
        for i, item in enumerate(value):
            if item is None:
                out.append((f"{path}[{i}]", "null is not allowed in an array"))
            else:
                _check_single(item, fd, f"{path}[{i}]", out)
        return
    _check_single(value, fd, path, out)


def _check_single(value: Any, fd: FieldDescriptor, path: str, out: list[Violation]) -> None:
    if fd.message_type is not None:
        check_message(value, fd.message_type, path, out)
    else:
        _check_scalar(value, fd, path, out)


def _check_map_key(key: str, fd: FieldDescriptor, path: str, out: list[Violation]) -> None:
    if fd.type == FieldDescriptor.TYPE_BOOL:
        if key not in ("true", "false"):
            out.append((path, "expected a key of true or false"))
        return
    low, high = _INT_RANGES.get(fd.type, (-(2**63), 2**64 - 1))
    try:
        number = int(key)
    except ValueError:
        out.append((path, "expected an integer key"))
        return
    if not low <= number <= high:
        out.append((path, "key out of range"))


def _check_scalar(value: Any, fd: FieldDescriptor, path: str, out: list[Violation]) -> None:
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        if not isinstance(value, str):
            out.append((path, _expected("a string", value)))
    elif kind == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            out.append((path, _expected("true or false", value)))
    elif kind in _INT_RANGES:
        _check_integer(value, kind, path, out)
    elif kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        _check_float(value, kind == FieldDescriptor.TYPE_FLOAT, path, out)
    elif kind == FieldDescriptor.TYPE_BYTES:
        if not isinstance(value, str):
            out.append((path, _expected("a base64 string", value)))
        else:
            try:
                base64.b64decode(value.replace("-", "+").replace("_", "/") + "==")
            except (binascii.Error, ValueError):
                out.append((path, "expected a base64 string"))
    elif kind == FieldDescriptor.TYPE_ENUM:
        _check_enum(value, fd.enum_type, path, out)


def _check_integer(value: Any, kind: int, path: str, out: list[Violation]) -> None:
    low, high = _INT_RANGES[kind]
    number: int | None = None
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and re.fullmatch(r"-?\d{1,20}", value):
        number = int(value)
    if number is None:
        out.append((path, _expected("an integer (a number or a string of digits)", value)))
    elif not low <= number <= high:
        out.append((path, f"out of range ({low} to {high})"))


def _check_float(value: Any, single: bool, path: str, out: list[Violation]) -> None:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        if value in _SPECIAL_FLOATS:
            return
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or math.isnan(number):
        out.append((path, _expected("a number", value)))
    elif single and math.isfinite(number) and abs(number) > _FLOAT_MAX:
        out.append((path, "out of range for a 32-bit float"))


def _check_enum(value: Any, enum: EnumDescriptor | None, path: str, out: list[Violation]) -> None:
    if enum is None:
        return
    if isinstance(value, str) and re.fullmatch(r"-?\d{1,10}", value):
        value = int(value)  # a number as text (query parameters)
    if isinstance(value, str):
        if value not in enum.values_by_name:
            names = ", ".join(v.name for v in enum.values if v.number != 0) or "none"
            out.append((path, f"unknown value {value[:64]!r} (one of {names})"))
    elif isinstance(value, bool) or not isinstance(value, int):
        out.append((path, _expected("an enum name (a string)", value)))
    elif not -(2**31) <= value < 2**31:
        out.append((path, "out of range"))


def _check_text(value: Any, parser: Any, what: str, path: str, out: list[Violation]) -> None:
    if not isinstance(value, str):
        out.append((path, _expected(what, value)))
        return
    try:
        parser.FromJsonString(value)
    except (ValueError, TypeError, OverflowError):
        out.append((path, f"expected {what}, got {value[:64]!r}"))
