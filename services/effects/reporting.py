"""Task ends reported to analytics (its internal RecordTaskEnds, a service token)
in the background, never slowing a task: `offer` only appends to a bounded
buffer (the oldest end is dropped, and counted, when it is full); a sender ships
batches and keeps a batch that failed for the next try, backing off while
analytics is away. RecordTaskEnds is idempotent by task id, so a batch sent
twice after a lost reply is harmless. Analytics refuses an invalid batch whole:
figures are bounded before sending, and a refused batch is sent again one end at
a time so only an end analytics will never take is left out (counted)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

import grpc
from prometheus_client import Counter, Gauge

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc

from .taskstore import TaskRow

log = logging.getLogger(__name__)

REPORTED = Counter("effects_task_end_reports", "Task ends sent to analytics, by result.", ["result"])
BUFFERED = Gauge("effects_task_end_buffer", "Task ends waiting to be sent to analytics.")


# What analytics' RecordTaskEnds accepts (services/analytics/validation.py): a batch
# with one value out of range is refused whole, so an odd figure from RunningHub is
# bounded or left out here rather than holding every other end back.
MAX_COST_SECONDS = 7 * 86400.0
MAX_COINS = Decimal(10) ** 9
COIN_PLACES = Decimal("0.0001")


def _seconds(value: float | None) -> float:
    if value is None or not 0.0 <= value:  # None, negative or nan
        return 0.0
    return min(value, MAX_COST_SECONDS)


def _coins(text: str | None) -> str:
    """RunningHub's consumeCoins as a plain decimal of at most 4 places; "" (not
    reported) for anything else."""
    if not text:
        return ""
    try:
        coins = Decimal(text.strip())
    except InvalidOperation:
        return ""
    if not coins.is_finite() or not 0 <= coins < MAX_COINS:
        return ""
    if coins.as_tuple().exponent < -4:  # type: ignore[operator]
        coins = coins.quantize(COIN_PLACES, rounding=ROUND_HALF_UP)
    return format(coins, "f")


def task_end(row: TaskRow) -> analytics_pb2.TaskEnd:
    end = analytics_pb2.TaskEnd(
        task_id=row.task_id,
        effect_id=row.effect_id,
        user_id=row.owner,
        status=row.status,
        cost_seconds=_seconds(row.cost_seconds),
        cost_coins=_coins(row.cost_coins),
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
        self._in_flight = 0
        self.dropped = 0
        self.rejected = 0
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

    @property
    def pending(self) -> int:
        """Task ends not yet taken by analytics (buffered or in flight)."""
        return len(self._buffer) + self._in_flight

    async def _record(self, batch: list[analytics_pb2.TaskEnd]) -> None:
        await self._stub.RecordTaskEnds(
            analytics_pb2.RecordTaskEndsRequest(task_ends=batch), timeout=self._timeout
        )

    async def _one_by_one(self, batch: list[analytics_pb2.TaskEnd]) -> None:
        """Analytics refused a batch as invalid (it refuses a batch whole): each end
        alone, so one it will never take does not hold the others back forever."""
        for end in batch:
            try:
                await self._record([end])
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                self.rejected += 1
                REPORTED.labels("rejected").inc()
                log.error(
                    "task end refused by analytics", extra={"task_id": end.task_id, "error": exc.details()}
                )
            else:
                self.sent += 1
                REPORTED.labels("sent").inc()

    async def _send_once(self) -> bool:
        """Send one batch; False when analytics did not take it (kept for later)."""
        batch = [self._buffer.popleft() for _ in range(min(self._batch, len(self._buffer)))]
        self._in_flight = len(batch)
        try:
            try:
                await self._record(batch)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                await self._one_by_one(batch)
                return True
        except grpc.aio.AioRpcError as exc:
            REPORTED.labels("error").inc(len(batch))
            room = self._max - len(self._buffer)
            keep = batch[len(batch) - room :] if room < len(batch) else batch
            if len(keep) < len(batch):  # newer ends arrived meanwhile: the oldest go
                self.dropped += len(batch) - len(keep)
                REPORTED.labels("dropped").inc(len(batch) - len(keep))
            self._buffer.extendleft(reversed(keep))
            log.warning(
                "task ends not reported yet", extra={"code": exc.code().name, "pending": len(self._buffer)}
            )
            return False
        finally:
            self._in_flight = 0
            BUFFERED.set(len(self._buffer))
        self.sent += len(batch)
        REPORTED.labels("sent").inc(len(batch))
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
