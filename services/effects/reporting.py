"""Task ends reported to analytics (its internal RecordTaskEnds, a service token)
in the background, never slowing a task: `offer` only appends to a bounded
buffer (the oldest end is dropped, and counted, when it is full); a sender ships
batches and keeps a batch that failed for the next try, backing off while
analytics is away. RecordTaskEnds is idempotent by task id, so a batch sent
twice after a lost reply is harmless."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque

import grpc
from prometheus_client import Counter, Gauge

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc

from .taskstore import TaskRow

log = logging.getLogger(__name__)

REPORTED = Counter("effects_task_end_reports", "Task ends sent to analytics, by result.", ["result"])
BUFFERED = Gauge("effects_task_end_buffer", "Task ends waiting to be sent to analytics.")


def task_end(row: TaskRow) -> analytics_pb2.TaskEnd:
    end = analytics_pb2.TaskEnd(
        task_id=row.task_id,
        effect_id=row.effect_id,
        user_id=row.owner,
        status=row.status,
        cost_seconds=row.cost_seconds or 0.0,
        cost_coins=row.cost_coins or "",
        region=row.region,
    )
    end.timestamp.FromDatetime(row.updated_at)
    return end


class TaskEndReporter:
    def __init__(
        self,
        stub: analytics_pb2_grpc.AnalyticsServiceAsyncStub,
        *,
        max_buffer: int = 10_000,
        batch: int = 200,
        interval: float = 1.0,
        timeout: float = 5.0,
        max_backoff: float = 30.0,
    ) -> None:
        self._stub = stub
        self._buffer: deque[analytics_pb2.TaskEnd] = deque()
        self._max = max_buffer
        self._batch = batch
        self._interval = interval
        self._timeout = timeout
        self._max_backoff = max_backoff
        self._wake = asyncio.Event()
        self.dropped = 0
        self.sent = 0

    def offer(self, row: TaskRow) -> None:
        if len(self._buffer) >= self._max:
            self._buffer.popleft()
            self.dropped += 1
            REPORTED.labels("dropped").inc()
        self._buffer.append(task_end(row))
        BUFFERED.set(len(self._buffer))
        if len(self._buffer) >= self._batch:
            self._wake.set()

    async def _send_once(self) -> bool:
        """Send one batch; False when analytics did not take it (kept for later)."""
        batch = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
        try:
            await self._stub.RecordTaskEnds(
                analytics_pb2.RecordTaskEndsRequest(task_ends=batch), timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            REPORTED.labels("error").inc(len(batch))
            room = self._max - len(self._buffer)
            keep = batch[len(batch) - room :] if room < len(batch) else batch
            self.dropped += len(batch) - len(keep)
            self._buffer.extendleft(reversed(keep))
            BUFFERED.set(len(self._buffer))
            log.warning(
                "task ends not reported yet", extra={"code": exc.code().name, "pending": len(self._buffer)}
            )
            return False
        self.sent += len(batch)
        REPORTED.labels("sent").inc(len(batch))
        BUFFERED.set(len(self._buffer))
        return True

    async def run_forever(self) -> None:
        backoff = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            self._wake.clear()
            ok = True
            while self._buffer and ok:
                ok = await self._send_once()
            backoff = self._interval if ok else min(backoff * 2, self._max_backoff)

    async def flush(self) -> None:
        """At shutdown: one last try for what is buffered."""
        while self._buffer:
            if not await self._send_once():
                log.warning("task ends lost at shutdown", extra={"count": len(self._buffer)})
                return
