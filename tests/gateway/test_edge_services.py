"""The edge in front of the real analytics service: public paths never answer 401,
NUL in a query value is a 400 (not a 500 from PostgreSQL), and a service at its
concurrency cap sheds load as 429 with Retry-After."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from services.analytics import app as analytics_app
from services.servicekit.auth import issue_token
from tests.support import JWT_SECRET

pytestmark = pytest.mark.timeout(120)


def event(event_id: str) -> dict[str, Any]:
    return {"eventId": event_id, "sessionId": "s-1", "eventType": "page_view"}


async def test_public_paths_ignore_bad_tokens(start_service: Any, start_edge: Any) -> None:
    app = await start_service(analytics_app)
    base = await start_edge(app)
    expired = issue_token(JWT_SECRET, "alice", "user", ttl_seconds=-60)
    forged = issue_token("another-secret-0123456789-0123456789", "alice", "admin")
    async with aiohttp.ClientSession() as http:
        for n, authorization in enumerate(
            (f"Bearer {expired}", f"Bearer {forged}", "Bearer not-a-jwt", "Basic abc", "Bearer")
        ):
            async with http.post(
                f"{base}/api/analytics/events",
                json={"events": [event(f"public-{n}")]},
                headers={"Authorization": authorization},
            ) as resp:
                assert resp.status == 200, (authorization, await resp.text())
                assert await resp.json() == {"accepted": 1, "duplicates": 0}
        # An admin path still refuses them.
        async with http.get(
            f"{base}/api/analytics/funnel", headers={"Authorization": f"Bearer {expired}"}
        ) as resp:
            assert resp.status == 401


async def test_nul_in_the_funnel_effect_is_a_400(start_service: Any, start_edge: Any) -> None:
    app = await start_service(analytics_app)
    base = await start_edge(app)
    admin = issue_token(JWT_SECRET, "admin-1", "admin")
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{base}/api/analytics/funnel?effectId=%00", headers={"Authorization": f"Bearer {admin}"}
        ) as resp,
    ):
        assert resp.status == 400, await resp.text()
        body = await resp.json()
        assert body["code"] == 3 and body["details"][0]["fieldViolations"][0]["field"] == "effectId"


async def test_beyond_the_concurrency_cap_is_429_with_retry_after(
    start_service: Any, start_edge: Any
) -> None:
    # Each request waits 400 ms for its group commit: two in flight fill the cap.
    app = await start_service(analytics_app, max_concurrent_rpcs=2, analytics_flush_interval_ms=400)
    base = await start_edge(app)
    async with aiohttp.ClientSession() as http:

        async def send(n: int) -> tuple[int, str | None]:
            async with http.post(
                f"{base}/api/analytics/events", json={"events": [event(f"cap-{n}")]}
            ) as resp:
                await resp.read()
                return resp.status, resp.headers.get("Retry-After")

        results = await asyncio.gather(*(send(n) for n in range(8)))
    statuses = sorted(status for status, _ in results)
    assert set(statuses) == {200, 429}, results
    assert statuses.count(200) >= 2
    assert all(retry == "1" for status, retry in results if status == 429)
