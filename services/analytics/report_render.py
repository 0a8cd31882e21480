"""A weekly report rendered: its charts (report_charts.py) as one PDF, as PNG per
page (for the e-mail) and as inline SVG inside a self-contained HTML page that
also has the figures as tables.

:func:`render` is synchronous (matplotlib draws in the calling thread): call it
through ``run_in_executor``.
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from services.analytics import report_charts
from services.analytics.report_data import WeeklyData
from services.analytics.report_text import fmt_change, fmt_count, fmt_ms, fmt_period, fmt_vital, summary

DASH = "\u2013"


@dataclass
class Rendered:
    html: str
    pdf: bytes
    summary: list[str]
    mail_png: bytes  # page one's charts without its title and summary (the e-mail has them as text)


def render(data: WeeklyData) -> Rendered:
    """Both pages as PDF, PNGs and HTML (synchronous; run it in an executor)."""
    lines = summary(data)
    pages = report_charts.pages(data, lines)
    pdf = report_charts.pdf(pages, f"Cosnap weekly performance {data.week.label}")
    # The HTML page and the e-mail have the title and the summary as text: their first
    # chart leaves them out.
    charts = [report_charts.page_one(data, lines, header=False), *pages[1:]]
    svgs = [report_charts.image(page, "svg").decode("utf-8") for page in charts]
    mail_png = report_charts.image(charts[0], "png")
    return Rendered(_html(data, lines, svgs), pdf, lines, mail_png)


def _html(data: WeeklyData, lines: list[str], svgs: list[str]) -> str:
    e = html.escape
    vitals_rows = "".join(
        f"<tr><td>{e(v.name)}</td>"
        + "".join(
            f"<td class='{e(v.rating_of(x))}'>{e(fmt_vital(v.name, x)) if x is not None else DASH}</td>"
            for x in v.daily_p75
        )
        + f"<td class='{e(v.rating)}'><b>{e(fmt_vital(v.name, v.p75))}</b></td>"
        + f"<td>{e(fmt_vital(v.name, v.previous_p75))}</td></tr>"
        for v in data.vitals
    )
    days = "".join(f"<th>{d:%a %d}</th>" for d in data.days)
    endpoints = "".join(
        f"<tr><td>{e(x.service)}</td><td>{e(x.endpoint)}</td><td>{fmt_count(x.requests)}</td>"
        f"<td>{e(fmt_ms(x.p95_ms))}</td><td>{x.error_rate:.2%}</td></tr>"
        for x in sorted(data.endpoints, key=lambda x: -x.p95_ms)
    )
    alerts = "".join(
        f"<tr><td>{e(a.severity)}</td><td>{a.opened}</td><td>{a.resolved}</td></tr>"
        for a in data.alerts or []
    )
    missing = "".join(f"<li><b>{e(k)}</b>: {e(v)}</li>" for k, v in data.unavailable.items())
    funnel = "".join(
        f"<tr><td>{e(s.name)}</td><td>{fmt_count(s.sessions)}</td><td>{fmt_count(s.previous_sessions)}</td>"
        f"<td>{e(fmt_change(s.sessions, s.previous_sessions))}</td></tr>"
        for s in data.funnel
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Cosnap weekly performance {e(data.week.label)}</title>
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#202124;max-width:1100px;margin:2rem auto;padding:0 1rem}}
h1{{margin-bottom:0}} .sub{{color:#5f6368;margin-top:.2rem}}
figure{{margin:1.5rem 0}} figure svg{{width:100%;height:auto;border:1px solid #e8eaed;border-radius:8px}}
table{{border-collapse:collapse;margin:1rem 0;font-size:.9rem}} td,th{{padding:.3rem .6rem;border-bottom:1px solid #e8eaed;text-align:right}}
td:first-child,th:first-child{{text-align:left}}
.good{{color:#0a8a48}} .needs-improvement{{color:#b36b00}} .poor{{color:#d93025}}
</style></head><body>
<h1>Cosnap · weekly performance</h1>
<p class="sub">{e(data.week.label)} · {e(fmt_period(data))} · generated {data.generated_at:%Y-%m-%d %H:%M} UTC</p>
<h2>What changed</h2>
<ul>{"".join(f"<li>{e(line)}</li>" for line in lines)}</ul>
{"".join(f"<figure>{svg[svg.find('<svg') :]}</figure>" for svg in svgs)}
<h2>Web vitals p75 per day</h2>
<table><tr><th>metric</th>{days}<th>week</th><th>last week</th></tr>{vitals_rows}</table>
<h2>Funnel</h2>
<table><tr><th>step</th><th>sessions</th><th>last week</th><th>change</th></tr>{funnel}</table>
<h2>API endpoints</h2>
{f"<table><tr><th>service</th><th>endpoint</th><th>requests</th><th>p95</th><th>errors</th></tr>{endpoints}</table>" if endpoints else "<p>No endpoint figures.</p>"}
<h2>Alerts this week</h2>
{f"<table><tr><th>severity</th><th>opened</th><th>resolved</th></tr>{alerts}</table>" if alerts else "<p>No alert figures.</p>"}
{f"<h2>Not in this report</h2><ul>{missing}</ul>" if missing else ""}
</body></html>
"""
