"""The AnalyticsService servicer: validate, hand rows to the group committer, reply after COMMIT."""

from __future__ import annotations

import time
from typing import Any

import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc

from .dashboard import Dashboard
from .funnel import FunnelReports
from .ingest import GroupCommitter, Kind
from .validation import Limits, validate_events, validate_metrics, validate_steps


class AnalyticsServicer(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(
        self,
        committer: GroupCommitter,
        dashboard: Dashboard,
        funnels: FunnelReports,
        limits: Limits,
    ) -> None:
        self._committer = committer
        self._dashboard = dashboard
        self._funnels = funnels
        self._limits = limits

    async def RecordEvents(
        self, request: analytics_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.RecordEventsResponse:
        rows = validate_events(request, time.time(), self._limits)
        accepted, duplicates = await self._committer.submit(Kind.EVENTS, rows)
        return analytics_pb2.RecordEventsResponse(accepted=accepted, duplicates=duplicates)

    async def RecordPerformanceMetrics(
        self,
        request: analytics_pb2.RecordPerformanceMetricsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> analytics_pb2.RecordPerformanceMetricsResponse:
        rows = validate_metrics(request, time.time(), self._limits)
        accepted, duplicates = await self._committer.submit(Kind.METRICS, rows)
        return analytics_pb2.RecordPerformanceMetricsResponse(accepted=accepted, duplicates=duplicates)

    async def RecordFunnelSteps(
        self, request: analytics_pb2.RecordFunnelStepsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.RecordFunnelStepsResponse:
        rows = validate_steps(request, time.time(), self._limits)
        accepted, duplicates = await self._committer.submit(Kind.STEPS, rows)
        return analytics_pb2.RecordFunnelStepsResponse(accepted=accepted, duplicates=duplicates)

    async def GetFunnelReport(
        self, request: analytics_pb2.GetFunnelReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.GetFunnelReportResponse:
        return await self._funnels.get(request)

    async def GetPerformanceDashboard(
        self,
        request: analytics_pb2.GetPerformanceDashboardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> analytics_pb2.GetPerformanceDashboardResponse:
        return await self._dashboard.get(request)
