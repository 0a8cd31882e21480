"""Validation of ingest batches: every kind of bad input is named by its JSON path,
one bad item fails the whole batch, and nothing of it is stored."""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics import validation
from services.analytics.validation import Limits
from services.analytics.validation.common import CACHE_MAX, BatchClock
from services.analytics.validation.events import event_row, event_types
from services.analytics.validation.jsonvalues import key_json
from services.analytics.validation.metrics import metric_row
from services.analytics.validation.steps import step_row
from services.servicekit.errors import FieldViolations, ServiceError, bad_request_violations
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
            "events[1].properties.n",
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
        ({"attributes": {"endpoint": "v" * 257}}, "metrics[0].attributes.endpoint"),
        ({"attributes": {"k" * 257: "v"}}, f'metrics[0].attributes["{"k" * 64}"]'),
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

    assert (rows[0][11], rows[1][11]) == (sketch.bin_of(5000.0), sketch.ZERO_BIN)


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


# ------------------------------------------------- the fast path and its encoder
#
# validate_* try a fast path first and fall back to the checked path (the
# reference: `_plain` + json, `_check_id`, `_occurred_at`, ...) for anything it
# declines. These tests pin that the fast path produces the checked path's rows
# exactly and never accepts what the checked path rejects.

KEYS = ("a", "effectId", "é", "ключ", "emoji😀", 'quo"te', "back\\slash", "tab\tnl\n", "\x01ctl", "", " ")
STRINGS = ("", "x", "fx-12", "ünïcødé", "中文", "😀🎉", '"', "\\", "\u2028\u2029", "\x01\x1f", "</script>")
NUMBERS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    42.0,
    0.5,
    -2.25,
    1e-300,
    1e300,
    1e20,
    2.0**53 - 1,
    2.0**53,
    -(2.0**53),
    2.0**53 + 2,
    123456789.125,
    5e-324,
    1.7976931348623157e308,
)


def random_value(rng: random.Random, depth: int) -> Any:
    """A plain value for Struct.update, containers only below MAX_PROPERTIES_DEPTH."""
    roll = rng.random()
    if depth < validation.MAX_PROPERTIES_DEPTH and roll < 0.15:
        return {
            rng.choice(KEYS) + str(rng.randrange(3)): random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))
        }
    if depth < validation.MAX_PROPERTIES_DEPTH and roll < 0.3:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if roll < 0.5:
        return rng.choice(STRINGS) + rng.choice(("", str(rng.random())))
    if roll < 0.65:
        return rng.choice(NUMBERS) * rng.choice((1, -1))
    if roll < 0.8:
        return rng.uniform(-1e6, 1e6) if rng.random() < 0.5 else float(rng.randrange(-(10**6), 10**6))
    if roll < 0.9:
        return rng.random() < 0.5
    return None


def random_struct(rng: random.Random) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update({rng.choice(KEYS) + str(i): random_value(rng, 1) for i in range(rng.randrange(1, 8))})
    return out


def _plain(value: struct_pb2.Value) -> Any:
    """An independent reference: a Value as plain Python (integral floats below 2**53 as ints)."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _plain(v) for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_plain(v) for v in value.list_value.values]
    return None


_to_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def reference_json(struct: struct_pb2.Struct) -> str:
    return _to_json({k: _plain(v) for k, v in struct.fields.items()})


def test_struct_json_matches_the_reference_on_random_structs() -> None:
    rng = random.Random(20240607)
    for _ in range(2000):
        struct = random_struct(rng)
        # Through the wire, like a request.
        struct = struct_pb2.Struct.FromString(struct.SerializeToString())
        text = validation.struct_json(struct.fields)
        assert text == reference_json(struct)
        assert json.loads(text) == json_format.MessageToDict(struct)


def test_struct_json_numbers() -> None:
    def encode(number: float) -> str:
        struct = struct_pb2.Struct(fields={"n": struct_pb2.Value(number_value=number)})
        return validation.struct_json(struct.fields)

    assert encode(3.0) == '{"n":3}'
    assert encode(-0.0) == '{"n":0}'
    assert encode(0.5) == '{"n":0.5}'
    assert encode(2.0**53 - 1) == '{"n":9007199254740991}'
    assert encode(2.0**53) == '{"n":9007199254740992.0}'  # beyond exact integers: a float
    assert encode(1e300) == '{"n":1e+300}'
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(validation.BadValue):
            encode(bad)
        nested_bad = struct_pb2.Struct()
        nested_bad.update({"a": [1, {"b": [bad]}]})
        with pytest.raises(validation.BadValue):
            validation.struct_json(nested_bad.fields)


def test_struct_json_unicode_and_escapes() -> None:
    struct = struct_pb2.Struct()
    struct.update({"ключ": "значение 😀", 'q"': "a\\b\n\x01", "\u2028": ["é", {"中": True, "n": None}]})
    text = validation.struct_json(struct.fields)
    assert text == reference_json(struct)
    assert "ключ" in text and "😀" in text and "\\u0001" in text  # not \u-escaped, except control characters


def nested_lists(depth: int) -> struct_pb2.Struct:
    """{"a": [[...[1]...]]} with `depth` containers in all (the object included)."""
    inner: Any = 1
    for _ in range(depth - 1):
        inner = [inner]
    out = struct_pb2.Struct()
    out.update({"a": inner})
    return out


@pytest.mark.parametrize("make", [nested, nested_lists])
def test_depth_limit_exactly_at_the_boundary(make: Callable[[int], struct_pb2.Struct]) -> None:
    limit = validation.MAX_PROPERTIES_DEPTH
    assert validation.struct_json(make(limit).fields) == reference_json(make(limit))
    with pytest.raises(validation.BadValue):
        validation.struct_json(make(limit + 1).fields)
    request = analytics_pb2.RecordEventsRequest(
        events=[ev(properties=make(limit)), ev(properties=make(limit + 1))]
    )
    assert violations_of(lambda: validation.validate_events(request, time.time(), LIMITS)) == [
        ("events[1].properties", f"must not be nested more than {limit} levels deep")
    ]


def violations_of(call: Callable[[], Any]) -> list[tuple[str, str]]:
    with pytest.raises(ServiceError) as err:
        call()
    (detail,) = err.value.details
    bad = error_details_pb2.BadRequest()
    assert detail.Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


def sized(total: int, filler: str = "x", shape: str = "flat") -> struct_pb2.Struct:
    """Properties whose compact JSON is exactly `total` UTF-8 bytes."""
    wrap = {"flat": ('{"s":"', '"}'), "list": ('{"l":[1,"', '"]}'), "deep": ('{"a":{"b":["', '"]}}')}
    head, tail = wrap[shape]
    room = total - len(head.encode()) - len(tail.encode())
    width = len(filler.encode())
    text = filler * (room // width) + "x" * (room % width)
    value: Any = {"flat": text, "list": [1, text], "deep": {"b": [text]}}[shape]
    out = struct_pb2.Struct()
    out.update({"flat": {"s": value}, "list": {"l": value}, "deep": {"a": value}}[shape])
    assert len(reference_json(out).encode()) == total
    return out


@pytest.mark.parametrize("shape", ["flat", "list", "deep"])
@pytest.mark.parametrize("filler", ["x", "é", "中", "😀"])
def test_size_limit_exactly_at_the_boundary(shape: str, filler: str) -> None:
    limit = validation.MAX_PROPERTIES_BYTES
    fits, too_big = sized(limit, filler, shape), sized(limit + 1, filler, shape)
    # The fast path itself takes the largest and declines one byte more.
    assert validation.properties_json(fits) == reference_json(fits)
    with pytest.raises(validation.BadValue):
        validation.properties_json(too_big)
    request = analytics_pb2.RecordEventsRequest(events=[ev(properties=fits)])
    (row,) = validation.validate_events(request, time.time(), LIMITS)
    assert row[5] == reference_json(fits) and len(row[5].encode()) == limit
    request = analytics_pb2.RecordEventsRequest(events=[ev(properties=fits), ev(properties=too_big)])
    assert violations_of(lambda: validation.validate_events(request, time.time(), LIMITS)) == [
        ("events[1].properties", f"must be at most {limit} bytes as JSON")
    ]


def test_size_limit_bounds_the_work_on_huge_properties() -> None:
    wide = struct_pb2.Struct()
    wide.update({f"k{i}": i for i in range(50_000)})
    with pytest.raises(validation.BadValue):
        validation.struct_json(wide.fields)
    request = analytics_pb2.RecordEventsRequest(events=[ev(properties=wide)])
    assert violations_of(lambda: validation.validate_events(request, time.time(), LIMITS)) == [
        ("events[0].properties", f"must be at most {validation.MAX_PROPERTIES_BYTES} bytes as JSON")
    ]


def test_non_finite_numbers_are_named_with_their_path() -> None:
    for bad in (math.nan, math.inf, -math.inf):
        props = struct_pb2.Struct()
        props.update({"ok": 1, "list": [{"x": bad}]})
        request = analytics_pb2.RecordEventsRequest(events=[ev(), ev(properties=props)])
        assert violations_of(partial(validation.validate_events, request, time.time(), LIMITS)) == [
            ("events[1].properties.list[0].x", "numbers must be finite")
        ]


def test_an_explicit_epoch_timestamp_is_not_taken_for_an_absent_one() -> None:
    request = analytics_pb2.RecordEventsRequest(events=[ev(timestamp=timestamp_pb2.Timestamp())])
    assert violations_of(lambda: validation.validate_events(request, time.time(), LIMITS)) == [
        ("events[0].timestamp", "is older than the retention period")
    ]
    steps = analytics_pb2.RecordFunnelStepsRequest(
        steps=[
            analytics_pb2.FunnelStep(
                step_id="s", session_id="s", step="effect_viewed", timestamp=timestamp_pb2.Timestamp()
            )
        ]
    )
    assert violations_of(lambda: validation.validate_steps(steps, time.time(), LIMITS)) == [
        ("steps[0].timestamp", "is older than the retention period")
    ]


def random_text(rng: random.Random, limit: int) -> str:
    return rng.choice(
        (
            "",
            "id-" + str(rng.randrange(1000)),
            "x" * limit,
            "x" * (limit + 1),
            "bad\nid",
            "ünï",
            "\u00a0nbsp",
            "tab\t",
        )
    )


def test_fast_and_checked_paths_agree_on_random_items() -> None:
    """Every item through validate_* equals the checked path's row; every
    violation is the checked path's, in its order."""
    rng = random.Random(7)
    now = time.time()
    clock = BatchClock(now, LIMITS.retention_days)
    stamps = [
        None,
        timestamp_pb2.Timestamp(),
        ts(NOW),
        ts(NOW + timedelta(minutes=4, microseconds=999_999)),
        ts(NOW + timedelta(minutes=6)),
        ts(NOW - timedelta(days=31)),
        timestamp_pb2.Timestamp(seconds=int(now), nanos=-1),
        timestamp_pb2.Timestamp(seconds=int(now), nanos=999_999_999),
    ]
    types = ("page_view", "share", "", "PageView", "a" * 64, "a" * 65, "x-y", "9lives")

    def stamp(item: Any) -> None:
        chosen = rng.choice(stamps)
        if chosen is not None:
            item.timestamp.CopyFrom(chosen)

    def props(item: Any) -> None:
        roll = rng.random()
        if roll < 0.3:
            item.properties.CopyFrom(random_struct(rng))
        elif roll < 0.35:
            item.properties.CopyFrom(struct_pb2.Struct())
        elif roll < 0.4:
            item.properties.CopyFrom(nested(6))
        elif roll < 0.45:
            item.properties.CopyFrom(sized(validation.MAX_PROPERTIES_BYTES + rng.choice((0, 1)), "é"))

    for _ in range(300):
        events = analytics_pb2.RecordEventsRequest()
        metrics = analytics_pb2.RecordPerformanceMetricsRequest()
        steps = analytics_pb2.RecordFunnelStepsRequest()
        for _ in range(rng.randrange(1, 6)):
            e = events.events.add(
                event_id=random_text(rng, 128),
                session_id=random_text(rng, 128),
                user_id=random_text(rng, 128),
                event_type=rng.choice(types),
                page=random_text(rng, 2048),
            )
            stamp(e)
            props(e)
            m = metrics.metrics.add(
                metric_id=random_text(rng, 128),
                session_id=random_text(rng, 128),
                user_id=random_text(rng, 128),
                name=rng.choice(("LCP", "CLS", "API_RESPONSE", "", "lcp")),
                value=rng.choice((0.0, -0.0, 1.5, 5000.0, -1.0, math.inf, math.nan)),
                delta=rng.choice((0.0, -3.5, math.inf, math.nan)),
                navigation_type=random_text(rng, 64),
                page=random_text(rng, 2048),
            )
            for _ in range(rng.choice((0, 0, 1, 3, 33))):
                m.attributes[random_text(rng, 256) + str(rng.randrange(50))] = random_text(rng, 256)
            stamp(m)
            s = steps.steps.add(
                step_id=random_text(rng, 128),
                session_id=random_text(rng, 128),
                user_id=random_text(rng, 128),
                step=rng.choice(("effect_viewed", "result_shared", "", "checkout")),
                effect_id=random_text(rng, 128),
            )
            stamp(s)
            props(s)
        for request, items, validate, checked in (
            (events, events.events, validation.validate_events, event_row),
            (metrics, metrics.metrics, validation.validate_metrics, metric_row),
            (steps, steps.steps, validation.validate_steps, step_row),
        ):
            request = type(request).FromString(request.SerializeToString())
            items = getattr(
                request, items.DESCRIPTOR.name if False else type(request).DESCRIPTOR.fields[0].name
            )
            expected_violations = FieldViolations()
            expected = [checked(item, i, clock, expected_violations) for i, item in enumerate(items)]
            if expected_violations:
                assert violations_of(partial(validate, request, now, LIMITS)) == expected_violations.items
            else:
                assert validate(request, now, LIMITS) == expected


def test_metric_attributes_json_matches_the_reference() -> None:
    attributes = {"endpoint": "/api/ключ", 'q"': "a\\b\n", "😀": "", "k": "中"}
    request = analytics_pb2.RecordPerformanceMetricsRequest(metrics=[m(attributes=attributes)])
    (row,) = validation.validate_metrics(request, time.time(), LIMITS)
    assert row[9] == _to_json(dict(request.metrics[0].attributes))


def test_caches_stay_bounded() -> None:
    for i in range(CACHE_MAX + 50):
        request = analytics_pb2.RecordEventsRequest(
            events=[
                ev(
                    event_type=f"type_{i}",
                    properties=struct_pb2.Struct(fields={f"key{i}": struct_pb2.Value()}),
                )
            ]
        )
        validation.validate_events(request, time.time(), LIMITS)
    assert len(event_types) <= CACHE_MAX
    assert len(key_json) <= CACHE_MAX
