"""The MonitoringService servicer: validation and storage live in the domain
modules; this maps RPCs onto them."""

from __future__ import annotations

from datetime import timedelta

import grpc

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc

from .clock import Clock
from .stats import StatsStore, validate_stats
from .summary import ServiceSummary
from .timings import TimingStore, validate_timings


class MonitoringServicer(monitoring_pb2_grpc.MonitoringServiceServicer):
    def __init__(
        self,
        clock: Clock,
        timings: TimingStore,
        stats: StatsStore,
        summary: ServiceSummary,
        *,
        max_timings: int,
        retention: timedelta,
    ) -> None:
        self._clock = clock
        self._timings = timings
        self._stats = stats
        self._summary = summary
        self._max_timings = max_timings
        self._retention = retention

    async def RecordApiTimings(
        self, request: monitoring_pb2.RecordApiTimingsRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.RecordApiTimingsResponse:
        rows = validate_timings(
            request, self._clock.now(), max_items=self._max_timings, retention=self._retention
        )
        return monitoring_pb2.RecordApiTimingsResponse(accepted=await self._timings.store(rows))

    async def ReportServiceStats(
        self, request: monitoring_pb2.ReportServiceStatsRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.ReportServiceStatsResponse:
        observed = validate_stats(request, self._clock.now(), self._retention)
        await self._stats.store(request, observed)
        return monitoring_pb2.ReportServiceStatsResponse()

    async def GetServiceSummary(
        self, request: monitoring_pb2.GetServiceSummaryRequest, context: grpc.aio.ServicerContext
    ) -> monitoring_pb2.GetServiceSummaryResponse:
        return await self._summary.get(request, self._clock.now())
