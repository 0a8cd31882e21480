"""The README's report page: a weekly report drawn from example figures.

``python tools/report_example.py [OUT]`` renders a week of made-up but plausible
figures with the service's own renderer (``services/analytics/report_render.py``)
and writes page one as PNG (default ``docs/report-example.png``), so the picture
in the README is the report's real layout and can be made again after the layout
changes. ``example()`` is the same data for tests.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from services.analytics.report_data import (  # noqa: E402
    AlertActivity,
    Cache,
    Endpoint,
    FunnelStep,
    Vital,
    WeeklyData,
)
from services.analytics.vitals import FUNNEL_STEPS  # noqa: E402
from services.analytics.weeks import Week  # noqa: E402

OUT = ROOT / "docs" / "report-example.png"


def example() -> WeeklyData:
    """Week 2026-W48: LCP better than the week before, conversion worse, one slow endpoint,
    a cache below its alert level, four alerts open."""
    week = Week(datetime(2026, 11, 23, tzinfo=UTC))
    vitals = [
        Vital("LCP", [2100, 2300, 2250, 2600, 2900, 2400, 2200], 2450, 2800, 41_200, 0.71, 0.20, 0.09),
        Vital("INP", [150, 170, 160, 220, 240, 180, 160], 190, 170, 38_900, 0.76, 0.18, 0.06),
        Vital("CLS", [0.04, 0.05, 0.06, 0.05, 0.12, 0.05, 0.04], 0.06, 0.07, 40_100, 0.88, 0.09, 0.03),
        Vital("FCP", [1200, 1300, 1250, 1400, 1600, 1350, 1300], 1380, 1430, 41_500, 0.80, 0.15, 0.05),
        Vital("TTFB", [500, 520, 610, 700, 900, 650, 560], 680, 590, 41_800, 0.70, 0.25, 0.05),
    ]
    this_week = [40_000, 31_000, 21_500, 17_800, 15_200, 12_600, 9_000, 7_400, 1_900]
    last_week = [38_000, 30_100, 22_000, 18_900, 16_600, 13_900, 9_956, 8_300, 2_050]
    return WeeklyData(
        week=week,
        generated_at=datetime(2026, 11, 30, 0, 30, tzinfo=UTC),
        vitals=vitals,
        days=week.days,
        events=[38_200, 41_900, 40_300, 44_800, 47_100, 40_700, 38_500],
        active_users=[5_100, 5_600, 5_350, 5_900, 6_250, 4_800, 4_450],
        weekly_users=18_450,
        previous_weekly_users=17_243,
        previous_events=269_907,
        funnel=[FunnelStep(n, s, p) for n, s, p in zip(FUNNEL_STEPS, this_week, last_week, strict=True)],
        endpoints=[
            Endpoint("effects", "/cosnap.effects.v1.EffectsService/CreateTask", 21_400, 3400, 0.021),
            Endpoint("effects", "/cosnap.effects.v1.EffectsService/GetTask", 612_000, 38, 0.001),
            Endpoint("effects", "/cosnap.effects.v1.EffectsService/ListEffects", 88_300, 24, 0.0),
            Endpoint("analytics", "/cosnap.analytics.v1.AnalyticsService/RecordEvents", 301_000, 61, 0.002),
            Endpoint(
                "analytics", "/cosnap.analytics.v1.AnalyticsService/GetPerformanceDashboard", 940, 180, 0.0
            ),
        ],
        caches=[
            Cache("effects", "task", 54_000, 46_000),
            Cache("effects", "catalog", 97_500, 2_500),
            Cache("analytics", "dashboard", 8_100, 1_900),
        ],
        open_alerts=(2, 1, 1),
        alerts=[
            AlertActivity("critical", 1, 0),
            AlertActivity("error", 2, 1),
            AlertActivity("warning", 5, 4),
        ],
        monitoring_span=(week.start, week.end),
    )


def page_one_png(data: WeeklyData) -> bytes:
    """Page one as the PDF has it, as PNG."""
    from services.analytics.report_charts import image, page_one
    from services.analytics.report_text import summary

    return image(page_one(data, summary(data)), "png")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.write_bytes(page_one_png(example()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
