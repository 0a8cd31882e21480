"""Attribution models on hand-built journeys; every expected figure is worked out by hand
in the comments. The models are pure functions (services/analytics/attribution.py); the
last tests run them end to end over a real service's tables."""

from __future__ import annotations

import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from typing import Any

import aiohttp
import asyncpg
import pytest

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.attribution import (
    Conversion,
    Task,
    Touchpoint,
    attribute,
    credits,
    money,
    parse_rates,
    task_costs,
    to_response,
)
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import ADMIN, FRESH, Client, analytics_app, auth, connect  # noqa: F401
from tests.conftest import StartService

T = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)

# Journey A: user a saw google (T-10d), facebook (T-5d), a newsletter (T-1d), paid 30.00 USD at T.
A_TOUCH = [
    Touchpoint(T - 10 * DAY, "google"),
    Touchpoint(T - 5 * DAY, "facebook"),
    Touchpoint(T - 1 * DAY, "newsletter"),
]
A_PAID = Conversion("o-a", "a", T, Decimal("30.00"), "USD")


def revenue_of(
    model: str, conversions: list[Conversion], touch: dict[str, list[Touchpoint]]
) -> dict[str, str]:
    result = attribute(model, "source", conversions, touch, {})
    return {f"{g}/{c}": money(t.revenue, c) for (g, c), t in result.groups.items()}


def test_first_touch() -> None:
    # All 30.00 to the earliest touchpoint.
    assert revenue_of("first_touch", [A_PAID], {"a": A_TOUCH}) == {"google/USD": "30.00"}


def test_last_touch() -> None:
    assert revenue_of("last_touch", [A_PAID], {"a": A_TOUCH}) == {"newsletter/USD": "30.00"}


def test_linear() -> None:
    # 30.00 / 3 = 10.00 each.
    assert revenue_of("linear", [A_PAID], {"a": A_TOUCH}) == {
        "google/USD": "10.00",
        "facebook/USD": "10.00",
        "newsletter/USD": "10.00",
    }


def test_time_decay() -> None:
    # Weights 2^(-10/7) = 0.371528, 2^(-5/7) = 0.609507, 2^(-1/7) = 0.905724; sum 1.886759.
    # Shares 0.196901, 0.323049, 0.480050 of 30.00 = 5.9070, 9.6915, 14.4015.
    assert revenue_of("time_decay", [A_PAID], {"a": A_TOUCH}) == {
        "google/USD": "5.91",
        "facebook/USD": "9.69",
        "newsletter/USD": "14.40",
    }
    shares = credits("time_decay", A_TOUCH, T)
    assert sum(shares.values()) == pytest.approx(Decimal(1), abs=Decimal("1e-30"))
    # A touchpoint exactly one half-life older weighs exactly half: 50.00 EUR -> 33.33 / 16.67.
    week = [Touchpoint(T - 7 * DAY, "old"), Touchpoint(T, "new")]
    paid = Conversion("o-b", "b", T, Decimal("50.00"), "EUR")
    assert revenue_of("time_decay", [paid], {"b": week}) == {"old/EUR": "16.67", "new/EUR": "33.33"}


def test_time_decay_float_weights_match_34_digit_decimal_weights() -> None:
    """The weights are evaluated in floating point: on 300 journeys of 1 to 30 touchpoints
    up to 30 days old (to the second), each credit is within 1e-14 of the credit from
    34-digit Decimal powers, far below what is shown (cents, 6 decimals of conversions)."""
    ctx = Context(prec=34)
    rng = random.Random(3)
    half_life = Decimal(7 * 24 * 3600)
    for _ in range(300):
        touch = sorted(
            Touchpoint(T - timedelta(seconds=rng.randint(0, 30 * 24 * 3600)), f"g{rng.randint(0, 4)}")
            for _ in range(rng.randint(1, 30))
        )
        weights = [ctx.power(Decimal(2), -Decimal((T - t.at).total_seconds()) / half_life) for t in touch]
        total = sum(weights[1:], weights[0])
        reference: dict[str, Decimal] = {}
        for t, w in zip(touch, weights, strict=True):
            reference[t.group] = reference.get(t.group, Decimal(0)) + ctx.divide(w, total)
        shares = credits("time_decay", touch, T)
        assert shares.keys() == reference.keys()
        for group, share in shares.items():
            assert abs(share - reference[group]) < Decimal("1e-14")


def test_lookback_future_and_no_touchpoint() -> None:
    touch = [
        Touchpoint(T - 31 * DAY, "too-old"),  # outside the 30-day lookback
        Touchpoint(T - 30 * DAY, "edge"),  # exactly 30 days: counted
        Touchpoint(T + timedelta(seconds=1), "after"),  # after the conversion: not counted
    ]
    assert revenue_of("first_touch", [A_PAID], {"a": touch}) == {"edge/USD": "30.00"}
    assert revenue_of("last_touch", [A_PAID], {"a": touch}) == {"edge/USD": "30.00"}
    # No touchpoint at all: all credit to (direct); another user's touchpoints never count.
    lonely = Conversion("o-c", "c", T, Decimal("9.99"), "USD")
    assert revenue_of("linear", [lonely], {"a": A_TOUCH}) == {"(direct)/USD": "9.99"}
    result = attribute("linear", "effect", [lonely], {}, {})
    assert list(result.groups) == [("(none)", "USD")]


def test_same_group_twice_and_currencies_apart() -> None:
    # Two google sessions and one facebook: linear gives google 2/3 of 12.00 = 8.00.
    touch = [
        Touchpoint(T - 3 * DAY, "google"),
        Touchpoint(T - 2 * DAY, "facebook"),
        Touchpoint(T - 1 * DAY, "google"),
    ]
    usd = Conversion("o-1", "a", T, Decimal("12.00"), "USD")
    jpy = Conversion("o-2", "a", T + DAY, Decimal("1000"), "JPY")
    result = attribute("linear", "source", [usd, jpy], {"a": touch}, {})
    out = {(g, c): (money(t.revenue, c), float(t.conversions)) for (g, c), t in result.groups.items()}
    assert out == {
        ("google", "USD"): ("8.00", pytest.approx(2 / 3)),
        ("facebook", "USD"): ("4.00", pytest.approx(1 / 3)),
        # JPY has no minor unit: 1000 * 2/3 = 666.67 -> 667, 333.33 -> 333.
        ("google", "JPY"): ("667", pytest.approx(2 / 3)),
        ("facebook", "JPY"): ("333", pytest.approx(1 / 3)),
    }
    assert result.totals == {"USD": (Decimal("12.00"), 1), "JPY": (Decimal("1000"), 1)}


def test_costs_follow_the_first_conversion_and_the_credits() -> None:
    first = Conversion("o-1", "a", T, Decimal("10.00"), "USD")
    second = Conversion("o-2", "a", T + 2 * DAY, Decimal("20.00"), "USD")
    tasks = [
        Task("a", T - DAY, Decimal("3")),  # -> o-1
        Task("a", T, Decimal("1.5")),  # at the same instant as o-1 -> o-1
        Task("a", T + DAY, Decimal("4")),  # -> o-2
        Task("a", T + 3 * DAY, Decimal("100")),  # after every conversion: not involved
        Task("a", T - 31 * DAY, Decimal("100")),  # more than 30 days before o-1: not involved
        Task("z", T, Decimal("100")),  # a user who never paid
    ]
    coins = task_costs([first, second], tasks)
    assert coins == {"o-1": Decimal("4.5"), "o-2": Decimal("4")}
    # Linear over effects fx-1 (T-1d) and fx-2 (T): o-1's 10.00 and 4.5 coins split in halves;
    # o-2 (T+2d) sees fx-1, fx-2 and fx-3 (T+1d): 20.00 and 4 coins in thirds.
    touch = {
        "a": [
            Touchpoint(T - DAY, "fx-1"),
            Touchpoint(T, "fx-2"),
            Touchpoint(T + DAY, "fx-3"),
        ]
    }
    result = attribute("linear", "effect", [first, second], touch, coins)
    rates = parse_rates("USD=0.5")
    response = to_response(result, rates, "30d", "linear", "effect", T)
    rows = {r.group: r for r in response.rows}
    # fx-1: 5.00 + 6.666.. = 11.67; coins 2.25 + 1.333.. = 3.5833; cost 1.79; margin 9.875 -> 9.88.
    assert (rows["fx-1"].revenue, rows["fx-1"].runninghub_cost, rows["fx-1"].margin) == (
        "11.67",
        "1.79",
        "9.88",
    )
    assert rows["fx-1"].runninghub_cost_coins == pytest.approx(2.25 + 4 / 3)
    assert rows["fx-1"].conversions == pytest.approx(0.5 + 1 / 3)
    # fx-3: a third of o-2 only: 6.67, coins 1.3333, cost 0.67, margin 6.00.
    assert (rows["fx-3"].revenue, rows["fx-3"].runninghub_cost, rows["fx-3"].margin) == (
        "6.67",
        "0.67",
        "6.00",
    )
    assert [(t.currency, t.revenue, t.conversions) for t in response.totals] == [("USD", "30.00", 2)]
    # Without a rate for the currency: coins only, no money cost or margin.
    bare = to_response(result, {}, "30d", "linear", "effect", T)
    assert all(r.runninghub_cost == "" and r.margin == "" for r in bare.rows)


def test_rates_are_validated() -> None:
    assert parse_rates("USD=0.0014, CNY=0.01") == {"USD": Decimal("0.0014"), "CNY": Decimal("0.01")}
    assert parse_rates("") == {}
    for bad in ["USD", "usd=1", "US=1", "USD=abc", "USD=-1", "USD=NaN", "USD=inf"]:
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_money_rounds_half_even_to_minor_units() -> None:
    assert money(Decimal("2.345"), "USD") == "2.34"
    assert money(Decimal("2.355"), "USD") == "2.36"
    assert money(Decimal("1.2345"), "KWD") == "1.234"
    assert money(Decimal("499.5"), "JPY") == "500"


# --------------------------------------------------------------------------- end to end


async def test_attribution_over_the_service_tables(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    admin_pg: asyncpg.Connection,
    start_edge: Callable[..., Any],
) -> None:
    c = connect(await start_service(analytics_app(), analytics_runninghub_coin_rates="USD=0.5", **FRESH))
    now = datetime.now(UTC)
    # User a: a google / spring session 5 days ago, then a facebook referral 2 days ago.
    await c.events(
        "a", now - 5 * DAY, session="s-google", properties={"utm_source": "Google", "utm_campaign": "spring"}
    )
    await c.events("a", now - 5 * DAY + timedelta(minutes=1), session="s-google")
    await c.events(
        None, now - 2 * DAY, session="s-fb", properties={"referrer": "https://www.facebook.com/x?y=1"}
    )
    await c.events("a", now - 2 * DAY + timedelta(minutes=1), session="s-fb")  # logged in later
    # Revenue and server facts, as the ingest stores them (RecordRevenue / RecordTaskEnds).
    schema = c.app.schema
    await admin_pg.executemany(
        f'INSERT INTO "{schema}".revenue (order_id, user_id, amount, currency, occurred_at) VALUES ($1, $2, $3, $4, $5)',
        [
            ("o-a", "a", Decimal("30.00"), "USD", now - timedelta(hours=1)),
            ("o-b", "b", Decimal("1000"), "JPY", now - timedelta(hours=2)),
        ],
    )
    await admin_pg.executemany(
        f'INSERT INTO "{schema}".task_ends (task_id, effect_id, user_id, status, cost_coins, occurred_at)'
        " VALUES ($1, $2, $3, 'SUCCEEDED', $4, $5)",
        [("t1", "fx-1", "a", Decimal("2"), now - 4 * DAY), ("t2", "fx-2", "a", Decimal("1"), now - DAY)],
    )

    async def rows(model: str, group_by: str) -> dict[tuple[str, str], tuple[str, float, float, str, str]]:
        reply = await c.stub.GetRevenueAttribution(
            analytics_pb2.GetRevenueAttributionRequest(model=model, group_by=group_by),
            metadata=ADMIN,
            timeout=30,
        )
        assert [(t.currency, t.revenue, t.conversions) for t in reply.totals] == [
            ("JPY", "1000", 1),
            ("USD", "30.00", 1),
        ]
        return {
            (r.group, r.currency): (
                r.revenue,
                r.conversions,
                r.runninghub_cost_coins,
                r.runninghub_cost,
                r.margin,
            )
            for r in reply.rows
        }

    # Last touch by source: facebook.com (the referrer's host); b had no session: (direct).
    assert await rows("last_touch", "source") == {
        ("facebook.com", "USD"): ("30.00", 1.0, 3.0, "1.50", "28.50"),
        ("(direct)", "JPY"): ("1000", 1.0, 0.0, "", ""),
    }
    assert await rows("first_touch", "campaign") == {
        ("spring", "USD"): ("30.00", 1.0, 3.0, "1.50", "28.50"),
        ("(none)", "JPY"): ("1000", 1.0, 0.0, "", ""),
    }
    # Linear over the effects a ran: fx-1 and fx-2 half each (15.00, 1.5 coins = 0.75).
    assert await rows("linear", "effect") == {
        ("fx-1", "USD"): ("15.00", 0.5, 1.5, "0.75", "14.25"),
        ("fx-2", "USD"): ("15.00", 0.5, 1.5, "0.75", "14.25"),
        ("(none)", "JPY"): ("1000", 1.0, 0.0, "", ""),
    }

    base = await start_edge(c.app)
    async with aiohttp.ClientSession() as http:
        admin = {"Authorization": ADMIN[0][1]}
        url = f"{base}/api/analytics/revenue/attribution?model=time_decay&groupBy=source&window=7d"
        async with http.get(url, headers=admin) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert {r["group"] for r in body["rows"]} == {"google", "facebook.com", "(direct)"}
        for query in ("model=u_shaped", "groupBy=page", "window=1d"):
            async with http.get(f"{base}/api/analytics/revenue/attribution?{query}", headers=admin) as resp:
                assert resp.status == 400, query
        async with http.get(
            f"{base}/api/analytics/revenue/attribution", headers={"Authorization": auth("a")[0][1]}
        ) as resp:
            assert resp.status == 403
