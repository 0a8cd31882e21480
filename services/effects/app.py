"""effects: the RunningHub proxy. Wiring only; the domain lives beside it."""

from __future__ import annotations

from pydantic import Field

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.config import ServiceSettings
from services.servicekit.server import ServiceApp

NAME = "effects"
MIGRATIONS = None  # its schema gets tables with the effects issue

SERVICE = effects_pb2.DESCRIPTOR.services_by_name["EffectsService"]
ACCESS = {
    "ListEffects": Access.PUBLIC,
    "GetEffect": Access.PUBLIC,
    "UploadInput": Access.USER,
    "CreateTask": Access.USER,
    "GetTask": Access.USER,
    "CancelTask": Access.USER,
    "HandleRunningHubWebhook": Access.PUBLIC,  # authenticated by the token in its URL
}


class EffectsSettings(ServiceSettings):
    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    # Uploads are up to 30 MiB of image bytes in one message.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)


async def wire(app: ServiceApp) -> None:
    # The catalog, tasks and the RunningHub client come with the effects issue;
    # until then every RPC answers UNIMPLEMENTED (the generated base servicer).
    app.add_service(
        SERVICE,
        effects_pb2_grpc.EffectsServiceServicer(),
        effects_pb2_grpc.add_EffectsServiceServicer_to_server,
        ACCESS,
    )


SETTINGS = EffectsSettings
