"""Validation refuses everything PostgreSQL cannot store, naming the field: NUL in
every text field at every depth, metric values outside their name's range, a
metric without a value; and the revenue and task-end rules (ISO 4217 minor units,
exact decimals)."""

from __future__ import annotations

import time
from decimal import Decimal
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2

from cosnap.analytics.v1 import analytics_pb2
from services.analytics import validation
from services.analytics.ingest.rows import METRICS, REVENUE, TASK_ENDS
from services.analytics.validation import Limits
from services.servicekit.errors import ServiceError

LIMITS = Limits(max_items=500, retention_days=30)
NUL = "\x00"


def violations(call: Any, request: Any) -> list[tuple[str, str]]:
    with pytest.raises(ServiceError) as err:
        call(request, time.time(), LIMITS)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    (detail,) = err.value.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


def fields(call: Any, request: Any) -> list[str]:
    return [field for field, _ in violations(call, request)]


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def ev(**kw: Any) -> analytics_pb2.Event:
    return analytics_pb2.Event(**{"event_id": "e1", "session_id": "s1", "event_type": "page_view", **kw})


def metric(**kw: Any) -> analytics_pb2.PerformanceMetric:
    return analytics_pb2.PerformanceMetric(
        **{"metric_id": "m1", "session_id": "s1", "name": "LCP", "value": 1200.0, **kw}
    )


def step(**kw: Any) -> analytics_pb2.FunnelStep:
    return analytics_pb2.FunnelStep(**{"step_id": "f1", "session_id": "s1", "step": "effect_viewed", **kw})


@pytest.mark.parametrize(
    ("item", "path"),
    [
        (ev(page=f"/a{NUL}b"), "events[1].page"),
        (ev(event_id=f"e{NUL}"), "events[1].eventId"),
        (ev(user_id=NUL), "events[1].userId"),
        (ev(event_type=f"page_view{NUL}"), "events[1].eventType"),
        (ev(properties=struct({"k": f"v{NUL}"})), "events[1].properties.k"),
        (ev(properties=struct({f"k{NUL}": "v"})), 'events[1].properties["k\\u0000"]'),
        (ev(properties=struct({"a": {"b": [1, {"c": NUL}]}})), "events[1].properties.a.b[1].c"),
        (ev(properties=struct({"a": [[[f"{NUL}"]]]})), "events[1].properties.a[0][0][0]"),
        (ev(properties=struct({"a": {f"{NUL}x": 1}})), 'events[1].properties.a["\\u0000x"]'),
    ],
)
def test_nul_in_any_event_text_is_named(item: analytics_pb2.Event, path: str) -> None:
    request = analytics_pb2.RecordEventsRequest(events=[ev(), item])
    assert fields(validation.validate_events, request) == [path]


@pytest.mark.parametrize(
    ("item", "path"),
    [
        (metric(navigation_type=f"navigate{NUL}"), "metrics[1].navigationType"),
        (metric(page=NUL), "metrics[1].page"),
        (metric(attributes={"endpoint": f"/api{NUL}"}), "metrics[1].attributes.endpoint"),
        (metric(attributes={f"end{NUL}point": "/api"}), 'metrics[1].attributes["end\\u0000point"]'),
    ],
)
def test_nul_in_any_metric_text_is_named(item: analytics_pb2.PerformanceMetric, path: str) -> None:
    request = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(), item])
    assert fields(validation.validate_metrics, request) == [path]


def test_nul_in_step_text_is_named() -> None:
    request = analytics_pb2.RecordFunnelStepsRequest(
        steps=[step(effect_id=f"fx{NUL}"), step(properties=struct({"deep": {"er": NUL}}))]
    )
    assert fields(validation.validate_steps, request) == ["steps[0].effectId", "steps[1].properties.deep.er"]


def test_clean_text_refuses_nul_and_lone_surrogates() -> None:
    # Protobuf itself refuses lone surrogates (they are not UTF-8), so they cannot arrive
    # in a request; the check covers them anyway, for text that reaches rows another way.
    assert validation.clean_text("ascii") and validation.clean_text("ключ 😀") and validation.clean_text("")
    assert not validation.clean_text("a\x00b")
    assert not validation.clean_text("\ud800")
    assert not validation.clean_text("é\udfff")
    assert validation.clean_text("\u2028\x01")  # other controls are fine in JSON and text


@pytest.mark.parametrize(
    ("name", "good", "bad"),
    [
        ("LCP", 3_600_000.0, 3_600_000.5),
        ("INP", 0.0, -0.5),
        ("CLS", 100.0, 100.01),
        ("MEMORY_USAGE", float(2**40), float(2**40) * 1.001),
        ("API_RESPONSE", 12.5, 1.7e308),
        ("EFFECT_PROCESSING", 3_599_999.0, float("inf")),
        ("TTFB", 1.0, float("nan")),
    ],
)
def test_metric_values_have_their_names_range(name: str, good: float, bad: float) -> None:
    ok = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(name=name, value=good)])
    (row,) = validation.validate_metrics(ok, time.time(), LIMITS)
    assert METRICS.as_dict(row)["value"] == good
    request = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(name=name, value=bad)])
    assert fields(validation.validate_metrics, request) == ["metrics[0].value"]


def test_metric_delta_is_bounded_like_its_value() -> None:
    request = analytics_pb2.RecordPerformanceMetricsRequest(
        metrics=[metric(name="CLS", value=0.1, delta=-0.05), metric(name="CLS", value=0.1, delta=1e308)]
    )
    assert fields(validation.validate_metrics, request) == ["metrics[1].delta"]


def test_a_metric_without_a_value_is_refused() -> None:
    missing = analytics_pb2.PerformanceMetric(metric_id="m1", session_id="s1", name="LCP")
    request = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(value=0.0), missing])
    assert violations(validation.validate_metrics, request) == [("metrics[1].value", "is required")]


# ------------------------------------------------------------------ revenue


def order(**kw: Any) -> analytics_pb2.Revenue:
    return analytics_pb2.Revenue(
        **{"order_id": "o1", "user_id": "u1", "amount": "9.99", "currency": "USD", **kw}
    )


@pytest.mark.parametrize(
    ("amount", "currency", "stored"),
    [
        ("9.99", "USD", Decimal("9.99")),
        ("9.9", "USD", Decimal("9.90")),
        ("12", "EUR", Decimal("12.00")),
        ("500", "JPY", Decimal("500")),
        ("1.250", "KWD", Decimal("1.250")),
        ("0.0001", "CLF", Decimal("0.0001")),
        ("999999999999.99", "USD", Decimal("999999999999.99")),
    ],
)
def test_amounts_are_exact_at_the_currencys_minor_units(amount: str, currency: str, stored: Decimal) -> None:
    request = analytics_pb2.RecordRevenueRequest(revenue=[order(amount=amount, currency=currency)])
    (row,) = validation.validate_revenue(request, time.time(), LIMITS)
    value = REVENUE.as_dict(row)["amount"]
    assert isinstance(value, Decimal) and value == stored
    assert value.as_tuple().exponent == stored.as_tuple().exponent  # the scale too: 9.90, not 9.9


@pytest.mark.parametrize(
    ("amount", "currency", "path"),
    [
        ("9.999", "USD", "revenue[0].amount"),
        ("1.5", "JPY", "revenue[0].amount"),
        ("0", "USD", "revenue[0].amount"),
        ("-5", "USD", "revenue[0].amount"),
        ("1e3", "USD", "revenue[0].amount"),
        ("NaN", "USD", "revenue[0].amount"),
        (" 5", "USD", "revenue[0].amount"),
        ("1000000000000", "USD", "revenue[0].amount"),
        ("", "USD", "revenue[0].amount"),
        ("5", "usd", "revenue[0].currency"),
        ("5", "ABC", "revenue[0].currency"),
        ("5", "XAU", "revenue[0].currency"),  # gold has no minor unit: not money we take
        ("5", "", "revenue[0].currency"),
    ],
)
def test_bad_amounts_and_currencies_are_named(amount: str, currency: str, path: str) -> None:
    request = analytics_pb2.RecordRevenueRequest(revenue=[order(amount=amount, currency=currency)])
    assert fields(validation.validate_revenue, request) == [path]


def test_revenue_ids_are_checked() -> None:
    request = analytics_pb2.RecordRevenueRequest(
        revenue=[order(order_id="", user_id=""), order(session_id=f"s{NUL}", effect_id="x" * 200)]
    )
    assert fields(validation.validate_revenue, request) == [
        "revenue[0].orderId",
        "revenue[0].userId",
        "revenue[1].sessionId",
        "revenue[1].effectId",
    ]


# ------------------------------------------------------------------ task ends


def task_end(**kw: Any) -> analytics_pb2.TaskEnd:
    return analytics_pb2.TaskEnd(
        **{"task_id": "t1", "effect_id": "fx", "user_id": "u1", "status": "SUCCEEDED", **kw}
    )


def test_task_ends_become_exact_rows() -> None:
    request = analytics_pb2.RecordTaskEndsRequest(
        task_ends=[
            task_end(cost_seconds=12.3456, cost_coins="0.75", region="cn"),
            task_end(task_id="t2", status="FAILED"),
        ]
    )
    first, second = (
        TASK_ENDS.as_dict(r) for r in validation.validate_task_ends(request, time.time(), LIMITS)
    )
    assert (first["cost_seconds"], first["cost_coins"], first["region"]) == (
        Decimal("12.346"),
        Decimal("0.75"),
        "cn",
    )
    assert (second["status"], second["cost_seconds"], second["cost_coins"], second["region"]) == (
        "FAILED",
        Decimal("0.000"),
        None,
        None,
    )


def test_bad_task_ends_are_named() -> None:
    request = analytics_pb2.RecordTaskEndsRequest(
        task_ends=[
            task_end(status="DONE", cost_seconds=-1.0),
            task_end(cost_seconds=float("nan"), cost_coins="1e5", region="mars"),
            task_end(task_id="", effect_id="", user_id="", cost_coins="0.123456"),
        ]
    )
    assert fields(validation.validate_task_ends, request) == [
        "taskEnds[0].status",
        "taskEnds[0].costSeconds",
        "taskEnds[1].costSeconds",
        "taskEnds[1].costCoins",
        "taskEnds[1].region",
        "taskEnds[2].taskId",
        "taskEnds[2].effectId",
        "taskEnds[2].userId",
        "taskEnds[2].costCoins",
    ]
