"""monitoring: API timings, alert rules, client alerts and system health. Wiring only."""

from __future__ import annotations

from pydantic import Field

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.config import ServiceSettings
from services.servicekit.server import ServiceApp

NAME = "monitoring"
MIGRATIONS = None  # its schema gets tables with the monitoring issue

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


class MonitoringSettings(ServiceSettings):
    grpc_port: int = Field(50053, ge=0, le=65535)
    metrics_port: int = Field(9103, ge=0, le=65535)


async def wire(app: ServiceApp) -> None:
    # Timings, rules, alerts and health come with the monitoring issue; until
    # then every RPC answers UNIMPLEMENTED (the generated base servicer).
    app.add_service(
        SERVICE,
        monitoring_pb2_grpc.MonitoringServiceServicer(),
        monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
        ACCESS,
    )


SETTINGS = MonitoringSettings
