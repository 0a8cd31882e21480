"""effects: the RunningHub proxy (catalog, uploads, tasks, webhooks). Wiring
only; the domain lives beside it."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, SecretStr

from cosnap.analytics.v1 import analytics_pb2_grpc
from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.servicekit.auth import Access
from services.servicekit.config import ServiceSettings
from services.servicekit.server import ServiceApp

from . import catalog as catalog_file
from .catalog import Catalog
from .health import RunningHubHealthProbe
from .ratelimit import RateLimiter
from .reporting import TaskEndReporter
from .runninghub import ClientOptions, Regions, RunningHubClient
from .servicer import EffectsServicer
from .taskcache import TASK_CACHE_OPTIONS
from .taskrefresh import TaskTimings
from .tasks import Tasks
from .taskstore import TaskStore
from .uploads import Uploads
from .webhooks import WebhookReceiver, WebhookTokens

NAME = "effects"
MIGRATIONS = Path(__file__).parent / "migrations"
CATALOG = Path(__file__).parent / "catalog.json"

SERVICE = effects_pb2.DESCRIPTOR.services_by_name["EffectsService"]
ACCESS = {
    "ListEffects": Access.PUBLIC,
    "GetEffect": Access.PUBLIC,
    "UploadInput": Access.USER,
    "CreateTask": Access.USER,
    "GetTask": Access.USER,
    "CancelTask": Access.USER,
    "HandleRunningHubWebhook": Access.PUBLIC,  # authenticated by the token in its URL
    "GetRunningHubHealth": Access.INTERNAL,
}
URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"


class EffectsSettings(ServiceSettings):
    grpc_port: int = Field(50052, ge=0, le=65535)
    metrics_port: int = Field(9102, ge=0, le=65535)
    # Uploads are up to 30 MiB of image bytes in one message.
    max_message_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)

    runninghub_cn_url: str = Field("https://www.runninghub.cn", pattern=URL)
    runninghub_cn_api_key: SecretStr = Field(
        SecretStr(""), description="Empty: the cn region is unavailable."
    )
    runninghub_global_url: str = Field("https://www.runninghub.ai", pattern=URL)
    runninghub_global_api_key: SecretStr = Field(SecretStr(""))
    runninghub_timeout_seconds: float = Field(45.0, gt=0, le=600)
    runninghub_retry_attempts: int = Field(3, ge=1, le=10, description="Reads and uploads, per call.")
    runninghub_retry_max_wait_seconds: float = Field(2.0, gt=0, le=60)
    runninghub_busy_delay_scale: float = Field(
        1.0,
        ge=0,
        le=10,
        description="Multiplies the documented waits after 415 (30 s), 421 (20 s), 804 (10 s).",
    )
    runninghub_busy_max_wait_seconds: float = Field(60.0, ge=0, le=600)
    runninghub_max_connections: int = Field(100, ge=1, le=10_000, description="Per region.")
    runninghub_breaker_failures: int = Field(5, ge=1, le=1000)
    runninghub_breaker_reset_seconds: float = Field(30.0, gt=0, le=3600)

    effects_public_base_url: str = Field(
        "", pattern=URL + "|^$", description="Where RunningHub reaches the edge; empty: no webhooks."
    )
    effects_webhook_secret: SecretStr = Field(
        SecretStr("cosnap-development-webhook-secret-change-me"), min_length=32
    )
    effects_default_region: str = Field("global", pattern=r"^(cn|global)$")
    effects_catalog_file: Path = Field(CATALOG)
    effects_rate_limit_tasks: int = Field(
        20, ge=0, le=100_000, description="Per user and window; 0: no limit."
    )
    effects_rate_limit_window_seconds: float = Field(300.0, gt=0, le=86_400)
    effects_poll_ttl_queued_seconds: float = Field(2.0, gt=0, le=60)
    effects_poll_ttl_running_seconds: float = Field(3.0, gt=0, le=60)
    effects_final_ttl_seconds: float = Field(3600.0, gt=0)
    effects_reconcile_timeout_seconds: float = Field(
        1800.0, gt=0, description="A create with no reply and no callback fails after this."
    )
    effects_recheck_after_seconds: float = Field(
        60.0, gt=0, description="Open tasks nobody polled are re-read."
    )
    effects_sweep_interval_seconds: float = Field(15.0, gt=0)
    effects_refresh_concurrency: int = Field(
        16, ge=1, le=1000, description="Background refreshes of due task states at once, per replica."
    )
    effects_webapp_fresh_seconds: float = Field(6 * 3600.0, gt=0, description="Refreshed ahead at 80 %.")
    effects_webapp_stale_seconds: float = Field(
        7 * 86_400.0, gt=0, description="Cached copy served this long."
    )
    effects_upload_max_bytes: int = Field(30 * 1024 * 1024, ge=1, le=30 * 1024 * 1024)
    analytics_addr: str = Field("", description="host:port of analytics; empty: task ends are not reported.")
    effects_report_buffer: int = Field(
        10_000, ge=1, le=1_000_000, description="Task ends held for analytics."
    )
    effects_report_timeout_seconds: float = Field(5.0, gt=0, le=60, description="Per RecordTaskEnds call.")
    effects_report_max_backoff_seconds: float = Field(
        30.0, gt=0, le=600, description="Longest wait between tries while analytics is away."
    )


SETTINGS = EffectsSettings


@dataclass
class Effects:
    """The running pieces of one effects app (for tests and the benchmark)."""

    regions: Regions
    catalog: Catalog
    tasks: Tasks
    webhooks: WebhookReceiver
    tokens: WebhookTokens
    servicer: EffectsServicer
    reporter: TaskEndReporter | None


_STATE: weakref.WeakKeyDictionary[ServiceApp, Effects] = weakref.WeakKeyDictionary()


def state(app: ServiceApp) -> Effects:
    return _STATE[app]


def _regions(s: EffectsSettings) -> Regions:
    options = ClientOptions(
        timeout_seconds=s.runninghub_timeout_seconds,
        retry_attempts=s.runninghub_retry_attempts,
        retry_max_wait_seconds=s.runninghub_retry_max_wait_seconds,
        busy_delay_scale=s.runninghub_busy_delay_scale,
        busy_max_wait_seconds=s.runninghub_busy_max_wait_seconds,
        max_connections=s.runninghub_max_connections,
        breaker_failures=s.runninghub_breaker_failures,
        breaker_reset_seconds=s.runninghub_breaker_reset_seconds,
    )
    return Regions(
        {
            "cn": RunningHubClient(
                "cn", s.runninghub_cn_url, s.runninghub_cn_api_key.get_secret_value(), options
            ),
            "global": RunningHubClient(
                "global", s.runninghub_global_url, s.runninghub_global_api_key.get_secret_value(), options
            ),
        }
    )


async def wire(app: ServiceApp) -> None:
    settings = app.settings
    assert isinstance(settings, EffectsSettings)
    assert app.pool is not None and app.redis is not None, "connect() first"
    pool, redis, prefix = app.pool, app.redis, app.redis_prefix

    await catalog_file.sync(pool, catalog_file.load_file(settings.effects_catalog_file))
    regions = _regions(settings)
    catalog = Catalog(
        pool,
        redis,
        prefix,
        regions,
        await app.cache("effects"),
        await app.cache("webapp"),
        fresh_seconds=settings.effects_webapp_fresh_seconds,
        stale_seconds=settings.effects_webapp_stale_seconds,
    )
    tokens = WebhookTokens(
        settings.effects_webhook_secret.get_secret_value(), settings.effects_public_base_url
    )
    tasks = Tasks(
        TaskStore(pool),
        catalog,
        regions,
        await app.cache("task", **TASK_CACHE_OPTIONS),
        redis,
        prefix,
        RateLimiter(
            redis, prefix, settings.effects_rate_limit_tasks, settings.effects_rate_limit_window_seconds
        ),
        tokens,
        TaskTimings(
            queued_ttl=settings.effects_poll_ttl_queued_seconds,
            running_ttl=settings.effects_poll_ttl_running_seconds,
            final_ttl=settings.effects_final_ttl_seconds,
            reconcile_timeout=settings.effects_reconcile_timeout_seconds,
            recheck_after=settings.effects_recheck_after_seconds,
            refresh_concurrency=settings.effects_refresh_concurrency,
        ),
    )
    webhooks = WebhookReceiver(tokens, tuple(regions.clients), tasks.confirm)
    app.run_in_background(tasks.sweep_forever(settings.effects_sweep_interval_seconds), "effects-sweeper")
    reporter: TaskEndReporter | None = None
    if settings.analytics_addr:
        reporter = TaskEndReporter(
            analytics_pb2_grpc.AnalyticsServiceStub(app.service_channel(settings.analytics_addr)),
            max_buffer=settings.effects_report_buffer,
            timeout=settings.effects_report_timeout_seconds,
            max_backoff=settings.effects_report_max_backoff_seconds,
        )
        tasks.end_listeners.append(reporter.offer)
        app.run_in_background(reporter.run_forever(), "effects-task-end-reporter")

    async def close() -> None:  # after the server stopped taking RPCs
        await webhooks.drain()
        await tasks.close()
        await catalog.close()
        await regions.close()
        if reporter is not None:
            await reporter.flush()

    app.on_shutdown(close)
    servicer = EffectsServicer(
        catalog,
        tasks,
        Uploads(regions, settings.effects_default_region, settings.effects_upload_max_bytes),
        webhooks,
        RunningHubHealthProbe(regions),
    )
    app.add_service(SERVICE, servicer, effects_pb2_grpc.add_EffectsServiceServicer_to_server, ACCESS)
    _STATE[app] = Effects(regions, catalog, tasks, webhooks, tokens, servicer, reporter)
