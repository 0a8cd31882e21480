"""The edge end to end: HTTP in, real gRPC servers behind it."""

from __future__ import annotations

import gzip
import json
import logging
import re
from typing import Any

import aiohttp
import brotli
import grpc
import pytest
from aiohttp.test_utils import TestClient
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from cosnap.effects.v1 import effects_pb2
from gateway import Settings
from gateway.status import GRPC_TO_HTTP, PUBLIC_TEXT
from tests.conftest import EdgeFactory
from tests.gateway.backends import (
    ANALYTICS,
    BIG_INT64,
    UPLOAD_LIMIT,
    Backend,
    Backends,
)
from tests.support import free_port

Client = TestClient[Any, Any]
ORIGIN = "https://app.cosnap.test"


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return json.loads(await resp.read())


# -- routing and transcoding -----------------------------------------------------------------


async def test_body_star_post_reaches_the_server_and_reply_is_camel_case(
    edge: Client,
    backend: Backend,
) -> None:
    events = [
        {"eventId": "e1", "sessionId": "s1", "eventType": "effect_click", "properties": {"a": 1}},
        {"event_id": "e1", "session_id": "s1", "event_type": "effect_click"},  # snake_case too
        {
            "eventId": "e2",
            "sessionId": "s1",
            "eventType": "page_view",
            "timestamp": "2024-01-02T03:04:05Z",
        },
    ]
    resp = await edge.post("/api/analytics/events", json={"events": events})
    assert resp.status == 200
    assert await _json(resp) == {"accepted": 2, "duplicates": 1}
    name, request = backend.requests[-1]
    assert name == "RecordEvents"
    assert [e.event_id for e in request.events] == ["e1", "e1", "e2"]
    assert request.events[0].properties["a"] == 1
    assert request.events[2].timestamp.seconds == 1704164645


async def test_path_variable_and_response_body_unwrap(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/effects/tasks/task-42")
    assert resp.status == 200
    body = await _json(resp)
    # response_body: "task": the Task itself, not {"task": {...}}; enums by name, camelCase.
    assert body["taskId"] == "task-42"
    assert body["status"] == "RUNNING"
    assert body["createdAt"] == "2023-11-14T22:13:20Z"
    assert body["outputs"] == [{"url": "https://cdn/x.png", "fileType": "png", "nodeId": "9"}]
    assert "task" not in body
    assert backend.last.task_id == "task-42"


async def test_percent_encoded_path_variable_is_decoded(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/effects/fx%20one")
    assert resp.status == 200
    assert (await _json(resp))["effectId"] == "fx one"
    assert backend.requests[-1][0] == "GetEffect"


async def test_literal_segment_beats_variable(edge: Client, backend: Backend) -> None:
    # /api/effects/uploads is a literal POST route; /api/effects/{effect_id}/tasks must not
    # swallow it, and GET /api/effects/tasks/x is GetTask, not GetEffect.
    resp = await edge.get("/api/effects/tasks/t1")
    assert resp.status == 200
    assert backend.requests[-1][0] == "GetTask"


async def test_custom_verb_cancel(edge: Client, backend: Backend) -> None:
    resp = await edge.post("/api/effects/tasks/t-9:cancel", json={})
    assert resp.status == 200
    body = await _json(resp)
    assert body["taskId"] == "t-9"
    assert body["status"] == "CANCELLED"
    assert backend.requests[-1][0] == "CancelTask"


async def test_custom_verb_resolve_with_body(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/analytics/performance/alerts/alert-7:resolve",
        json={"note": "fixed in 1.2"},
    )
    assert resp.status == 200
    alert = (await _json(resp))["alert"]
    assert {k: alert[k] for k in ("alertId", "state", "resolutionNote")} == {
        "alertId": "alert-7",
        "state": "resolved",
        "resolutionNote": "fixed in 1.2",
    }
    assert backend.requests[-1][0] == "ResolvePerformanceAlert"


async def test_unknown_custom_verb_is_404(edge: Client, backend: Backend) -> None:
    resp = await edge.post("/api/analytics/performance/alerts/alert-7:explode", json={})
    assert resp.status == 404
    assert (await _json(resp))["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert backend.requests == []


async def test_create_task_path_and_body_merge(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/effects/fx-1/tasks",
        json={
            "requestId": "r-1",
            "region": "cn",
            "inputs": {"image": "f.png"},
            "parameters": {"k": "v"},
        },
    )
    assert resp.status == 200
    body = await _json(resp)
    assert body["effectId"] == "fx-1" and body["requestId"] == "r-1"
    assert body["status"] == "QUEUED"
    request = backend.last
    assert request.effect_id == "fx-1"
    assert dict(request.inputs) == {"image": "f.png"}
    assert dict(request.parameters) == {"k": "v"}


async def test_path_body_field_collision_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.post("/api/effects/fx-1/tasks", json={"effectId": "fx-2", "requestId": "r"})
    assert resp.status == 400
    body = await _json(resp)
    assert body["code"] == 3 and "effect_id" in body["message"]
    assert backend.requests == []
    # The same value in both places is not a collision.
    resp = await edge.post("/api/effects/fx-1/tasks", json={"effectId": "fx-1", "requestId": "r"})
    assert resp.status == 200


async def test_query_parameters_camel_and_snake_case(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/funnel?window=1h&conversionWindow=30m&effect_id=fx%2F1")
    assert resp.status == 200
    request = backend.last
    assert (request.window, request.conversion_window, request.effect_id) == ("1h", "30m", "fx/1")
    body = await _json(resp)
    assert body["conversionWindow"] == "30m" and body["effectId"] == "fx/1"


async def test_int64_rendered_as_json_string(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/funnel")
    body = await _json(resp)
    assert body["steps"][0]["sessions"] == str(BIG_INT64)
    assert body["steps"][0]["position"] == 1  # int32 stays a number
    assert body["generatedAt"] == "2023-11-14T22:13:20Z"
    assert body["effectId"] == ""  # zero values are printed (always_print_primitive_fields)


async def test_int_query_parameter_parsed(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/effects?pageSize=3&region=cn&page_token=p2")
    assert resp.status == 200
    assert backend.last.page_size == 3
    body = await _json(resp)
    assert len(body["effects"]) == 3 and body["nextPageToken"] == "p2"
    assert body["effects"][0]["region"] == "cn"


async def test_bad_int_query_parameter_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/effects?pageSize=lots")
    assert resp.status == 400
    body = await _json(resp)
    assert body["code"] == 3 and "pageSize" in body["message"]
    violation = body["details"][0]["fieldViolations"][0]
    assert violation["field"] == "pageSize" and violation["description"].startswith("expected an integer")
    assert backend.requests == []


async def test_unknown_query_parameter_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/performance/alerts?state=open&colour=red")
    assert resp.status == 400
    body = await _json(resp)
    assert body["code"] == 3 and "colour" in body["message"]
    assert backend.requests == []


async def test_query_parameter_on_body_star_route_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.post("/api/analytics/events?debug=1", json={"events": []})
    assert resp.status == 400
    assert "debug" in (await _json(resp))["message"]


async def test_repeated_singular_query_parameter_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/funnel?window=1h&window=7d")
    assert resp.status == 400
    assert "window" in (await _json(resp))["message"]


async def test_malformed_json_is_400_with_status_body(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/analytics/events",
        data=b'{"events": [',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert resp.content_type == "application/json"
    body = await _json(resp)
    assert body["code"] == 3 and "malformed JSON" in body["message"]
    assert backend.requests == []


async def test_unknown_json_field_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/analytics/events",
        json={"events": [{"eventId": "e", "colour": "red"}]},
    )
    assert resp.status == 400
    body = await _json(resp)
    assert body["code"] == 3 and "colour" in body["message"]


async def test_wrong_json_type_is_400(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/analytics/performance/metrics",
        json={"metrics": [{"metricId": "m", "value": "fast"}]},
    )
    assert resp.status == 400
    assert "value" in (await _json(resp))["message"]
    resp = await edge.post("/api/analytics/events", json=[1, 2])
    assert resp.status == 400
    assert "JSON object" in (await _json(resp))["message"]


async def test_empty_body_is_an_empty_message(edge: Client, backend: Backend) -> None:
    resp = await edge.post("/api/analytics/events", data=b"")
    assert resp.status == 200
    assert await _json(resp) == {"accepted": 0, "duplicates": 0}  # zero values printed
    assert len(backend.last.events) == 0


async def test_unknown_path_and_wrong_method_are_404(edge: Client, backend: Backend) -> None:
    for method, path in [("GET", "/api/nothing/here"), ("DELETE", "/api/analytics/events")]:
        resp = await edge.request(method, path)
        assert resp.status == 404, (method, path)
        body = await _json(resp)
        assert body["code"] == 5 and path in body["message"]
    assert backend.requests == []


async def test_healthz(edge: Client) -> None:
    resp = await edge.get("/healthz")
    assert resp.status == 200
    assert await _json(resp) == {"status": "ok"}


# -- HttpBody --------------------------------------------------------------------------------


async def test_upload_raw_bytes_and_content_type_reach_the_server(
    edge: Client,
    backend: Backend,
) -> None:
    image = bytes(range(256)) * 40  # binary, not UTF-8
    resp = await edge.post(
        "/api/effects/uploads?region=cn",
        data=image,
        headers={"Content-Type": "image/png"},
    )
    assert resp.status == 200
    assert await _json(resp) == {
        "fileName": "upload.png",
        "region": "cn",
        "sizeBytes": str(len(image)),
    }
    request = backend.last
    assert request.file.data == image
    assert request.file.content_type == "image/png"
    assert request.region == "cn"


async def test_upload_above_limit_is_413(edge: Client, backend: Backend) -> None:
    resp = await edge.post(
        "/api/effects/uploads?region=cn",
        data=b"\0" * (UPLOAD_LIMIT + 1),
        headers={"Content-Type": "image/jpeg"},
    )
    assert resp.status == 413
    body = await _json(resp)
    assert str(UPLOAD_LIMIT) in body["message"]
    assert backend.requests == []


async def test_upload_of_chunked_body_above_limit_is_413(edge: Client, backend: Backend) -> None:
    async def chunks() -> Any:  # no Content-Length: the edge must count what it reads
        for _ in range(5):
            yield b"\1" * (UPLOAD_LIMIT // 4)

    resp = await edge.post(
        "/api/effects/uploads",
        data=chunks(),
        headers={"Content-Type": "image/webp"},
    )
    assert resp.status == 413
    assert backend.requests == []


async def test_webhook_payload_is_raw_http_body(edge: Client, backend: Backend) -> None:
    payload = b'{"event":"TASK_END","taskId":"1","eventData":"{\\"x\\":1}"}'
    resp = await edge.post(
        "/api/effects/webhooks/runninghub/global?token=s3cret",
        data=payload,
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 200
    assert await _json(resp) == {}
    request = backend.last
    assert (request.region, request.token) == ("global", "s3cret")
    assert request.payload.data == payload
    assert request.payload.content_type == "application/json"


async def test_default_upload_limit_is_30_mib() -> None:
    settings = Settings()
    assert settings.max_upload_bytes == 30 * 1024 * 1024
    assert settings.max_body_bytes == 1024 * 1024


async def test_analytics_body_above_1_mib_is_413(edge: Client, backend: Backend) -> None:
    big = {"events": [{"eventId": "e", "page": "x" * (1024 * 1024)}]}
    resp = await edge.post("/api/analytics/events", json=big)
    assert resp.status == 413
    body = await _json(resp)
    assert body["code"] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "1048576" in body["message"]
    assert backend.requests == []


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", list(grpc.StatusCode), ids=lambda c: c.name)
async def test_grpc_status_maps_to_http_like_envoy(
    edge: Client,
    backend: Backend,
    code: grpc.StatusCode,
) -> None:
    expected = {
        "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
        "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
        "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
    }  # fmt: skip
    assert GRPC_TO_HTTP[code] == expected[code.name]
    if code is not grpc.StatusCode.OK:
        backend.abort = (code, f"failed with {code.name}")
    resp = await edge.get("/api/analytics/system/health")
    assert resp.status == expected[code.name]
    body = await _json(resp)
    if code is grpc.StatusCode.OK:
        assert body["status"] == "healthy" and body["uptime"] == "90s"
    else:
        # Codes the gRPC library produces too may carry its text (addresses, internals):
        # without a rich status from the service, the edge says them in its own words.
        message = PUBLIC_TEXT.get(code, f"failed with {code.name}")
        assert body == {"code": code.value[0], "message": message}


async def test_bad_request_details_are_surfaced(edge: Client, backend: Backend) -> None:
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(
                field="events[2].eventType",
                description="must be lowercase",
            ),
        ],
    )
    detail = any_pb2.Any()
    detail.Pack(bad_request)
    backend.abort_status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message="2 invalid events",
        details=[detail],
    )
    resp = await edge.post("/api/analytics/events", json={"events": []})
    assert resp.status == 400
    assert await _json(resp) == {
        "code": 3,
        "message": "2 invalid events",
        "details": [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [
                    {"field": "events[2].eventType", "description": "must be lowercase"},
                ],
            },
        ],
    }


async def test_backend_down_is_503(make_edge: EdgeFactory) -> None:
    client = await make_edge(backends=f"{ANALYTICS}=127.0.0.1:{free_port()}")
    resp = await client.get("/api/analytics/funnel")
    assert resp.status == 503
    body = await _json(resp)
    assert body["code"] == grpc.StatusCode.UNAVAILABLE.value[0] and body["message"]


async def test_backend_not_configured_is_503(make_edge: EdgeFactory, backends: Backends) -> None:
    client = await make_edge(backends={ANALYTICS: backends.addresses[ANALYTICS]})
    resp = await client.get("/api/effects")
    assert resp.status == 503
    assert "cosnap.effects.v1.EffectsService" in (await _json(resp))["message"]


# -- metadata, request ids and logs ----------------------------------------------------------


async def test_authorization_and_request_id_propagate(edge: Client, backend: Backend) -> None:
    resp = await edge.get(
        "/api/analytics/dashboard/performance?window=24h",
        headers={"Authorization": "Bearer abc.def.ghi", "X-Request-Id": "req-123"},
    )
    assert resp.status == 200
    assert resp.headers["x-request-id"] == "req-123"
    seen = backend.last_metadata
    assert seen["authorization"] == "Bearer abc.def.ghi"
    assert seen["x-request-id"] == "req-123"
    assert seen["x-forwarded-for"] == "127.0.0.1"


async def test_request_id_generated_when_absent(
    edge: Client,
    backend: Backend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        resp = await edge.get(
            "/api/analytics/system/health",
            headers={"X-Forwarded-For": "203.0.113.9"},
        )
    request_id = resp.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert backend.last_metadata["x-request-id"] == request_id
    assert backend.last_metadata["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert "authorization" not in backend.last_metadata
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    assert lines[-1]["request_id"] == request_id
    assert lines[-1]["status"] == 200 and lines[-1]["method"] == "GET"
    assert lines[-1]["path"] == "/api/analytics/system/health"
    assert lines[-1]["duration_ms"] >= 0


# -- compression -----------------------------------------------------------------------------


async def _raw_get(
    edge: Client,
    path: str,
    accept_encoding: str,
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        resp = await session.get(edge.make_url(path), headers={"Accept-Encoding": accept_encoding})
        return resp, await resp.read()


@pytest.mark.parametrize(
    ("accept", "expected"),
    [("gzip, deflate, br", "br"), ("gzip", "gzip"), ("br;q=0.5, gzip", "gzip"), ("identity", None)],
)
async def test_compression(
    edge: Client,
    backend: Backend,
    accept: str,
    expected: str | None,
) -> None:
    resp, raw = await _raw_get(edge, "/api/effects?pageSize=40", accept)
    assert resp.status == 200
    assert "Accept-Encoding" in resp.headers.getall("Vary", [])
    assert resp.headers.get("Content-Encoding") == expected
    plain = {"br": brotli.decompress, "gzip": gzip.decompress, None: bytes}[expected](raw)
    assert len(plain) > 1024
    assert len(json.loads(plain)["effects"]) == 40
    if expected:
        assert len(raw) < len(plain)


async def test_small_bodies_are_not_compressed(edge: Client, backend: Backend) -> None:
    resp, raw = await _raw_get(edge, "/api/effects/fx-1", "gzip, br")
    assert "Content-Encoding" not in resp.headers
    assert json.loads(raw)["effectId"] == "fx-1"


async def test_aiohttp_client_decodes_compressed_reply(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/performance/alerts?pageSize=50&state=open")
    assert resp.headers["Content-Encoding"] == "br"
    body = await resp.json()
    assert len(body["alerts"]) == 50 and body["alerts"][0]["state"] == "open"


# -- CORS ------------------------------------------------------------------------------------


async def test_cors_preflight_for_configured_origin(edge: Client, backend: Backend) -> None:
    resp = await edge.options(
        "/api/analytics/events",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id"} <= allowed
    assert int(resp.headers["Access-Control-Max-Age"]) > 0
    assert backend.requests == []


async def test_cors_preflight_for_unconfigured_origin(edge: Client, backend: Backend) -> None:
    resp = await edge.options(
        "/api/analytics/events",
        headers={"Origin": "https://evil.test", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 404
    assert not any(h.lower().startswith("access-control-") for h in resp.headers)


async def test_cors_headers_on_actual_response(edge: Client, backend: Backend) -> None:
    resp = await edge.get("/api/analytics/system/health", headers={"Origin": ORIGIN})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in resp.headers.getall("Vary")
    assert resp.headers["Access-Control-Expose-Headers"].lower() == "x-request-id"
    other = await edge.get("/api/analytics/system/health", headers={"Origin": "https://evil.test"})
    assert other.status == 200
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_grpc_stub_types_are_what_the_edge_sends(edge: Client, backend: Backend) -> None:
    # The edge builds messages from its own descriptor pool; the server parses them with the
    # generated classes, so a full round trip proves the wire format is the same.
    await edge.post("/api/effects/fx-3/tasks", json={"requestId": "r", "instanceType": "plus"})
    assert isinstance(backend.last, effects_pb2.CreateTaskRequest)
    assert backend.last.instance_type == "plus"
