"""The batcher: the queue of submitted requests, when flushes start, and back-pressure.

Requests hand their validated rows to :meth:`Batcher.submit` and wait for the
writer's answer. Flush policy: a flush starts as soon as something is queued
(no delay when idle); while a flush runs, new requests queue up and go
together in the next one. ``flush_interval`` > 0 adds a deliberate wait for
more rows. Only under a backlog (``parallel_min_rows`` waiting) does a second
flush start beside the running one (up to ``concurrency``).

Back-pressure: the rows of every request admitted and not yet answered
(queued or being written) are counted; a request that would take them above
``max_pending_rows`` is refused at once with RESOURCE_EXHAUSTED (the edge
answers 429): while PostgreSQL is slow, memory stays bounded and clients back
off, instead of a queue that grows until the process is killed.

Nothing here touches PostgreSQL: the flush itself is the ``write`` callable
(the writer), which must settle every request's future; the clock is
injectable for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import grpc
from prometheus_client import Counter, Gauge

from services.servicekit.clock import SYSTEM_CLOCK, Clock
from services.servicekit.errors import ServiceError, unavailable

from .rows import Kind, Row

log = logging.getLogger(__name__)

PENDING_ROWS = Gauge("analytics_ingest_pending_rows", "Rows admitted and not yet answered.")
SHED = Counter(
    "analytics_ingest_shed_requests", "Requests refused with RESOURCE_EXHAUSTED, by kind.", ["kind"]
)


def overloaded() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "analytics ingestion is overloaded: re-send after a short wait"
    )


class Request:
    """One submitted request: its rows, its place in the flush (seq), and its answer."""

    __slots__ = ("future", "kind", "rows", "seq")

    def __init__(self, kind: Kind, rows: Sequence[Row], seq: int, future: asyncio.Future[tuple[int, int]]):
        self.kind = kind
        self.rows = rows
        self.seq = seq
        self.future = future

    def answer(self, accepted: int) -> None:
        if not self.future.done():
            self.future.set_result((accepted, len(self.rows) - accepted))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


Write = Callable[[list[Request]], Awaitable[None]]


class Batcher:
    def __init__(
        self,
        write: Write,
        *,
        max_rows: int = 5000,
        max_pending_rows: int = 50_000,
        flush_interval: float = 0.0,
        concurrency: int = 2,
        parallel_min_rows: int | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._write = write
        self.max_rows = max(1, max_rows)
        self.max_pending_rows = max(1, max_pending_rows)
        self.flush_interval = max(0.0, flush_interval)
        self.concurrency = max(1, concurrency)
        self.parallel_min_rows = (
            parallel_min_rows if parallel_min_rows is not None else max(1, self.max_rows // 5)
        )
        self._clock = clock
        self._queue: deque[Request] = deque()
        self._queued_rows = 0
        self.pending_rows = 0  # admitted, not yet answered (queued or being written)
        self.max_pending_seen = 0
        self.shed = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._closing = False
        self._seq = 0
        self.max_parallel = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="analytics-batcher")

    async def close(self) -> None:
        """Refuse new rows, write what is queued, stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- submitting -----------------------------------------------------------------------
    async def submit(self, kind: Kind, rows: Sequence[Row]) -> tuple[int, int]:
        """Queue one request's rows; (accepted, duplicates) once committed.

        Raises RESOURCE_EXHAUSTED when admitting them would exceed ``max_pending_rows``
        (a request is always admitted when nothing is pending, whatever its size).
        """
        if self._closing or self._task is None:
            raise unavailable("analytics ingestion is shutting down")
        n = len(rows)
        if self.pending_rows and self.pending_rows + n > self.max_pending_rows:
            self.shed += 1
            SHED.labels(kind.name.lower()).inc()
            raise overloaded()
        self._seq += 1
        future: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()
        self._queue.append(Request(kind, rows, self._seq, future))
        self._queued_rows += n
        self.pending_rows += n
        self.max_pending_seen = max(self.max_pending_seen, self.pending_rows)
        PENDING_ROWS.set(self.pending_rows)
        self._wakeup.set()
        return await future

    # -- scheduling -----------------------------------------------------------------------
    def _may_start(self) -> bool:
        running = len(self._flushing)
        if running == 0:
            return True
        return running < self.concurrency and self._queued_rows >= self.parallel_min_rows

    async def _run(self) -> None:
        while True:
            while self._queue and self._may_start():
                if (
                    self.flush_interval
                    and not self._flushing
                    and self._queued_rows < self.max_rows
                    and not self._closing
                ):
                    await self._clock.sleep(self.flush_interval)
                batch = self.take()
                task = asyncio.create_task(self._flush(batch))
                self._flushing.add(task)
                self.max_parallel = max(self.max_parallel, len(self._flushing))
            if self._closing and not self._queue and not self._flushing:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def take(self) -> list[Request]:
        """The next batch: whole requests in arrival order, up to ``max_rows`` (at least one)."""
        batch: list[Request] = []
        rows = 0
        queue = self._queue
        while queue and (not batch or rows + len(queue[0].rows) <= self.max_rows):
            request = queue.popleft()
            batch.append(request)
            rows += len(request.rows)
        self._queued_rows -= rows
        return batch

    async def _flush(self, batch: list[Request]) -> None:
        try:
            await self._write(batch)
        except Exception as exc:  # the writer settles its requests; this is a last resort
            log.error("flush failed", extra={"requests": len(batch), "error": repr(exc)}, exc_info=True)
            error = exc if isinstance(exc, ServiceError) else unavailable("could not store the batch")
            for request in batch:
                request.fail(error)
        finally:
            for request in batch:
                request.fail(unavailable("could not store the batch"))  # no-op when answered
                self.pending_rows -= len(request.rows)
            PENDING_ROWS.set(self.pending_rows)
            task = asyncio.current_task()
            if task is not None:
                self._flushing.discard(task)
            self._wakeup.set()
