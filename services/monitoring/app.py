"""monitoring: API timings, alert rules, client alerts and system health. Wiring only."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from pydantic import Field

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.config import ServiceSettings
from services.servicekit.partitions import DailyPartitions
from services.servicekit.server import ServiceApp

from .clock import Clock, SystemClock
from .servicer import MonitoringServicer
from .stats import StatsStore
from .summary import ServiceSummary
from .timings import TimingStore

NAME = "monitoring"
MIGRATIONS = Path(__file__).parent / "migrations"

SERVICE = monitoring_pb2.DESCRIPTOR.services_by_name["MonitoringService"]
ACCESS = {
    "ReportPerformanceAlerts": Access.PUBLIC,
    "ListPerformanceAlerts": Access.ADMIN,
    "ResolvePerformanceAlert": Access.ADMIN,
    "GetSystemHealth": Access.PUBLIC,
    "RecordApiTimings": Access.INTERNAL,
    "ReportServiceStats": Access.INTERNAL,
    "GetServiceSummary": Access.INTERNAL,
}
# Tables whose rows older than MONITORING_ROLLUP_RETENTION_DAYS are deleted.
AGED_TABLES = (
    ("api_rollup_minute", "bucket_start"),
    ("instance_stats_minute", "bucket_start"),
    ("cache_rollup_minute", "bucket_start"),
    ("client_alert_keys", "received_at"),
)


class MonitoringSettings(ServiceSettings):
    grpc_port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)
    monitoring_raw_retention_days: int = Field(7, ge=1, le=365, description="Raw API timings kept.")
    monitoring_rollup_retention_days: int = Field(
        30, ge=1, le=3650, description="Per-minute rollups and client alert ids kept."
    )
    monitoring_partition_days_ahead: int = Field(2, ge=1, le=60, description="Daily partitions made ahead.")
    monitoring_partition_interval_seconds: float = Field(3600.0, gt=0)
    monitoring_max_timings: int = Field(5000, ge=1, le=100_000, description="Timings per RecordApiTimings.")


SETTINGS = MonitoringSettings


@dataclass
class Monitoring:
    """The running pieces of one monitoring app (for tests and the benchmark)."""

    clock: Clock
    maintainer: DailyPartitions
    timings: TimingStore
    stats: StatsStore
    summary: ServiceSummary
    servicer: MonitoringServicer


_STATE: weakref.WeakKeyDictionary[ServiceApp, Monitoring] = weakref.WeakKeyDictionary()


def state(app: ServiceApp) -> Monitoring:
    return _STATE[app]


async def wire(app: ServiceApp, clock: Clock | None = None) -> None:
    settings = app.settings
    assert isinstance(settings, MonitoringSettings)
    assert app.pool is not None, "connect() first"
    pool = app.pool
    clock = clock or SystemClock()

    maintainer = DailyPartitions(
        pool,
        app.schema,
        parents=("api_timings",),
        aged_tables=AGED_TABLES,
        lock_name="monitoring-partitions",
        retention_days=settings.monitoring_raw_retention_days,
        aged_retention_days=settings.monitoring_rollup_retention_days,
        days_ahead=settings.monitoring_partition_days_ahead,
        interval_seconds=settings.monitoring_partition_interval_seconds,
    )
    await maintainer.run_once()  # partitions must exist before rows arrive
    app.run_in_background(maintainer.run_forever(), "monitoring-partitions")

    raw_retention = timedelta(days=settings.monitoring_raw_retention_days)
    timings = TimingStore(pool, maintainer.ensure)
    stats = StatsStore(pool)
    summary = ServiceSummary(pool, timedelta(days=settings.monitoring_rollup_retention_days))
    servicer = MonitoringServicer(
        clock, timings, stats, summary, max_timings=settings.monitoring_max_timings, retention=raw_retention
    )
    app.add_service(SERVICE, servicer, monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server, ACCESS)
    _STATE[app] = Monitoring(clock, maintainer, timings, stats, summary, servicer)
