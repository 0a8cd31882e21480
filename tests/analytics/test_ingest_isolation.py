"""Defence in depth: a request whose data PostgreSQL refuses, slipped past validation
into a stream of concurrent good requests, fails alone; every good request is
acknowledged and stored (real service, real PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics.ingest import EVENTS, Kind, Row
from services.analytics.validation import Limits, validate_events
from services.servicekit.errors import ServiceError
from services.servicekit.server import ServiceApp
from tests.conftest import StartService


@pytest.fixture
async def app(start_service: StartService) -> AsyncIterator[ServiceApp]:
    # Flushes wait 30 ms for more rows, so the bad request shares its flush with good ones.
    yield await start_service(analytics_app, analytics_flush_interval_ms=30.0)


def good_request(n: int) -> analytics_pb2.RecordEventsRequest:
    return analytics_pb2.RecordEventsRequest(
        events=[
            analytics_pb2.Event(
                event_id=f"good-{uuid.uuid4().hex}", session_id="s-1", event_type="page_view", page="/x"
            )
            for _ in range(n)
        ]
    )


def poison_rows(page: str) -> list[Row]:
    """Rows as validation builds them, then one text swapped for what PostgreSQL refuses."""
    request = analytics_pb2.RecordEventsRequest(
        events=[
            analytics_pb2.Event(event_id=f"bad-{uuid.uuid4().hex}", session_id="s-2", event_type="page_view"),
            analytics_pb2.Event(event_id=f"bad-{uuid.uuid4().hex}", session_id="s-2", event_type="page_view"),
        ]
    )
    rows = validate_events(request, time.time(), Limits())
    index = EVENTS.index("page")
    return [(*row[:index], page, *row[index + 1 :]) for row in rows]


@pytest.mark.parametrize(
    "page",
    [
        "/nul\x00here",  # refused by PostgreSQL (invalid byte sequence for UTF8: 0x00)
        "/lone\udc80surrogate",  # refused by the driver (not encodable as UTF-8)
    ],
)
async def test_a_poison_request_fails_alone_and_the_rest_commit(app: ServiceApp, page: str) -> None:
    committer = analytics_app.state(app).committer
    isolating_before = committer.writer.isolating_flushes
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        requests = [good_request(1 + i % 5) for i in range(120)]

        async def send_good(start: int) -> list[tuple[int, analytics_pb2.RecordEventsResponse]]:
            replies = []
            for request in requests[start::8]:
                replies.append((len(request.events), await stub.RecordEvents(request, timeout=30)))
            return replies

        async def send_poison() -> list[BaseException | tuple[int, int]]:
            outcomes: list[BaseException | tuple[int, int]] = []
            for _ in range(6):  # a few times, amid the stream
                await asyncio.sleep(0.01)
                try:
                    outcomes.append(await committer.submit(Kind.EVENTS, poison_rows(page)))
                except ServiceError as exc:
                    outcomes.append(exc)
            return outcomes

        good, poison = await asyncio.gather(asyncio.gather(*(send_good(k) for k in range(8))), send_poison())

    # Every good request acknowledged with all its events accepted ...
    replies = [pair for worker in good for pair in worker]
    assert len(replies) == len(requests)
    assert all(reply.accepted == n and reply.duplicates == 0 for n, reply in replies)
    # ... and stored; the poison got INVALID_ARGUMENT (re-sending cannot help), and stored nothing.
    assert all(
        isinstance(outcome, ServiceError) and outcome.code == grpc.StatusCode.INVALID_ARGUMENT
        for outcome in poison
    ), poison
    assert committer.writer.isolating_flushes > isolating_before  # it did share a flush and was split out
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        stored = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM events")}
        keys = {r["event_id"] for r in await conn.fetch("SELECT event_id FROM event_keys")}
    expected = {e.event_id for request in requests for e in request.events}
    assert expected <= stored and expected <= keys
    assert not any(event_id.startswith("bad-") for event_id in stored | keys)


async def test_a_failed_flush_keeps_nothing_and_isolation_spares_connection_errors(
    app: ServiceApp, admin_pg: asyncpg.Connection
) -> None:
    """A connection error is not a data error: the whole flush gets UNAVAILABLE (re-send)."""
    from services.analytics.ingest.writer import is_data_error

    assert is_data_error(asyncpg.exceptions.UntranslatableCharacterError("x"))
    assert is_data_error(asyncpg.exceptions.CharacterNotInRepertoireError("x"))
    assert is_data_error(asyncpg.exceptions.NumericValueOutOfRangeError("x"))
    assert is_data_error(asyncpg.exceptions.CheckViolationError("x"))
    assert is_data_error(asyncpg.exceptions.ProgramLimitExceededError("x"))
    assert is_data_error(UnicodeEncodeError("utf-8", "\udc80", 0, 1, "surrogates not allowed"))
    assert not is_data_error(asyncpg.exceptions.AdminShutdownError("x"))
    assert not is_data_error(asyncpg.exceptions.ConnectionDoesNotExistError("x"))
    assert not is_data_error(ConnectionResetError())
    assert not is_data_error(asyncpg.exceptions.DeadlockDetectedError("x"))
    assert not is_data_error(asyncpg.exceptions.UniqueViolationError("x"))
    assert not is_data_error(asyncpg.exceptions.UndefinedTableError("x"))  # a bug, not data
