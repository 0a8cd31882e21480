"""The EffectsService servicer: each RPC hands over to the module that does the work."""

from __future__ import annotations

from typing import Any

import grpc

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.servicekit.auth import Principal, current_principal
from services.servicekit.errors import not_found

from .catalog import Catalog
from .health import RunningHubHealthProbe
from .tasks import Tasks
from .uploads import Uploads
from .webhooks import WebhookReceiver


def _caller() -> Principal:
    principal = current_principal.get()
    assert principal is not None, "USER access is enforced by the interceptor"
    return principal


class EffectsServicer(effects_pb2_grpc.EffectsServiceServicer):
    def __init__(
        self,
        catalog: Catalog,
        tasks: Tasks,
        uploads: Uploads,
        webhooks: WebhookReceiver,
        health: RunningHubHealthProbe,
    ) -> None:
        self._catalog = catalog
        self._tasks = tasks
        self._uploads = uploads
        self._webhooks = webhooks
        self._health = health

    async def ListEffects(
        self, request: effects_pb2.ListEffectsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.ListEffectsResponse:
        return await self._catalog.list_effects(request)

    async def GetEffect(
        self, request: effects_pb2.GetEffectRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.GetEffectResponse:
        if not request.effect_id or len(request.effect_id) > 64:
            raise not_found("no such effect")
        row = await self._catalog.effect(request.effect_id)
        return effects_pb2.GetEffectResponse(effect=await self._catalog.describe(row, strict=False))

    async def UploadInput(
        self, request: effects_pb2.UploadInputRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.UploadInputResponse:
        return await self._uploads.upload(request)

    async def CreateTask(
        self, request: effects_pb2.CreateTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.CreateTaskResponse:
        return effects_pb2.CreateTaskResponse(task=await self._tasks.create(request, _caller()))

    async def GetTask(
        self, request: effects_pb2.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.GetTaskResponse:
        return await self._tasks.get(request.task_id, _caller())

    async def CancelTask(
        self, request: effects_pb2.CancelTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.CancelTaskResponse:
        return effects_pb2.CancelTaskResponse(task=await self._tasks.cancel(request.task_id, _caller()))

    async def HandleRunningHubWebhook(
        self, request: effects_pb2.HandleRunningHubWebhookRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.HandleRunningHubWebhookResponse:
        await self._webhooks.receive(request.region, request.token, request.payload)
        return effects_pb2.HandleRunningHubWebhookResponse()

    async def GetRunningHubHealth(
        self, request: effects_pb2.GetRunningHubHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> effects_pb2.GetRunningHubHealthResponse:
        return await self._health.check()
