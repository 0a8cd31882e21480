"""ISO weeks in UTC: ``2026-W48`` runs from Monday 00:00 UTC to the next Monday 00:00 UTC."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from services.servicekit.errors import invalid_argument

_WEEK = re.compile(r"^(\d{4})-W(\d{2})$")
WEEK = timedelta(days=7)


@dataclass(frozen=True, order=True)
class Week:
    start: datetime  # Monday 00:00 UTC

    @property
    def end(self) -> datetime:
        return self.start + WEEK

    @property
    def label(self) -> str:
        year, week, _ = self.start.date().isocalendar()
        return f"{year}-W{week:02d}"

    @property
    def days(self) -> list[date]:
        first = self.start.date()
        return [first + timedelta(days=i) for i in range(7)]

    @property
    def previous(self) -> Week:
        return Week(self.start - WEEK)

    def __str__(self) -> str:
        return self.label


def week_of(moment: datetime) -> Week:
    """The ISO week holding `moment` (taken in UTC)."""
    day = moment.astimezone(UTC).date()
    monday = day - timedelta(days=day.weekday())
    return Week(datetime(monday.year, monday.month, monday.day, tzinfo=UTC))


def last_complete_week(now: datetime) -> Week:
    return week_of(now).previous


def parse_week(text: str, field: str = "week") -> Week:
    """``YYYY-Www`` (ISO 8601 week date, W01..W53 as the year has them)."""
    match = _WEEK.match(text)
    if match is not None:
        try:
            monday = date.fromisocalendar(int(match[1]), int(match[2]), 1)
        except ValueError:
            pass
        else:
            return Week(datetime(monday.year, monday.month, monday.day, tzinfo=UTC))
    raise invalid_argument([(field, f"must be an ISO week like 2026-W48; got {text[:40]!r}")], "invalid week")
