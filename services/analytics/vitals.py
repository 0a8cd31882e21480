"""Metric names, funnel steps and the web.dev rating thresholds (rated on the server)."""

from __future__ import annotations

# good <= first, poor > second (web.dev; CLS is unitless, the rest in ms).
THRESHOLDS: dict[str, tuple[float, float]] = {
    "LCP": (2500.0, 4000.0),
    "INP": (200.0, 500.0),
    "CLS": (0.1, 0.25),
    "FCP": (1800.0, 3000.0),
    "TTFB": (800.0, 1800.0),
    "FID": (100.0, 300.0),
}
WEB_VITALS = tuple(THRESHOLDS)
OTHER_METRICS = (
    "API_RESPONSE",
    "COMPONENT_RENDER",
    "RESOURCE_LOAD",
    "PAGE_LOAD",
    "MEMORY_USAGE",
    "EFFECT_PROCESSING",
)
METRIC_NAMES = frozenset(WEB_VITALS + OTHER_METRICS)

FUNNEL_STEPS = (
    "effect_discovered",
    "effect_viewed",
    "effect_started",
    "image_uploaded",
    "parameters_set",
    "processing_started",
    "processing_completed",
    "result_downloaded",
    "result_shared",
)
STEP_NUMBER = {name: i + 1 for i, name in enumerate(FUNNEL_STEPS)}
# The funnel steps the engagement score counts, as engagement_daily's columns uploads,
# browser_runs, downloads and shares: one SQL select-list fragment over rows with a `step`
# column, shared by the ingest's change log and the pre-aggregation's whole-day recount.
SCORED_STEP_COUNTS = ", ".join(
    f"count(*) FILTER (WHERE step = {STEP_NUMBER[name]})"
    for name in ("image_uploaded", "processing_completed", "result_downloaded", "result_shared")
)

GOOD, NEEDS_IMPROVEMENT, POOR = "good", "needs-improvement", "poor"


def rate(name: str, value: float) -> str | None:
    """The web.dev rating of a web vital; None for other metrics."""
    limits = THRESHOLDS.get(name)
    if limits is None:
        return None
    good, poor = limits
    if value <= good:
        return GOOD
    if value <= poor:
        return NEEDS_IMPROVEMENT
    return POOR
