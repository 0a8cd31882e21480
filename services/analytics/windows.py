"""Time windows of the analytics reports: parsing and validation.

Two kinds of strings arrive from the admin endpoints:

* ``window`` (``GetFunnelReport``, ``GetPerformanceDashboard``): how far back a
  report looks from now. Only the presets ``15m``, ``1h``, ``24h``, ``7d`` and
  ``30d`` are allowed (the dashboard's cache key and trend bucketing depend on
  them). An empty string means the endpoint's default.
* ``conversionWindow`` (``GetFunnelReport``): how long after a session's step 1
  a later step still counts. Any ``<digits><unit>`` with unit ``m`` (minutes),
  ``h`` (hours) or ``d`` (days), from ``1m`` to ``30d`` inclusive, for example
  ``90m``, ``36h`` or ``14d``. No spaces, signs, fractions or upper-case units.
  An empty string means the default (``24h``).

Bad values raise :func:`services.servicekit.errors.invalid_argument` naming
the JSON field (``window`` or ``conversionWindow``), which the edge maps to a
400 with a ``google.rpc.BadRequest`` detail.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta

from services.servicekit.errors import invalid_argument

WINDOWS: dict[str, timedelta] = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
DEFAULT_FUNNEL_WINDOW = "7d"
DEFAULT_DASHBOARD_WINDOW = "24h"
DEFAULT_CONVERSION_WINDOW = "24h"

MIN_CONVERSION = timedelta(minutes=1)
MAX_CONVERSION = timedelta(days=30)
_DURATION = re.compile(r"^(\d{1,6})([mhd])$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}


@dataclass(frozen=True)
class Window:
    """A validated window: the canonical text (echoed in responses) and its length."""

    text: str
    length: timedelta


def parse_window(value: str, default: str, field: str = "window") -> Window:
    """One of the preset report windows (``15m, 1h, 24h, 7d, 30d``); ``""`` gives ``default``."""
    text = value or default
    length = WINDOWS.get(text)
    if length is None:
        raise invalid_argument(
            [(field, f"must be one of {', '.join(WINDOWS)}; got {value!r}")], "invalid window"
        )
    return Window(text, length)


def parse_conversion_window(
    value: str, default: str = DEFAULT_CONVERSION_WINDOW, field: str = "conversionWindow"
) -> Window:
    """A duration ``<digits>(m|h|d)`` between 1m and 30d inclusive; ``""`` gives ``default``."""
    text = value or default
    match = _DURATION.match(text)
    if match is None:
        raise invalid_argument(
            [(field, f"must look like 30m, 24h or 7d (minutes, hours or days); got {value!r}")],
            "invalid conversion window",
        )
    length = int(match[1]) * _UNITS[match[2]]
    if not MIN_CONVERSION <= length <= MAX_CONVERSION:
        raise invalid_argument(
            [(field, f"must be between 1m and 30d; got {value!r}")], "invalid conversion window"
        )
    return Window(text, length)
