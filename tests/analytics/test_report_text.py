"""The weekly report's written summary, on the README's example week (tools/report_example.py)."""

from __future__ import annotations

import re

from services.analytics.report_render import render
from services.analytics.report_text import counted, summary
from tools.report_example import example, page_one_png


def test_counts_read_as_words() -> None:
    assert [counted(n, "alert") for n in (0, 1, 2, 1200)] == [
        "0 alerts",
        "1 alert",
        "2 alerts",
        "1,200 alerts",
    ]


def test_the_summary_leads_with_what_matters_most() -> None:
    lines = summary(example())
    assert len(lines) == 6
    assert lines[0] == "LCP p75 improved 12% to 2.45 s (from 2.80 s) and is now good."
    assert lines[1] == "Slowest endpoint: effects CreateTask at p95 3.40 s."
    # A conversion drop of 3.7 points is among the first things a stakeholder reads,
    # ahead of a cache below its alert level (which falls off the six lines).
    assert "Funnel conversion (discovered to processed) 22.5%, -3.7 points vs last week (26.2%)." in lines[:4]
    assert "4 alerts open at report time (1 critical, 1 error, 2 warning)." in lines
    assert "1 endpoint above 1% errors; worst effects CreateTask at 2.1%." in lines
    assert not any("(s)" in line or "Cache" in line for line in lines)


def test_the_example_renders_both_pages() -> None:
    rendered = render(example())
    assert rendered.pdf.startswith(b"%PDF") and len(re.findall(rb"/Type\s*/Page(?!s)", rendered.pdf)) == 2
    assert "2026-W48" in rendered.html and rendered.summary == summary(example())
    # The HTML page writes the title and the summary as text once; its first chart leaves
    # them out (the PDF's page one has them), so it is 3 inches (216 pt) shorter than A4.
    page_heights = [float(h) for h in re.findall(r'<svg[^>]* height="([\d.]+)pt"', rendered.html)]
    assert page_heights == [379.44, 595.44]
    assert rendered.html.count("<h1>") == 1 and rendered.html.count("<li>LCP p75 improved") == 1
    # The e-mail's picture is that same shorter chart (the e-mail writes the summary as text).
    width, height = (int.from_bytes(rendered.mail_png[i : i + 4], "big") for i in (16, 20))
    page = page_one_png(example())
    page_width, page_height = (int.from_bytes(page[i : i + 4], "big") for i in (16, 20))
    assert rendered.mail_png.startswith(b"\x89PNG") and width == page_width and height < page_height * 0.7
