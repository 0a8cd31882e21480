"""RecordApiTimings: every service's RPC timings, validated, stored raw (binary
COPY into the day's partition) and added to the per-minute rollups, in one
transaction per batch.

A batch is all-or-nothing: one invalid timing and nothing is stored (the
reply names every bad field). Rollup rows are upserted in key order, so two
batches touching the same minutes never deadlock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg
import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.errors import FieldViolations, unavailable

from . import histogram

log = logging.getLogger(__name__)

SERVICE_NAME: Final = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
ENDPOINT: Final = re.compile(r"^/[A-Za-z_][A-Za-z0-9_.]{0,150}/[A-Za-z_][A-Za-z0-9_]{0,100}$")
INSTANCE: Final = re.compile(r"^[A-Za-z0-9_.:\-]{0,128}$")
STATUS_CODES: Final = frozenset(code.name for code in grpc.StatusCode)
# Codes that count as the server's failure in error rates; the caller's
# mistakes (INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED, ...) and rate
# limiting (RESOURCE_EXHAUSTED) do not.
SERVER_ERRORS: Final = frozenset(
    {"UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS", "UNIMPLEMENTED"}
)
MAX_DURATION_MS: Final = 86_400_000.0
FUTURE_SLACK: Final = timedelta(minutes=5)
MINUTE: Final = timedelta(minutes=1)
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799  # what Timestamp.ToDatetime accepts

_ROLLUP_SQL = """
INSERT INTO api_rollup_minute AS r (bucket_start, service, endpoint, requests, errors, sum_ms, max_ms, buckets)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
ON CONFLICT (bucket_start, service, endpoint) DO UPDATE SET
    requests = r.requests + excluded.requests,
    errors = r.errors + excluded.errors,
    sum_ms = r.sum_ms + excluded.sum_ms,
    max_ms = greatest(r.max_ms, excluded.max_ms),
    buckets = (SELECT array_agg(a + b ORDER BY i)
               FROM unnest(r.buckets, excluded.buckets) WITH ORDINALITY AS t(a, b, i))
"""
_COLUMNS: Final = ("service", "endpoint", "status_code", "duration_ms", "instance", "observed_at")


def floor_minute(moment: datetime) -> datetime:
    return moment.replace(second=0, microsecond=0)


def timestamp_or(ts: Timestamp, field: str, default: datetime, bad: FieldViolations) -> datetime | None:
    """A set Timestamp as a datetime (None after recording a violation), or `default` when unset."""
    if ts.seconds == 0 and ts.nanos == 0:
        return default
    if not (_MIN_SECONDS <= ts.seconds <= _MAX_SECONDS) or not (0 <= ts.nanos < 1_000_000_000):
        bad.add(field, "not a valid timestamp")
        return None
    return ts.ToDatetime(tzinfo=default.tzinfo)


def check_time(
    moment: datetime | None, field: str, now: datetime, oldest: datetime, bad: FieldViolations
) -> bool:
    if moment is None:
        return False
    if moment > now + FUTURE_SLACK:
        bad.add(field, "more than 5 minutes in the future")
        return False
    if moment < oldest:
        bad.add(field, "older than the retention")
        return False
    return True


@dataclass
class Rollup:
    requests: int = 0
    errors: int = 0
    sum_ms: float = 0.0
    max_ms: float = 0.0
    buckets: list[int] | None = None

    def add(self, duration_ms: float, error: bool) -> None:
        if self.buckets is None:
            self.buckets = [0] * histogram.BUCKETS
        self.requests += 1
        self.errors += error
        self.sum_ms += duration_ms
        self.max_ms = max(self.max_ms, duration_ms)
        self.buckets[histogram.bucket_of(duration_ms)] += 1


def validate_timings(
    request: monitoring_pb2.RecordApiTimingsRequest,
    now: datetime,
    *,
    max_items: int,
    retention: timedelta,
) -> list[tuple[Any, ...]]:
    """The rows to COPY (in `_COLUMNS` order), or INVALID_ARGUMENT naming every bad field."""
    bad = FieldViolations()
    if len(request.timings) > max_items:
        bad.add("timings", f"at most {max_items} timings per request")
        bad.raise_if_any("invalid timings")
    oldest = now - retention
    rows: list[tuple[Any, ...]] = []
    for i, t in enumerate(request.timings):
        where = f"timings[{i}]"
        ok = True
        if not SERVICE_NAME.match(t.service):
            bad.add(f"{where}.service", "a lowercase service name of at most 63 characters")
            ok = False
        if not ENDPOINT.match(t.endpoint):
            bad.add(f"{where}.endpoint", "a gRPC method path like /pkg.Service/Method")
            ok = False
        if t.status_code not in STATUS_CODES:
            bad.add(f"{where}.statusCode", "a gRPC status code name like OK")
            ok = False
        if not (math.isfinite(t.duration_ms) and 0.0 <= t.duration_ms <= MAX_DURATION_MS):
            bad.add(f"{where}.durationMs", "a finite duration between 0 and 86400000 ms")
            ok = False
        if not INSTANCE.match(t.instance):
            bad.add(f"{where}.instance", "at most 128 characters of letters, digits and . _ : -")
            ok = False
        observed = timestamp_or(t.observed_at, f"{where}.observedAt", now, bad)
        ok = check_time(observed, f"{where}.observedAt", now, oldest, bad) and ok
        if ok:
            rows.append((t.service, t.endpoint, t.status_code, t.duration_ms, t.instance, observed))
    bad.raise_if_any("invalid timings")
    return rows


def rollups(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Per (minute, service, endpoint) rollup rows, in key order."""
    acc: dict[tuple[datetime, str, str], Rollup] = {}
    for service, endpoint, code, duration, _instance, observed in rows:
        key = (floor_minute(observed), service, endpoint)
        rollup = acc.get(key)
        if rollup is None:
            rollup = acc[key] = Rollup()
        rollup.add(duration, code in SERVER_ERRORS)
    return [(*key, r.requests, r.errors, r.sum_ms, r.max_ms, r.buckets) for key, r in sorted(acc.items())]


class TimingStore:
    """Stores validated batches, group-committed: batches arriving while a
    write is under way go together in the next one (one COPY, one rollup
    upsert with the minutes merged in Python), so concurrent reporters never
    queue on the same rollup rows' locks. A request is answered after COMMIT;
    a failed write answers UNAVAILABLE to every request in it and leaves
    nothing behind. `ensure_partitions` is called once when a row has no
    partition yet (a clock crossing midnight before maintenance ran)."""

    def __init__(
        self, pool: asyncpg.Pool, ensure_partitions: Callable[[], Awaitable[Any]], max_rows: int = 20_000
    ) -> None:
        self._pool = pool
        self._ensure = ensure_partitions
        self._max_rows = max_rows
        self._queue: list[tuple[list[tuple[Any, ...]], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0

    async def store(self, rows: list[tuple[Any, ...]]) -> int:
        if not rows:
            return 0
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((rows, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_all())
        return await asyncio.shield(future)

    async def _flush_all(self) -> None:
        while self._queue:
            taken, size = 0, 0
            while taken < len(self._queue) and (
                taken == 0 or size + len(self._queue[taken][0]) <= self._max_rows
            ):
                size += len(self._queue[taken][0])
                taken += 1
            batch, self._queue = self._queue[:taken], self._queue[taken:]
            rows = [row for part, _ in batch for row in part]
            try:
                await self._write_once(rows)
            except Exception as exc:
                log.error("timings not stored", extra={"rows": len(rows), "error": repr(exc)})
                for _, future in batch:
                    if not future.done():
                        future.set_exception(unavailable("timings not stored, retry"))
                continue
            for part, future in batch:
                if not future.done():
                    future.set_result(len(part))

    async def _write_once(self, rows: list[tuple[Any, ...]]) -> None:
        self.flushes += 1
        summary = rollups(rows)
        try:
            await self._write(rows, summary)
        except asyncpg.CheckViolationError:  # "no partition of relation ... found for row"
            await self._ensure()
            await self._write(rows, summary)

    async def _write(self, rows: list[tuple[Any, ...]], summary: list[tuple[Any, ...]]) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.copy_records_to_table("api_timings", records=rows, columns=_COLUMNS)
            await conn.executemany(_ROLLUP_SQL, summary)

    async def close(self) -> None:
        """Finish what is queued (graceful shutdown)."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
