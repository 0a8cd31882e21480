"""Validation of ingest batches: every kind of bad input is named by its JSON path,
one bad item fails the whole batch, and nothing of it is stored."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics import validation
from services.analytics.validation import Limits
from services.servicekit.errors import ServiceError, bad_request_violations
from tests.conftest import StartService

LIMITS = Limits(max_items=500, retention_days=30)


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def nested(depth: int) -> struct_pb2.Struct:
    """{"a": {"a": ... {"a": 1}}} with `depth` objects in all."""
    inner: Any = 1
    for _ in range(depth - 1):
        inner = {"a": inner}
    out = struct_pb2.Struct()
    out.update({"a": inner})
    return out


def fields_of(call: Callable[[], Any]) -> list[str]:
    with pytest.raises(ServiceError) as err:
        call()
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    from google.rpc import error_details_pb2

    (detail,) = err.value.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    return [v.field for v in bad.field_violations]


def ev(**fields: Any) -> analytics_pb2.Event:
    base: dict[str, Any] = {"event_id": "e1", "session_id": "s1", "event_type": "page_view"}
    base.update(fields)
    return analytics_pb2.Event(**base)


def events_fields(*events: analytics_pb2.Event) -> list[str]:
    request = analytics_pb2.RecordEventsRequest(events=list(events))
    return fields_of(lambda: validation.validate_events(request, time.time(), LIMITS))


NOW = datetime.now(UTC)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"event_id": ""}, "events[1].eventId"),
        ({"event_id": "x" * 129}, "events[1].eventId"),
        ({"event_id": "bad\nid"}, "events[1].eventId"),
        ({"session_id": ""}, "events[1].sessionId"),
        ({"user_id": "u" * 200}, "events[1].userId"),
        ({"event_type": ""}, "events[1].eventType"),
        ({"event_type": "PageView"}, "events[1].eventType"),
        ({"event_type": "9lives"}, "events[1].eventType"),
        ({"event_type": "a-b"}, "events[1].eventType"),
        ({"event_type": "a" * 65}, "events[1].eventType"),
        ({"page": "/" * 2049}, "events[1].page"),
        ({"timestamp": ts(NOW + timedelta(minutes=30))}, "events[1].timestamp"),
        ({"timestamp": ts(NOW - timedelta(days=31))}, "events[1].timestamp"),
        ({"properties": nested(6)}, "events[1].properties"),
        (
            {"properties": struct_pb2.Struct(fields={"big": struct_pb2.Value(string_value="x" * 9000)})},
            "events[1].properties",
        ),
        (
            {"properties": struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=math.nan)})},
            "events[1].properties",
        ),
        (  # 4100 characters but 8200 bytes of UTF-8
            {"properties": struct_pb2.Struct(fields={"u": struct_pb2.Value(string_value="é" * 4100)})},
            "events[1].properties",
        ),
    ],
)
def test_bad_event_fields_are_named(fields: dict[str, Any], path: str) -> None:
    assert events_fields(ev(), ev(**fields)) == [path]


def test_good_edge_values_pass() -> None:
    request = analytics_pb2.RecordEventsRequest(
        events=[
            ev(event_id="x" * 128, event_type="a" + "b" * 63, page="/" * 2048, properties=nested(5)),
            ev(timestamp=ts(NOW + timedelta(minutes=4)), user_id="u"),
            ev(timestamp=ts(NOW - timedelta(days=29, hours=23))),
        ]
    )
    rows = validation.validate_events(request, time.time(), LIMITS)
    assert len(rows) == 3
    assert rows[0][5] == '{"a":{"a":{"a":{"a":{"a":1}}}}}'


def test_every_invalid_item_is_named() -> None:
    assert events_fields(ev(event_id=""), ev(), ev(event_type="X", session_id=""), ev(page="p" * 3000)) == [
        "events[0].eventId",
        "events[2].sessionId",
        "events[2].eventType",
        "events[3].page",
    ]


def test_empty_and_oversized_batches() -> None:
    assert events_fields() == ["events"]
    assert events_fields(*[ev(event_id=f"e{i}") for i in range(501)]) == ["events"]
    request = analytics_pb2.RecordEventsRequest(events=[ev(event_id=f"e{i}") for i in range(500)])
    assert len(validation.validate_events(request, time.time(), LIMITS)) == 500


def m(**fields: Any) -> analytics_pb2.PerformanceMetric:
    base: dict[str, Any] = {"metric_id": "m1", "session_id": "s1", "name": "LCP", "value": 1000.0}
    base.update(fields)
    return analytics_pb2.PerformanceMetric(**base)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"metric_id": ""}, "metrics[0].metricId"),
        ({"session_id": "s" * 129}, "metrics[0].sessionId"),
        ({"name": ""}, "metrics[0].name"),
        ({"name": "lcp"}, "metrics[0].name"),
        ({"name": "BOGUS"}, "metrics[0].name"),
        ({"value": -1.0}, "metrics[0].value"),
        ({"value": math.inf}, "metrics[0].value"),
        ({"value": math.nan}, "metrics[0].value"),
        ({"delta": math.nan}, "metrics[0].delta"),
        ({"navigation_type": "n" * 65}, "metrics[0].navigationType"),
        ({"page": "p" * 2049}, "metrics[0].page"),
        ({"timestamp": ts(NOW + timedelta(hours=1))}, "metrics[0].timestamp"),
        ({"attributes": {f"k{i}": "v" for i in range(33)}}, "metrics[0].attributes"),
        ({"attributes": {"endpoint": "v" * 257}}, "metrics[0].attributes['endpoint']"),
        ({"attributes": {"k" * 257: "v"}}, f"metrics[0].attributes[{'k' * 64!r}]"),
    ],
)
def test_bad_metric_fields_are_named(fields: dict[str, Any], path: str) -> None:
    request = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[m(**fields)])
    assert fields_of(lambda: validation.validate_metrics(request, time.time(), LIMITS)) == [path]


def test_metric_rows_carry_the_server_rating_and_bin() -> None:
    request = analytics_pb2.RecordPerformanceMetricsRequest(
        metrics=[m(value=5000.0), m(name="API_RESPONSE", value=0.0, attributes={"endpoint": "/x"})]
    )
    rows = validation.validate_metrics(request, time.time(), LIMITS)
    assert rows[0][6] == "poor" and rows[1][6] is None
    assert rows[1][9] == '{"endpoint":"/x"}'
    from services.analytics import sketch

    assert (rows[0][12], rows[1][12]) == (sketch.bin_of(5000.0), sketch.ZERO_BIN)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"step_id": ""}, "steps[0].stepId"),
        ({"session_id": ""}, "steps[0].sessionId"),
        ({"step": ""}, "steps[0].step"),
        ({"step": "checkout"}, "steps[0].step"),
        ({"effect_id": "e" * 129}, "steps[0].effectId"),
        ({"properties": nested(7)}, "steps[0].properties"),
        ({"timestamp": ts(NOW - timedelta(days=40))}, "steps[0].timestamp"),
    ],
)
def test_bad_step_fields_are_named(fields: dict[str, Any], path: str) -> None:
    base: dict[str, Any] = {"step_id": "st1", "session_id": "s1", "step": "effect_viewed"}
    base.update(fields)
    request = analytics_pb2.RecordFunnelStepsRequest(steps=[analytics_pb2.FunnelStep(**base)])
    assert fields_of(lambda: validation.validate_steps(request, time.time(), LIMITS)) == [path]


# ------------------------------------------------------- through the real service


@pytest.fixture
async def stub(
    start_service: StartService,
) -> AsyncIterator[tuple[analytics_pb2_grpc.AnalyticsServiceStub, asyncpg.Pool]]:
    app = await start_service(analytics_app, analytics_max_batch_items=50)
    assert app.pool is not None
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield analytics_pb2_grpc.AnalyticsServiceStub(channel), app.pool


async def test_batches_are_all_or_nothing_over_grpc(
    stub: tuple[analytics_pb2_grpc.AnalyticsServiceStub, asyncpg.Pool],
) -> None:
    client, pool = stub
    good = [ev(event_id=uuid.uuid4().hex) for _ in range(10)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.RecordEvents(
            analytics_pb2.RecordEventsRequest(
                events=[*good[:4], ev(event_type="Nope"), *good[4:], ev(session_id="")]
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request_violations(err.value)] == [
        "events[4].eventType",
        "events[11].sessionId",
    ]
    assert "events[4].eventType" in (err.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM events") == 0
    assert await pool.fetchval("SELECT count(*) FROM event_keys") == 0

    # The configured batch limit (ANALYTICS_MAX_BATCH_ITEMS=50 here).
    metrics = [m(metric_id=f"m{i}") for i in range(51)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.RecordPerformanceMetrics(analytics_pb2.RecordPerformanceMetricsRequest(metrics=metrics))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request_violations(err.value)] == ["metrics"]

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.RecordFunnelSteps(analytics_pb2.RecordFunnelStepsRequest())
    assert [f for f, _ in bad_request_violations(err.value)] == ["steps"]

    reply = await client.RecordEvents(analytics_pb2.RecordEventsRequest(events=good))
    assert (reply.accepted, reply.duplicates) == (10, 0)
    assert await pool.fetchval("SELECT count(*) FROM events") == 10
