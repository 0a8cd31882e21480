"""Validation of ingest batches, producing the rows the group committer stores.

Every item of a batch is checked and every problem is named with its JSON path
(`events[2].eventType`, camelCase as the frontend sends it); one bad item fails
the whole batch (all-or-nothing) with INVALID_ARGUMENT and a google.rpc.BadRequest.

Validation and conversion happen in one pass: a valid item becomes a tuple in
the column order of the committer's staging tables (see `ingest.py`).

Two paths, one set of rules. Each item first goes through a fast path that
only ever *accepts*: the checks inlined on locals, `properties` encoded straight
from the protobuf `Value`s to JSON text (`struct_json`), no path strings built.
Anything it is not sure about (any failed check, an explicit epoch timestamp)
sends the item through the checked path (`_event_row`, `_metric_row`,
`_step_row`): the reference implementation, which names every violation and
also builds the row. So errors and their order come from one place only, and the
fast path can be conservative but never more permissive.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from . import sketch, vitals

MAX_ID_CHARS = 128
MAX_PAGE_CHARS = 2048
MAX_NAVIGATION_TYPE_CHARS = 64
MAX_PROPERTIES_BYTES = 8 * 1024
MAX_PROPERTIES_DEPTH = 5
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_CHARS = 256
MAX_FUTURE_SECONDS = 300.0

EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Timestamps in rows are PostgreSQL's own representation: microseconds since
# 2000-01-01 00:00:00 UTC, as an int. Cheaper to build than a datetime, and the
# committer COPYs them as they are (ingest.py sets the codec on its connections).
PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds
# Compact JSON; non-finite numbers never get here (rejected while converting).
_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

# Rows, in the staging tables' column order (without the leading request seq):
# events:  event_id, session_id, user_id, event_type, page, properties, occurred_at
# metrics: name, metric_id, session_id, user_id, value, delta, rating, navigation_type, page,
#          attributes, occurred_at, bin
# steps:   step_id, session_id, user_id, step, effect_id, properties, occurred_at
# occurred_at: microseconds since 2000-01-01 UTC (see PG_EPOCH_SECONDS).
# (received_at is the flush's transaction time, filled in by PostgreSQL: a timestamp
# less to encode per row; a missing timestamp makes occurred_at the request's receive time)
Row = tuple[Any, ...]


@dataclass(frozen=True)
class Limits:
    max_items: int = 500
    retention_days: int = 30


class _Clock:
    """The receive time of one request and the accepted timestamp range."""

    __slots__ = ("earliest", "latest", "received_at")

    def __init__(self, now: float, retention_days: int) -> None:
        self.received_at = round((now - PG_EPOCH_SECONDS) * 1_000_000)
        self.earliest = now - retention_days * 86400.0
        self.latest = now + MAX_FUTURE_SECONDS


# The checks below take the list name, index and field and build the JSON path
# (`events[2].eventId`) only when something is wrong: valid items cost no strings.


def _check_id(
    value: str, violations: FieldViolations, kind: str, i: int, name: str, required: bool = True
) -> str | None:
    if value:
        if len(value) <= MAX_ID_CHARS and value.isprintable():
            return value
    elif not required:
        return None
    path = f"{kind}[{i}].{name}"
    if not value:
        violations.add(path, "is required")
        return None
    if len(value) > MAX_ID_CHARS:
        violations.add(path, f"must be at most {MAX_ID_CHARS} characters")
    else:
        violations.add(path, "must contain printable characters only")
    return value


def _check_text(
    value: str, limit: int, violations: FieldViolations, kind: str, i: int, name: str
) -> str | None:
    if not value:
        return None
    if len(value) > limit:
        violations.add(f"{kind}[{i}].{name}", f"must be at most {limit} characters")
    return value


def _occurred_at(item: Any, clock: _Clock, violations: FieldViolations, kind: str, i: int) -> int:
    if not item.HasField("timestamp"):
        return clock.received_at
    ts: timestamp_pb2.Timestamp = item.timestamp
    seconds, nanos = ts.seconds, ts.nanos
    if 0 <= nanos < 1_000_000_000 and clock.earliest <= seconds + nanos / 1e9 <= clock.latest:
        return (seconds - PG_EPOCH_SECONDS) * 1_000_000 + nanos // 1000
    path = f"{kind}[{i}].timestamp"
    if not 0 <= nanos < 1_000_000_000:
        violations.add(path, "nanos must be in [0, 1e9)")
    elif seconds + nanos / 1e9 > clock.latest:
        violations.add(path, f"must not be more than {int(MAX_FUTURE_SECONDS)} seconds in the future")
    else:
        violations.add(path, "is older than the retention period")
    return clock.received_at


class _BadValue(Exception):
    pass


def _plain(value: struct_pb2.Value, depth: int) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise _BadValue("numbers must be finite")
        if number.is_integer() and abs(number) < 2**53:
            return int(number)
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        if depth >= MAX_PROPERTIES_DEPTH:
            raise _BadValue(f"must not be nested more than {MAX_PROPERTIES_DEPTH} levels deep")
        return {k: _plain(v, depth + 1) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        if depth >= MAX_PROPERTIES_DEPTH:
            raise _BadValue(f"must not be nested more than {MAX_PROPERTIES_DEPTH} levels deep")
        return [_plain(v, depth + 1) for v in value.list_value.values]
    return None  # null_value or unset


def _properties(item: Any, violations: FieldViolations, kind: str, i: int) -> str | None:
    """The properties as compact JSON text, or None when absent or empty (checked path)."""
    if not item.HasField("properties"):
        return None
    struct: struct_pb2.Struct = item.properties
    if not struct.fields:
        return None
    path = f"{kind}[{i}].properties"
    # A bound on the work before walking: the JSON form is never 16 times smaller
    # than the wire form (a number: 9-11 bytes on the wire, 1 or more as JSON).
    if struct.ByteSize() > 16 * MAX_PROPERTIES_BYTES:
        violations.add(path, f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON")
        return None
    try:
        plain = {k: _plain(v, 1) for k, v in struct.fields.items()}
    except _BadValue as exc:
        violations.add(path, str(exc))
        return None
    except RecursionError:
        violations.add(path, f"must not be nested more than {MAX_PROPERTIES_DEPTH} levels deep")
        return None
    text = _to_json(plain)
    # UTF-8 takes at most 4 bytes a character: encode only when it could matter.
    if len(text) > MAX_PROPERTIES_BYTES or (
        len(text) > MAX_PROPERTIES_BYTES // 4 and len(text.encode()) > MAX_PROPERTIES_BYTES
    ):
        violations.add(path, f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON")
        return None
    return text


# ------------------------------------------------------------------ fast path


class Declined(Exception):
    """The fast path does not accept an item; the checked path decides and names the problem."""


_encode_str = json.encoder.encode_basestring  # what JSONEncoder(ensure_ascii=False) uses
_SAFE_INTEGER = float(2**53)
# Bounded caches of inputs that passed: event types and JSON-encoded keys (`"key":`)
# repeat across items. Full caches stop growing (they only save work).
_CACHE_MAX = 1024
_MAX_CACHED_KEY_CHARS = 64
_event_types: set[str] = set()
_key_json: dict[str, str] = {}


def _event_type_ok(event_type: str) -> bool:
    if event_type in _event_types:
        return True
    if EVENT_TYPE.fullmatch(event_type) is None:
        return False
    if len(_event_types) < _CACHE_MAX:
        _event_types.add(event_type)
    return True


def _key_prefix(key: str, budget: int) -> str:
    """`"key":` for a Struct key not in the cache (declined when over the budget alone)."""
    if len(key) > budget:
        raise Declined
    prefix = _encode_str(key) + ":"
    if len(key) <= _MAX_CACHED_KEY_CHARS and len(_key_json) < _CACHE_MAX:
        _key_json[key] = prefix
    return prefix


def struct_json(fields: Any, depth: int = 1, budget: int = MAX_PROPERTIES_BYTES) -> str:
    """A Struct's `fields` (map of Values, at nesting `depth`) as compact JSON text.

    The same text as `_to_json` of the checked path's `_plain` conversion, in one
    pass straight from the Values, checking depth and size as it goes. Raises
    Declined when a number is not finite, a list or object sits at depth
    MAX_PROPERTIES_DEPTH or deeper, or the text would exceed `budget` characters,
    so the work is bounded by `budget` (every entry adds at least 2 characters),
    whatever the size of the input.
    """
    parts: list[str] = []
    append = parts.append
    keys = _key_json
    size = 1  # "{", then per entry: the entry and its "," or the closing "}"
    for key in fields:
        value = fields[key]
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            text = value.string_value
            if len(text) > budget:
                raise Declined
            text = _encode_str(text)
        elif kind == "number_value":
            number = value.number_value
            if number.is_integer():  # False for inf and nan
                text = f"{int(number)}" if -_SAFE_INTEGER < number < _SAFE_INTEGER else repr(number)
            elif number - number == 0.0:  # finite
                text = repr(number)
            else:
                raise Declined
        elif kind == "bool_value":
            text = "true" if value.bool_value else "false"
        elif kind == "struct_value":
            if depth >= MAX_PROPERTIES_DEPTH:
                raise Declined
            text = struct_json(value.struct_value.fields, depth + 1, budget - size)
        elif kind == "list_value":
            if depth >= MAX_PROPERTIES_DEPTH:
                raise Declined
            text = _list_json(value.list_value.values, depth + 1, budget - size)
        else:  # null_value or unset
            text = "null"
        prefix = keys.get(key)
        if prefix is None:
            prefix = _key_prefix(key, budget)
        size += len(prefix) + len(text) + 1
        if size > budget:
            raise Declined
        append(prefix + text)
    return "{" + ",".join(parts) + "}"


def _list_json(values: Any, depth: int, budget: int) -> str:
    """A ListValue's `values` (at nesting `depth`) as compact JSON text; see struct_json."""
    parts: list[str] = []
    append = parts.append
    size = 1  # "[", then per element: the element and its "," or the closing "]"
    for value in values:
        kind = value.WhichOneof("kind")
        if kind == "string_value":
            text = value.string_value
            if len(text) > budget:
                raise Declined
            text = _encode_str(text)
        elif kind == "number_value":
            number = value.number_value
            if number.is_integer():
                text = f"{int(number)}" if -_SAFE_INTEGER < number < _SAFE_INTEGER else repr(number)
            elif number - number == 0.0:
                text = repr(number)
            else:
                raise Declined
        elif kind == "bool_value":
            text = "true" if value.bool_value else "false"
        elif kind == "struct_value":
            if depth >= MAX_PROPERTIES_DEPTH:
                raise Declined
            text = struct_json(value.struct_value.fields, depth + 1, budget - size)
        elif kind == "list_value":
            if depth >= MAX_PROPERTIES_DEPTH:
                raise Declined
            text = _list_json(value.list_value.values, depth + 1, budget - size)
        else:
            text = "null"
        size += len(text) + 1
        if size > budget:
            raise Declined
        append(text)
    return "[" + ",".join(parts) + "]"


def _properties_json(struct: struct_pb2.Struct) -> str | None:
    """Fast path of `_properties` for a present Struct: its JSON text, None when empty."""
    fields = struct.fields
    if not fields:
        return None
    text = struct_json(fields)
    # At most MAX_PROPERTIES_BYTES characters here; UTF-8 takes at most 4 bytes a character.
    if len(text) > MAX_PROPERTIES_BYTES // 4 and len(text.encode()) > MAX_PROPERTIES_BYTES:
        raise Declined
    return text


def _check_batch(field: str, count: int, limits: Limits, violations: FieldViolations) -> bool:
    if count == 0:
        violations.add(field, "must contain at least one item")
        return False
    if count > limits.max_items:
        violations.add(field, f"must contain at most {limits.max_items} items, got {count}")
        return False
    return True


# ------------------------------------------------------------------ batches


def _event_row(e: analytics_pb2.Event, i: int, clock: _Clock, violations: FieldViolations) -> Row:
    """The checked path: one event's row, every problem added to `violations`."""
    event_id = _check_id(e.event_id, violations, "events", i, "eventId")
    session_id = _check_id(e.session_id, violations, "events", i, "sessionId")
    user_id = _check_id(e.user_id, violations, "events", i, "userId", False)
    event_type = e.event_type
    if not event_type:
        violations.add(f"events[{i}].eventType", "is required")
    elif EVENT_TYPE.fullmatch(event_type) is None:
        violations.add(
            f"events[{i}].eventType",
            "must be a lowercase identifier ([a-z][a-z0-9_]*, at most 64 characters)",
        )
    page = _check_text(e.page, MAX_PAGE_CHARS, violations, "events", i, "page")
    properties = _properties(e, violations, "events", i)
    occurred_at = _occurred_at(e, clock, violations, "events", i)
    return (event_id, session_id, user_id, event_type, page, properties, occurred_at)


def validate_events(request: analytics_pb2.RecordEventsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.events
    if not _check_batch("events", len(items), limits, violations):
        violations.raise_if_any("invalid events")
    clock = _Clock(now, limits.retention_days)
    earliest, latest, received_at = clock.earliest, clock.latest, clock.received_at
    pg_epoch = PG_EPOCH_SECONDS
    rows: list[Row] = []
    append = rows.append
    event_types = _event_types
    properties_json = _properties_json
    for i, e in enumerate(items):
        try:
            event_id = e.event_id
            session_id = e.session_id
            user_id = e.user_id
            event_type = e.event_type
            page = e.page
            if not (
                event_id
                and len(event_id) <= MAX_ID_CHARS
                and event_id.isprintable()
                and session_id
                and len(session_id) <= MAX_ID_CHARS
                and session_id.isprintable()
                and (not user_id or (len(user_id) <= MAX_ID_CHARS and user_id.isprintable()))
                and (event_type in event_types or _event_type_ok(event_type))
                and len(page) <= MAX_PAGE_CHARS
            ):
                raise Declined
            # The fast path of `_occurred_at`; an explicit 1970-01-01T00:00:00Z goes the checked path.
            ts = e.timestamp
            seconds = ts.seconds
            nanos = ts.nanos
            if seconds or nanos:
                if not (0 <= nanos < 1_000_000_000 and earliest <= seconds + nanos / 1e9 <= latest):
                    raise Declined
                occurred_at = (seconds - pg_epoch) * 1_000_000 + nanos // 1000
            elif e.HasField("timestamp"):
                raise Declined
            else:
                occurred_at = received_at
            append(
                (
                    event_id,
                    session_id,
                    user_id or None,
                    event_type,
                    page or None,
                    properties_json(e.properties) if e.HasField("properties") else None,
                    occurred_at,
                )
            )
        except Declined:
            append(_event_row(e, i, clock, violations))
    violations.raise_if_any("invalid events")
    return rows


def _metric_row(
    m: analytics_pb2.PerformanceMetric, i: int, clock: _Clock, violations: FieldViolations
) -> Row:
    """The checked path: one metric's row, every problem added to `violations`."""
    metric_id = _check_id(m.metric_id, violations, "metrics", i, "metricId")
    session_id = _check_id(m.session_id, violations, "metrics", i, "sessionId")
    user_id = _check_id(m.user_id, violations, "metrics", i, "userId", False)
    name = m.name
    if not name:
        violations.add(f"metrics[{i}].name", "is required")
    elif name not in vitals.METRIC_NAMES:
        violations.add(f"metrics[{i}].name", "must be one of " + ", ".join(sorted(vitals.METRIC_NAMES)))
    value = m.value
    ok_value = math.isfinite(value) and value >= 0
    if not ok_value:
        violations.add(f"metrics[{i}].value", "must be a finite number >= 0")
    delta = m.delta
    if not math.isfinite(delta):
        violations.add(f"metrics[{i}].delta", "must be a finite number")
    navigation_type = _check_text(
        m.navigation_type, MAX_NAVIGATION_TYPE_CHARS, violations, "metrics", i, "navigationType"
    )
    page = _check_text(m.page, MAX_PAGE_CHARS, violations, "metrics", i, "page")
    attributes: str | None = None
    if m.attributes:
        attrs = dict(m.attributes)
        if len(attrs) > MAX_ATTRIBUTES:
            violations.add(f"metrics[{i}].attributes", f"must have at most {MAX_ATTRIBUTES} entries")
        for key, val in attrs.items():
            if not key or len(key) > MAX_ATTRIBUTE_CHARS:
                violations.add(
                    f"metrics[{i}].attributes[{key[:64]!r}]",
                    f"keys must be 1 to {MAX_ATTRIBUTE_CHARS} characters",
                )
            elif len(val) > MAX_ATTRIBUTE_CHARS:
                violations.add(
                    f"metrics[{i}].attributes[{key!r}]",
                    f"values must be at most {MAX_ATTRIBUTE_CHARS} characters",
                )
        attributes = _to_json(attrs)
    occurred_at = _occurred_at(m, clock, violations, "metrics", i)
    if ok_value:
        rating = vitals.rate(name, value)
        bin_ = sketch.bin_of(value)
    else:
        rating, bin_ = None, 0
    return (
        name,
        metric_id,
        session_id,
        user_id,
        value,
        delta,
        rating,
        navigation_type,
        page,
        attributes,
        occurred_at,
        bin_,
    )


def _attributes_json(attributes: Any) -> str:
    """Fast path of the attributes check: a non-empty map<string, string> as compact JSON."""
    if len(attributes) > MAX_ATTRIBUTES:
        raise Declined
    parts: list[str] = []
    for key in attributes:
        value = attributes[key]
        if not key or len(key) > MAX_ATTRIBUTE_CHARS or len(value) > MAX_ATTRIBUTE_CHARS:
            raise Declined
        parts.append(f"{_encode_str(key)}:{_encode_str(value)}")
    return "{" + ",".join(parts) + "}"


def validate_metrics(
    request: analytics_pb2.RecordPerformanceMetricsRequest, now: float, limits: Limits
) -> list[Row]:
    violations = FieldViolations()
    items = request.metrics
    if not _check_batch("metrics", len(items), limits, violations):
        violations.raise_if_any("invalid metrics")
    clock = _Clock(now, limits.retention_days)
    earliest, latest, received_at = clock.earliest, clock.latest, clock.received_at
    pg_epoch = PG_EPOCH_SECONDS
    rows: list[Row] = []
    append = rows.append
    names = vitals.METRIC_NAMES
    rate = vitals.rate
    bin_of = sketch.bin_of
    max_float = sys.float_info.max
    for i, m in enumerate(items):
        try:
            metric_id = m.metric_id
            session_id = m.session_id
            user_id = m.user_id
            name = m.name
            value = m.value
            delta = m.delta
            navigation_type = m.navigation_type
            page = m.page
            if not (
                metric_id
                and len(metric_id) <= MAX_ID_CHARS
                and metric_id.isprintable()
                and session_id
                and len(session_id) <= MAX_ID_CHARS
                and session_id.isprintable()
                and (not user_id or (len(user_id) <= MAX_ID_CHARS and user_id.isprintable()))
                and name in names
                and 0.0 <= value <= max_float  # finite and >= 0 (false for nan)
                and delta - delta == 0.0  # finite
                and len(navigation_type) <= MAX_NAVIGATION_TYPE_CHARS
                and len(page) <= MAX_PAGE_CHARS
            ):
                raise Declined
            # The fast path of `_occurred_at`; an explicit 1970-01-01T00:00:00Z goes the checked path.
            ts = m.timestamp
            seconds = ts.seconds
            nanos = ts.nanos
            if seconds or nanos:
                if not (0 <= nanos < 1_000_000_000 and earliest <= seconds + nanos / 1e9 <= latest):
                    raise Declined
                occurred_at = (seconds - pg_epoch) * 1_000_000 + nanos // 1000
            elif m.HasField("timestamp"):
                raise Declined
            else:
                occurred_at = received_at
            attributes = m.attributes
            append(
                (
                    name,
                    metric_id,
                    session_id,
                    user_id or None,
                    value,
                    delta,
                    rate(name, value),
                    navigation_type or None,
                    page or None,
                    _attributes_json(attributes) if attributes else None,
                    occurred_at,
                    bin_of(value),
                )
            )
        except Declined:
            append(_metric_row(m, i, clock, violations))
    violations.raise_if_any("invalid metrics")
    return rows


def _step_row(s: analytics_pb2.FunnelStep, i: int, clock: _Clock, violations: FieldViolations) -> Row:
    """The checked path: one funnel step's row, every problem added to `violations`."""
    step_id = _check_id(s.step_id, violations, "steps", i, "stepId")
    session_id = _check_id(s.session_id, violations, "steps", i, "sessionId")
    user_id = _check_id(s.user_id, violations, "steps", i, "userId", False)
    number = vitals.STEP_NUMBER.get(s.step)
    if number is None:
        if not s.step:
            violations.add(f"steps[{i}].step", "is required")
        else:
            violations.add(f"steps[{i}].step", "must be one of " + ", ".join(vitals.FUNNEL_STEPS))
    effect_id = _check_id(s.effect_id, violations, "steps", i, "effectId", False)
    properties = _properties(s, violations, "steps", i)
    occurred_at = _occurred_at(s, clock, violations, "steps", i)
    return (step_id, session_id, user_id, number, effect_id, properties, occurred_at)


def validate_steps(request: analytics_pb2.RecordFunnelStepsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.steps
    if not _check_batch("steps", len(items), limits, violations):
        violations.raise_if_any("invalid funnel steps")
    clock = _Clock(now, limits.retention_days)
    earliest, latest, received_at = clock.earliest, clock.latest, clock.received_at
    pg_epoch = PG_EPOCH_SECONDS
    rows: list[Row] = []
    append = rows.append
    numbers = vitals.STEP_NUMBER
    properties_json = _properties_json
    for i, s in enumerate(items):
        try:
            step_id = s.step_id
            session_id = s.session_id
            user_id = s.user_id
            number = numbers.get(s.step)
            effect_id = s.effect_id
            if not (
                step_id
                and len(step_id) <= MAX_ID_CHARS
                and step_id.isprintable()
                and session_id
                and len(session_id) <= MAX_ID_CHARS
                and session_id.isprintable()
                and (not user_id or (len(user_id) <= MAX_ID_CHARS and user_id.isprintable()))
                and number is not None
                and (not effect_id or (len(effect_id) <= MAX_ID_CHARS and effect_id.isprintable()))
            ):
                raise Declined
            # The fast path of `_occurred_at`; an explicit 1970-01-01T00:00:00Z goes the checked path.
            ts = s.timestamp
            seconds = ts.seconds
            nanos = ts.nanos
            if seconds or nanos:
                if not (0 <= nanos < 1_000_000_000 and earliest <= seconds + nanos / 1e9 <= latest):
                    raise Declined
                occurred_at = (seconds - pg_epoch) * 1_000_000 + nanos // 1000
            elif s.HasField("timestamp"):
                raise Declined
            else:
                occurred_at = received_at
            append(
                (
                    step_id,
                    session_id,
                    user_id or None,
                    number,
                    effect_id or None,
                    properties_json(s.properties) if s.HasField("properties") else None,
                    occurred_at,
                )
            )
        except Declined:
            append(_step_row(s, i, clock, violations))
    violations.raise_if_any("invalid funnel steps")
    return rows
