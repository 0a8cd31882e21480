"""`python -m gateway` as a real process: configuration errors, serving, and envoy.yaml in step."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from gateway import Settings
from gateway.routes import load_descriptors
from tests.gateway.backends import Backend, Backends
from tests.support import ROOT, free_port


def _run(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("EDGE_PORT", "eighty"),
        ("EDGE_BACKENDS", "cosnap.analytics.v1.AnalyticsService"),
        ("EDGE_BACKENDS", "cosnap.analytics.v1.AnalyticsService=host:port"),
        ("EDGE_MAX_BODY_BYTES", "-1"),
        ("EDGE_DESCRIPTOR_SET", "/nonexistent/descriptor.binpb"),
        ("EDGE_GRPC_TIMEOUT_SECONDS", "0"),
    ],
)
def test_bad_config_exits_naming_the_variable(variable: str, value: str) -> None:
    result = _run({variable: value})
    assert result.returncode == 2
    assert variable in result.stderr


def test_settings_parse_lists() -> None:
    settings = Settings(
        backends="a.B=127.0.0.1:1, c.D = localhost:2 ,",
        cors_origins="https://x, https://y",
    )
    assert settings.backends == {"a.B": "127.0.0.1:1", "c.D": "localhost:2"}
    assert settings.cors_origins == ("https://x", "https://y")


@pytest.fixture
async def edge_process(backends: Backends) -> AsyncIterator[str]:
    port = free_port()
    env = {
        **os.environ,
        "EDGE_PORT": str(port),
        "EDGE_BACKENDS": ",".join(f"{k}={v}" for k, v in backends.addresses.items()),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        env=env,
        cwd=ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(100):
                try:
                    async with session.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
            else:
                pytest.fail("the edge did not start")
        yield base
    finally:
        process.terminate()
        await process.wait()


async def test_running_edge_serves_routes(edge_process: str, backend: Backend) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{edge_process}/api/effects/tasks/t-1") as resp,
    ):
        assert resp.status == 200
        assert (await resp.json())["taskId"] == "t-1"
        assert resp.headers["x-request-id"] == backend.last_metadata["x-request-id"]


def test_envoy_config_matches_the_edge() -> None:
    """Envoy in production and the local edge agree on services, limits and validation options
    (test_envoy_config.py validates the Envoy config itself)."""
    text = (ROOT / "gateway" / "envoy.yaml").read_text()
    services = load_descriptors(Settings().descriptor_set).services
    # The filter config and the per-route overrides (uploads, the live stream's SSE and NDJSON).
    transcoders = text.count("type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3")
    assert transcoders == 4
    for service in services:
        assert f"- match: {{prefix: /{service}/}}" in text
        assert text.count(f"- {service}\n") == transcoders
        assert f"grpc_health_check: {{service_name: {service}}}" in text
    assert f"max_request_body_size: {Settings().max_body_bytes}\n" in text
    assert f"max_request_body_size: {Settings().max_upload_bytes}\n" in text
    assert text.count("convert_grpc_status: true") == transcoders
    for option in ("unknown_method", "unknown_query_parameters", "binding_body_field_collisions"):
        assert text.count(f"reject_{option}: true") == transcoders
    assert "proto_descriptor: /etc/envoy/descriptor.binpb" in text
