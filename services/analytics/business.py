"""The business RPCs of AnalyticsService: engagement, attribution, weekly reports, the live stream.

A mixin the wiring combines with the ingest servicer (``app.py``), so the two
halves of the service stay in their own modules.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from pydantic import Field, field_validator

from cosnap.analytics.v1 import analytics_pb2
from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.servicekit.auth import current_principal
from services.servicekit.cache import RAW_BYTES
from services.servicekit.config import ServiceSettings
from services.servicekit.errors import ServiceError
from services.servicekit.server import ServiceApp

from .attribution import AttributionReports, parse_rates
from .engagement import EngagementReports
from .live import LiveDashboard
from .preagg import Preaggregator
from .report_mail import SmtpSettings
from .reports import Leader, WeeklyReports


class BusinessSettings(ServiceSettings):
    """The business reports' variables (AnalyticsSettings extends these)."""

    analytics_business_ttl_seconds: float = Field(
        60.0, ge=0, description="Engagement and attribution report cache lifetime."
    )
    analytics_preagg_interval_seconds: float = Field(
        60.0, gt=0, description="How often the engagement / acquisition pre-aggregation runs."
    )
    analytics_preagg_min_age_seconds: float = Field(
        60.0, ge=0, description="A day is re-aggregated whole from the raw rows at most this often."
    )
    analytics_preagg_full_check_seconds: float = Field(
        3600.0,
        gt=0,
        description="How often a pre-aggregation pass compares every day's counts with the ingest's.",
    )
    analytics_runninghub_coin_rates: str = Field(
        "", description="Price of one RunningHub coin per currency: USD=0.0014,CNY=0.01"
    )
    analytics_report_recipients: str = Field("", description="Comma-separated e-mail addresses.")
    analytics_report_delay_minutes: float = Field(
        30.0, ge=0, le=24 * 60, description="How long after Monday 00:00 UTC the weekly report is made."
    )
    analytics_report_check_seconds: float = Field(
        60.0, gt=0, description="How often the schedule is checked."
    )
    analytics_smtp_host: str = Field("", description="SMTP server; empty: reports are not e-mailed.")
    analytics_smtp_port: int = Field(25, ge=1, le=65535)
    analytics_smtp_username: str = ""
    analytics_smtp_password: str = ""
    analytics_smtp_starttls: bool = False
    analytics_smtp_tls: bool = False
    analytics_smtp_sender: str = Field("reports@cosnap.local", pattern=r"^[^@\s,<>]+@[^@\s,<>]+$")
    analytics_stream_max_clients: int = Field(100, ge=1, le=100_000, description="Live streams per replica.")
    analytics_stream_heartbeat_seconds: float = Field(15.0, gt=0, le=300)

    @field_validator("analytics_runninghub_coin_rates")
    @classmethod
    def _rates(cls, value: str) -> str:
        parse_rates(value)  # raises ValueError naming the bad item
        return value

    @field_validator("analytics_report_recipients")
    @classmethod
    def _recipients(cls, value: str) -> str:
        for address in recipients(value):
            if not _EMAIL.match(address):
                raise ValueError(f"not an e-mail address: {address!r}")
        return value


_EMAIL = re.compile(r"^[^@\s,<>]+@[^@\s,<>]+\.[^@\s,<>]+$")


def recipients(text: str) -> tuple[str, ...]:
    return tuple(filter(None, (a.strip() for a in text.split(","))))


@dataclass
class Business:
    engagement: EngagementReports
    attribution: AttributionReports
    reports: WeeklyReports
    live: LiveDashboard
    preagg: Preaggregator


async def wire_business(
    app: ServiceApp,
    settings: BusinessSettings,
    monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None,
) -> Business:
    """Build the business reports and start their background work (pre-aggregation, schedule)."""
    assert app.pool is not None
    pool = app.pool
    retention = getattr(settings, "analytics_retention_days", 30)
    preagg = Preaggregator(
        pool,
        app.schema,
        retention_days=retention,
        min_age_seconds=settings.analytics_preagg_min_age_seconds,
        interval_seconds=settings.analytics_preagg_interval_seconds,
        full_check_seconds=settings.analytics_preagg_full_check_seconds,
    )
    app.run_in_background(preagg.run_forever(), "analytics-preagg")
    cache = await app.cache("business", **RAW_BYTES)
    ttl = settings.analytics_business_ttl_seconds
    smtp = SmtpSettings(
        host=settings.analytics_smtp_host,
        port=settings.analytics_smtp_port,
        sender=settings.analytics_smtp_sender,
        recipients=recipients(settings.analytics_report_recipients),
        username=settings.analytics_smtp_username,
        password=settings.analytics_smtp_password,
        starttls=settings.analytics_smtp_starttls,
        tls=settings.analytics_smtp_tls,
    )
    reports = WeeklyReports(
        pool,
        Leader(settings.database_url, app.schema, "analytics-weekly-reports"),
        monitoring,
        smtp,
        retention_days=retention,
        delay=timedelta(minutes=settings.analytics_report_delay_minutes),
        check_interval=settings.analytics_report_check_seconds,
        refresh=preagg.preflight,
    )
    app.run_in_background(reports.run_forever(), "analytics-weekly-reports")
    live = LiveDashboard(
        pool,
        monitoring,
        max_streams=settings.analytics_stream_max_clients,
        heartbeat_seconds=settings.analytics_stream_heartbeat_seconds,
    )
    app.on_shutdown(live.close)
    return Business(
        engagement=EngagementReports(pool, cache, ttl, preagg.preflight),
        attribution=AttributionReports(
            pool, cache, ttl, parse_rates(settings.analytics_runninghub_coin_rates), preagg.preflight
        ),
        reports=reports,
        live=live,
        preagg=preagg,
    )


class BusinessRpcs:
    """Set ``business`` before serving."""

    business: Business

    async def GetEngagementReport(
        self, request: analytics_pb2.GetEngagementReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.GetEngagementReportResponse:
        return await self.business.engagement.report(request)

    async def GetUserEngagement(
        self, request: analytics_pb2.GetUserEngagementRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.GetUserEngagementResponse:
        principal = current_principal.get()
        if principal is None or not (principal.is_admin or principal.subject == request.user_id):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "a user may read only their own score")
        return await self.business.engagement.user(request)

    async def GetRevenueAttribution(
        self, request: analytics_pb2.GetRevenueAttributionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.GetRevenueAttributionResponse:
        return await self.business.attribution.get(request)

    async def ListWeeklyReports(
        self, request: analytics_pb2.ListWeeklyReportsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.ListWeeklyReportsResponse:
        return await self.business.reports.list(request)

    async def GetWeeklyReport(
        self, request: analytics_pb2.GetWeeklyReportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> analytics_pb2.GetWeeklyReportResponse:
        return await self.business.reports.get(request)

    async def StreamPerformanceDashboard(
        self,
        request: analytics_pb2.StreamPerformanceDashboardRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[analytics_pb2.StreamPerformanceDashboardResponse]:
        async for message in self.business.live.stream(request, context):
            yield message
