"""Configuration from environment variables, validated at start-up."""

from __future__ import annotations

import sys
from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

S = TypeVar("S", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    """What every service reads. A service subclasses it to add its own
    variables and to set its default ports."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/postgres",
        description="PostgreSQL DSN (asyncpg).",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis URL: redis://, rediss://, unix://, or redis+cluster://host:port for a Redis Cluster.",
    )
    db_schema: str = Field(
        "",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$|^$",
        description="Schema; the service name when empty.",
    )
    redis_prefix: str = Field("", description="Key prefix; the service name when empty.")
    grpc_host: str = "0.0.0.0"
    grpc_port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one.")
    auth_jwt_secret: str = Field("cosnap-development-secret-change-me!", min_length=32)
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR|debug|info|warning|error)$")
    shutdown_grace_seconds: float = Field(10.0, gt=0, le=300)
    shutdown_drain_seconds: float = Field(
        2.0, ge=0, le=60, description="After SIGTERM, at most this long serving on until arrivals pause."
    )
    max_concurrent_rpcs: int = Field(
        512, ge=1, le=100_000, description="RPCs served at once; RESOURCE_EXHAUSTED beyond."
    )
    db_pool_min: int = Field(1, ge=0, le=100)
    db_pool_max: int = Field(10, ge=1, le=200)
    db_connect_timeout_seconds: float = Field(
        30.0, gt=0, le=600, description="How long start-up waits for PostgreSQL."
    )
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_connection_age_seconds: float = Field(300.0, gt=0)
    monitoring_addr: str = Field(
        "", description="host:port of the monitoring service; empty disables timing reports."
    )
    monitoring_report_interval_seconds: float = Field(
        1.0, gt=0, le=60, description="How often buffered RPC timings are sent to monitoring."
    )
    monitoring_stats_interval_seconds: float = Field(
        5.0, gt=0, le=300, description="How often this instance's stats are sent to monitoring."
    )
    monitoring_buffer_size: int = Field(
        10_000, ge=1, le=1_000_000, description="RPC timings held while monitoring is slow or down."
    )
    monitoring_batch_size: int = Field(500, ge=1, le=5000, description="RPC timings per report.")
    monitoring_send_timeout_seconds: float = Field(2.0, gt=0, le=60, description="Deadline of one report.")
    instance_name: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_.:\-]{0,128}$",
        description="This replica's name in reports; host:pid (the pod name) when empty.",
    )
    migrate_on_start: bool = True


def load_settings(cls: type[S]) -> S:
    """Build settings from the environment or exit naming every bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "_".join(str(p) for p in err["loc"]).upper() or "?"
            lines.append(f"  {name}: {err['msg']}")
        print("configuration error:\n" + "\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None
