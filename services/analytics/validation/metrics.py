"""Performance metrics (`RecordPerformanceMetrics`): web vitals and the app's own
timings, each within its name's range, rated and binned for the distribution sketch as
it is validated. A fast path that only accepts, and the checked path (`metric_row`)
that names every violation, as for events.
"""

from __future__ import annotations

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from .. import sketch, vitals
from ..ingest.rows import Row
from .common import (
    MAX_ID_CHARS,
    MAX_PAGE_CHARS,
    BatchClock,
    Declined,
    Limits,
    check_batch,
    check_id,
    check_text,
    checked_timestamp,
    clean_text,
    timestamp,
)
from .jsonvalues import BadValue, attributes_json

MAX_NAVIGATION_TYPE_CHARS = 64
# Metric values: each name's plausible range (API.md). Timings in ms, at most an hour;
# CLS is unitless; MEMORY_USAGE in bytes, at most 1 TiB. |delta| has the same bound.
MAX_TIMING_MS = 3_600_000.0
MAX_METRIC_VALUE: dict[str, float] = dict.fromkeys(vitals.METRIC_NAMES, MAX_TIMING_MS)
MAX_METRIC_VALUE.update(CLS=100.0, MEMORY_USAGE=float(2**40))


def metric_row(
    m: analytics_pb2.PerformanceMetric, i: int, clock: BatchClock, violations: FieldViolations
) -> Row:
    """The checked path: one metric's row, every problem added to `violations`."""
    metric_id = check_id(m.metric_id, violations, "metrics", i, "metricId")
    session_id = check_id(m.session_id, violations, "metrics", i, "sessionId")
    user_id = check_id(m.user_id, violations, "metrics", i, "userId", False)
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
    navigation_type = check_text(
        m.navigation_type, MAX_NAVIGATION_TYPE_CHARS, violations, "metrics", i, "navigationType"
    )
    page = check_text(m.page, MAX_PAGE_CHARS, violations, "metrics", i, "page")
    attributes: str | None = None
    if m.attributes:
        try:
            attributes = attributes_json(m.attributes)
        except BadValue as exc:
            violations.add(f"metrics[{i}].attributes{exc.path}", exc.message)
    occurred_at = checked_timestamp(m, clock, violations, "metrics", i)
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
    if not check_batch("metrics", len(items), limits, violations):
        violations.raise_if_any("invalid metrics")
    clock = BatchClock(now, limits.retention_days)
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
            occurred_at = timestamp(m, clock)
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
            append(metric_row(m, i, clock, violations))
    violations.raise_if_any("invalid metrics")
    return rows
