"""The generated OpenAPI document, the docs page (in headless Chromium) and the edge's own
/metrics. schemathesis against the running suite is in test_schemathesis.py."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from gateway.access import bindings
from gateway.docs import ASSETS
from gateway.openapi import build_document
from gateway.routes import RouteTable, build_routes, load_descriptors
from services.servicekit.auth import Access
from tests.conftest import EdgeFactory
from tests.gateway.test_envoy_config import DESCRIPTOR_SET

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


@pytest.fixture(scope="module")
def table() -> RouteTable:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    return build_routes(descriptors.pool, descriptors.services)


@pytest.fixture(scope="module")
def document(table: RouteTable) -> dict[str, Any]:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    return build_document(descriptors.pool, table)


def openapi_path(template: str) -> str:
    """/api/effects/{effect_id} -> /api/effects/{effectId} (JSON names, as the document)."""
    return re.sub(r"\{(\w+)\}", lambda m: "{" + _camel(m.group(1)) + "}", template)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.capitalize() for p in rest)


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def test_every_binding_is_an_operation_with_its_auth(document: dict[str, Any], table: RouteTable) -> None:
    assert document["openapi"] == "3.1.0"
    derived = bindings(table)
    operations = {(verb.upper(), path) for path, item in document["paths"].items() for verb in item}
    assert operations == {(b.verb, openapi_path(b.template)) for b in derived}
    for binding in derived:
        operation = document["paths"][openapi_path(binding.template)][binding.verb.lower()]
        security = operation["security"]
        if binding.access is Access.PUBLIC:
            assert {} in security, f"{binding.template}: a public path takes no token"
        else:
            assert security == [{"bearerAuth": []}], binding.template
            assert "401" in operation["responses"]
        error = operation["responses"]["default"]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/google.rpc.Status"}
        declared = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", openapi_path(binding.template)))
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def test_schemas_follow_the_proto3_json_mapping(document: dict[str, Any], table: RouteTable) -> None:
    schemas = document["components"]["schemas"]
    for ref in refs(document):
        assert ref.startswith("#/components/schemas/") and ref.split("/")[-1] in schemas, ref
    status = schemas["google.rpc.Status"]["properties"]
    assert status["code"]["type"] == "integer" and status["message"]["type"] == "string"
    assert status["details"]["type"] == "array"
    checked = 0
    for route in table.routes:
        for message in (route.method.input_type, route.method.output_type):
            schema = schemas.get(message.full_name)
            if schema is None:
                continue
            assert schema["additionalProperties"] is False
            for fd in message.fields:
                prop = schema["properties"][fd.json_name]
                item = prop["items"] if fd.is_repeated and "items" in prop else prop
                if fd.type in INT64:
                    assert item["type"] == "string", f"{message.full_name}.{fd.name}: int64 as a string"
                    checked += 1
                if fd.enum_type is not None:
                    assert item["enum"] == [v.name for v in fd.enum_type.values]
                if fd.message_type and fd.message_type.full_name == "google.protobuf.Timestamp":
                    assert item == {"type": "string", "format": "date-time"}
    assert checked >= 1, "the descriptor set has int64 fields (counts): at least one was checked"


async def test_the_edge_serves_the_document_and_the_docs_page_without_a_cdn(
    make_edge: EdgeFactory, document: dict[str, Any]
) -> None:
    client = await make_edge()
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    assert await response.json() == json.loads(json.dumps(document))
    page = await client.get("/api/docs")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    init = await (await client.get("/api/docs/init.js")).text()
    for text in (html, init):
        assert not re.search(r"(src|href|url)\s*[=:]\s*[\"']?(https?:)?//", text), "no third-party URL"
    if not ASSETS.is_dir():
        pytest.skip("swagger-ui-dist is not installed (npm install, as make does)")
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert {a.rsplit("/", 1)[-1] for a in assets} >= {"swagger-ui.css", "swagger-ui-bundle.js", "init.js"}
    for asset in assets:
        served = await client.get(asset)
        assert served.status == 200, asset
        body = await served.read()
        assert len(body) > (100 if asset.endswith("init.js") else 10_000), asset


async def test_the_docs_page_lists_every_path_in_headless_chromium(
    make_edge: EdgeFactory, document: dict[str, Any]
) -> None:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium)")
    if not ASSETS.is_dir():
        pytest.skip("swagger-ui-dist is not installed (npm install, as make does)")
    client = await make_edge()
    url = str(client.make_url("/api/docs"))
    process = await asyncio.create_subprocess_exec(
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root on CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        # Any host but the edge fails to resolve: the page must render from the edge alone.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=120)
    dom = out.decode()
    listed = set(re.findall(r'class="opblock-summary-path"[^>]*data-path="([^"]+)"', dom)) | set(
        re.findall(r'data-path="([^"]+)"', dom)
    )
    assert "swagger-ui" in dom, dom[:500]
    assert listed == set(document["paths"]), f"rendered {sorted(listed)}"


async def test_the_edge_counts_requests_per_route(make_edge: EdgeFactory) -> None:
    client = await make_edge()
    await client.get("/api/openapi.json")
    for _ in range(3):
        await client.get("/api/no/such/path")
    # A real route (no backend behind it here: 503), labelled by its template, not its path.
    await client.get("/api/effects/some-effect-id")
    text = await (await client.get("/metrics")).text()
    assert 'edge_requests_total{method="GET",route="/api/openapi.json",status="200"} 1.0' in text
    assert 'edge_requests_total{method="GET",route="unmatched",status="404"} 3.0' in text
    assert re.search(
        r'edge_requests_total\{method="GET",route="/api/effects/\{effect_id\}",status="5\d\d"\} 1.0', text
    )
    assert "some-effect-id" not in text
    assert 'edge_request_duration_seconds_count{method="GET",route="/api/effects/{effect_id}"} 1.0' in text
