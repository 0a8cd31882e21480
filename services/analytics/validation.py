"""Validation of ingest batches, producing the rows the group committer stores.

Every item of a batch is checked and every problem is named with its JSON path
(`events[2].eventType`, `events[0].properties.utm.source`, camelCase as the
frontend sends it); one bad item fails the whole batch (all-or-nothing) with
INVALID_ARGUMENT and a google.rpc.BadRequest.

Validation and conversion happen in one pass: a valid item becomes a tuple in
the column order of its row contract (`ingest/rows.py`).

Text: every string that is stored (ids, page, navigation type, attribute keys
and values, `properties` keys and string values at every depth) is refused
when PostgreSQL could not store it: NUL (U+0000) or a lone surrogate.
Numbers: finite, and metric values within their name's range.

Two paths, one set of rules. Each event, metric and step first goes through a
fast path that only ever *accepts*: the checks inlined on locals, no path
strings built. Anything it is not sure about sends the item through the
checked path (`_event_row`, `_metric_row`, `_step_row`), which names every
violation and also builds the row. Both paths share the timestamp check
(`_timestamp`), the text check (`clean_text`) and the one JSON encoder of
`properties` values (`struct_json`), so the fast path cannot be more
permissive. Revenue and task ends (a few per minute) have the checked path
only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf import struct_pb2
from iso4217 import Currency

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from . import sketch, vitals
from .ingest.rows import Row

MAX_ID_CHARS = 128
MAX_PAGE_CHARS = 2048
MAX_NAVIGATION_TYPE_CHARS = 64
MAX_PROPERTIES_BYTES = 8 * 1024
MAX_PROPERTIES_DEPTH = 5
MAX_ATTRIBUTES = 32
MAX_ATTRIBUTE_CHARS = 256
MAX_FUTURE_SECONDS = 300.0

# Metric values: each name's plausible range (API.md). Timings in ms, at most an hour;
# CLS is unitless; MEMORY_USAGE in bytes, at most 1 TiB. |delta| has the same bound.
MAX_TIMING_MS = 3_600_000.0
MAX_METRIC_VALUE: dict[str, float] = dict.fromkeys(vitals.METRIC_NAMES, MAX_TIMING_MS)
MAX_METRIC_VALUE.update(CLS=100.0, MEMORY_USAGE=float(2**40))

# Revenue: at most 10^12 major units an order; task costs: at most a week, 10^9 coins.
MAX_AMOUNT = Decimal(10) ** 12
MAX_COST_SECONDS = 7 * 86400.0
MAX_COINS = Decimal(10) ** 9
TASK_STATUSES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
REGIONS = frozenset({"cn", "global"})

EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
DECIMAL = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,8})?")
# Timestamps in rows are PostgreSQL's own representation: microseconds since
# 2000-01-01 00:00:00 UTC, as an int. Cheaper to build than a datetime, and the
# committer COPYs them as they are (ingest/writer.py sets the codec on its connections).
PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds


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


# ------------------------------------------------------------------ shared checks


def clean_text(value: str) -> bool:
    """True when PostgreSQL can store the string: no NUL, no lone surrogate.

    `isascii` is O(1) in CPython, so ASCII text costs one scan for NUL."""
    if "\x00" in value:
        return False
    if value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(value: str) -> str:
    if "\x00" in value:
        return "must not contain NUL (U+0000)"
    return "must not contain lone surrogates (invalid Unicode)"


def _timestamp(item: Any, clock: _Clock) -> int | None:
    """An item's `timestamp` as PostgreSQL microseconds; the receive time when absent;
    None when invalid (`_timestamp_problem` says why). An explicit 1970-01-01T00:00:00Z
    is present (and too old), so presence is asked only for an all-zero value."""
    ts = item.timestamp
    seconds: int = ts.seconds
    nanos: int = ts.nanos
    if seconds or nanos:
        if 0 <= nanos < 1_000_000_000 and clock.earliest <= seconds + nanos / 1e9 <= clock.latest:
            return (seconds - PG_EPOCH_SECONDS) * 1_000_000 + nanos // 1000
        return None
    if item.HasField("timestamp"):
        return None
    return clock.received_at


def _timestamp_problem(item: Any, clock: _Clock) -> str:
    ts = item.timestamp
    if not 0 <= ts.nanos < 1_000_000_000:
        return "nanos must be in [0, 1e9)"
    if ts.seconds + ts.nanos / 1e9 > clock.latest:
        return f"must not be more than {int(MAX_FUTURE_SECONDS)} seconds in the future"
    return "is older than the retention period"


def _occurred_at(item: Any, clock: _Clock, violations: FieldViolations, kind: str, i: int) -> int:
    occurred_at = _timestamp(item, clock)
    if occurred_at is None:
        violations.add(f"{kind}[{i}].timestamp", _timestamp_problem(item, clock))
        return clock.received_at
    return occurred_at


# The checks below take the list name, index and field and build the JSON path
# (`events[2].eventId`) only when something is wrong: valid items cost no strings.


def _check_id(
    value: str, violations: FieldViolations, kind: str, i: int, name: str, required: bool = True
) -> str | None:
    if value:
        # isprintable() is False for NUL, other controls and lone surrogates.
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
    elif not clean_text(value):
        violations.add(f"{kind}[{i}].{name}", _text_problem(value))
    return value


def _check_batch(field: str, count: int, limits: Limits, violations: FieldViolations) -> bool:
    if count == 0:
        violations.add(field, "must contain at least one item")
        return False
    if count > limits.max_items:
        violations.add(field, f"must contain at most {limits.max_items} items, got {count}")
        return False
    return True


# ------------------------------------------------------------------ the JSON encoder


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
# Bounded caches of inputs that passed: event types and JSON-encoded keys (`"key":`)
# repeat across items. Full caches stop growing (they only save work).
_CACHE_MAX = 1024
_MAX_CACHED_KEY_CHARS = 64
_event_types: set[str] = set()
_key_json: dict[str, str] = {}
_TOO_BIG = f"must be at most {MAX_PROPERTIES_BYTES} bytes as JSON"
_TOO_DEEP = f"must not be nested more than {MAX_PROPERTIES_DEPTH} levels deep"


def _path_key(key: str) -> str:
    """`.key`, or `["k e y"]` (JSON-escaped, ASCII) for a key that is not an identifier."""
    if len(key) <= 64 and _IDENTIFIER.fullmatch(key):
        return "." + key
    return "[" + json.dumps(key[:64]) + "]"


def _event_type_ok(event_type: str) -> bool:
    if event_type in _event_types:
        return True
    if EVENT_TYPE.fullmatch(event_type) is None:
        return False
    if len(_event_types) < _CACHE_MAX:
        _event_types.add(event_type)
    return True


def _key_prefix(key: str, budget: int) -> str:
    """`"key":` for a Struct key not in the cache (checked, then cached)."""
    if len(key) > budget:
        raise BadValue(_TOO_BIG, whole=True)
    if not clean_text(key):
        raise BadValue("keys " + _text_problem(key))
    prefix = _encode_str(key) + ":"
    if len(key) <= _MAX_CACHED_KEY_CHARS and len(_key_json) < _CACHE_MAX:
        _key_json[key] = prefix
    return prefix


def value_json(value: struct_pb2.Value, depth: int, budget: int) -> str:
    """One protobuf `Value` (at nesting `depth`) as compact JSON text, at most `budget`
    characters; raises BadValue for what cannot be stored."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        text = value.string_value
        if len(text) > budget:
            raise BadValue(_TOO_BIG, whole=True)
        if "\x00" in text or not (text.isascii() or clean_text(text)):
            raise BadValue(_text_problem(text))
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
            raise BadValue(_TOO_DEEP, whole=True)
        return struct_json(value.struct_value.fields, depth + 1, budget)
    if kind == "list_value":
        if depth >= MAX_PROPERTIES_DEPTH:
            raise BadValue(_TOO_DEEP, whole=True)
        parts: list[str] = []
        size = 1  # "[", then per element: the element and its "," or the closing "]"
        for index, element in enumerate(value.list_value.values):
            try:
                text = value_json(element, depth + 1, budget - size)
            except BadValue as exc:
                raise exc.within(f"[{index}]") from None
            size += len(text) + 1
            if size > budget:
                raise BadValue(_TOO_BIG, whole=True)
            parts.append(text)
        return "[" + ",".join(parts) + "]"
    return "null"  # null_value or unset


def struct_json(fields: Any, depth: int = 1, budget: int = MAX_PROPERTIES_BYTES) -> str:
    """A Struct's `fields` (map of Values, at nesting `depth`) as compact JSON text.

    Checks text, numbers, depth and size as it goes; the work is bounded by `budget`
    (every entry adds at least 2 characters), whatever the size of the input."""
    parts: list[str] = []
    keys = _key_json
    size = 1  # "{", then per entry: the entry and its "," or the closing "}"
    for key in fields:
        try:
            prefix = keys.get(key) or _key_prefix(key, budget)
            text = value_json(fields[key], depth, budget - size)
        except BadValue as exc:
            raise exc.within(_path_key(key)) from None
        size += len(prefix) + len(text) + 1
        if size > budget:
            raise BadValue(_TOO_BIG, whole=True)
        parts.append(prefix + text)
    return "{" + ",".join(parts) + "}"


def properties_json(struct: struct_pb2.Struct) -> str | None:
    """A present Struct's JSON text (None when empty); raises BadValue."""
    fields = struct.fields
    if not fields:
        return None
    # A bound on the work before walking: the JSON form is never 16 times smaller
    # than the wire form (a number: 9-11 bytes on the wire, 1 or more as JSON).
    if struct.ByteSize() > 16 * MAX_PROPERTIES_BYTES:
        raise BadValue(_TOO_BIG, whole=True)
    text = struct_json(fields)
    # At most MAX_PROPERTIES_BYTES characters here; UTF-8 takes at most 4 bytes a character.
    if len(text) > MAX_PROPERTIES_BYTES // 4 and len(text.encode()) > MAX_PROPERTIES_BYTES:
        raise BadValue(_TOO_BIG, whole=True)
    return text


def _properties(item: Any, violations: FieldViolations, kind: str, i: int) -> str | None:
    """The checked path's properties: JSON text, None when absent or empty."""
    if not item.HasField("properties"):
        return None
    try:
        return properties_json(item.properties)
    except BadValue as exc:
        violations.add(f"{kind}[{i}].properties{exc.path}", exc.message)
    except RecursionError:
        violations.add(f"{kind}[{i}].properties", _TOO_DEEP)
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
            raise BadValue("keys " + _text_problem(key)).within(_path_key(key))
        if not clean_text(value):
            raise BadValue(_text_problem(value)).within(_path_key(key))
        parts.append(f"{_encode_str(key)}:{_encode_str(value)}")
    return "{" + ",".join(parts) + "}"


# ------------------------------------------------------------------ events


class Declined(Exception):
    """The fast path does not accept an item; the checked path decides and names the problem."""


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


def _id_ok(value: str) -> bool:
    return bool(value) and len(value) <= MAX_ID_CHARS and value.isprintable()


def _optional_id_ok(value: str) -> bool:
    return not value or (len(value) <= MAX_ID_CHARS and value.isprintable())


def validate_events(request: analytics_pb2.RecordEventsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.events
    if not _check_batch("events", len(items), limits, violations):
        violations.raise_if_any("invalid events")
    clock = _Clock(now, limits.retention_days)
    rows: list[Row] = []
    append = rows.append
    event_types = _event_types
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
                and (not page or (len(page) <= MAX_PAGE_CHARS and clean_text(page)))
            ):
                raise Declined
            occurred_at = _timestamp(e, clock)
            if occurred_at is None:
                raise Declined
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
        except (Declined, BadValue):
            append(_event_row(e, i, clock, violations))
    violations.raise_if_any("invalid events")
    return rows


# ------------------------------------------------------------------ metrics


def _metric_row(
    m: analytics_pb2.PerformanceMetric, i: int, clock: _Clock, violations: FieldViolations
) -> Row:
    """The checked path: one metric's row, every problem added to `violations`."""
    metric_id = _check_id(m.metric_id, violations, "metrics", i, "metricId")
    session_id = _check_id(m.session_id, violations, "metrics", i, "sessionId")
    user_id = _check_id(m.user_id, violations, "metrics", i, "userId", False)
    name = m.name
    limit = MAX_METRIC_VALUE.get(name)
    if not name:
        violations.add(f"metrics[{i}].name", "is required")
    elif limit is None:
        violations.add(f"metrics[{i}].name", "must be one of " + ", ".join(sorted(vitals.METRIC_NAMES)))
    value = m.value
    ok_value = False
    if not m.HasField("value"):
        violations.add(f"metrics[{i}].value", "is required")
    elif not 0.0 <= value <= (limit or MAX_TIMING_MS):  # false for nan
        violations.add(f"metrics[{i}].value", f"must be a number from 0 to {limit or MAX_TIMING_MS:g}")
    else:
        ok_value = limit is not None
    delta = m.delta
    if not abs(delta) <= (limit or MAX_TIMING_MS):
        violations.add(
            f"metrics[{i}].delta",
            f"must be a number from -{limit or MAX_TIMING_MS:g} to {limit or MAX_TIMING_MS:g}",
        )
    navigation_type = _check_text(
        m.navigation_type, MAX_NAVIGATION_TYPE_CHARS, violations, "metrics", i, "navigationType"
    )
    page = _check_text(m.page, MAX_PAGE_CHARS, violations, "metrics", i, "page")
    attributes: str | None = None
    if m.attributes:
        try:
            attributes = attributes_json(m.attributes)
        except BadValue as exc:
            violations.add(f"metrics[{i}].attributes{exc.path}", exc.message)
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


def validate_metrics(
    request: analytics_pb2.RecordPerformanceMetricsRequest, now: float, limits: Limits
) -> list[Row]:
    violations = FieldViolations()
    items = request.metrics
    if not _check_batch("metrics", len(items), limits, violations):
        violations.raise_if_any("invalid metrics")
    clock = _Clock(now, limits.retention_days)
    rows: list[Row] = []
    append = rows.append
    ranges = MAX_METRIC_VALUE
    rate = vitals.rate
    bin_of = sketch.bin_of
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
            limit = ranges.get(name)
            if not (
                limit is not None
                and metric_id
                and len(metric_id) <= MAX_ID_CHARS
                and metric_id.isprintable()
                and session_id
                and len(session_id) <= MAX_ID_CHARS
                and session_id.isprintable()
                and (not user_id or (len(user_id) <= MAX_ID_CHARS and user_id.isprintable()))
                and 0.0 <= value <= limit  # false for nan
                and -limit <= delta <= limit
                and m.HasField("value")
                and (
                    not navigation_type
                    or (len(navigation_type) <= MAX_NAVIGATION_TYPE_CHARS and clean_text(navigation_type))
                )
                and (not page or (len(page) <= MAX_PAGE_CHARS and clean_text(page)))
            ):
                raise Declined
            occurred_at = _timestamp(m, clock)
            if occurred_at is None:
                raise Declined
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
                    attributes_json(attributes) if attributes else None,
                    occurred_at,
                    bin_of(value),
                )
            )
        except (Declined, BadValue):
            append(_metric_row(m, i, clock, violations))
    violations.raise_if_any("invalid metrics")
    return rows


# ------------------------------------------------------------------ funnel steps


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
    rows: list[Row] = []
    append = rows.append
    numbers = vitals.STEP_NUMBER
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
            occurred_at = _timestamp(s, clock)
            if occurred_at is None:
                raise Declined
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
        except (Declined, BadValue):
            append(_step_row(s, i, clock, violations))
    violations.raise_if_any("invalid funnel steps")
    return rows


# ------------------------------------------------------------------ revenue, task ends


def minor_units(currency: str) -> int | None:
    """ISO 4217 minor units (the exponent) of an active currency code; None when the code
    is unknown or has no minor unit defined (XAU, XDR: not money we take)."""
    if len(currency) != 3 or not currency.isascii() or not currency.isupper():
        return None
    try:
        exponent: int | None = Currency(currency).exponent
    except ValueError:
        return None
    return exponent


def _decimal(text: str) -> Decimal | None:
    """A plain decimal string ("12", "9.99") as a Decimal; None for anything else
    (exponents, signs, spaces, NaN, more than 20 integer or 8 fraction digits)."""
    if not DECIMAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _amount(text: str, currency: str, violations: FieldViolations, path: str) -> Decimal | None:
    if not text:
        violations.add(path, "is required")
        return None
    amount = _decimal(text)
    if amount is None:
        violations.add(path, 'must be a decimal string like "9.99" (no sign, exponent or spaces)')
        return None
    if not 0 < amount < MAX_AMOUNT:
        violations.add(path, f"must be greater than 0 and less than {MAX_AMOUNT:,}")
        return None
    exponent = minor_units(currency)
    if exponent is None:
        return None  # the currency's own violation says why
    if -amount.as_tuple().exponent > exponent:  # type: ignore[operator]
        violations.add(path, f"{currency} has {exponent} decimal places at most")
        return None
    # Stored at the currency's minor units: "9.9" USD is 9.90, "500" JPY is 500.
    return amount.quantize(Decimal(1).scaleb(-exponent))


def validate_revenue(request: analytics_pb2.RecordRevenueRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.revenue
    if not _check_batch("revenue", len(items), limits, violations):
        violations.raise_if_any("invalid revenue")
    clock = _Clock(now, limits.retention_days)
    rows: list[Row] = []
    for i, r in enumerate(items):
        order_id = _check_id(r.order_id, violations, "revenue", i, "orderId")
        user_id = _check_id(r.user_id, violations, "revenue", i, "userId")
        session_id = _check_id(r.session_id, violations, "revenue", i, "sessionId", False)
        effect_id = _check_id(r.effect_id, violations, "revenue", i, "effectId", False)
        currency = r.currency
        if not currency:
            violations.add(f"revenue[{i}].currency", "is required")
        elif minor_units(currency) is None:
            violations.add(f"revenue[{i}].currency", "must be an ISO 4217 currency code like USD")
        amount = _amount(r.amount, currency, violations, f"revenue[{i}].amount")
        occurred_at = _occurred_at(r, clock, violations, "revenue", i)
        rows.append((order_id, user_id, session_id, amount, currency, effect_id, occurred_at))
    violations.raise_if_any("invalid revenue")
    return rows


def validate_task_ends(request: analytics_pb2.RecordTaskEndsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.task_ends
    if not _check_batch("taskEnds", len(items), limits, violations):
        violations.raise_if_any("invalid task ends")
    clock = _Clock(now, limits.retention_days)
    rows: list[Row] = []
    for i, t in enumerate(items):
        task_id = _check_id(t.task_id, violations, "taskEnds", i, "taskId")
        effect_id = _check_id(t.effect_id, violations, "taskEnds", i, "effectId")
        user_id = _check_id(t.user_id, violations, "taskEnds", i, "userId")
        if t.status not in TASK_STATUSES:
            violations.add(f"taskEnds[{i}].status", "must be one of " + ", ".join(sorted(TASK_STATUSES)))
        seconds = t.cost_seconds
        cost_seconds = Decimal(0)
        if not 0.0 <= seconds <= MAX_COST_SECONDS:  # false for nan
            violations.add(f"taskEnds[{i}].costSeconds", f"must be a number from 0 to {MAX_COST_SECONDS:g}")
        else:
            cost_seconds = Decimal(f"{seconds:.3f}")  # milliseconds kept, exactly as printed
        cost_coins: Decimal | None = None
        if t.cost_coins:
            cost_coins = _decimal(t.cost_coins)
            if cost_coins is None or cost_coins >= MAX_COINS or -cost_coins.as_tuple().exponent > 4:  # type: ignore[operator]
                violations.add(
                    f"taskEnds[{i}].costCoins",
                    f'must be a decimal string like "0.75", at most 4 decimal places, below {MAX_COINS:,}',
                )
                cost_coins = None
        region = t.region or None
        if region is not None and region not in REGIONS:
            violations.add(f"taskEnds[{i}].region", "must be one of " + ", ".join(sorted(REGIONS)))
        occurred_at = _occurred_at(t, clock, violations, "taskEnds", i)
        rows.append((task_id, effect_id, user_id, t.status, cost_seconds, cost_coins, region, occurred_at))
    violations.raise_if_any("invalid task ends")
    return rows
