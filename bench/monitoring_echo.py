"""An echo server behind the kit's interceptor, with or without the monitoring reporter.

`python -m bench.monitoring_echo PORT [MONITORING_ADDR]`: answers RecordEvents at once
(like bench.echo) through `ServiceInterceptor` (request id, auth, Prometheus timing,
error mapping); given MONITORING_ADDR, every RPC's timing also goes to the kit's
`MonitoringReporter`, which ships them to that monitoring service in the background.
The difference between the two is what the reporter costs an RPC.
"""

from __future__ import annotations

import asyncio
import os
import sys

from bench.echo import serve as serve_echo
from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.servicekit.auth import Access, ServiceTokens
from services.servicekit.channels import service_channel
from services.servicekit.interceptors import ServiceInterceptor
from services.servicekit.reporter import MonitoringReporter, ReporterSettings

METHOD = "/cosnap.analytics.v1.AnalyticsService/RecordEvents"


async def serve(port: int, monitoring_addr: str | None) -> None:
    secret = os.environ.get("AUTH_JWT_SECRET", "cosnap-development-secret-change-me!")
    reporter = None
    if monitoring_addr:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(
            service_channel(monitoring_addr, ServiceTokens(secret, "echo"))
        )
        reporter = MonitoringReporter(stub, "echo", f"echo-{os.getpid()}", settings=ReporterSettings())
        reporter.start()
    interceptor = ServiceInterceptor({METHOD: Access.PUBLIC}, secret, reporter.record if reporter else None)
    await serve_echo(port, [interceptor])
    if reporter is not None:
        await reporter.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None))
