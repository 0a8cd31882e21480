"""The one way a service starts, serves and stops.

`ServiceApp` connects PostgreSQL (retrying, then migrating its own schema),
Redis, starts Prometheus metrics, and serves grpc.aio with the standard
health service (for "", "liveness" and each full service name), reflection
and the service interceptor. On SIGTERM or SIGINT it turns health NOT_SERVING,
refuses new RPCs, lets in-flight ones finish within the grace period, runs the
shutdown hooks (flushing buffers), closes pools and returns.

Overload: at most MAX_CONCURRENT_RPCS RPCs run at once; beyond that grpc answers
RESOURCE_EXHAUSTED at once, before any work (the edge: 429 with Retry-After).

Shutdown, in order: health turns NOT_SERVING; the server keeps taking and serving
RPCs until none has arrived for a moment (at most SHUTDOWN_DRAIN_SECONDS), so calls
already on their way are taken rather than dropped; then it stops taking RPCs (new
ones get UNAVAILABLE) and gives those in flight SHUTDOWN_GRACE_SECONDS; only then
are background tasks cancelled and the shutdown hooks run (the analytics committer
keeps flushing until the last in-flight request is answered). The draining is
:mod:`.draining`; readiness following PostgreSQL, and the dependency checks, are
:mod:`.dependencies`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from cosnap.monitoring.v1 import monitoring_pb2_grpc

from . import db
from .auth import Access, ServiceTokens
from .channels import service_channel
from .clock import SYSTEM_CLOCK, Clock
from .config import ServiceSettings
from .dependencies import dependency_status, watch_database, watch_redis
from .draining import Arrivals
from .interceptors import ServiceInterceptor, TimingSink
from .redis_client import RedisClient, connect_redis
from .reporter import MonitoringReporter, ReporterSettings, cache_counts, default_instance

if TYPE_CHECKING:
    from .cache import MultiLevelCache
    from .interceptors import SerializedStream

log = logging.getLogger(__name__)


class ListenError(RuntimeError):
    """A port the service must listen on cannot be bound (in use, or not allowed)."""


Hook = Callable[[], Awaitable[Any]]
LIVENESS = "liveness"


class ServiceApp:
    def __init__(self, name: str, settings: ServiceSettings, migrations: Path | None = None) -> None:
        self.name = name
        self.settings = settings
        self.schema = settings.db_schema or name
        self.redis_prefix = settings.redis_prefix or name
        self.migrations = migrations
        self.pool: asyncpg.Pool | None = None
        self.redis: RedisClient | None = None
        self.health = health_aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self.started_at = time.time()
        self.db_healthy = False
        self._services: list[tuple[ServiceDescriptor, Any, Callable[[Any, grpc.aio.Server], None]]] = []
        self._access: dict[str, Access] = {}
        self._serialized: dict[str, SerializedStream] = {}
        self._caches: list[MultiLevelCache[Any]] = []
        self._shutdown_hooks: list[Hook] = []
        self._background: list[asyncio.Task[Any]] = []
        self._server: grpc.aio.Server | None = None
        self._metrics_server: Any = None
        self._stopping = asyncio.Event()
        self._arrivals = Arrivals(lambda: self.service_names)
        self._db_watch: asyncio.Future[None] | None = None
        self.timing_sink: TimingSink | None = None
        # The clock tokens are judged by, and this service's own `service` token (for calling
        # the others' internal RPCs) minted on: wall time, kept apart from `clock` below so a
        # test stepping the domain's time does not expire its callers' tokens.
        self._auth_clock: Clock = SYSTEM_CLOCK
        self.service_tokens = ServiceTokens(settings.auth_jwt_secret, name)
        self._channels: dict[str, grpc.aio.Channel] = {}
        # The clock of the kit's caches and of whatever the wiring builds (tests set a ManualClock).
        self.clock: Clock = SYSTEM_CLOCK
        self.instance = settings.instance_name or default_instance()
        self._interceptor: ServiceInterceptor | None = None
        # Ships RPC timings and instance stats to monitoring (None without MONITORING_ADDR).
        self.reporter: MonitoringReporter | None = None

    @property
    def auth_clock(self) -> Clock:
        return self._auth_clock

    @auth_clock.setter
    def auth_clock(self, clock: Clock) -> None:
        """Set before `start()` (tests that expire tokens step it by hand)."""
        self._auth_clock = clock
        self.service_tokens = ServiceTokens(self.settings.auth_jwt_secret, self.name, clock=clock)

    # -- resources ---------------------------------------------------------
    async def connect(self) -> None:
        """PostgreSQL (with retries and migrations) and Redis."""
        s = self.settings
        self.pool = await db.create_pool(
            s.database_url,
            self.schema,
            min_size=s.db_pool_min,
            max_size=max(s.db_pool_max, s.db_pool_min),
            connect_timeout=s.db_connect_timeout_seconds,
        )
        if self.migrations is not None and s.migrate_on_start:
            async with self.pool.acquire() as conn:
                await db.migrate(conn, self.schema, db.load_migrations(self.migrations))
        self.db_healthy = True
        # One Redis or a Redis Cluster (redis+cluster://), by the URL's scheme.
        self.redis = connect_redis(s.redis_url)

    async def cache(self, name: str, **options: Any) -> MultiLevelCache[Any]:
        """A named multi-level cache under this service's key prefix."""
        from .cache import MultiLevelCache

        assert self.redis is not None, "connect() first"
        options.setdefault("clock", self.clock)
        cache: MultiLevelCache[Any] = MultiLevelCache(
            self.redis, prefix=self.redis_prefix, name=name, **options
        )
        await cache.start()
        self._caches.append(cache)
        return cache

    @property
    def service_names(self) -> list[str]:
        """Full names of the services this app serves (besides health and reflection)."""
        return [descriptor.full_name for descriptor, _, _ in self._services]

    @property
    def caches(self) -> list[MultiLevelCache[Any]]:
        return list(self._caches)

    def add_service(
        self,
        descriptor: ServiceDescriptor,
        servicer: Any,
        add_to_server: Callable[[Any, grpc.aio.Server], None],
        access: Mapping[str, Access],
        serialized: Mapping[str, SerializedStream] | None = None,
    ) -> None:
        """Register a servicer; `access` names the access level of every RPC.

        `serialized` names server-streaming methods served by a behaviour that
        yields responses already serialized (bytes) instead of the servicer's
        method (see ``ServiceInterceptor``); the servicer's method stays the
        registered one, so the contract's types are unchanged."""
        missing = [m.name for m in descriptor.methods if m.name not in access]
        if missing:
            raise ValueError(f"no access level for {descriptor.full_name} methods {missing}")
        client_streams = [m.name for m in descriptor.methods if m.client_streaming]
        if client_streams:
            raise ValueError(f"client-streaming RPCs are not supported by the kit: {client_streams}")
        streams = {m.name for m in descriptor.methods if m.server_streaming}
        not_streams = sorted(set(serialized or {}) - streams)
        if not_streams:
            raise ValueError(f"serialized responses are for server-streaming RPCs only: {not_streams}")
        for method, level in access.items():
            self._access[f"/{descriptor.full_name}/{method}"] = level
        for method, behaviour in (serialized or {}).items():
            self._serialized[f"/{descriptor.full_name}/{method}"] = behaviour
        self._services.append((descriptor, servicer, add_to_server))

    def service_channel(self, address: str) -> grpc.aio.Channel:
        """A channel to another service whose calls carry this service's token (one per
        address, closed at shutdown after the shutdown hooks ran):
        ``MonitoringServiceStub(app.service_channel(settings.monitoring_addr))``."""
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = service_channel(address, self.service_tokens)
        return channel

    def on_shutdown(self, hook: Hook) -> None:
        """Run after the server stopped taking RPCs (flush buffers here)."""
        self._shutdown_hooks.append(hook)

    def run_in_background(self, coro: Awaitable[Any], name: str) -> None:
        """A task cancelled at shutdown, before the shutdown hooks run."""
        self._background.append(asyncio.ensure_future(coro))
        self._background[-1].set_name(name)

    # -- serving -----------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        if self.pool is None:
            await self.connect()
        age_ms = int(s.max_connection_age_seconds * 1000)
        options = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Clients reconnect (and re-resolve DNS) so new replicas get traffic.
            ("grpc.max_connection_age_ms", age_ms),
            ("grpc.max_connection_age_grace_ms", int(s.shutdown_grace_seconds * 1000)),
            ("grpc.so_reuseport", 0),
        ]
        self._interceptor = ServiceInterceptor(
            self._access,
            s.auth_jwt_secret,
            self._timing,
            clock=self._auth_clock,
            serialized=self._serialized,
        )
        self._server = grpc.aio.server(
            interceptors=[self._arrivals, self._interceptor],
            options=options,
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        names = [
            reflection.SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        ]
        for descriptor, servicer, add in self._services:
            add(servicer, self._server)
            names.append(descriptor.full_name)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(names, self._server)
        try:
            self.port = self._server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise ListenError(f"cannot listen on {s.grpc_host}:{s.grpc_port} (GRPC_PORT): the port is in use")
        try:
            self._metrics_server, _ = start_http_server(s.metrics_port, addr=s.grpc_host)
        except OSError as exc:
            raise ListenError(
                f"cannot listen on {s.grpc_host}:{s.metrics_port} (METRICS_PORT): {exc.strerror}"
            ) from None
        self.metrics_port = self._metrics_server.server_port
        await self._server.start()
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._set_ready(True)
        self._db_watch = asyncio.ensure_future(
            watch_database(self.settings.database_url, self._stopping, self._database_health)
        )
        self.run_in_background(watch_redis(lambda: self.redis), "watch-redis")
        self._start_reporter()
        log.info(
            "serving",
            extra={
                "grpc_port": self.port,
                "metrics_port": self.metrics_port,
                "schema": self.schema,
            },
        )

    @property
    def in_flight(self) -> int:
        """RPCs being answered now (streams included)."""
        return self._interceptor.in_flight if self._interceptor is not None else 0

    def _start_reporter(self) -> None:
        s = self.settings
        if not s.monitoring_addr:
            return
        self.reporter = MonitoringReporter(
            monitoring_pb2_grpc.MonitoringServiceStub(self.service_channel(s.monitoring_addr)),
            self.name,
            self.instance,
            in_flight=lambda: self.in_flight,
            cache_counts=lambda: cache_counts(self._caches),
            settings=ReporterSettings(
                buffer_size=s.monitoring_buffer_size,
                batch_size=s.monitoring_batch_size,
                flush_interval=s.monitoring_report_interval_seconds,
                stats_interval=s.monitoring_stats_interval_seconds,
                send_timeout=s.monitoring_send_timeout_seconds,
                close_timeout=min(2.0, s.shutdown_grace_seconds),
            ),
        )
        self.reporter.start()

    def _timing(self, method: str, code: str, ms: float) -> None:
        if self.reporter is not None:
            self.reporter.record(method, code, ms)
        if self.timing_sink is not None:
            self.timing_sink(method, code, ms)

    async def _set_ready(self, ready: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", status)
        for descriptor, _, _ in self._services:
            await self.health.set(descriptor.full_name, status)

    async def _database_health(self, healthy: bool) -> None:
        """Readiness follows PostgreSQL (:func:`.dependencies.watch_database`):
        NOT_SERVING while it is down, back when it returns (not while stopping)."""
        self.db_healthy = healthy
        if not self._stopping.is_set():
            await self._set_ready(healthy)

    async def dependency_status(self) -> dict[str, tuple[str, float]]:
        """(status, check latency ms) of PostgreSQL and Redis: healthy,
        degraded (Redis down: serving from L1) or unhealthy."""
        return await dependency_status(self.pool, self.redis)

    async def stop(self) -> None:
        """Graceful shutdown; safe to call more than once."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info("shutting down", extra={"grace_seconds": self.settings.shutdown_grace_seconds})
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._arrivals.drain(lambda: self.in_flight, self.settings.shutdown_drain_seconds)
            await self._server.stop(self.settings.shutdown_grace_seconds)
        if self._db_watch is not None:
            await self._db_watch
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for hook in self._shutdown_hooks:
            try:
                await hook()
            except Exception:
                log.exception("shutdown hook failed")
        if self.reporter is not None:
            await self.reporter.close()  # the last timings, after every RPC has finished
        for channel in self._channels.values():
            await channel.close()
        for cache in self._caches:
            await cache.close()
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()
        if self._metrics_server is not None:
            # shutdown() waits for the server thread's next poll: not on the loop.
            await asyncio.to_thread(self._metrics_server.shutdown)
            self._metrics_server.server_close()
        log.info("stopped")

    async def serve_forever(self) -> None:
        """Start, wait for SIGTERM or SIGINT, shut down gracefully."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()
