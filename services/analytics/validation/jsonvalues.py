"""The one JSON encoder of free-form values: an event's or funnel step's `properties`
(a protobuf Struct) and a metric's `attributes` (map<string, string>), checked while
they are encoded (text PostgreSQL can store, finite numbers, depth, size) and turned
into the compact JSON text the rows carry. Both validation paths use it, so the fast
path cannot be more permissive than the checked one.
"""

from __future__ import annotations

import json
import re
from typing import Any

from google.protobuf import struct_pb2

from services.servicekit.errors import FieldViolations

from .common import CACHE_MAX, clean_text, text_problem

MAX_PROPERTIES_BYTES = 8 * 1024
MAX_PROPERTIES_DEPTH = 5
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_CHARS = 256


class BadValue(Exception):
    """A `properties` value that cannot be stored; `path` is relative to `properties`
    (empty for problems of the whole: size and depth)."""

    def __init__(self, message: str, whole: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.whole = whole
        self.path = ""

    def within(self, part: str) -> BadValue:
        if not self.whole:
            self.path = part + self.path
        return self


_encode_str = json.encoder.encode_basestring  # what JSONEncoder(ensure_ascii=False) uses
_SAFE_INTEGER = float(2**53)
_IDENTIFIER = re.compile(r"[A-Za-z_$][A-Za-z0-9_$]*")
# JSON-encoded keys (`"key":`) repeat across items: a bounded cache of those that passed.
_MAX_CACHED_KEY_CHARS = 64
key_json: dict[str, str] = {}
TOO_BIG = f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON"
TOO_DEEP = f"must not be nested more than {MAX_PROPERTIES_DEPTH} levels deep"


def _path_key(key: str) -> str:
    """`.key`, or `["k e y"]` (JSON-escaped, ASCII) for a key that is not an identifier."""
    if len(key) <= 64 and _IDENTIFIER.fullmatch(key):
        return "." + key
    return "[" + json.dumps(key[:64]) + "]"


def _key_prefix(key: str, budget: int) -> str:
    """`"key":` for a Struct key not in the cache (checked, then cached)."""
    if len(key) > budget:
        raise BadValue(TOO_BIG, whole=True)
    if not clean_text(key):
        raise BadValue("keys " + text_problem(key))
    prefix = _encode_str(key) + ":"
    if len(key) <= _MAX_CACHED_KEY_CHARS and len(key_json) < CACHE_MAX:
        key_json[key] = prefix
    return prefix


def value_json(value: struct_pb2.Value, depth: int, budget: int) -> str:
    """One protobuf `Value` (at nesting `depth`) as compact JSON text, at most `budget`
    characters; raises BadValue for what cannot be stored."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        if len(text) > budget:
            raise BadValue(TOO_BIG, whole=True)
        if "\x00" in text or not (text.isascii() or clean_text(text)):
            raise BadValue(text_problem(text))
        return _encode_str(text)
    if kind == "number_value":
        number = value.number_value
        if number.is_integer():  # False for inf and nan
            return f"{int(number)}" if -_SAFE_INTEGER < number < _SAFE_INTEGER else repr(number)
        if number - number == 0.0:  # finite
            return repr(number)
        raise BadValue("numbers must be finite")
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "struct_value":
        if depth >= MAX_PROPERTIES_DEPTH:
            raise BadValue(TOO_DEEP, whole=True)
        return struct_json(value.struct_value.fields, depth + 1, budget)
    if kind == "list_value":
        if depth >= MAX_PROPERTIES_DEPTH:
            raise BadValue(TOO_DEEP, whole=True)
        parts: list[str] = []
        size = 1  # "[", then per element: the element and its "," or the closing "]"
        for index, element in enumerate(value.list_value.values):
            try:
                text = value_json(element, depth + 1, budget - size)
            except BadValue as exc:
                raise exc.within(f"[{index}]") from None
            size += len(text) + 1
            if size > budget:
                raise BadValue(TOO_BIG, whole=True)
            parts.append(text)
        return "[" + ",".join(parts) + "]"
    return "null"  # null_value or unset


def struct_json(fields: Any, depth: int = 1, budget: int = MAX_PROPERTIES_BYTES) -> str:
    """A Struct's `fields` (map of Values, at nesting `depth`) as compact JSON text.

    Checks text, numbers, depth and size as it goes; the work is bounded by `budget`
    (every entry adds at least 2 characters), whatever the size of the input."""
    parts: list[str] = []
    keys = key_json
    size = 1  # "{", then per entry: the entry and its "," or the closing "}"
    for key in fields:
        try:
            prefix = keys.get(key) or _key_prefix(key, budget)
            value = fields[key]
            # The scalar cases of value_json inlined (same checks, same text): a call per
            # value was a fifth of the encoder's time on typical flat `properties`.
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                text = value.string_value
                if len(text) > budget - size:
                    raise BadValue(TOO_BIG, whole=True)
                if "\x00" in text or not (text.isascii() or clean_text(text)):
                    raise BadValue(text_problem(text))
                text = _encode_str(text)
            elif kind == "number_value":
                number = value.number_value
                if number.is_integer():  # False for inf and nan
                    text = f"{int(number)}" if -_SAFE_INTEGER < number < _SAFE_INTEGER else repr(number)
                elif number - number == 0.0:  # finite
                    text = repr(number)
                else:
                    raise BadValue("numbers must be finite")
            else:
                text = value_json(value, depth, budget - size)
        except BadValue as exc:
            raise exc.within(_path_key(key)) from None
        size += len(prefix) + len(text) + 1
        if size > budget:
            raise BadValue(TOO_BIG, whole=True)
        parts.append(prefix + text)
    return "{" + ",".join(parts) + "}"


def properties_json(struct: struct_pb2.Struct) -> str | None:
    """A present Struct's JSON text (None when empty); raises BadValue."""
    fields = struct.fields
    if not fields:
        return None
    # No wire-size check first: struct_json's work is bounded by the JSON budget
    # (every entry adds at least 2 characters; a text or key longer than the budget is
    # refused before it is encoded), and struct.ByteSize() cost about a third of a
    # typical event's encoding (bench.ingest, 2026-12-03).
    text = struct_json(fields)
    # At most MAX_PROPERTIES_BYTES characters here; UTF-8 takes at most 4 bytes a character.
    if len(text) > MAX_PROPERTIES_BYTES // 4 and len(text.encode()) > MAX_PROPERTIES_BYTES:
        raise BadValue(TOO_BIG, whole=True)
    return text


def checked_properties(item: Any, violations: FieldViolations, kind: str, i: int) -> str | None:
    """The checked path's properties: JSON text, None when absent or empty."""
    if not item.HasField("properties"):
        return None
    try:
        return properties_json(item.properties)
    except BadValue as exc:
        violations.add(f"{kind}[{i}].properties{exc.path}", exc.message)
    except RecursionError:
        violations.add(f"{kind}[{i}].properties", TOO_DEEP)
    return None


def attributes_json(attributes: Any) -> str:
    """A metric's non-empty map<string, string> as compact JSON; raises BadValue."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise BadValue(f"must have at most {MAX_ATTRIBUTES} entries", whole=True)
    parts: list[str] = []
    for key in attributes:
        value = attributes[key]
        if not key or len(key) > MAX_ATTRIBUTE_CHARS:
            raise BadValue(f"keys must be 1 to {MAX_ATTRIBUTE_CHARS} characters").within(_path_key(key))
        if len(value) > MAX_ATTRIBUTE_CHARS:
            raise BadValue(f"values must be at most {MAX_ATTRIBUTE_CHARS} characters").within(_path_key(key))
        if not clean_text(key):
            raise BadValue("keys " + text_problem(key)).within(_path_key(key))
        if not clean_text(value):
            raise BadValue(text_problem(value)).within(_path_key(key))
        parts.append(f"{_encode_str(key)}:{_encode_str(value)}")
    return "{" + ",".join(parts) + "}"
