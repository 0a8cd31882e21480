"""Durable batched ingestion: a group committer.

- ``rows``: the row contract of every kind (the one column list validation,
  COPY and the staging tables use);
- ``sql``: the statements of a flush;
- ``batcher``: the queue, when flushes start, back-pressure (no PostgreSQL);
- ``writer``: one flush as one transaction, the optimistic policy, poison
  isolation.

:class:`GroupCommitter` puts the batcher in front of the writer: requests
submit their validated rows and are answered only after COMMIT.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from services.servicekit.clock import SYSTEM_CLOCK, Clock

from .batcher import Batcher
from .rows import CONTRACTS, EVENTS, METRICS, REVENUE, STEPS, TASK_ENDS, Kind, Row, RowContract
from .writer import Writer

__all__ = [
    "CONTRACTS",
    "EVENTS",
    "METRICS",
    "REVENUE",
    "STEPS",
    "TASK_ENDS",
    "GroupCommitter",
    "Kind",
    "Row",
    "RowContract",
]


class GroupCommitter:
    """Queues rows of concurrent requests; the writer stores them, one transaction per flush.

    One flush runs at a time while the backlog is small, so concurrent requests
    group naturally behind it. When at least ``parallel_min_rows`` rows are
    waiting, up to ``concurrency`` flushes run at once, each on its own
    connection, so that PostgreSQL's work on one overlaps the Python work
    (COPY encoding, validation of new requests) of the next. At most
    ``max_pending_rows`` rows wait or are being written; beyond, RESOURCE_EXHAUSTED.
    """

    PESSIMISTIC_FLUSHES = Writer.PESSIMISTIC_FLUSHES

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        max_rows: int = 5000,
        max_pending_rows: int = 50_000,
        flush_interval_ms: float = 0.0,
        concurrency: int = 2,
        parallel_min_rows: int | None = None,
        ensure_partitions: Callable[[], Awaitable[Any]] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.writer = Writer(pool, ensure_partitions)
        self.batcher = Batcher(
            self.writer.write,
            max_rows=max_rows,
            max_pending_rows=max_pending_rows,
            flush_interval=max(0.0, flush_interval_ms) / 1000.0,
            concurrency=concurrency,
            parallel_min_rows=parallel_min_rows,
            clock=clock,
        )

    async def start(self) -> None:
        await self.batcher.start()

    async def close(self) -> None:
        """Refuse new rows, flush what is queued, stop, release the connections."""
        await self.batcher.close()
        await self.writer.close()

    async def submit(self, kind: Kind, rows: Sequence[Row]) -> tuple[int, int]:
        """Queue one request's rows; (accepted, duplicates) once committed."""
        return await self.batcher.submit(kind, rows)

    # Counters for tests and the benchmark.
    @property
    def flushes(self) -> int:
        return self.writer.flushes

    @property
    def failed_flushes(self) -> int:
        return self.writer.failed_flushes

    @property
    def rows_flushed(self) -> int:
        return self.writer.rows_flushed

    @property
    def optimistic_fallbacks(self) -> int:
        return self.writer.optimistic_fallbacks

    @property
    def connections_prepared(self) -> int:
        return self.writer.connections_prepared

    @property
    def max_parallel(self) -> int:
        return self.batcher.max_parallel
