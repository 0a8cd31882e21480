"""Every kind of bad input, sent through the REST edge as the frontend sends
it, gets a 4xx with a JSON body that says why, and stores nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from services.analytics import app as analytics_app

pytestmark = pytest.mark.timeout(120)

NOW = datetime.now(UTC)
FUTURE = (NOW + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
ANCIENT = (NOW - timedelta(days=400)).isoformat().replace("+00:00", "Z")


def event(**fields: Any) -> dict[str, Any]:
    return {"eventId": "e-1", "sessionId": "s-1", "eventType": "page_view", **fields}


def metric(**fields: Any) -> dict[str, Any]:
    return {"metricId": "m-1", "sessionId": "s-1", "name": "LCP", "value": 1200, **fields}


def step(**fields: Any) -> dict[str, Any]:
    return {"stepId": "f-1", "sessionId": "s-1", "step": "effect_viewed", **fields}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"next": value}
    return value


EVENTS, METRICS, FUNNEL = (
    "/api/analytics/events",
    "/api/analytics/performance/metrics",
    "/api/analytics/funnel",
)

# (path, JSON body, HTTP status, the field violation expected, or a word of the message)
CASES: list[tuple[str, Any, int, str]] = [
    (EVENTS, {"events": [event(eventId="")]}, 400, "events[0].eventId"),
    (EVENTS, {"events": [event(sessionId="")]}, 400, "events[0].sessionId"),
    (EVENTS, {"events": [event(eventId="x" * 129)]}, 400, "events[0].eventId"),
    (EVENTS, {"events": [event(eventType="Page View")]}, 400, "events[0].eventType"),
    (EVENTS, {"events": [event(timestamp=FUTURE)]}, 400, "events[0].timestamp"),
    (EVENTS, {"events": [event(timestamp=ANCIENT)]}, 400, "events[0].timestamp"),
    (EVENTS, {"events": [event(properties={"blob": "x" * 9000})]}, 400, "events[0].properties"),
    (EVENTS, {"events": [event(properties=nested(8))]}, 400, "events[0].properties"),
    (EVENTS, {"events": []}, 400, "events"),
    (EVENTS, {"events": [event(eventId=f"e-{i}") for i in range(501)]}, 400, "events"),
    (METRICS, {"metrics": [metric(name="LOL")]}, 400, "metrics[0].name"),
    (METRICS, {"metrics": [metric(value=-1)]}, 400, "metrics[0].value"),
    (METRICS, {"metrics": [metric(value="NaN")]}, 400, "metrics[0].value"),
    (METRICS, {"metrics": [metric(value="Infinity")]}, 400, "metrics[0].value"),
    (
        METRICS,
        {"metrics": [metric(attributes={f"k{i}": "v" for i in range(40)})]},
        400,
        "metrics[0].attributes",
    ),
    (FUNNEL, {"steps": [step(step="checkout")]}, 400, "steps[0].step"),
    (FUNNEL, {"steps": [step(stepId="")]}, 400, "steps[0].stepId"),
    # What the edge refuses before any service sees it.
    (EVENTS, {"events": [event(colour="blue")]}, 400, "colour"),
    (EVENTS, {"events": [event(timestamp="yesterday")]}, 400, "timestamp"),
    (METRICS, {"metrics": [metric(value="fast")]}, 400, "value"),
    # `true` is not a number: protobuf's json_format alone would store it as 1.
    (METRICS, {"metrics": [metric(value=True)]}, 400, "metrics[0].value"),
    (METRICS, {"metrics": [metric(delta=False)]}, 400, "metrics[0].delta"),
    (EVENTS, {"events": "not a list"}, 400, "events"),
    (EVENTS, b'{"events": [', 400, "JSON"),
    (EVENTS, {"events": [event(page="x" * (1 << 20))]}, 413, "limit"),
]


async def test_every_kind_of_bad_input_is_a_clear_4xx_and_stores_nothing(
    start_service: Any, start_edge: Any
) -> None:
    app = await start_service(analytics_app)
    base = await start_edge(app)
    failures = []
    async with aiohttp.ClientSession() as http:
        for path, body, status, expected in CASES:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"}
            async with http.post(base + path, data=data, headers=headers) as resp:
                text = await resp.text()
                got = (resp.status, resp.headers.get("Content-Type", ""))
            payload = json.loads(text)  # always a JSON body
            fields = [v["field"] for d in payload.get("details", []) for v in d.get("fieldViolations", [])]
            if got[0] != status or not got[1].startswith("application/json"):
                failures.append(f"{path} {str(body)[:80]}: {got} {text[:200]}")
            elif expected not in fields and expected not in payload.get("message", ""):
                failures.append(f"{path} {str(body)[:80]}: {expected!r} not named in {text[:300]}")
    assert not failures, "\n".join(failures)
    assert app.pool is not None
    for table in ("events", "metrics", "funnel_steps"):
        assert await app.pool.fetchval(f"SELECT count(*) FROM {table}") == 0, table
