"""The MonitoringService servicer: validation and storage live in the domain
modules; this maps RPCs onto them.

A service reports only for itself: the `service` of RecordApiTimings' timings
and of ReportServiceStats must be the calling service token's subject (the
name the service mints its token with), else PERMISSION_DENIED naming the
field, so one compromised or misconfigured service cannot pose as another.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import grpc

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.servicekit.auth import current_principal
from services.servicekit.clock import Clock
from services.servicekit.errors import ServiceError

from .alerts import AlertBook, validate_client_alerts
from .health import SystemHealth
from .stats import StatsStore, validate_stats
from .summary import ServiceSummary
from .timings import TimingStore, validate_timings


def check_reporter(names: Iterable[tuple[str, str]]) -> None:
    """PERMISSION_DENIED unless every (field, service name) is the calling service's own."""
    principal = current_principal.get()
    caller = principal.subject if principal is not None and principal.is_service else None
    for field, name in names:
        if name != caller:
            raise ServiceError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{field}: a service reports only for itself ({name!r} is not the caller {caller!r})",
            )


class MonitoringServicer(monitoring_pb2_grpc.MonitoringServiceServicer):
    def __init__(
        self,
        clock: Clock,
        timings: TimingStore,
        stats: StatsStore,
        summary: ServiceSummary,
        alerts: AlertBook,
        health: SystemHealth,
        *,
        max_timings: int,
        max_client_alerts: int,
        retention: timedelta,
    ) -> None:
        self._clock = clock
        self._timings = timings
        self._stats = stats
        self._summary = summary
        self._alerts = alerts
        self._health = health
        self._max_timings = max_timings
        self._max_client_alerts = max_client_alerts
        self._retention = retention

    async def ReportPerformanceAlerts(
        self,
        request: monitoring_pb2.ReportPerformanceAlertsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> monitoring_pb2.ReportPerformanceAlertsResponse:
        alerts = validate_client_alerts(request, self._max_client_alerts)
        accepted, duplicates = await self._alerts.report(alerts, self._clock.now())
        return monitoring_pb2.ReportPerformanceAlertsResponse(accepted=accepted, duplicates=duplicates)

    async def ListPerformanceAlerts(
        self,
        request: monitoring_pb2.ListPerformanceAlertsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> monitoring_pb2.ListPerformanceAlertsResponse:
        return await self._alerts.list(request)

    async def ResolvePerformanceAlert(
        self,
        request: monitoring_pb2.ResolvePerformanceAlertRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> monitoring_pb2.ResolvePerformanceAlertResponse:
        return await self._alerts.resolve(request, self._clock.now())

    async def GetSystemHealth(
        self, request: monitoring_pb2.GetSystemHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> monitoring_pb2.GetSystemHealthResponse:
        return await self._health.get()

    async def RecordApiTimings(
        self, request: monitoring_pb2.RecordApiTimingsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> monitoring_pb2.RecordApiTimingsResponse:
        rows = validate_timings(
            request, self._clock.now(), max_items=self._max_timings, retention=self._retention
        )
        check_reporter((f"timings[{i}].service", t.service) for i, t in enumerate(request.timings))
        return monitoring_pb2.RecordApiTimingsResponse(accepted=await self._timings.store(rows))

    async def ReportServiceStats(
        self, request: monitoring_pb2.ReportServiceStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> monitoring_pb2.ReportServiceStatsResponse:
        observed = validate_stats(request, self._clock.now(), self._retention)
        check_reporter([("service", request.service)])
        await self._stats.store(request, observed)
        return monitoring_pb2.ReportServiceStatsResponse()

    async def GetServiceSummary(
        self, request: monitoring_pb2.GetServiceSummaryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> monitoring_pb2.GetServiceSummaryResponse:
        return await self._summary.get(request, self._clock.now())
