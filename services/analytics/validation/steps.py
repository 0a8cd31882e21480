"""Funnel steps (`RecordFunnelSteps`): one step of the conversion funnel reached by a
session, stored as its number. A fast path that only accepts, and the checked path
(`step_row`) that names every violation, as for events.
"""

from __future__ import annotations

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from .. import vitals
from ..ingest.rows import Row
from .common import (
    MAX_ID_CHARS,
    BatchClock,
    Declined,
    Limits,
    check_batch,
    check_id,
    checked_timestamp,
    timestamp,
)
from .jsonvalues import BadValue, checked_properties, properties_json


def step_row(s: analytics_pb2.FunnelStep, i: int, clock: BatchClock, violations: FieldViolations) -> Row:
    """The checked path: one funnel step's row, every problem added to `violations`."""
    step_id = check_id(s.step_id, violations, "steps", i, "stepId")
    session_id = check_id(s.session_id, violations, "steps", i, "sessionId")
    user_id = check_id(s.user_id, violations, "steps", i, "userId", False)
    number = vitals.STEP_NUMBER.get(s.step)
    if number is None:
        if not s.step:
            violations.add(f"steps[{i}].step", "is required")
        else:
            violations.add(f"steps[{i}].step", "must be one of " + ", ".join(vitals.FUNNEL_STEPS))
    effect_id = check_id(s.effect_id, violations, "steps", i, "effectId", False)
    properties = checked_properties(s, violations, "steps", i)
    occurred_at = checked_timestamp(s, clock, violations, "steps", i)
    return (step_id, session_id, user_id, number, effect_id, properties, occurred_at)


def validate_steps(request: analytics_pb2.RecordFunnelStepsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.steps
    if not check_batch("steps", len(items), limits, violations):
        violations.raise_if_any("invalid funnel steps")
    clock = BatchClock(now, limits.retention_days)
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
            occurred_at = timestamp(s, clock)
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
            append(step_row(s, i, clock, violations))
    violations.raise_if_any("invalid funnel steps")
    return rows
