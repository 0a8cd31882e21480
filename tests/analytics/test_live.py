"""The live dashboard stream through the REST edge: SSE or NDJSON, auth, heartbeats, a
client going away, the cap on open streams, and one computation shared by every stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from services.analytics.live import LiveDashboard
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import ADMIN, FRESH, Client, analytics_app, auth, connect  # noqa: F401
from tests.conftest import StartService
from tests.support import eventually

PATH = "/api/analytics/dashboard/performance:stream"
SSE = {"Accept": "text/event-stream", "Authorization": ADMIN[0][1]}
NDJSON = {"Authorization": ADMIN[0][1]}


def live_of(app: ServiceApp) -> LiveDashboard:
    live: LiveDashboard = analytics_app().state(app).business.live
    return live


@pytest.fixture
async def edge(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
    start_edge: Callable[..., Any],
) -> AsyncIterator[tuple[ServiceApp, str, aiohttp.ClientSession]]:
    app = await start_service(
        analytics_app(), analytics_stream_max_clients=3, analytics_stream_heartbeat_seconds=0.3, **FRESH
    )
    client = connect(app)
    await client.events("u1", __import__("datetime").datetime.now(__import__("datetime").UTC), 4)
    base = await start_edge(app)
    async with aiohttp.ClientSession() as http:
        yield app, base, http


async def sse_events(resp: aiohttp.ClientResponse, count: int) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    kind = ""
    while len(out) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            out.append((kind, json.loads(line.removeprefix("data: "))))
    return out


async def test_sse_snapshots_and_heartbeats(edge: tuple[ServiceApp, str, aiohttp.ClientSession]) -> None:
    _, base, http = edge
    async with http.get(f"{base}{PATH}?intervalSeconds=60", headers=SSE) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["Cache-Control"] == "no-cache"
        events = await sse_events(resp, 3)
        while events[0][0] == "heartbeat":  # the first computation outlasted 0.3 s (a loaded machine)
            events = events[1:] + await sse_events(resp, 1)
    (kind, first), *beats = events
    assert kind == "snapshot" and first["kind"] == "snapshot"
    assert first["intervalSeconds"] == 60 and first["windowSeconds"] == 300
    assert first["activeSessions"] == "1"  # the 4 events of one session, just now
    assert first["eventsPerSecond"] > 0
    assert sorted(first["unavailableSections"]) == ["endpoints", "openAlerts"]  # no monitoring here
    # Nothing new for 0.3 s: heartbeats, with only their kind and time.
    assert [k for k, _ in beats] == ["heartbeat", "heartbeat"]
    assert all(b["kind"] == "heartbeat" and b["generatedAt"] and b["activeSessions"] == "0" for _, b in beats)


async def test_ndjson_without_event_stream_accept(
    edge: tuple[ServiceApp, str, aiohttp.ClientSession],
) -> None:
    _, base, http = edge
    async with http.get(f"{base}{PATH}?intervalSeconds=1", headers=NDJSON) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
        lines = [json.loads(await asyncio.wait_for(resp.content.readline(), 10)) for _ in range(3)]
    assert lines[0]["kind"] == "snapshot"
    assert {line["kind"] for line in lines} <= {"snapshot", "heartbeat"}


async def test_auth_and_bad_input(edge: tuple[ServiceApp, str, aiohttp.ClientSession]) -> None:
    app, base, http = edge
    cases = [
        ({"Accept": "text/event-stream"}, "", 401),
        ({"Accept": "text/event-stream", "Authorization": "Bearer forged.token.here"}, "", 401),
        ({"Accept": "text/event-stream", "Authorization": auth("u1")[0][1]}, "", 403),
        (SSE, "?intervalSeconds=0", 200),  # 0 is the default (5)
        (SSE, "?intervalSeconds=61", 400),
        (SSE, "?intervalSeconds=-1", 400),
        (SSE, "?intervalSeconds=abc", 400),
        (SSE, "?interval=5", 400),
    ]
    for headers, query, status in cases:
        async with http.get(f"{base}{PATH}{query}", headers=headers) as resp:
            assert resp.status == status, (headers, query)
            if status != 200:
                assert resp.headers["Content-Type"].startswith("application/json")
                assert "code" in await resp.json()
    await eventually(lambda: live_of(app).open_streams == 0)


async def test_disconnect_is_noticed_at_once(
    start_service: StartService, start_edge: Callable[..., Any]
) -> None:
    # Heartbeats every 30 s and snapshots every 60 s: nothing is written to the stream after
    # the first snapshot, so the disconnect can only be noticed by watching for it.
    app = await start_service(analytics_app(), analytics_stream_heartbeat_seconds=30, **FRESH)
    base = await start_edge(app)
    live = live_of(app)
    async with aiohttp.ClientSession() as own:
        resp = await own.get(f"{base}{PATH}?intervalSeconds=60", headers=SSE)
        assert (await sse_events(resp, 1))[0][0] == "snapshot"
        assert live.open_streams == 1
        resp.close()  # the client goes away mid-stream
        started = time.monotonic()
        await eventually(lambda: live.open_streams == 0, timeout=5.0)
        assert time.monotonic() - started < 3.0  # not at the next write, 30 s away
    # Its feed stopped with its last subscriber.
    await eventually(lambda: not live._feeds)


async def test_cap_and_one_computation_for_every_stream(
    edge: tuple[ServiceApp, str, aiohttp.ClientSession],
) -> None:
    app, base, http = edge
    live = live_of(app)
    before = live.computations
    streams = [await http.get(f"{base}{PATH}?intervalSeconds=60", headers=SSE) for _ in range(3)]
    try:
        firsts = [(await sse_events(r, 1))[0] for r in streams]
        assert all(kind == "snapshot" for kind, _ in firsts)
        # Three streams, one interval: one computation, the same snapshot for all.
        assert live.computations - before == 1
        assert len({json.dumps(body, sort_keys=True) for _, body in firsts}) == 1
        async with http.get(f"{base}{PATH}", headers=SSE) as refused:
            assert refused.status == 429
            assert (await refused.json())["code"] == 8  # RESOURCE_EXHAUSTED
        assert live.open_streams == 3
    finally:
        for r in streams:
            r.close()
    await eventually(lambda: live.open_streams == 0)
    async with http.get(f"{base}{PATH}", headers=SSE) as again:
        assert again.status == 200  # room again once they left
