"""A weekly report's charts: two A4 landscape pages drawn with matplotlib (Agg, no
browser), :func:`pages`, and their bytes as one PDF (``PdfPages``, :func:`pdf`) or
one page as PNG or SVG (:func:`image`).

Only matplotlib's object API is used (a ``Figure`` per page, never ``pyplot``'s
global state), so drawing can run in a worker thread while the event loop
serves (everything here is synchronous: call it through ``run_in_executor``).
Mathtext is off: endpoint names and other text from the data are drawn as is.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams.update(
    {
        "text.parse_math": False,
        "font.family": "DejaVu Sans",
        "font.size": 9,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.edgecolor": "#9aa0a6",
        "axes.labelcolor": "#3c4043",
        "xtick.color": "#5f6368",
        "ytick.color": "#5f6368",
        "svg.hashsalt": "cosnap-weekly",
        "pdf.compression": 9,
    }
)
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from services.analytics.report_data import Vital, WeeklyData  # noqa: E402
from services.analytics.report_text import fmt_count, fmt_ms, fmt_period, fmt_vital  # noqa: E402
from services.analytics.vitals import THRESHOLDS  # noqa: E402

GOOD, AMBER, POOR = "#0cce6b", "#ffa400", "#ff4e42"
INK, MUTED, FAINT = "#202124", "#5f6368", "#e8eaed"
ACCENT, PREVIOUS = "#1a73e8", "#bdc1c6"
SEVERITY_COLOURS = {"critical": POOR, "error": "#e37400", "warning": AMBER}
RATING_COLOURS = {"good": GOOD, "needs-improvement": AMBER, "poor": POOR, "": MUTED}
A4_LANDSCAPE = (11.69, 8.27)


def _tile(
    fig: Figure,
    rect: tuple[float, float, float, float],
    title: str,
    value: str,
    delta: str,
    good: bool | None,
) -> None:
    ax = fig.add_axes(rect)
    ax.set_axis_off()
    ax.add_patch(
        FancyBboxPatch(
            (0.0, 0.0),
            1.0,
            1.0,
            boxstyle="round,pad=0,rounding_size=0.06",
            transform=ax.transAxes,
            facecolor="#f8f9fa",
            edgecolor=FAINT,
        )
    )
    ax.text(0.07, 0.78, title, transform=ax.transAxes, color=MUTED, fontsize=9)
    ax.text(0.07, 0.38, value, transform=ax.transAxes, color=INK, fontsize=20, fontweight="bold")
    colour = MUTED if good is None else (GOOD if good else POOR)
    ax.text(0.07, 0.12, delta, transform=ax.transAxes, color=colour, fontsize=9, fontweight="bold")


def _arrow(now: float | None, before: float | None, lower_is_better: bool) -> tuple[str, bool | None]:
    if now is None or before is None or before == 0:
        return ("no data last week" if now is not None else "no data"), None
    change = (now - before) / before
    if abs(change) < 0.005:
        return "▬ no change vs last week", None
    arrow = "▲" if change > 0 else "▼"
    better = (change < 0) if lower_is_better else (change > 0)
    return f"{arrow} {abs(change):.0%} vs last week", better


# Page one without its header (title and "what changed"): the HTML page and the e-mail
# write those as text.
_TILES = 0.74  # the KPI tiles' bottom, as a fraction of the A4 page
_HEADER_INCHES = 1.0  # above the tiles
_SUMMARY_INCHES = 2.0  # between the tiles and the web vitals


def page_one(data: WeeklyData, lines: list[str], *, header: bool = True) -> Figure:
    """Page one: title, KPI tiles, what changed, web vitals. Without ``header`` only the tiles
    and the web vitals, on a shorter figure (the HTML page and the e-mail have the rest as
    text)."""
    width, height = A4_LANDSCAPE
    cut_top, cut_middle = (0.0, 0.0) if header else (_HEADER_INCHES, _SUMMARY_INCHES)
    fig = Figure(figsize=(width, height - cut_top - cut_middle), facecolor="white")

    def y(fraction: float) -> float:
        """A height given as a fraction of the A4 page, as a fraction of this figure."""
        inches = fraction * height - (cut_middle if fraction >= _TILES else 0.0)
        return inches / (height - cut_top - cut_middle)

    def h(fraction: float) -> float:
        return fraction * height / (height - cut_top - cut_middle)

    if header:
        fig.text(0.04, 0.935, "Cosnap · weekly performance", fontsize=22, fontweight="bold", color=INK)
        fig.text(0.04, 0.905, f"{data.week.label} · {fmt_period(data)}", fontsize=11, color=MUTED)
        fig.text(
            0.96,
            0.935,
            f"generated {data.generated_at:%Y-%m-%d %H:%M} UTC",
            fontsize=8,
            color=MUTED,
            ha="right",
        )

    # KPI tiles.
    lcp = next((v for v in data.vitals if v.name == "LCP"), None)
    conv, conv_before = data.conversion, data.previous_conversion
    tiles = [
        (
            "Weekly active users",
            fmt_count(data.weekly_users),
            *_arrow(data.weekly_users, data.previous_weekly_users, lower_is_better=False),
        ),
        ("Events", fmt_count(sum(data.events)), *_arrow(sum(data.events), data.previous_events, False)),
        ("Funnel conversion", f"{conv:.1%}" if conv is not None else "\u2013", *(_points(conv, conv_before))),
        (
            "LCP p75",
            fmt_vital("LCP", lcp.p75) if lcp else "\u2013",
            *(_arrow(lcp.p75, lcp.previous_p75, lower_is_better=True) if lcp else ("no data", None)),
        ),
    ]
    for i, (title, value, delta, good) in enumerate(tiles):
        _tile(fig, (0.04 + i * 0.235, y(_TILES), 0.215, h(0.12)), title, value, delta, good)

    if header:  # what changed
        fig.text(0.04, 0.695, "What changed", fontsize=13, fontweight="bold", color=INK)
        line_y = 0.665
        for line in lines:
            for j, chunk in enumerate(_wrap(line, 150)):
                fig.text(
                    0.05 if j == 0 else 0.062,
                    line_y,
                    ("•  " if j == 0 else "") + chunk,
                    fontsize=10,
                    color=INK,
                )
                line_y -= 0.026
    # Web vitals, one panel each: daily p75 against the thresholds, last week's p75 dashed.
    fig.text(0.04, y(0.44), "Core Web Vitals · p75 per day", fontsize=13, fontweight="bold", color=INK)
    n = len(data.vitals)
    panel = 0.92 / n
    for i, v in enumerate(data.vitals):
        ax = fig.add_axes((0.04 + i * panel + 0.012, y(0.08), panel - 0.04, h(0.3)))
        _vital_panel(ax, v, data)
    return fig


def _points(now: float | None, before: float | None) -> tuple[str, bool | None]:
    if now is None or before is None:
        return ("no data last week" if now is not None else "no data"), None
    points = (now - before) * 100
    if abs(points) < 0.05:
        return "▬ no change vs last week", None
    return f"{'▲' if points > 0 else '▼'} {abs(points):.1f} pts vs last week", points > 0


def _wrap(text: str, width: int) -> list[str]:
    words, lines, current = text.split(), [], ""
    for word in words:
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return [*lines, current] if current else lines


def _vital_panel(ax: matplotlib.axes.Axes, v: Vital, data: WeeklyData) -> None:
    good, poor = THRESHOLDS[v.name]
    values = [x for x in v.daily_p75 if x is not None]
    top = max(
        [poor * 1.25, *(x * 1.15 for x in values), *([v.previous_p75 * 1.15] if v.previous_p75 else [])]
    )
    ax.axhspan(0, good, color=GOOD, alpha=0.10, lw=0)
    ax.axhspan(good, poor, color=AMBER, alpha=0.10, lw=0)
    ax.axhspan(poor, top, color=POOR, alpha=0.08, lw=0)
    xs = list(range(7))
    points = [(x, y) for x, y in zip(xs, v.daily_p75, strict=True) if y is not None]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], color=INK, lw=1.6, zorder=3)
        ax.scatter(
            [p[0] for p in points],
            [p[1] for p in points],
            s=36,
            zorder=4,
            color=[RATING_COLOURS[v.rating_of(p[1])] for p in points],
            edgecolors="white",
            linewidths=1.2,
        )
    else:
        ax.text(3, top / 2, "no samples", ha="center", va="center", color=MUTED)
    if v.previous_p75 is not None:
        ax.axhline(v.previous_p75, color=MUTED, lw=1, ls="--", zorder=2)
        ax.text(6.4, v.previous_p75, "last wk", color=MUTED, fontsize=7, va="bottom", ha="right")
    ax.set_ylim(0, top)
    ax.set_xlim(-0.4, 6.4)
    ax.set_xticks(xs, [d.strftime("%a") for d in data.days], fontsize=8)
    if v.name == "CLS":
        ax.yaxis.set_major_formatter(lambda y, _: f"{y:.2f}")
    else:
        ax.yaxis.set_major_formatter(lambda y, _: f"{y / 1000:.1f}s" if y >= 1000 else f"{y:.0f}")
    ax.tick_params(axis="y", labelsize=7)
    colour = RATING_COLOURS[v.rating]
    ax.set_title(
        f"{v.name}  {fmt_vital(v.name, v.p75)}",
        loc="left",
        fontsize=11,
        fontweight="bold",
        color=colour if v.p75 is not None else MUTED,
    )
    if v.samples:
        ax.text(
            0,
            -0.2,
            f"good {v.good:.0%} · NI {v.needs_improvement:.0%} · poor {v.poor:.0%}",
            transform=ax.transAxes,
            fontsize=7,
            color=MUTED,
        )


def _page_two(data: WeeklyData) -> Figure:
    fig = Figure(figsize=A4_LANDSCAPE, facecolor="white")
    fig.text(
        0.04,
        0.95,
        f"{data.week.label} · funnel, traffic and the API",
        fontsize=16,
        fontweight="bold",
        color=INK,
    )

    # Funnel: this week against last week, as a share of step 1.
    ax = fig.add_axes((0.2, 0.56, 0.3, 0.33))
    names = [s.name.replace("_", " ") for s in data.funnel]
    ys = list(range(len(names)))[::-1]
    first = data.funnel[0].sessions if data.funnel else 0
    first_before = data.funnel[0].previous_sessions if data.funnel else 0
    now = [s.sessions / first if first else 0 for s in data.funnel]
    before = [s.previous_sessions / first_before if first_before else 0 for s in data.funnel]
    ax.barh([y + 0.2 for y in ys], before, height=0.38, color=PREVIOUS, label="last week")
    ax.barh([y - 0.2 for y in ys], now, height=0.38, color=ACCENT, label="this week")
    for y, share, step in zip(ys, now, data.funnel, strict=True):
        ax.text(
            share + 0.01,
            y - 0.2,
            f"{share:.0%} ({fmt_count(step.sessions)})",
            va="center",
            fontsize=7,
            color=INK,
        )
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.xaxis.set_major_formatter(lambda x, _: f"{x:.0%}")
    ax.set_title(
        "Funnel · sessions reaching each step", loc="left", fontsize=11, fontweight="bold", color=INK
    )
    ax.legend(frameon=False, fontsize=7, loc="lower right")

    # Traffic: events per day, active users per day.
    ax = fig.add_axes((0.6, 0.56, 0.34, 0.33))
    xs = list(range(7))
    ax.bar(xs, data.events, color="#d2e3fc", label="events")
    ax.set_xticks(xs, [d.strftime("%a %d") for d in data.days], fontsize=8)
    ax.set_ylim(0, max([1, *data.events]) * 1.15)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(lambda y, _: fmt_count(int(y)))
    ax.set_ylabel("events", fontsize=8)
    twin = ax.twinx()
    twin.plot(xs, data.active_users, color=ACCENT, lw=2, marker="o", ms=4, label="active users")
    twin.set_ylim(0, max([1, *data.active_users]) * 1.3)
    twin.yaxis.set_major_locator(MaxNLocator(integer=True))
    twin.yaxis.set_major_formatter(lambda y, _: fmt_count(int(y)))
    twin.set_ylabel("active users", fontsize=8, color=ACCENT)
    twin.spines["right"].set_visible(True)
    twin.tick_params(axis="y", colors=ACCENT, labelsize=7)
    ax.set_title(
        "Traffic · events and active users per day", loc="left", fontsize=11, fontweight="bold", color=INK
    )

    # API latency p95 per endpoint, coloured against the 3 s / 5 s alert thresholds.
    ax = fig.add_axes((0.2, 0.08, 0.3, 0.36))
    if "apiLatency" in data.unavailable:
        _unavailable(ax, "API latency", data.unavailable["apiLatency"])
    else:
        busy = sorted((e for e in data.endpoints if e.requests), key=lambda e: e.p95_ms)[-8:]
        if busy:
            ys = list(range(len(busy)))
            colours = [GOOD if e.p95_ms < 3000 else AMBER if e.p95_ms < 5000 else POOR for e in busy]
            ax.barh(ys, [e.p95_ms for e in busy], color=colours, height=0.6)
            ax.set_yticks(ys, [f"{e.service} {e.endpoint.rsplit('/', 1)[-1]}"[:38] for e in busy], fontsize=7)
            for y, e in zip(ys, busy, strict=True):
                ax.text(
                    e.p95_ms,
                    y,
                    f"  {fmt_ms(e.p95_ms)} · {e.error_rate:.1%} err",
                    va="center",
                    fontsize=7,
                    color=INK,
                )
            ax.set_xlim(0, max(e.p95_ms for e in busy) * 1.6)
            ax.xaxis.set_major_formatter(lambda x, _: fmt_ms(x))
        else:
            _unavailable(ax, "API latency", "no requests recorded")
        ax.set_title("API latency · p95 per endpoint", loc="left", fontsize=11, fontweight="bold", color=INK)

    # Cache hit rates against the 60 % alert level.
    ax = fig.add_axes((0.58, 0.08, 0.21, 0.36))
    if "cacheHitRates" in data.unavailable:
        _unavailable(ax, "Cache hit rates", data.unavailable["cacheHitRates"], width=30)
    else:
        caches = [c for c in data.caches if c.hits + c.misses][:6]
        if caches:
            xs = list(range(len(caches)))
            ax.bar(
                xs,
                [c.hit_rate for c in caches],
                color=[GOOD if c.hit_rate >= 0.6 else POOR for c in caches],
                width=0.6,
            )
            ax.axhline(0.6, color=MUTED, lw=1, ls="--")
            ax.set_xticks(xs, [f"{c.service}\n{c.cache}"[:30] for c in caches], fontsize=7)
            ax.set_ylim(0, 1.1)
            ax.yaxis.set_major_formatter(lambda y, _: f"{y:.0%}")
            for x, c in zip(xs, caches, strict=True):
                ax.text(x, c.hit_rate + 0.02, f"{c.hit_rate:.0%}", ha="center", fontsize=7, color=INK)
        else:
            _unavailable(ax, "Cache hit rates", "no cache traffic recorded", width=30)
        ax.set_title("Cache hit rates", loc="left", fontsize=11, fontweight="bold", color=INK)

    # Alerts opened and resolved within the week, per severity.
    ax = fig.add_axes((0.84, 0.08, 0.13, 0.36))
    if data.alerts is None:
        _unavailable(ax, "Alerts", data.unavailable.get("alerts", "no figures"), width=22)
    else:
        xs = list(range(len(data.alerts)))
        colours = [SEVERITY_COLOURS.get(a.severity, MUTED) for a in data.alerts]
        ax.bar([x - 0.2 for x in xs], [a.opened for a in data.alerts], width=0.38, color=colours)
        ax.bar([x + 0.2 for x in xs], [a.resolved for a in data.alerts], width=0.38, color=PREVIOUS)
        for x, a in zip(xs, data.alerts, strict=True):
            ax.text(x - 0.2, a.opened, f"{a.opened}", ha="center", va="bottom", fontsize=7, color=INK)
            ax.text(x + 0.2, a.resolved, f"{a.resolved}", ha="center", va="bottom", fontsize=7, color=MUTED)
        ax.set_xticks(xs, [a.severity for a in data.alerts], fontsize=7)
        top = max([1, *(a.opened for a in data.alerts), *(a.resolved for a in data.alerts)])
        ax.set_ylim(0, top * 1.25)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title("Alerts this week", loc="left", fontsize=11, fontweight="bold", color=INK)
        ax.text(0, -0.16, "colour: opened · grey: resolved", transform=ax.transAxes, fontsize=7, color=MUTED)
    if data.open_alerts is not None:
        warning, error, critical = data.open_alerts
        fig.text(
            0.04,
            0.02,
            f"Alerts open at report time: {critical} critical · {error} error · {warning} warning",
            fontsize=9,
            color=POOR if critical else MUTED,
        )
    return fig


def _unavailable(ax: matplotlib.axes.Axes, what: str, why: str, width: int = 60) -> None:
    ax.set_axis_off()
    ax.text(
        0.0,
        0.6,
        f"{what}: not in this report",
        fontsize=11,
        fontweight="bold",
        color=MUTED,
        transform=ax.transAxes,
    )
    for i, chunk in enumerate(_wrap(why, width)):
        ax.text(0.0, 0.45 - i * 0.08, chunk, fontsize=8, color=MUTED, transform=ax.transAxes)


def pages(data: WeeklyData, lines: list[str]) -> list[Figure]:
    """The report's two pages; `lines` are the "what changed" sentences (page one)."""
    return [page_one(data, lines), _page_two(data)]


def pdf(figures: list[Figure], title: str) -> bytes:
    """The pages as one PDF (its metadata: `title`, no creation date)."""
    buffer = io.BytesIO()
    with PdfPages(buffer, metadata={"Title": title, "CreationDate": None}) as out:
        for figure in figures:
            FigureCanvasAgg(figure)
            out.savefig(figure)
    return buffer.getvalue()


def image(fig: Figure, fmt: str) -> bytes:
    """One page as PNG (110 dpi) or SVG (no date)."""
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(
        buffer,
        format=fmt,
        dpi=110 if fmt == "png" else None,
        metadata={"Date": None} if fmt == "svg" else None,
    )
    return buffer.getvalue()
