"""The written part of a weekly report: what changed, biggest moves first, and value formats."""

from __future__ import annotations

from dataclasses import dataclass

from services.analytics.report_data import Vital, WeeklyData

ERROR_RATE_NOTICE = 0.01  # the error-rate alert's warning level
CACHE_HIT_NOTICE = 0.60  # the cache alert's level
CHANGE_NOTICE = 0.05  # a web vital moving 5 % or more is worth a sentence


def fmt_vital(name: str, value: float | None) -> str:
    if value is None:
        return "no data"
    if name == "CLS":
        return f"{value:.2f}"
    return fmt_ms(value)


def fmt_ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def fmt_count(value: int) -> str:
    return f"{value:,}"


def counted(n: int, noun: str) -> str:
    """'1 alert', '3 alerts': a count with its noun in the right number."""
    return f"{fmt_count(n)} {noun}{'' if n == 1 else 's'}"


def fmt_period(data: WeeklyData) -> str:
    """The report's seven days, e.g. "01 Dec \u2013 07 Dec 2026 (UTC)"."""
    first, last = data.days[0], data.days[-1]
    return f"{first:%d %b} \u2013 {last:%d %b %Y} (UTC)"


def fmt_change(now: float, before: float) -> str:
    """ "+12%" / "-3%" / "new" for a relative change."""
    if before == 0:
        return "new" if now else "±0%"
    change = (now - before) / before
    return f"{change:+.0%}"


@dataclass(frozen=True)
class Finding:
    weight: float  # how much it matters; the summary leads with the largest
    text: str


def _vital_finding(v: Vital) -> Finding | None:
    if v.p75 is None:
        return None
    now_rating = v.rating_of(v.p75)
    if v.previous_p75 is None or v.previous_p75 == 0:
        return Finding(
            0.1, f"{v.name} p75 {fmt_vital(v.name, v.p75)} ({now_rating}); no data the week before."
        )
    change = (v.p75 - v.previous_p75) / v.previous_p75
    before_rating = v.rating_of(v.previous_p75)
    if abs(change) < CHANGE_NOTICE and now_rating == before_rating:
        return None
    verb = "worsened" if change > 0 else "improved"
    text = (
        f"{v.name} p75 {verb} {abs(change):.0%} to {fmt_vital(v.name, v.p75)} "
        f"(from {fmt_vital(v.name, v.previous_p75)})"
    )
    if now_rating != before_rating:
        text += f" and is now {now_rating}"
        weight = 10 + abs(change)
    else:
        text += f", still {now_rating}"
        weight = abs(change) * 5
    return Finding(weight, text + ".")


def findings(data: WeeklyData) -> list[Finding]:
    out: list[Finding] = []
    total_events = sum(data.events)
    if total_events == 0 and data.weekly_users == 0:
        out.append(Finding(100, "No traffic was recorded this week."))
    else:
        change = fmt_change(data.weekly_users, data.previous_weekly_users)
        weight = (
            abs(data.weekly_users - data.previous_weekly_users) / data.previous_weekly_users * 4
            if data.previous_weekly_users
            else 1.0
        )
        out.append(
            Finding(
                weight,
                f"{fmt_count(data.weekly_users)} weekly active users ({change} vs last week), "
                f"{fmt_count(total_events)} events.",
            )
        )
    for v in data.vitals:
        found = _vital_finding(v)
        if found is not None:
            out.append(found)
    conv, before = data.conversion, data.previous_conversion
    if conv is not None:
        if before is not None:
            points = (conv - before) * 100
            out.append(
                Finding(  # 2 points either way outrank a cache below its level
                    abs(points) * 2,
                    f"Funnel conversion (discovered to processed) {conv:.1%}, "
                    f"{points:+.1f} points vs last week ({before:.1%}).",
                )
            )
        else:
            out.append(Finding(0.5, f"Funnel conversion (discovered to processed) {conv:.1%}."))
    if data.endpoints:
        busy = [e for e in data.endpoints if e.requests > 0]
        if busy:
            slowest = max(busy, key=lambda e: e.p95_ms)
            weight = 8.0 if slowest.p95_ms >= 3000 else 0.3
            out.append(
                Finding(
                    weight,
                    f"Slowest endpoint: {slowest.service} {_short(slowest.endpoint)} "
                    f"at p95 {fmt_ms(slowest.p95_ms)}.",
                )
            )
        erring = sorted((e for e in busy if e.error_rate > ERROR_RATE_NOTICE), key=lambda e: -e.error_rate)
        if erring:
            worst = erring[0]
            out.append(
                Finding(
                    6 + worst.error_rate * 10,
                    f"{counted(len(erring), 'endpoint')} above 1% errors; worst {worst.service} "
                    f"{_short(worst.endpoint)} at {worst.error_rate:.1%}.",
                )
            )
    low = [c for c in data.caches if c.hits + c.misses > 0 and c.hit_rate < CACHE_HIT_NOTICE]
    if low:
        worst_cache = min(low, key=lambda c: c.hit_rate)
        out.append(
            Finding(
                3,
                f"Cache {worst_cache.service}/{worst_cache.cache} hit rate {worst_cache.hit_rate:.0%} "
                f"(below {CACHE_HIT_NOTICE:.0%}).",
            )
        )
    if data.alerts is not None:
        opened = sum(a.opened for a in data.alerts)
        resolved = sum(a.resolved for a in data.alerts)
        critical_opened = sum(a.opened for a in data.alerts if a.severity == "critical")
        if opened or resolved:
            per = ", ".join(f"{a.opened} {a.severity}" for a in data.alerts if a.opened)
            out.append(
                Finding(
                    4 + critical_opened * 3,
                    f"{counted(opened, 'alert')} opened this week"
                    + (f" ({per})" if per else "")
                    + f", {resolved} resolved.",
                )
            )
        else:
            out.append(Finding(0.2, "No alert was opened or resolved this week."))
    if data.open_alerts is not None:
        warning, error, critical = data.open_alerts
        total = warning + error + critical
        if total:
            out.append(
                Finding(
                    5 + critical * 3,
                    f"{counted(total, 'alert')} open at report time ({critical} critical, {error} error, {warning} warning).",
                )
            )
    if data.unavailable:
        out.append(
            Finding(0.05, "API latency, cache hit rates and alerts are missing: monitoring data unavailable.")
        )
    return sorted(out, key=lambda f: -f.weight)


def summary(data: WeeklyData, limit: int = 6) -> list[str]:
    return [f.text for f in findings(data)[:limit]]


def _short(endpoint: str) -> str:
    """`/cosnap.analytics.v1.AnalyticsService/GetFunnelReport` -> `GetFunnelReport`."""
    return endpoint.rsplit("/", 1)[-1][:60] or endpoint[:60]
