"""monitoring: API timings, alert rules, client alerts and system health. Wiring only."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import Field, field_validator

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.clock import Clock
from services.servicekit.config import ServiceSettings
from services.servicekit.partitions import DailyPartitions
from services.servicekit.server import ServiceApp

from .alerts import AlertBook
from .election import Election
from .engine import AlertEngine
from .evaluator import Evaluator
from .health import SystemHealth, parse_targets
from .notify import Sender, parse_receivers
from .rules import DEFAULT_RULES, load_rules
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
# Tables whose rows older than MONITORING_ROLLUP_RETENTION_DAYS are deleted
# (alerts once resolved that long ago; open ones stay whatever their age).
AGED_TABLES = (
    ("api_rollup_minute", "bucket_start"),
    ("instance_stats_minute", "bucket_start"),
    ("cache_rollup_minute", "bucket_start"),
    ("client_alert_keys", "received_at"),
    ("alerts", "resolved_at"),
    ("notifications", "created_at"),
)
# A weekly report reads the previous ISO week, which began at most 14 days ago.
MIN_ROLLUP_RETENTION_DAYS = 15


class MonitoringSettings(ServiceSettings):
    grpc_port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)
    monitoring_raw_retention_days: int = Field(7, ge=1, le=365, description="Raw API timings kept.")
    monitoring_rollup_retention_days: int = Field(
        30,
        ge=MIN_ROLLUP_RETENTION_DAYS,
        le=3650,
        description="Per-minute rollups, resolved alerts, client alert ids and notifications kept.",
    )
    monitoring_partition_days_ahead: int = Field(2, ge=1, le=60, description="Daily partitions made ahead.")
    monitoring_partition_interval_seconds: float = Field(3600.0, gt=0)
    monitoring_max_timings: int = Field(5000, ge=1, le=100_000, description="Timings per RecordApiTimings.")
    monitoring_max_client_alerts: int = Field(100, ge=1, le=1000, description="Alerts per client report.")
    monitoring_rules_file: str = Field("", description="Alert rules (TOML); empty: the defaults.")
    monitoring_eval_interval_seconds: float = Field(5.0, gt=0, le=300, description="Rule evaluation period.")
    monitoring_webhook_urls: str = Field("", description="name=url,... receiving Alertmanager webhooks.")
    monitoring_external_url: str = Field("", description="generatorURL / externalURL in notifications.")
    monitoring_notify_timeout_seconds: float = Field(5.0, gt=0, le=120)
    monitoring_notify_attempts: int = Field(5, ge=1, le=50, description="Tries per delivery round.")
    monitoring_notify_backoff_seconds: float = Field(0.5, gt=0, le=60)
    monitoring_health_targets: str = Field("", description="name=host:port of every service to check.")
    monitoring_health_timeout_seconds: float = Field(1.0, gt=0, le=30)
    monitoring_health_slow_ms: float = Field(500.0, gt=0)
    monitoring_health_ttl_seconds: float = Field(1.5, ge=0, le=60)

    @field_validator("monitoring_rules_file")
    @classmethod
    def _rules(cls, value: str) -> str:
        load_rules(Path(value) if value else DEFAULT_RULES)
        return value

    @field_validator("monitoring_webhook_urls")
    @classmethod
    def _receivers(cls, value: str) -> str:
        parse_receivers(value)
        return value

    @field_validator("monitoring_health_targets")
    @classmethod
    def _targets(cls, value: str) -> str:
        parse_targets(value)
        return value


SETTINGS = MonitoringSettings


@dataclass
class Monitoring:
    """The running pieces of one monitoring app (for tests and the benchmark)."""

    clock: Clock
    maintainer: DailyPartitions
    timings: TimingStore
    alerts: AlertBook
    health: SystemHealth
    engine: AlertEngine
    servicer: MonitoringServicer


_STATE: weakref.WeakKeyDictionary[ServiceApp, Monitoring] = weakref.WeakKeyDictionary()


def state(app: ServiceApp) -> Monitoring:
    return _STATE[app]


async def wire(app: ServiceApp) -> None:
    """Build monitoring on a connected app; everything runs on `app.clock` (the kit's)."""
    settings = app.settings
    assert isinstance(settings, MonitoringSettings)
    assert app.pool is not None and app.redis is not None, "connect() first"
    pool = app.pool
    clock = app.clock

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

    receivers = parse_receivers(settings.monitoring_webhook_urls)
    rules = load_rules(
        Path(settings.monitoring_rules_file) if settings.monitoring_rules_file else DEFAULT_RULES
    )
    sender = Sender(
        pool,
        timeout_seconds=settings.monitoring_notify_timeout_seconds,
        attempts=settings.monitoring_notify_attempts,
        backoff_seconds=settings.monitoring_notify_backoff_seconds,
    )
    evaluator = Evaluator(rules, clock, receivers, settings.monitoring_external_url, sender.wake)
    engine = AlertEngine(
        Election(settings.database_url, app.schema),
        evaluator,
        sender,
        settings.monitoring_eval_interval_seconds,
    )
    app.run_in_background(engine.run_forever(), "monitoring-rules")
    app.on_shutdown(engine.close)

    alerts = AlertBook(pool, receivers, settings.monitoring_external_url, sender.wake)
    health = SystemHealth(
        self_name=NAME,
        targets={k: v for k, v in parse_targets(settings.monitoring_health_targets).items() if k != NAME},
        pool=pool,
        redis=app.redis,
        clock=clock,
        started_at=datetime.fromtimestamp(app.started_at, UTC),
        timeout_seconds=settings.monitoring_health_timeout_seconds,
        slow_ms=settings.monitoring_health_slow_ms,
        ttl_seconds=settings.monitoring_health_ttl_seconds,
        metadata=lambda: [app.service_tokens.metadata()],
    )
    app.on_shutdown(health.close)

    timings = TimingStore(pool, maintainer.ensure)
    app.on_shutdown(timings.close)
    servicer = MonitoringServicer(
        clock,
        timings,
        StatsStore(pool),
        ServiceSummary(pool, timedelta(days=settings.monitoring_rollup_retention_days)),
        alerts,
        health,
        max_timings=settings.monitoring_max_timings,
        max_client_alerts=settings.monitoring_max_client_alerts,
        retention=timedelta(days=settings.monitoring_raw_retention_days),
    )
    app.add_service(SERVICE, servicer, monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server, ACCESS)
    _STATE[app] = Monitoring(clock, maintainer, timings, alerts, health, engine, servicer)
