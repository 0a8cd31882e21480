"""What every kind of ingest item shares: the batch limits, the receive time and the
accepted timestamp range, the text rule (what PostgreSQL can store), and the checks of
ids and free text that name the offending field by its JSON path.

The checks take the list name, index and field and build the path (`events[2].eventId`)
only when something is wrong: valid items cost no strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.servicekit.errors import FieldViolations

MAX_ID_CHARS = 128
MAX_PAGE_CHARS = 2048
MAX_FUTURE_SECONDS = 300.0
# Timestamps in rows are PostgreSQL's own representation: microseconds since
# 2000-01-01 00:00:00 UTC, as an int. Cheaper to build than a datetime, and the
# committer COPYs them as they are (ingest/writer.py sets the codec on its connections).
PG_EPOCH_SECONDS = 946_684_800  # 2000-01-01T00:00:00Z in Unix seconds
# Bounded caches of inputs that passed (event types, JSON-encoded `properties` keys):
# full caches stop growing (they only save work).
CACHE_MAX = 1024


@dataclass(frozen=True)
class Limits:
    max_items: int = 500
    retention_days: int = 30


class BatchClock:
    """The receive time of one request and the accepted timestamp range."""

    __slots__ = ("earliest", "latest", "received_at")

    def __init__(self, now: float, retention_days: int) -> None:
        self.received_at = round((now - PG_EPOCH_SECONDS) * 1_000_000)
        self.earliest = now - retention_days * 86400.0
        self.latest = now + MAX_FUTURE_SECONDS


class Declined(Exception):
    """The fast path does not accept an item; the checked path decides and names the problem."""


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


def text_problem(value: str) -> str:
    if "\x00" in value:
        return "must not contain NUL (U+0000)"
    return "must not contain lone surrogates (invalid Unicode)"


def timestamp(item: Any, clock: BatchClock) -> int | None:
    """An item's `timestamp` as PostgreSQL microseconds; the receive time when absent;
    None when invalid (`timestamp_problem` says why). An explicit 1970-01-01T00:00:00Z
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


def timestamp_problem(item: Any, clock: BatchClock) -> str:
    ts = item.timestamp
    if not 0 <= ts.nanos < 1_000_000_000:
        return "nanos must be in [0, 1e9)"
    if ts.seconds + ts.nanos / 1e9 > clock.latest:
        return f"must not be more than {int(MAX_FUTURE_SECONDS)} seconds in the future"
    return "is older than the retention period"


def checked_timestamp(item: Any, clock: BatchClock, violations: FieldViolations, kind: str, i: int) -> int:
    """The checked path's timestamp: the receive time stands in for an invalid one
    (the batch fails anyway) after its violation is added."""
    at = timestamp(item, clock)
    if at is None:
        violations.add(f"{kind}[{i}].timestamp", timestamp_problem(item, clock))
        return clock.received_at
    return at


def check_id(
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


def check_text(
    value: str, limit: int, violations: FieldViolations, kind: str, i: int, name: str
) -> str | None:
    if not value:
        return None
    if len(value) > limit:
        violations.add(f"{kind}[{i}].{name}", f"must be at most {limit} characters")
    elif not clean_text(value):
        violations.add(f"{kind}[{i}].{name}", text_problem(value))
    return value


def check_batch(field: str, count: int, limits: Limits, violations: FieldViolations) -> bool:
    if count == 0:
        violations.add(field, "must contain at least one item")
        return False
    if count > limits.max_items:
        violations.add(field, f"must contain at most {limits.max_items} items, got {count}")
        return False
    return True
