"""Revenue attribution (``GetRevenueAttribution``): which effects, sources and campaigns earn.

Inputs
------
* **Conversions**: the revenue rows (order, user, decimal amount, ISO 4217
  currency, time) whose time falls in the report window (``7d`` or ``30d``
  back from now).
* **Touchpoints** of a conversion: the same user's touchpoints at or before the
  conversion and at most :data:`LOOKBACK` (30 days) before it, of the kind the
  report groups by:

  - ``groupBy=source`` / ``campaign``: the user's sessions, at the time of
    their first event, with the session's acquisition source / campaign
    (``session_sources``, see ``services/analytics/preagg.py``);
  - ``groupBy=effect``: the effect tasks the user ran (effects' server facts),
    at the task's time, with the effect id.

  They are ordered by time (ties by group name). A conversion with no
  touchpoint in the lookback gives all its credit to :data:`UNATTRIBUTED`
  (``(direct)`` for sources, ``(none)`` for campaigns and effects).

Models (each gives a conversion's touchpoints credits that sum to exactly 1)
---------------------------------------------------------------------------
* ``first_touch``: all credit to the earliest touchpoint.
* ``last_touch`` (default): all credit to the latest touchpoint.
* ``linear``: ``1/n`` to each of the ``n`` touchpoints.
* ``time_decay``: touchpoint ``i`` at ``t_i`` weighs
  ``w_i = 2 ** (-(T - t_i) / 7 days)`` for a conversion at ``T`` (a 7-day
  half-life, Google Analytics' default: a touchpoint a week older counts half
  as much), and gets ``w_i / sum(w)``.

A group's credit is the sum of its touchpoints' credits. Per group and
currency the report gives ``revenue = sum(amount * credit)`` over the
conversions (exact decimals, rounded half-even to the currency's minor unit
only when printed), ``conversions = sum(credit)``, and the **RunningHub cost**:
each effect task's coins belong to its user's first conversion at or after it
(within the lookback; tasks that led to no conversion are not "involved"),
and a conversion's coins are split across groups with the same credits as its
revenue. The cost in money is coins times the configured rate for the currency
(``ANALYTICS_RUNNINGHUB_COIN_RATES``, e.g. ``USD=0.0014,CNY=0.01``); without a
rate for a currency its cost and margin stay empty, since amounts in different
currencies are never added without a named rate. ``margin = revenue - cost``.
Totals per currency are exact sums of the conversions.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Context, Decimal
from typing import Final

import asyncpg

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.preagg import Preflight
from services.servicekit.cache import MultiLevelCache, get_or_load_message
from services.servicekit.errors import invalid_argument

MODELS: Final = ("first_touch", "last_touch", "linear", "time_decay")
DEFAULT_MODEL: Final = "last_touch"
GROUPS: Final = ("effect", "source", "campaign")
DEFAULT_GROUP: Final = "source"
WINDOWS: Final = {"7d": timedelta(days=7), "30d": timedelta(days=30)}
DEFAULT_WINDOW: Final = "30d"
LOOKBACK: Final = timedelta(days=30)
HALF_LIFE: Final = timedelta(days=7)
UNATTRIBUTED: Final = {"effect": "(none)", "source": "(direct)", "campaign": "(none)"}
# ISO 4217 minor units that are not 2 (every other currency has 2).
MINOR_UNITS: Final = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"), 0),
    **dict.fromkeys(("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    "CLF": 4,
    "UYW": 4,
}
_CTX: Final = Context(prec=34)


@dataclass(frozen=True, order=True)
class Touchpoint:
    at: datetime
    group: str


@dataclass(frozen=True)
class Conversion:
    order_id: str
    user_id: str
    at: datetime
    amount: Decimal
    currency: str


@dataclass(frozen=True)
class Task:
    user_id: str
    at: datetime
    coins: Decimal


def credits(model: str, touchpoints: Sequence[Touchpoint], at: datetime) -> dict[str, Decimal]:
    """The credit of each group for one conversion at `at`; `touchpoints` sorted, all in the lookback.

    Empty `touchpoints` give ``{}`` (the caller credits the unattributed group).
    """
    if not touchpoints:
        return {}
    if model == "first_touch":
        return {touchpoints[0].group: Decimal(1)}
    if model == "last_touch":
        return {touchpoints[-1].group: Decimal(1)}
    if model == "linear":
        weights = [Decimal(1)] * len(touchpoints)
    elif model == "time_decay":
        # Each weight in binary floating point (relative error ~1e-16, exact for whole
        # half-lives), then exact as a Decimal: a 34-digit Decimal power cost ~60 us a
        # touchpoint (most of the report's time at 10 M rows) for digits that the rounded
        # outputs (cents, 6 decimals of conversions) never show.
        half_life = HALF_LIFE.total_seconds()
        weights = [Decimal(2.0 ** (-(at - t.at).total_seconds() / half_life)) for t in touchpoints]
    else:
        raise ValueError(f"unknown model {model!r}")
    total = _CTX.add(sum(weights[1:], weights[0]), Decimal(0))
    out: dict[str, Decimal] = defaultdict(Decimal)
    for t, w in zip(touchpoints, weights, strict=True):
        out[t.group] = _CTX.add(out[t.group], _CTX.divide(w, total))
    return dict(out)


@dataclass
class GroupTotals:
    revenue: Decimal = Decimal(0)
    conversions: Decimal = Decimal(0)
    coins: Decimal = Decimal(0)


@dataclass
class Attribution:
    """The result before printing: per (group, currency) and per currency."""

    groups: dict[tuple[str, str], GroupTotals] = field(default_factory=dict)
    totals: dict[str, tuple[Decimal, int]] = field(default_factory=dict)


def task_costs(conversions: Sequence[Conversion], tasks: Iterable[Task]) -> dict[str, Decimal]:
    """Coins per conversion (by order id): each task goes to its user's first conversion at or
    after it, within the lookback; ties between conversions at the same instant by order id."""
    by_user: dict[str, list[tuple[datetime, str]]] = defaultdict(list)
    for c in conversions:
        by_user[c.user_id].append((c.at, c.order_id))
    for items in by_user.values():
        items.sort()
    out: dict[str, Decimal] = defaultdict(Decimal)
    for task in tasks:
        found = by_user.get(task.user_id)
        items = found or []
        if not items:
            continue
        i = bisect.bisect_left(items, (task.at, ""))
        if i < len(items) and items[i][0] - task.at <= LOOKBACK:
            out[items[i][1]] += task.coins
    return dict(out)


def attribute(
    model: str,
    group_by: str,
    conversions: Sequence[Conversion],
    touchpoints: Mapping[str, Sequence[Touchpoint]],
    coins: Mapping[str, Decimal],
) -> Attribution:
    """Apply `model` to every conversion. `touchpoints` per user, sorted by time; `coins` per order."""
    result = Attribution()
    for c in conversions:
        mine = touchpoints.get(c.user_id, ())
        lo = bisect.bisect_left(mine, Touchpoint(c.at - LOOKBACK, ""))
        hi = bisect.bisect_right(mine, Touchpoint(c.at, "\U0010ffff"))
        shares = credits(model, mine[lo:hi], c.at) or {UNATTRIBUTED[group_by]: Decimal(1)}
        cost = coins.get(c.order_id, Decimal(0))
        for group, share in shares.items():
            totals = result.groups.setdefault((group, c.currency), GroupTotals())
            totals.revenue = _CTX.add(totals.revenue, _CTX.multiply(c.amount, share))
            totals.conversions = _CTX.add(totals.conversions, share)
            totals.coins = _CTX.add(totals.coins, _CTX.multiply(cost, share))
        revenue, count = result.totals.get(c.currency, (Decimal(0), 0))
        result.totals[c.currency] = (revenue + c.amount, count + 1)
    return result


def money(amount: Decimal, currency: str) -> str:
    """`amount` rounded half-even to the currency's minor unit, as a plain decimal string."""
    places = MINOR_UNITS.get(currency, 2)
    return str(amount.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_EVEN, context=_CTX))


def parse_rates(text: str) -> dict[str, Decimal]:
    """``USD=0.0014,CNY=0.01`` -> {currency: price of one RunningHub coin}; raises ValueError."""
    rates: dict[str, Decimal] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        currency, sep, value = item.partition("=")
        currency = currency.strip()
        if not sep or len(currency) != 3 or not currency.isalpha() or not currency.isupper():
            raise ValueError(f"expected CUR=rate with an ISO 4217 code, got {item!r}")
        try:
            rate = Decimal(value.strip())
        except ArithmeticError:
            raise ValueError(f"bad rate in {item!r}") from None
        if not rate.is_finite() or rate < 0:
            raise ValueError(f"bad rate in {item!r}")
        rates[currency] = rate
    return rates


def to_response(
    result: Attribution, rates: Mapping[str, Decimal], window: str, model: str, group_by: str, now: datetime
) -> analytics_pb2.GetRevenueAttributionResponse:
    response = analytics_pb2.GetRevenueAttributionResponse(window=window, model=model, group_by=group_by)
    response.generated_at.FromDatetime(now)
    ordered = sorted(result.groups.items(), key=lambda kv: (kv[0][1], -kv[1].revenue, kv[0][0]))
    for (group, currency), t in ordered:
        row = response.rows.add(
            group=group,
            currency=currency,
            revenue=money(t.revenue, currency),
            conversions=round(float(t.conversions), 6),
            runninghub_cost_coins=round(float(t.coins), 6),
        )
        rate = rates.get(currency)
        if rate is not None:
            cost = _CTX.multiply(t.coins, rate)
            row.runninghub_cost = money(cost, currency)
            row.margin = money(_CTX.subtract(t.revenue, cost), currency)
    for currency in sorted(result.totals):
        revenue, count = result.totals[currency]
        response.totals.add(currency=currency, revenue=money(revenue, currency), conversions=count)
    return response


def parse_request(request: analytics_pb2.GetRevenueAttributionRequest) -> tuple[str, timedelta, str, str]:
    bad: list[tuple[str, str]] = []
    window = request.window or DEFAULT_WINDOW
    if window not in WINDOWS:
        bad.append(("window", f"must be one of {', '.join(WINDOWS)}; got {request.window!r}"))
    model = request.model or DEFAULT_MODEL
    if model not in MODELS:
        bad.append(("model", f"must be one of {', '.join(MODELS)}; got {request.model!r}"))
    group_by = request.group_by or DEFAULT_GROUP
    if group_by not in GROUPS:
        bad.append(("groupBy", f"must be one of {', '.join(GROUPS)}; got {request.group_by!r}"))
    if bad:
        raise invalid_argument(bad, "invalid attribution request")
    return window, WINDOWS[window], model, group_by


# --------------------------------------------------------------------------- loading

_CONVERSIONS_SQL = """
SELECT order_id, user_id, occurred_at, amount, currency
FROM revenue
WHERE occurred_at >= $1 AND occurred_at <= $2 AND user_id IS NOT NULL
ORDER BY occurred_at, order_id
"""
_SESSION_TOUCHPOINTS_SQL = """
SELECT user_id, first_at AS at, {column} AS grp
FROM session_sources
WHERE user_id = ANY($1::text[]) AND first_at >= $2 AND first_at <= $3
"""
_TASKS_SQL = """
SELECT user_id, occurred_at AS at, effect_id AS grp, coalesce(cost_coins, 0)::numeric AS coins
FROM task_ends
WHERE user_id = ANY($1::text[]) AND occurred_at >= $2 AND occurred_at <= $3
"""


class AttributionReports:
    """Loads conversions and touchpoints, applies a model; answers cached ``ttl_seconds``."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache: MultiLevelCache[bytes],
        ttl_seconds: float,
        rates: Mapping[str, Decimal],
        refresh: Preflight | None = None,
    ) -> None:
        self._pool = pool
        self._cache = cache
        self._ttl = ttl_seconds
        self._rates = dict(rates)
        self._refresh = refresh
        self.computations = 0

    async def get(
        self, request: analytics_pb2.GetRevenueAttributionRequest
    ) -> analytics_pb2.GetRevenueAttributionResponse:
        window, length, model, group_by = parse_request(request)

        async def load() -> analytics_pb2.GetRevenueAttributionResponse:
            now = datetime.now(UTC)
            return await self.compute(window, now - length, now, model, group_by)

        return await get_or_load_message(
            self._cache,
            f"{window}|{model}|{group_by}",
            analytics_pb2.GetRevenueAttributionResponse,
            load,
            self._ttl,
        )

    async def compute(
        self, window: str, since: datetime, now: datetime, model: str, group_by: str
    ) -> analytics_pb2.GetRevenueAttributionResponse:
        self.computations += 1
        if self._refresh is not None and group_by != "effect":
            await self._refresh()
        async with self._pool.acquire() as conn, conn.transaction(readonly=True, isolation="repeatable_read"):
            conversions = [
                Conversion(r["order_id"], r["user_id"], r["occurred_at"], Decimal(r["amount"]), r["currency"])
                for r in await conn.fetch(_CONVERSIONS_SQL, since, now)
            ]
            users = sorted({c.user_id for c in conversions})
            first = since - LOOKBACK
            tasks_rows = await conn.fetch(_TASKS_SQL, users, first, now) if users else []
            if group_by == "effect":
                touch_rows = tasks_rows
            else:
                sql = _SESSION_TOUCHPOINTS_SQL.format(column=group_by)
                touch_rows = await conn.fetch(sql, users, first, now) if users else []
        touchpoints: dict[str, list[Touchpoint]] = defaultdict(list)
        for r in touch_rows:
            touchpoints[r["user_id"]].append(Touchpoint(r["at"], r["grp"]))
        for items in touchpoints.values():
            items.sort()
        tasks = [Task(r["user_id"], r["at"], Decimal(r["coins"])) for r in tasks_rows]
        coins = task_costs(conversions, tasks)
        result = attribute(model, group_by, conversions, touchpoints, coins)
        return to_response(result, self._rates, window, model, group_by, now)
