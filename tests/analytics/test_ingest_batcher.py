"""The batcher alone (no PostgreSQL): the writer is a function of the test that
records batches and answers when told; time is a ManualClock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from services.analytics.ingest.batcher import Batcher, Request
from services.analytics.ingest.rows import Kind
from services.servicekit.clock import ManualClock
from services.servicekit.errors import ServiceError


class Writer:
    """Holds each batch until released; answers every row as accepted."""

    def __init__(self) -> None:
        self.batches: list[list[Request]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def write(self, batch: list[Request]) -> None:
        self.batches.append(batch)
        self.started.set()
        await self.release.wait()
        for request in batch:
            request.answer(len(request.rows))


def rows(n: int) -> list[tuple[str]]:
    return [(f"id-{i}",) for i in range(n)]


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
async def writer() -> AsyncIterator[Writer]:
    yield Writer()


async def test_back_pressure_refuses_beyond_the_pending_rows_and_recovers(writer: Writer) -> None:
    batcher = Batcher(writer.write, max_rows=100, max_pending_rows=50, concurrency=1)
    await batcher.start()
    first = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(30)))
    await writer.started.wait()  # being written: still pending
    second = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(20)))  # 50: admitted
    await settle()
    assert batcher.pending_rows == 50
    with pytest.raises(ServiceError) as refused:
        await batcher.submit(Kind.METRICS, rows(1))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert batcher.shed == 1 and batcher.pending_rows == 50  # the refused rows were never queued
    writer.release.set()
    assert await first == (30, 0) and await second == (20, 0)
    assert batcher.pending_rows == 0
    assert await batcher.submit(Kind.METRICS, rows(1)) == (1, 0)  # room again
    assert batcher.max_pending_seen == 50
    await batcher.close()


async def test_a_request_larger_than_the_bound_is_admitted_when_nothing_is_pending(writer: Writer) -> None:
    writer.release.set()
    batcher = Batcher(writer.write, max_rows=1000, max_pending_rows=10)
    await batcher.start()
    assert await batcher.submit(Kind.EVENTS, rows(25)) == (25, 0)
    await batcher.close()


async def test_requests_queued_behind_a_flush_go_together_in_the_next(writer: Writer) -> None:
    batcher = Batcher(writer.write, max_rows=10, concurrency=1)
    await batcher.start()
    futures = [asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(4)))]
    await writer.started.wait()  # the first flush runs; the next four queue behind it
    futures += [asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(4))) for _ in range(4)]
    await settle()
    writer.release.set()
    await asyncio.gather(*futures)
    sizes = [[len(r.rows) for r in batch] for batch in writer.batches]
    # The first request flushed at once (no waiting when idle); the rest in batches of at
    # most 10 rows of whole requests, in arrival order.
    assert sizes == [[4], [4, 4], [4, 4]]
    assert [r.seq for batch in writer.batches for r in batch] == [1, 2, 3, 4, 5]
    await batcher.close()


async def test_flush_interval_waits_on_the_injected_clock(writer: Writer) -> None:
    writer.release.set()
    clock = ManualClock()
    batcher = Batcher(writer.write, max_rows=100, flush_interval=0.5, clock=clock)
    await batcher.start()
    first = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(1)))
    await settle()
    second = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(2)))
    await settle()
    assert writer.batches == [] and clock.sleepers == 1  # waiting for more rows, not flushing
    await clock.advance_and_settle(0.5)
    assert await first == (1, 0) and await second == (2, 0)
    assert [[len(r.rows) for r in b] for b in writer.batches] == [[1, 2]]  # one flush for both
    await batcher.close()


async def test_a_writer_that_leaves_a_request_unanswered_fails_it_instead_of_hanging() -> None:
    async def forgetful(batch: list[Request]) -> None:
        batch[0].answer(len(batch[0].rows))  # answers the first only

    batcher = Batcher(forgetful, max_rows=100, concurrency=1)
    await batcher.start()
    blocker = asyncio.Event()

    async def slow(batch: list[Request]) -> None:
        await blocker.wait()
        await forgetful(batch)

    batcher._write = slow  # both requests in one flush
    a = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(1)))
    await settle()
    b = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(1)))
    c = asyncio.ensure_future(batcher.submit(Kind.EVENTS, rows(1)))
    await settle()
    blocker.set()
    assert await a == (1, 0)
    assert await b == (1, 0)
    with pytest.raises(ServiceError) as err:
        await c
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert batcher.pending_rows == 0
    await batcher.close()


async def test_closing_refuses_new_rows_and_writes_what_is_queued(writer: Writer) -> None:
    batcher = Batcher(writer.write, max_rows=100, concurrency=1)
    await batcher.start()
    queued = [asyncio.ensure_future(batcher.submit(Kind.STEPS, rows(2))) for _ in range(3)]
    await settle()
    closing = asyncio.ensure_future(batcher.close())
    await settle()
    with pytest.raises(ServiceError) as err:
        await batcher.submit(Kind.STEPS, rows(1))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    writer.release.set()
    await closing
    assert [await f for f in queued] == [(2, 0)] * 3
