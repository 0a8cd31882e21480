"""End to end: real slow RPCs in a real analytics service (its ingest stalled
by a PostgreSQL lock the test holds: no test-only delay in the code), their
timings shipped by the kit's reporter to a real monitoring service, the
latency warning and then the critical alert firing and resolving, read
through the REST edge and received as webhooks.

The rules are the default latency rules with a 1-minute window, `for` and
`keep_firing_for` of 0 and one sample minimum, so the test takes seconds,
not the defaults' minutes (their timing is proven with a manual clock in
test_rules.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from tests.conftest import StartService
from tests.monitoring.conftest import Receiver, StartMonitoring
from tests.support import DATABASE_URL

ENDPOINT = "/cosnap.analytics.v1.AnalyticsService/RecordEvents"
RULES = """
[[rule]]
name = "ApiLatencyHigh"
kind = "latency_p95"
severity = "warning"
above = 3000.0
clear = 2500.0
window = "1m"
for = "0s"
min_samples = 1
summary = "API p95 above 3 s"

[[rule]]
name = "ApiLatencyHigh"
kind = "latency_p95"
severity = "critical"
above = 5000.0
clear = 4000.0
window = "1m"
for = "0s"
min_samples = 1
summary = "API p95 above 5 s"
"""


async def stalled_calls(
    schema: str, stub: analytics_pb2_grpc.AnalyticsServiceStub, seconds: float, tag: str
) -> None:
    """4 RecordEvents calls that wait `seconds` on a lock of the table their commit needs."""
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        async with conn.transaction():
            await conn.execute(f'LOCK TABLE "{schema}".event_keys IN ACCESS EXCLUSIVE MODE')
            calls = [
                asyncio.ensure_future(
                    stub.RecordEvents(
                        analytics_pb2.RecordEventsRequest(
                            events=[
                                analytics_pb2.Event(
                                    event_id=f"{tag}-{i}", session_id="s", event_type="page_view"
                                )
                            ]
                        ),
                        timeout=60,
                    )
                )
                for i in range(4)
            ]
            await asyncio.sleep(seconds)
        replies = await asyncio.gather(*calls)
        assert [r.accepted for r in replies] == [1, 1, 1, 1]
    finally:
        await conn.close()


async def test_slow_rpcs_fire_warning_then_critical_and_both_resolve(
    start_monitoring: StartMonitoring,
    start_service: StartService,
    start_edge: Callable[..., Awaitable[str]],
    make_receiver: Callable[..., Awaitable[Receiver]],
    admin_token: str,
    tmp_path: Path,
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    receiver = await make_receiver()
    monitoring = await start_monitoring(
        monitoring_rules_file=str(rules),
        monitoring_eval_interval_seconds=0.2,
        monitoring_webhook_urls=f"ops={receiver.url}",
        monitoring_notify_backoff_seconds=0.01,
    )
    analytics = await start_service(
        analytics_app,
        monitoring_addr=f"127.0.0.1:{monitoring.port}",
        monitoring_report_interval_seconds=0.2,
    )
    base = await start_edge(monitoring, analytics)
    headers = {"Authorization": f"Bearer {admin_token}"}

    async with (
        aiohttp.ClientSession() as session,
        grpc.aio.insecure_channel(f"127.0.0.1:{analytics.port}") as channel,
    ):
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)

        async def alerts(state: str) -> list[dict[str, Any]]:
            async with session.get(
                f"{base}/api/analytics/performance/alerts", params={"state": state}, headers=headers
            ) as reply:
                assert reply.status == 200
                body = await reply.json()
            return [a for a in body.get("alerts", []) if a["labels"].get("endpoint") == ENDPOINT]

        async def until(state: str, severities: set[str], timeout: float = 30.0) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
            for _ in range(int(timeout / 0.25)):
                found = await alerts(state)
                if {a["severity"] for a in found} >= severities:
                    return found
                await asyncio.sleep(0.25)
            raise AssertionError(f"no {state} {severities} alerts: {found}")

        # 3.5 s: above the warning's 3 s, below the critical's 5 s
        await stalled_calls(analytics.schema, stub, 3.5, "w")
        (warning,) = await until("open", {"warning"})
        assert warning["source"] == "ApiLatencyHigh" and warning["labels"]["service"] == "analytics"
        assert 3000.0 < warning["actualValue"] <= 4000.0
        assert await alerts("open") == [warning] or all(
            a["severity"] == "warning" for a in await alerts("open")
        )

        # 5.6 s more: the window's p95 is now above 5 s
        await stalled_calls(analytics.schema, stub, 5.6, "c")
        opened = await until("open", {"warning", "critical"})
        critical = next(a for a in opened if a["severity"] == "critical")
        assert critical["actualValue"] > 5000.0

        # fast calls dilute the slow ones below 5 % of the window: both resolve
        async def fast(i: int) -> None:
            await stub.RecordEvents(
                analytics_pb2.RecordEventsRequest(
                    events=[analytics_pb2.Event(event_id=f"f-{i}", session_id="s", event_type="page_view")]
                )
            )

        await asyncio.gather(*(fast(i) for i in range(300)))
        resolved = await until("resolved", {"warning", "critical"})
        assert {a["resolutionNote"] for a in resolved} == {"condition cleared"}
        assert await alerts("open") == []

    await receiver.wait_for(4)
    received = receiver.alerts()
    assert received[:2] == [("firing", "ApiLatencyHigh", "warning"), ("firing", "ApiLatencyHigh", "critical")]
    assert sorted(received[2:]) == [
        ("resolved", "ApiLatencyHigh", "critical"),
        ("resolved", "ApiLatencyHigh", "warning"),
    ]
