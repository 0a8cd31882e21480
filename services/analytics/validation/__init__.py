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

The modules, by idea:
- `common`: limits, the receive time and timestamp range, the text rule, id/text checks;
- `jsonvalues`: the one encoder of `properties` and `attributes` (checks while encoding);
- `events`, `metrics`, `steps`: the frontend's batches, each with an accept-only fast
  path and the checked path that names every violation (same rules: both use the
  shared timestamp check, text check and encoder, so the fast path cannot be more
  permissive);
- `revenue`: revenue and task ends (a few a minute: the checked path only).
"""

from __future__ import annotations

from ..ingest.rows import Row
from .common import MAX_ID_CHARS, MAX_PAGE_CHARS, PG_EPOCH_SECONDS, Limits, clean_text
from .events import validate_events
from .jsonvalues import (
    MAX_ATTRIBUTE_CHARS,
    MAX_ATTRIBUTES,
    MAX_PROPERTIES_BYTES,
    MAX_PROPERTIES_DEPTH,
    BadValue,
    attributes_json,
    properties_json,
    struct_json,
    value_json,
)
from .metrics import MAX_METRIC_VALUE, MAX_NAVIGATION_TYPE_CHARS, validate_metrics
from .revenue import minor_units, validate_revenue, validate_task_ends
from .steps import validate_steps

__all__ = [
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_CHARS",
    "MAX_ID_CHARS",
    "MAX_METRIC_VALUE",
    "MAX_NAVIGATION_TYPE_CHARS",
    "MAX_PAGE_CHARS",
    "MAX_PROPERTIES_BYTES",
    "MAX_PROPERTIES_DEPTH",
    "PG_EPOCH_SECONDS",
    "BadValue",
    "Limits",
    "Row",
    "attributes_json",
    "clean_text",
    "minor_units",
    "properties_json",
    "struct_json",
    "validate_events",
    "validate_metrics",
    "validate_revenue",
    "validate_steps",
    "validate_task_ends",
    "value_json",
]
