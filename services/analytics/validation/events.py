"""Events (`RecordEvents`): the frontend's user actions, with free-form `properties`.

Two paths, one set of rules. Each event first goes through a fast path that only ever
*accepts*: the checks inlined on locals, no path strings built. Anything it is not sure
about sends the item through the checked path (`event_row`), which names every
violation and also builds the row.
"""

from __future__ import annotations

import re

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.errors import FieldViolations

from ..ingest.rows import Row
from .common import (
    CACHE_MAX,
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
from .jsonvalues import BadValue, checked_properties, properties_json

EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# Event types repeat across items: a bounded cache of those that passed.
event_types: set[str] = set()


def _event_type_ok(event_type: str) -> bool:
    if event_type in event_types:
        return True
    if EVENT_TYPE.fullmatch(event_type) is None:
        return False
    if len(event_types) < CACHE_MAX:
        event_types.add(event_type)
    return True


def event_row(e: analytics_pb2.Event, i: int, clock: BatchClock, violations: FieldViolations) -> Row:
    """The checked path: one event's row, every problem added to `violations`."""
    event_id = check_id(e.event_id, violations, "events", i, "eventId")
    session_id = check_id(e.session_id, violations, "events", i, "sessionId")
    user_id = check_id(e.user_id, violations, "events", i, "userId", False)
    event_type = e.event_type
    if not event_type:
        violations.add(f"events[{i}].eventType", "is required")
    elif EVENT_TYPE.fullmatch(event_type) is None:
        violations.add(
            f"events[{i}].eventType",
            "must be a lowercase identifier ([a-z][a-z0-9_]*, at most 64 characters)",
        )
    page = check_text(e.page, MAX_PAGE_CHARS, violations, "events", i, "page")
    properties = checked_properties(e, violations, "events", i)
    occurred_at = checked_timestamp(e, clock, violations, "events", i)
    return (event_id, session_id, user_id, event_type, page, properties, occurred_at)


def validate_events(request: analytics_pb2.RecordEventsRequest, now: float, limits: Limits) -> list[Row]:
    violations = FieldViolations()
    items = request.events
    if not check_batch("events", len(items), limits, violations):
        violations.raise_if_any("invalid events")
    clock = BatchClock(now, limits.retention_days)
    rows: list[Row] = []
    append = rows.append
    known_types = event_types
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
                and (event_type in known_types or _event_type_ok(event_type))
                and (
                    not page
                    or (
                        len(page) <= MAX_PAGE_CHARS
                        and "\x00" not in page
                        and (page.isascii() or clean_text(page))
                    )
                )
            ):
                raise Declined
            occurred_at = timestamp(e, clock)
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
            append(event_row(e, i, clock, violations))
    violations.raise_if_any("invalid events")
    return rows
