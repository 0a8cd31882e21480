"""Edge settings, from EDGE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_BACKENDS: dict[str, str] = {
    "cosnap.analytics.v1.AnalyticsService": "127.0.0.1:50051",
    "cosnap.effects.v1.EffectsService": "127.0.0.1:50052",
    "cosnap.monitoring.v1.MonitoringService": "127.0.0.1:50053",
}


class Settings(BaseSettings):
    """`EDGE_BACKENDS=Service=host:port,...`, `EDGE_CORS_ORIGINS=https://a,https://b`."""

    model_config = SettingsConfigDict(env_prefix="EDGE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    descriptor_set: Path = REPO_ROOT / "build" / "descriptor.binpb"
    backends: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=lambda: dict(DEFAULT_BACKENDS),
    )
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    max_body_bytes: int = Field(1 << 20, gt=0)
    max_upload_bytes: int = Field(30 << 20, gt=0)
    grpc_timeout_seconds: float = Field(60.0, gt=0)
    cors_max_age_seconds: int = Field(86400, ge=0)
    # Retry-After of a 429 or 503 when the service did not say (google.rpc.RetryInfo).
    retry_after_seconds: int = Field(1, ge=1, le=3600)

    @field_validator("backends", mode="before")
    @classmethod
    def _parse_backends(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        backends: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            service, sep, address = item.partition("=")
            host, colon, port = address.rpartition(":")
            if not sep or not service or not colon or not host or not port.isdigit():
                raise ValueError(f"expected Service=host:port, got {item!r}")
            backends[service.strip()] = address.strip()
        return backends

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(filter(None, (part.strip() for part in value.split(","))))
        return value

    @field_validator("descriptor_set")
    @classmethod
    def _descriptor_exists(cls, value: Path) -> Path:
        if not value.is_file():
            raise ValueError(f"{value} is not a file (run `make gen`)")
        return value
