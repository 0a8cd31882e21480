"""Test servicers for the three services: they record what they receive and echo it back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_status import rpc_status

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc

ANALYTICS = "cosnap.analytics.v1.AnalyticsService"
EFFECTS = "cosnap.effects.v1.EffectsService"
MONITORING = "cosnap.monitoring.v1.MonitoringService"
UPLOAD_LIMIT = 256 * 1024  # small in tests; the default (30 MiB) is checked separately
BIG_INT64 = 9_007_199_254_740_993  # 2**53 + 1: not representable as a JS number


@dataclass
class Backend:
    """What the test servicers saw, and how they should answer next."""

    requests: list[tuple[str, Message]] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    abort: tuple[grpc.StatusCode, str] | None = None
    abort_status: Any = None  # a google.rpc.Status to send with abort_with_status

    @property
    def last(self) -> Message:
        return self.requests[-1][1]

    @property
    def last_metadata(self) -> dict[str, str]:
        return self.metadata[-1]

    def reset(self) -> None:
        self.requests.clear()
        self.metadata.clear()
        self.abort = None
        self.abort_status = None

    async def seen(self, name: str, request: Message, context: grpc.aio.ServicerContext) -> None:
        self.requests.append((name, request))
        self.metadata.append({m.key: m.value for m in context.invocation_metadata() or ()})
        if self.abort_status is not None:
            await context.abort_with_status(rpc_status.to_status(self.abort_status))
        if self.abort is not None:
            await context.abort(*self.abort)


def _ts(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


class Analytics(analytics_pb2_grpc.AnalyticsServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def RecordEvents(self, request: Any, context: Any) -> Any:
        await self.b.seen("RecordEvents", request, context)
        ids = [e.event_id for e in request.events]
        return analytics_pb2.RecordEventsResponse(
            accepted=len(set(ids)),
            duplicates=len(ids) - len(set(ids)),
        )

    async def RecordPerformanceMetrics(self, request: Any, context: Any) -> Any:
        await self.b.seen("RecordPerformanceMetrics", request, context)
        return analytics_pb2.RecordPerformanceMetricsResponse(accepted=len(request.metrics))

    async def RecordFunnelSteps(self, request: Any, context: Any) -> Any:
        await self.b.seen("RecordFunnelSteps", request, context)
        return analytics_pb2.RecordFunnelStepsResponse(accepted=len(request.steps))

    async def GetFunnelReport(self, request: Any, context: Any) -> Any:
        await self.b.seen("GetFunnelReport", request, context)
        return analytics_pb2.GetFunnelReportResponse(
            window=request.window,
            conversion_window=request.conversion_window,
            effect_id=request.effect_id,
            steps=[
                analytics_pb2.FunnelStepReport(
                    step="effect_viewed",
                    position=1,
                    sessions=BIG_INT64,
                ),
            ],
            generated_at=_ts(1_700_000_000),
        )

    async def GetPerformanceDashboard(self, request: Any, context: Any) -> Any:
        await self.b.seen("GetPerformanceDashboard", request, context)
        return analytics_pb2.GetPerformanceDashboardResponse(window=request.window)


class Effects(effects_pb2_grpc.EffectsServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def ListEffects(self, request: Any, context: Any) -> Any:
        await self.b.seen("ListEffects", request, context)
        effects = [
            effects_pb2.Effect(
                effect_id=f"effect-{i}",
                name=f"Effect number {i}",
                description="A fairly long description so that the reply is worth compressing.",
                category=request.category,
                region=request.region,
            )
            for i in range(max(request.page_size, 1))
        ]
        return effects_pb2.ListEffectsResponse(effects=effects, next_page_token=request.page_token)

    async def GetEffect(self, request: Any, context: Any) -> Any:
        await self.b.seen("GetEffect", request, context)
        return effects_pb2.GetEffectResponse(effect=effects_pb2.Effect(effect_id=request.effect_id))

    async def UploadInput(self, request: Any, context: Any) -> Any:
        await self.b.seen("UploadInput", request, context)
        return effects_pb2.UploadInputResponse(
            file_name=f"upload.{request.file.content_type.split('/')[-1]}",
            region=request.region,
            size_bytes=len(request.file.data),
        )

    def _task(self, task_id: str, status: str, **extra: Any) -> Any:
        return effects_pb2.Task(
            task_id=task_id,
            status=status,
            created_at=_ts(1_700_000_000),
            **extra,
        )

    async def CreateTask(self, request: Any, context: Any) -> Any:
        await self.b.seen("CreateTask", request, context)
        task = self._task(
            "task-1",
            "QUEUED",
            effect_id=request.effect_id,
            request_id=request.request_id,
            region=request.region,
        )
        return effects_pb2.CreateTaskResponse(task=task)

    async def GetTask(self, request: Any, context: Any) -> Any:
        await self.b.seen("GetTask", request, context)
        output = effects_pb2.TaskOutput(url="https://cdn/x.png", file_type="png", node_id="9")
        task = self._task(request.task_id, "RUNNING", outputs=[output])
        return effects_pb2.GetTaskResponse(task=task)

    async def CancelTask(self, request: Any, context: Any) -> Any:
        await self.b.seen("CancelTask", request, context)
        task = self._task(request.task_id, "CANCELLED")
        return effects_pb2.CancelTaskResponse(task=task)

    async def HandleRunningHubWebhook(self, request: Any, context: Any) -> Any:
        await self.b.seen("HandleRunningHubWebhook", request, context)
        return effects_pb2.HandleRunningHubWebhookResponse()


class Monitoring(monitoring_pb2_grpc.MonitoringServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.b = backend

    async def ReportPerformanceAlerts(self, request: Any, context: Any) -> Any:
        await self.b.seen("ReportPerformanceAlerts", request, context)
        return monitoring_pb2.ReportPerformanceAlertsResponse(accepted=len(request.alerts))

    async def ListPerformanceAlerts(self, request: Any, context: Any) -> Any:
        await self.b.seen("ListPerformanceAlerts", request, context)
        alert = monitoring_pb2.PerformanceAlert(
            alert_id="a-1",
            state=request.state,
            severity=request.severity,
        )
        return monitoring_pb2.ListPerformanceAlertsResponse(
            alerts=[alert] * max(request.page_size, 1),
            next_page_token=request.page_token,
        )

    async def ResolvePerformanceAlert(self, request: Any, context: Any) -> Any:
        await self.b.seen("ResolvePerformanceAlert", request, context)
        alert = monitoring_pb2.PerformanceAlert(
            alert_id=request.alert_id,
            state="resolved",
            resolution_note=request.note,
        )
        return monitoring_pb2.ResolvePerformanceAlertResponse(alert=alert)

    async def GetSystemHealth(self, request: Any, context: Any) -> Any:
        await self.b.seen("GetSystemHealth", request, context)
        return monitoring_pb2.GetSystemHealthResponse(
            status="healthy",
            components=[monitoring_pb2.ComponentHealth(name="postgres", status="healthy")],
            uptime=duration_pb2.Duration(seconds=90),
            checked_at=_ts(1_700_000_000),
        )


@dataclass
class Backends:
    backend: Backend
    addresses: dict[str, str]
