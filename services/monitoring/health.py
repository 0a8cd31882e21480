"""System health (GetSystemHealth): every service's gRPC health, PostgreSQL
and Redis round trips, and RunningHub per region as the effects service sees
it, checked in parallel, each within a timeout.

The rule (documented in the README):

* a service is healthy when its gRPC health answers SERVING within the
  timeout, unhealthy otherwise (NOT_SERVING, unreachable, timed out);
  PostgreSQL is healthy or unhealthy; Redis is healthy or degraded (the
  caches serve from their in-process level without it); a RunningHub region
  is what effects reports, and at worst degraded for the whole (the rest of
  the product works without it); any healthy check slower than
  `slow_ms` counts as degraded;
* overall: unhealthy when PostgreSQL or any service is unhealthy, else
  degraded when any component is not healthy, else healthy.

The answer is cached for `ttl_seconds` and computed once for all callers
waiting on it (single-flight), so the public endpoint cannot be used to
hammer the dependencies. Details are fixed words (SERVING, timeout,
unreachable, ...): never an address, a secret or an exception's text.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import grpc
from grpc_health.v1 import health_pb2

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.clock import Clock
from services.servicekit.redis_client import RedisClient

log = logging.getLogger(__name__)

HEALTHY, DEGRADED, UNHEALTHY = "healthy", "degraded", "unhealthy"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    latency_ms: float
    detail: str = ""


def parse_targets(text: str) -> dict[str, str]:
    """`analytics=host:port,effects=host:port` → {name: address}."""
    out: dict[str, str] = {}
    for item in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, address = item.partition("=")
        if not sep or not name.strip() or ":" not in address:
            raise ValueError(f"health target {item!r}: name=host:port")
        out[name.strip()] = address.strip()
    return out


def overall(checks: list[Check], critical: set[str]) -> str:
    if any(c.status == UNHEALTHY and c.name in critical for c in checks):
        return UNHEALTHY
    if any(c.status != HEALTHY for c in checks):
        return DEGRADED
    return HEALTHY


async def _timed(
    name: str, probe: Callable[[], Awaitable[Check | list[Check] | None]], timeout: float, bad: str
) -> Check | list[Check] | None:
    started = time.perf_counter()
    try:
        return await asyncio.wait_for(probe(), timeout)
    except TimeoutError:
        return Check(name, bad, (time.perf_counter() - started) * 1000, "timeout")
    except Exception:
        return Check(name, bad, (time.perf_counter() - started) * 1000, "unreachable")


class SystemHealth:
    def __init__(
        self,
        *,
        self_name: str,
        targets: Mapping[str, str],
        pool: asyncpg.Pool,
        redis: RedisClient,
        clock: Clock,
        started_at: datetime,
        timeout_seconds: float = 1.0,
        slow_ms: float = 500.0,
        ttl_seconds: float = 1.5,
        metadata: Callable[[], list[tuple[str, str]]] = list,
    ) -> None:
        self._self = self_name
        self._targets = dict(targets)
        self._pool = pool
        self._redis = redis
        self._clock = clock
        self._started_at = started_at
        self._timeout = timeout_seconds
        self._slow_ms = slow_ms
        self._ttl = ttl_seconds
        self._metadata = metadata
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._cached: tuple[float, monitoring_pb2.GetSystemHealthResponse] | None = None
        self._inflight: asyncio.Future[monitoring_pb2.GetSystemHealthResponse] | None = None
        self.computations = 0

    async def get(self) -> monitoring_pb2.GetSystemHealthResponse:
        cached = self._cached
        if cached is not None and self._clock.monotonic() - cached[0] < self._ttl:
            return cached[1]
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._compute())
            self._inflight.add_done_callback(self._done)
        return await asyncio.shield(self._inflight)

    def _done(self, future: asyncio.Future[monitoring_pb2.GetSystemHealthResponse]) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception() is None:
            self._cached = (self._clock.monotonic(), future.result())

    async def _compute(self) -> monitoring_pb2.GetSystemHealthResponse:
        self.computations += 1
        probes: list[Awaitable[Check | list[Check] | None]] = [
            _timed("postgres", self._postgres, self._timeout, UNHEALTHY),
            _timed("redis", self._redis_ping, self._timeout, DEGRADED),
        ]
        for name, address in self._targets.items():
            probes.append(
                _timed(name, functools.partial(self._service, name, address), self._timeout, UNHEALTHY)
            )
        if "effects" in self._targets:
            probes.append(_timed("runninghub", self._runninghub, self._timeout, DEGRADED))
        checks: list[Check] = [Check(self._self, HEALTHY, 0.0, "SERVING")]
        for item in await asyncio.gather(*probes):
            if isinstance(item, list):
                checks.extend(item)
            elif item is not None:
                checks.append(item)
        checks = [
            Check(c.name, DEGRADED, c.latency_ms, "slow")
            if c.status == HEALTHY and c.latency_ms > self._slow_ms
            else c
            for c in checks
        ]
        critical = {"postgres", self._self, *self._targets}
        response = monitoring_pb2.GetSystemHealthResponse(status=overall(checks, critical))
        for c in checks:
            response.components.add(
                name=c.name, status=c.status, latency_ms=round(c.latency_ms, 3), detail=c.detail
            )
        now = self._clock.now()
        response.checked_at.FromDatetime(now)
        response.uptime.FromTimedelta(max(now - self._started_at, timedelta(0)))
        return response

    async def _postgres(self) -> Check:
        started = time.perf_counter()
        async with self._pool.acquire(timeout=self._timeout) as conn:
            await conn.fetchval("SELECT 1", timeout=self._timeout)
        return Check("postgres", HEALTHY, (time.perf_counter() - started) * 1000, "ok")

    async def _redis_ping(self) -> Check:
        started = time.perf_counter()
        await self._redis.ping()
        return Check("redis", HEALTHY, (time.perf_counter() - started) * 1000, "ok")

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = grpc.aio.insecure_channel(address)
        return channel

    async def _service(self, name: str, address: str) -> Check:
        started = time.perf_counter()
        check = self._channel(address).unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=self._timeout)
        except grpc.aio.AioRpcError as exc:
            detail = "timeout" if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED else "unreachable"
            return Check(name, UNHEALTHY, (time.perf_counter() - started) * 1000, detail)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return Check(
            name, HEALTHY if serving else UNHEALTHY, (time.perf_counter() - started) * 1000, status_name
        )

    async def _runninghub(self) -> list[Check]:
        """RunningHub per region, as effects sees it (its GetRunningHubHealth RPC)."""
        stub = effects_pb2_grpc.EffectsServiceStub(self._channel(self._targets["effects"]))
        started = time.perf_counter()
        try:
            reply = await stub.GetRunningHubHealth(
                effects_pb2.GetRunningHubHealthRequest(), timeout=self._timeout, metadata=self._metadata()
            )
        except grpc.aio.AioRpcError:
            return [
                Check("runninghub", DEGRADED, (time.perf_counter() - started) * 1000, "effects unreachable")
            ]
        out = []
        for region in reply.regions:
            name = f"runninghub-{region.region}"
            if not region.region.isalnum() or len(name) > 40:
                continue
            status = region.status.lower()
            known = status in (HEALTHY, DEGRADED, UNHEALTHY)
            detail = (region.detail or status)[:100] if known else "unknown"
            out.append(Check(name, status if known else DEGRADED, region.latency_ms, detail))
        return out

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
