"""RunningHub's health per region, for monitoring's system health: the circuit
state and a probe (accountStatus) at most every `probe_interval` seconds."""

from __future__ import annotations

import asyncio
import time

from google.protobuf import timestamp_pb2

from cosnap.effects.v1 import effects_pb2

from .runninghub import BusinessError, Regions, RunningHubClient, UpstreamError


class RunningHubHealthProbe:
    def __init__(self, regions: Regions, probe_interval: float = 10.0) -> None:
        self._regions = regions
        self._interval = probe_interval
        self._last: dict[str, tuple[float, effects_pb2.RunningHubHealth]] = {}
        self._locks = {name: asyncio.Lock() for name in regions.clients}

    async def _probe(self, name: str, client: RunningHubClient) -> effects_pb2.RunningHubHealth:
        reply = effects_pb2.RunningHubHealth(region=name, circuit=client.circuit)
        if not client.configured:
            reply.status, reply.detail = "unhealthy", "no API key configured"
            return reply
        if client.circuit == "open":
            reply.status, reply.detail = "unhealthy", "circuit open after repeated failures"
            return reply
        started = time.perf_counter()
        try:
            await client.account_status()
            reply.status = "healthy" if client.circuit == "closed" else "degraded"
        except UpstreamError as exc:
            reply.status, reply.detail = "unhealthy", exc.outcome
        except BusinessError as exc:
            reply.status, reply.detail = "unhealthy", f"code {exc.code}"
        reply.latency_ms = (time.perf_counter() - started) * 1000
        reply.circuit = client.circuit
        return reply

    async def region(self, name: str) -> effects_pb2.RunningHubHealth:
        async with self._locks[name]:
            cached = self._last.get(name)
            if cached is not None and time.monotonic() - cached[0] < self._interval:
                return cached[1]
            reply = await self._probe(name, self._regions[name])
            self._last[name] = (time.monotonic(), reply)
            return reply

    async def check(self) -> effects_pb2.GetRunningHubHealthResponse:
        replies = await asyncio.gather(*(self.region(name) for name in self._regions.clients))
        now = timestamp_pb2.Timestamp()
        now.GetCurrentTime()
        return effects_pb2.GetRunningHubHealthResponse(regions=replies, checked_at=now)
