"""The live stream's fan-out through gRPC: 100 streams share one computation per interval
and one encoding of each snapshot; the pre-serialized path sends exactly what the
ordinary (message) path would; heartbeats only when a stream is silent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2
from services.analytics.live import LiveDashboard
from services.servicekit.server import ServiceApp
from tests.analytics.business_support import ADMIN, FRESH, Client, analytics_app, connect  # noqa: F401
from tests.conftest import StartService

METHOD = "/cosnap.analytics.v1.AnalyticsService/StreamPerformanceDashboard"
Response = analytics_pb2.StreamPerformanceDashboardResponse
Request = analytics_pb2.StreamPerformanceDashboardRequest


def live_of(app: ServiceApp) -> LiveDashboard:
    live: LiveDashboard = analytics_app().state(app).business.live
    return live


async def test_hundred_streams_share_one_computation_and_one_encoding(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> None:
    app = await start_service(
        analytics_app(), analytics_stream_max_clients=100, analytics_stream_heartbeat_seconds=30, **FRESH
    )
    client = connect(app)
    await client.events("u1", __import__("datetime").datetime.now(__import__("datetime").UTC), 3)
    live = live_of(app)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    # The bytes as they come off the wire, not parsed by a generated stub.
    raw = channel.unary_stream(METHOD, request_serializer=Request.SerializeToString)
    before = live.computations
    started = time.monotonic()
    try:
        calls = [raw(Request(interval_seconds=1), metadata=ADMIN) for _ in range(100)]

        async def three(call: Any) -> list[bytes]:
            return [cast(bytes, await asyncio.wait_for(call.read(), 15)) for _ in range(3)]

        received = await asyncio.gather(*(three(c) for c in calls))
        elapsed = time.monotonic() - started
        computations = live.computations - before
        assert live.open_streams == 100
        for call in calls:
            call.cancel()
    finally:
        await channel.close()
    # 300 messages; one computation per 1 s interval for all of them (the first at once).
    assert 3 <= computations <= elapsed + 2, (computations, elapsed)
    distinct = {message for stream in received for message in stream}
    assert len(distinct) <= computations
    for message in distinct:
        parsed = Response.FromString(message)
        assert parsed.kind == "snapshot" and parsed.interval_seconds == 1
        assert parsed.active_sessions == 1
        assert parsed.SerializeToString() == message  # the ordinary encoding of the same message
    for stream in received:  # three different snapshots, in order
        times = [Response.FromString(m).generated_at.ToNanoseconds() for m in stream]
        assert times == sorted(set(times))


async def test_serialized_path_sends_what_the_message_path_would(start_service: StartService) -> None:
    app = await start_service(
        analytics_app(), analytics_stream_max_clients=5, analytics_stream_heartbeat_seconds=0.3, **FRESH
    )
    live = live_of(app)
    context: Any = None  # neither path reads its context
    request = Request(interval_seconds=60)
    messages = live.stream(request, context)
    serialized = live.stream_serialized(request, context)

    async def snapshot_message() -> Response:
        while (item := await anext(messages)).kind != "snapshot":
            pass  # a heartbeat, when the first computation took longer than 0.3 s
        return item

    async def snapshot_bytes() -> bytes:
        while Response.FromString(item := await anext(serialized)).kind != "snapshot":
            pass
        return item

    try:
        # Same feed: the one snapshot on both paths, then a heartbeat each.
        first_message, first_bytes = await asyncio.wait_for(
            asyncio.gather(snapshot_message(), snapshot_bytes()), 15
        )
        assert first_message.kind == "snapshot"
        assert Response.FromString(first_bytes) == first_message
        assert first_bytes == first_message.SerializeToString()
        assert live.computations == 1
        beat_message, beat_bytes = await asyncio.wait_for(
            asyncio.gather(anext(messages), anext(serialized)), 5
        )
        beat = Response.FromString(beat_bytes)
        assert beat_message.kind == beat.kind == "heartbeat"
        assert beat.interval_seconds == beat_message.interval_seconds == 60
        assert beat.generated_at.seconds > 0 and not beat.endpoints
    finally:
        await messages.aclose()
        await serialized.aclose()
    assert live.open_streams == 0 and not live._feeds  # closing a stream unsubscribes it


async def test_no_heartbeat_while_snapshots_flow(
    start_service: StartService,
    connect: Callable[[ServiceApp], Client],  # noqa: F811
) -> None:
    # Snapshots every 1 s, heartbeat after 3 s of silence: the silence never comes (a
    # snapshot late by up to 2 s on a loaded machine still comes first), and 6 snapshots
    # take over 5 s, so heartbeats on a timer of their own would show.
    app = await start_service(
        analytics_app(), analytics_stream_max_clients=5, analytics_stream_heartbeat_seconds=3, **FRESH
    )
    call = connect(app).stub.StreamPerformanceDashboard(Request(interval_seconds=1), metadata=ADMIN)
    try:
        kinds = [(await asyncio.wait_for(call.read(), 10)).kind for _ in range(6)]
    finally:
        call.cancel()
    assert kinds == ["snapshot"] * 6


async def test_serialized_responses_only_for_server_streams() -> None:
    module = analytics_app()
    app = ServiceApp("probe", module.SETTINGS())
    with pytest.raises(ValueError, match="server-streaming RPCs only"):
        app.add_service(
            module.SERVICE,
            object(),
            lambda servicer, server: None,
            module.ACCESS,
            serialized={"GetPerformanceDashboard": LiveDashboard.stream_serialized},
        )
