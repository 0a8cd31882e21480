"""The business RPCs of AnalyticsService: engagement, attribution, weekly reports, the live stream.

A mixin the wiring combines with the ingest servicer (``app.py``), so the two
halves of the service stay in their own modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from cosnap.analytics.v1 import analytics_pb2
from services.servicekit.auth import current_principal
from services.servicekit.errors import ServiceError

from .attribution import AttributionReports
from .engagement import EngagementReports


@dataclass
class Business:
    engagement: EngagementReports
    attribution: AttributionReports


class BusinessRpcs:
    """Set ``business`` before serving."""

    business: Business

    async def GetEngagementReport(
        self, request: analytics_pb2.GetEngagementReportRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetEngagementReportResponse:
        return await self.business.engagement.report(request)

    async def GetUserEngagement(
        self, request: analytics_pb2.GetUserEngagementRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetUserEngagementResponse:
        principal = current_principal.get()
        if principal is None or not (principal.is_admin or principal.subject == request.user_id):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "a user may read only their own score")
        return await self.business.engagement.user(request)

    async def GetRevenueAttribution(
        self, request: analytics_pb2.GetRevenueAttributionRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.GetRevenueAttributionResponse:
        return await self.business.attribution.get(request)
