"""Hostile and malformed input at the edge: every answer the edge gives is a
google.rpc.Status JSON body, names the offending field the way the services'
validation does, and never carries internal detail (addresses, library text)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import grpc
from aiohttp.test_utils import TestClient
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from tests.conftest import EdgeFactory
from tests.gateway.backends import ANALYTICS, Backend, Backends
from tests.support import free_port

Client = TestClient[Any, Any]
EVENTS = "/api/analytics/events"


def event(**fields: Any) -> dict[str, Any]:
    return {"eventId": "e-1", "sessionId": "s-1", "eventType": "page_view", **fields}


async def status_body(resp: Any, http: int) -> dict[str, Any]:
    assert resp.status == http, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = json.loads(await resp.read())
    return body


def violations(body: dict[str, Any]) -> dict[str, str]:
    (detail,) = body["details"]
    assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    return {v["field"]: v["description"] for v in detail["fieldViolations"]}


async def test_deep_nesting_is_a_cheap_400(edge: Client, backend: Backend) -> None:
    for body in (b"[" * 100_000, b'{"events": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
        resp = await edge.post(EVENTS, data=body, headers={"Content-Type": "application/json"})
        answer = await status_body(resp, 400)
        assert answer["code"] == 3 and "deeper than 64" in answer["message"]
    deep = b'{"next": ' * 1000 + b"1" + b"}" * 1000  # 1,000-deep properties
    body = b'{"events": [{"eventId": "e", "sessionId": "s", "eventType": "x", "properties": ' + deep + b"}]}"
    resp = await edge.post(EVENTS, data=body, headers={"Content-Type": "application/json"})
    assert "deeper than 64" in (await status_body(resp, 400))["message"]
    assert backend.requests == []
    # Brackets inside strings do not count, and nesting within the bound passes on.
    shallow: dict[str, Any] = {"text": "[[[[{{{{" * 1000}
    for _ in range(20):
        shallow = {"next": shallow}
    resp = await edge.post(EVENTS, json={"events": [event(properties=shallow)]})
    assert resp.status == 200, await resp.text()


async def test_wrong_types_and_unknown_fields_name_the_field(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        EVENTS,
        json={
            "events": [
                event(),
                event(eventId=5, bogus=1),
                event(timestamp="yesterday", properties=[1]),
            ]
        },
    )
    body = await status_body(resp, 400)
    assert body["code"] == 3
    found = violations(body)
    assert found == {
        "events[1].eventId": "expected a string, got a number",
        "events[1].bogus": "unknown field",
        "events[2].timestamp": "expected an RFC 3339 timestamp like 2026-12-02T10:00:00Z, got 'yesterday'",
        "events[2].properties": "expected an object, got an array",
    }
    assert body["message"].startswith("invalid request body: events[1].eventId")
    assert "Failed to parse" not in json.dumps(body)
    resp = await edge.post(
        "/api/analytics/performance/metrics",
        json={"metrics": [{"metricId": "m", "sessionId": "s", "name": "LCP", "value": True}]},
    )
    assert violations(await status_body(resp, 400)) == {
        "metrics[0].value": "expected a number, got true or false"
    }
    resp = await edge.post(EVENTS, json={"events": {"eventId": "x"}})
    assert violations(await status_body(resp, 400)) == {"events": "expected an array, got an object"}
    resp = await edge.post(EVENTS, json={"events": [None]})
    assert violations(await status_body(resp, 400)) == {"events[0]": "null is not allowed in an array"}
    resp = await edge.get("/api/effects?pageSize=lots")
    assert "pageSize" in violations(await status_body(resp, 400))
    resp = await edge.post(EVENTS, data=b'{"events": [NaN]}', headers={"Content-Type": "application/json"})
    assert "malformed JSON" in (await status_body(resp, 400))["message"]
    assert backend.requests == []


async def test_web_vitals_rating_is_accepted(edge: Client, backend: Backend) -> None:
    metric = {
        "metricId": "v4-1",
        "sessionId": "s",
        "name": "LCP",
        "value": 2300,
        "rating": "good",
        "delta": 2300,
    }
    resp = await edge.post("/api/analytics/performance/metrics", json={"metrics": [metric]})
    assert resp.status == 200, await resp.text()
    assert backend.requests[-1][0] == "RecordPerformanceMetrics"


async def test_an_oversized_header_is_a_json_400(edge: Client) -> None:
    resp = await edge.get("/api/effects", headers={"X-Big": "x" * 20_000})
    body = await status_body(resp, 400)
    assert body == {"code": 3, "message": "request line or header too long"}


async def test_backend_errors_carry_no_internal_detail(edge: Client, backend: Backend) -> None:
    leaks = {
        grpc.StatusCode.UNAVAILABLE: (503, "failed to connect to all addresses; last error: 127.0.0.1:50051"),
        grpc.StatusCode.INTERNAL: (500, 'relation "events" does not exist'),
        grpc.StatusCode.UNKNOWN: (500, "Exception calling application: KeyError('x')"),
        grpc.StatusCode.DEADLINE_EXCEEDED: (504, "Deadline Exceeded at 10.0.0.7:50051"),
        grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "Received message larger than max (5000000 vs. 4194304)"),
    }
    for code, (http, secret) in leaks.items():
        backend.abort = (code, secret)
        resp = await edge.post(EVENTS, json={"events": [event()]})
        body = await status_body(resp, http)
        assert body["code"] == code.value[0]
        assert secret not in json.dumps(body) and "127.0.0.1" not in json.dumps(body), body
        if http in (429, 503):
            assert resp.headers["Retry-After"] == "1"
    # What the service chose to say (a rich status) passes through.
    backend.abort = (grpc.StatusCode.NOT_FOUND, "no effect 'x'")
    resp = await edge.get("/api/effects/x")
    assert (await status_body(resp, 404))["message"] == "no effect 'x'"


async def test_retry_info_sets_retry_after(edge: Client, backend: Backend) -> None:
    retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=7))
    detail = any_pb2.Any()
    detail.Pack(retry)
    backend.abort_status = status_pb2.Status(code=8, message="ingest queue full", details=[detail])
    resp = await edge.post(EVENTS, json={"events": [event()]})
    body = await status_body(resp, 429)
    assert body["message"] == "ingest queue full"
    assert resp.headers["Retry-After"] == "7"
    assert timedelta(seconds=7).total_seconds() == 7


async def test_a_dead_backend_answers_503_without_its_address(
    make_edge: EdgeFactory, backends: Backends
) -> None:
    dead = f"127.0.0.1:{free_port()}"
    client = await make_edge(backends={**backends.addresses, ANALYTICS: dead}, grpc_timeout_seconds=5)
    resp = await client.post(EVENTS, json={"events": [event()]})
    body = await status_body(resp, 503)
    assert dead not in json.dumps(body) and "127.0.0.1" not in json.dumps(body)
    assert body == {"code": 14, "message": "the service is unavailable: re-send the request"}
    assert resp.headers["Retry-After"] == "1"


async def test_cors_any_port_of_a_local_origin(make_edge: EdgeFactory, backends: Backends) -> None:
    client = await make_edge(backends=backends.addresses, cors_origins="http://localhost:*,https://app.test")
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    for origin, allowed in (
        ("http://localhost:5173", True),
        ("http://localhost:3000", True),
        ("http://localhost", True),
        ("https://app.test", True),
        ("http://localhost.evil.test:80", False),
        ("https://localhost:5173", False),
        ("http://evil.test", False),
    ):
        resp = await client.options(EVENTS, headers={"Origin": origin, **preflight})
        got = resp.headers.get("Access-Control-Allow-Origin")
        assert (got == origin) if allowed else got is None, (origin, resp.status, got)
        if allowed:
            assert resp.status == 204
    await asyncio.sleep(0)
