"""Ships every RPC's timing and the instance's stats to monitoring, in the background.

The interceptor hands each finished RPC to :meth:`MonitoringReporter.record`,
which only appends a tuple to a bounded buffer: it never waits, never does
I/O and never raises, so a slow or dead monitoring service cannot slow an RPC.
When the buffer is full the newest timing is dropped and counted
(``monitoring_reporter_dropped_total{kind="timings",reason="buffer_full"}``).

A background loop sends the buffer in batches (``RecordApiTimings``) every
``flush_interval`` seconds, one call at a time with a deadline; a batch that
fails for an outage goes back to the front of the buffer (as much of it as
fits) and is retried after a backoff, a batch monitoring refuses as invalid
is dropped and counted. Every ``stats_interval`` seconds it also sends the
instance's stats (``ReportServiceStats``): memory used (resident set) against
the memory limit (the cgroup v2 or v1 limit where there is one, else the
machine's memory), in-flight RPCs, and each named cache's hits and misses
since the previous report. :meth:`close` sends what is left, within a
deadline, on graceful shutdown.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Gauge

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc

from .clock import SYSTEM_CLOCK, Clock

__all__ = [
    "REPORTER_BUFFERED",
    "REPORTER_DROPPED",
    "REPORTER_SENT",
    "MonitoringReporter",
    "ReporterSettings",
    "default_instance",
    "memory_limit_bytes",
    "memory_used_bytes",
]

log = logging.getLogger(__name__)

REPORTER_DROPPED = Counter(
    "monitoring_reporter_dropped",
    "Timings and stats reports not delivered to monitoring, by reason (buffer_full, rejected, shutdown).",
    ["service", "kind", "reason"],
)
REPORTER_SENT = Counter(
    "monitoring_reporter_sent", "Timings and stats reports delivered to monitoring.", ["service", "kind"]
)
REPORTER_BUFFERED = Gauge("monitoring_reporter_buffered", "Timings waiting to be sent.", ["service"])

# An outage: keep the batch and retry. Anything else (INVALID_ARGUMENT, PERMISSION_DENIED,
# ...) would fail again the same way: drop it, count it, log it.
_RETRYABLE: Final = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.ABORTED,
    }
)
_UNLIMITED: Final = 1 << 60  # cgroup v1 writes ~2^63 for "no limit"
_INSTANCE_CHARS: Final = re.compile(r"[^A-Za-z0-9_.:\-]")


@dataclass(frozen=True)
class ReporterSettings:
    buffer_size: int = 10_000  # timings held while monitoring is slow or down
    batch_size: int = 500  # timings per RecordApiTimings
    flush_interval: float = 1.0  # seconds between sends
    stats_interval: float = 5.0  # seconds between ReportServiceStats
    send_timeout: float = 2.0  # deadline of one call
    retry_backoff_max: float = 10.0  # longest wait after failures in a row
    close_timeout: float = 2.0  # what a graceful shutdown gives the last sends


def default_instance() -> str:
    """``host:pid`` (the pod name in Kubernetes), in the characters monitoring accepts."""
    return _INSTANCE_CHARS.sub("-", f"{socket.gethostname()}:{os.getpid()}")[:128]


def memory_used_bytes() -> int:
    """This process's resident set size."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the peak, in KiB on Linux


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def memory_limit_bytes(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
) -> int:
    """The memory limit of this process: the tightest cgroup v2 ``memory.max`` from its
    cgroup up to the root, or the cgroup v1 ``memory.limit_in_bytes``; without any, the
    machine's physical memory."""
    limits: list[int] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2 (unified)
            current = root / path.lstrip("/")
            while True:
                limit = _read_limit(current / "memory.max")
                if limit is not None:
                    limits.append(limit)
                if current == root or root not in current.parents:
                    break
                current = current.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            for base in (root / "memory" / path.lstrip("/"), root / "memory"):
                limit = _read_limit(base / "memory.limit_in_bytes")
                if limit is not None:
                    limits.append(limit)
                    break
    if limits:
        return min(limits)
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


CacheCounts = Callable[[], Mapping[str, tuple[int, int]]]  # cache name -> (hits, misses) so far


class MonitoringReporter:
    """Batches RPC timings and periodic stats to monitoring.

    Args:
        stub: a MonitoringService stub on a channel carrying this service's token.
        service / instance: who reports (``app.name``, :func:`default_instance`).
        in_flight: the number of RPCs being answered now.
        cache_counts: each named cache's total hits and misses so far.
    """

    def __init__(
        self,
        stub: monitoring_pb2_grpc.MonitoringServiceAsyncStub,
        service: str,
        instance: str,
        *,
        in_flight: Callable[[], int] = lambda: 0,
        cache_counts: CacheCounts = dict,
        settings: ReporterSettings = ReporterSettings(),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._stub = stub
        self.service = service
        self.instance = instance
        self._in_flight = in_flight
        self._cache_counts = cache_counts
        self.settings = settings
        self._clock = clock
        self._buffer: collections.deque[tuple[str, str, float, float]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_caches: dict[str, tuple[int, int]] = {}
        self._pending_caches: dict[str, tuple[int, int]] = {}
        self._closed = False
        self._backing_off = False
        self.sent_timings = 0
        self.sent_stats = 0
        self.dropped = 0
        self._m_dropped_full = REPORTER_DROPPED.labels(service, "timings", "buffer_full")
        self._m_dropped_rejected = REPORTER_DROPPED.labels(service, "timings", "rejected")
        self._m_dropped_shutdown = REPORTER_DROPPED.labels(service, "timings", "shutdown")
        self._m_stats_dropped = REPORTER_DROPPED.labels(service, "stats", "failed")
        self._m_sent = REPORTER_SENT.labels(service, "timings")
        self._m_stats_sent = REPORTER_SENT.labels(service, "stats")
        self._m_buffered = REPORTER_BUFFERED.labels(service)

    # ------------------------------------------------------------------ the RPC path

    def record(self, method: str, code: str, duration_ms: float) -> None:
        """One finished RPC (the interceptor's timing sink). O(1); never blocks or raises."""
        if self._closed or len(self._buffer) >= self.settings.buffer_size:
            self.dropped += 1
            self._m_dropped_full.inc()
            return
        self._buffer.append((method, code, duration_ms, self._clock.time()))
        if len(self._buffer) >= self.settings.batch_size and not self._backing_off:
            self._wake.set()  # a full batch goes at once, unless monitoring is failing

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    # ------------------------------------------------------------------ background

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"monitoring-reporter:{self.service}")

    async def close(self) -> None:
        """Stop the loop, then send what is buffered and a last stats report within
        ``close_timeout``; what cannot be sent by then is dropped and counted."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._closed = True
        try:
            async with asyncio.timeout(self.settings.close_timeout):
                while self._buffer:
                    if not await self._send_batch():
                        break
                await self._send_stats()
        except TimeoutError:
            pass
        if self._buffer:
            lost = len(self._buffer)
            self._buffer.clear()
            self.dropped += lost
            self._m_dropped_shutdown.inc(lost)
            log.warning("monitoring reporter: timings lost at shutdown", extra={"timings": lost})
        self._m_buffered.set(0)

    async def _run(self) -> None:
        s = self.settings
        next_stats = self._clock.monotonic() + s.stats_interval
        failures = 0
        while True:
            delay = (
                s.flush_interval
                if failures == 0
                else min(s.flush_interval * 2**failures, s.retry_backoff_max)
            )
            await self._until_wake_or(min(delay, max(0.0, next_stats - self._clock.monotonic())))
            self._wake.clear()
            ok = True
            while self._buffer and ok:
                ok = await self._send_batch()
                if len(self._buffer) < s.batch_size:
                    break  # a partial batch waits for the next interval
            if self._clock.monotonic() >= next_stats:
                next_stats = self._clock.monotonic() + s.stats_interval
                ok = await self._send_stats() and ok
            failures = 0 if ok else failures + 1
            self._backing_off = failures > 0
            self._m_buffered.set(len(self._buffer))

    async def _until_wake_or(self, seconds: float) -> None:
        """Sleep ``seconds`` on the clock, or less if a full batch is waiting."""
        sleeper = asyncio.ensure_future(self._clock.sleep(seconds))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait((sleeper, waker), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waker.cancel()

    def _take(self) -> list[tuple[str, str, float, float]]:
        n = min(len(self._buffer), self.settings.batch_size)
        return [self._buffer.popleft() for _ in range(n)]

    def _give_back(self, batch: list[tuple[str, str, float, float]]) -> None:
        """Put a failed batch back in front, oldest first, as far as the buffer has room."""
        room = self.settings.buffer_size - len(self._buffer)
        keep = batch[-room:] if room > 0 else []
        lost = len(batch) - len(keep)
        if lost:
            self.dropped += lost
            self._m_dropped_full.inc(lost)
        self._buffer.extendleft(reversed(keep))

    async def _send_batch(self) -> bool:
        """Send one batch; False when monitoring could not be reached (the batch is kept)."""
        batch = self._take()
        if not batch:
            return True
        request = monitoring_pb2.RecordApiTimingsRequest()
        for method, code, ms, at in batch:
            timing = request.timings.add(
                service=self.service,
                endpoint=method,
                status_code=code,
                duration_ms=ms,
                instance=self.instance,
            )
            _set_timestamp(timing.observed_at, at)
        try:
            await self._stub.RecordApiTimings(request, timeout=self.settings.send_timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _RETRYABLE:
                self._give_back(batch)
                return False
            self.dropped += len(batch)
            self._m_dropped_rejected.inc(len(batch))
            log.warning(
                "monitoring refused a timings batch",
                extra={"code": exc.code().name, "error": exc.details(), "timings": len(batch)},
            )
            return True
        except asyncio.CancelledError:
            self._give_back(batch)
            raise
        except Exception as exc:  # a closed channel or the like
            self._give_back(batch)
            log.warning("monitoring reporter: send failed", extra={"error": repr(exc)})
            return False
        self.sent_timings += len(batch)
        self._m_sent.inc(len(batch))
        return True

    def stats_request(self) -> monitoring_pb2.ReportServiceStatsRequest:
        """The instance's stats now; cache counters are the change since the previous call."""
        request = monitoring_pb2.ReportServiceStatsRequest(
            service=self.service,
            instance=self.instance,
            heap_used_bytes=memory_used_bytes(),
            heap_limit_bytes=memory_limit_bytes(),
            in_flight=max(0, self._in_flight()),
        )
        _set_timestamp(request.observed_at, self._clock.time())
        totals = dict(self._cache_counts())
        for name, (hits, misses) in sorted(totals.items()):
            last_hits, last_misses = self._last_caches.get(name, (0, 0))
            request.caches.add(cache=name, hits=max(0, hits - last_hits), misses=max(0, misses - last_misses))
        self._pending_caches = totals
        return request

    async def _send_stats(self) -> bool:
        request = self.stats_request()
        try:
            await self._stub.ReportServiceStats(request, timeout=self.settings.send_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The counters stay unreported: the next report carries them.
            self._m_stats_dropped.inc()
            code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else repr(exc)
            log.debug("monitoring reporter: stats not sent", extra={"error": code})
            return not (isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRYABLE)
        self._last_caches = self._pending_caches
        self.sent_stats += 1
        self._m_stats_sent.inc()
        return True


def _set_timestamp(ts: Timestamp, seconds: float) -> None:
    ts.FromNanoseconds(int(seconds * 1_000_000) * 1000)


def cache_counts(caches: Iterable[Any]) -> dict[str, tuple[int, int]]:
    """Total hits and misses per cache name over ``caches`` (MultiLevelCache instances)."""
    out: dict[str, tuple[int, int]] = {}
    for cache in caches:
        stats = cache.stats()
        hits, misses = out.get(cache.name, (0, 0))
        out[cache.name] = (hits + int(stats["hits"]), misses + int(stats["misses"]))
    return out
