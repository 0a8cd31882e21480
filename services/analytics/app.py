"""analytics: durable batched ingestion of frontend events, metrics and funnel
steps, and the admin reports built on them. Wiring only; the domain lives beside it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import Field

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.cache import RAW_BYTES
from services.servicekit.server import ServiceApp

from .business import Business, BusinessRpcs, BusinessSettings, wire_business
from .dashboard import Dashboard
from .funnel import FunnelReports
from .ingest import GroupCommitter
from .partitions import PartitionMaintainer
from .servicer import AnalyticsServicer
from .validation import Limits

NAME = "analytics"
MIGRATIONS = Path(__file__).parent / "migrations"

SERVICE = analytics_pb2.DESCRIPTOR.services_by_name["AnalyticsService"]
ACCESS = {
    "RecordEvents": Access.PUBLIC,
    "RecordPerformanceMetrics": Access.PUBLIC,
    "RecordFunnelSteps": Access.PUBLIC,
    "GetFunnelReport": Access.ADMIN,
    "GetPerformanceDashboard": Access.ADMIN,
    "RecordRevenue": Access.ADMIN_OR_SERVICE,  # the payment side, never a browser (issue 11)
    "RecordTaskEnds": Access.INTERNAL,  # service token only: server facts from effects
    "GetEngagementReport": Access.ADMIN,
    "GetUserEngagement": Access.USER,  # the servicer lets a user read only their own
    "GetRevenueAttribution": Access.ADMIN,
    "ListWeeklyReports": Access.ADMIN,
    "GetWeeklyReport": Access.ADMIN,
    "StreamPerformanceDashboard": Access.ADMIN,
}


class AnalyticsSettings(BusinessSettings):
    grpc_port: int = Field(50051, ge=0, le=65535)
    metrics_port: int = Field(9101, ge=0, le=65535)
    analytics_retention_days: int = Field(30, ge=1, le=3650, description="Raw data and rollups kept.")
    analytics_partition_days_ahead: int = Field(3, ge=1, le=60, description="Daily partitions made ahead.")
    analytics_partition_interval_seconds: float = Field(
        3600.0, gt=0, description="How often partition maintenance runs."
    )
    analytics_max_batch_items: int = Field(500, ge=1, le=10_000, description="Items per ingest request.")
    analytics_flush_max_rows: int = Field(5000, ge=1, le=100_000, description="Rows per group commit.")
    analytics_max_pending_rows: int = Field(
        50_000,
        ge=1,
        le=10_000_000,
        description="Rows queued or being written at most; beyond, ingest answers RESOURCE_EXHAUSTED (429).",
    )
    analytics_flush_interval_ms: float = Field(
        0.0, ge=0, le=10_000, description="Extra wait for more rows before a flush; 0 flushes at once."
    )
    analytics_flush_concurrency: int = Field(
        2, ge=1, le=8, description="Flushes at once (each on its own connection) under a backlog."
    )
    analytics_dashboard_ttl_seconds: float = Field(10.0, ge=0, description="Dashboard cache lifetime.")
    analytics_funnel_ttl_seconds: float = Field(60.0, ge=0, description="Funnel report cache lifetime.")


SETTINGS = AnalyticsSettings


class Servicer(BusinessRpcs, AnalyticsServicer):
    """Ingest and reports (``servicer.py``) with the business RPCs (``business.py``)."""


@dataclass
class Analytics:
    """The running pieces of one analytics app (for tests and the benchmark)."""

    committer: GroupCommitter
    maintainer: PartitionMaintainer
    dashboard: Dashboard
    funnels: FunnelReports
    servicer: AnalyticsServicer
    business: Business


_STATE: weakref.WeakKeyDictionary[ServiceApp, Analytics] = weakref.WeakKeyDictionary()


def state(app: ServiceApp) -> Analytics:
    return _STATE[app]


async def wire(app: ServiceApp) -> None:
    settings = app.settings
    assert isinstance(settings, AnalyticsSettings)
    assert app.pool is not None, "connect() first"
    pool = app.pool

    maintainer = PartitionMaintainer(
        pool,
        app.schema,
        retention_days=settings.analytics_retention_days,
        days_ahead=settings.analytics_partition_days_ahead,
        interval_seconds=settings.analytics_partition_interval_seconds,
    )
    await maintainer.run_once()  # partitions must exist before rows arrive
    app.run_in_background(maintainer.run_forever(), "analytics-partitions")

    committer = GroupCommitter(
        pool,
        max_rows=settings.analytics_flush_max_rows,
        max_pending_rows=settings.analytics_max_pending_rows,
        flush_interval_ms=settings.analytics_flush_interval_ms,
        concurrency=settings.analytics_flush_concurrency,
        ensure_partitions=maintainer.ensure,
    )
    await committer.start()
    # Runs after the server stopped taking RPCs: what is queued is committed.
    app.on_shutdown(committer.close)

    monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None = None
    if settings.monitoring_addr:
        monitoring = monitoring_pb2_grpc.MonitoringServiceStub(app.service_channel(settings.monitoring_addr))

    dashboard = Dashboard(
        pool,
        await app.cache("dashboard", **RAW_BYTES),
        monitoring,
        settings.analytics_dashboard_ttl_seconds,
        clock=app.clock,
    )
    business = await wire_business(app, settings, monitoring)

    async def refresh_walks(since: datetime, until: datetime) -> object:
        # Every changed day of the report's range, however recently it was pre-aggregated:
        # a computed report (a cache miss) counts every step committed before it.
        # The days behind are compared with the ingest's counts by the pass (recomputed
        # whole if their steps came without change rows).
        behind = await business.preagg.steps_behind(since, until)
        if not behind:
            return None
        return await business.preagg.run_once(min_age_seconds=0, check_days=behind)

    funnels = FunnelReports(
        pool, await app.cache("funnel", **RAW_BYTES), settings.analytics_funnel_ttl_seconds, refresh_walks
    )
    servicer = Servicer(
        committer,
        dashboard,
        funnels,
        Limits(
            max_items=settings.analytics_max_batch_items, retention_days=settings.analytics_retention_days
        ),
    )
    servicer.business = business
    # The live stream is served pre-serialized: one encoding per snapshot for every stream.
    app.add_service(
        SERVICE,
        servicer,
        analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server,
        ACCESS,
        serialized={"StreamPerformanceDashboard": business.live.stream_serialized},
    )
    _STATE[app] = Analytics(committer, maintainer, dashboard, funnels, servicer, business)
