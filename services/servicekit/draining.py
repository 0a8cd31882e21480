"""Draining a server at shutdown without dropping calls already on their way.

After SIGTERM, calls a client sent before it may still wait inside gRPC to be
taken; stopping the server at once would drop them (CANCELLED). So
:meth:`Arrivals.drain`: keep serving until no RPC has arrived for
DRAIN_QUIET_SECONDS; then answer the services' new RPCs UNAVAILABLE (clients
re-send elsewhere; health and reflection go on) until those in flight are done
and none has arrived for REFUSE_QUIET_SECONDS, each phase at most the drain limit
(SHUTDOWN_DRAIN_SECONDS). What still arrives after that meets a stopped server:
gRPC may end such a call CANCELLED rather than UNAVAILABLE, so the refusing phase
waits long enough for a client that was just answered to send again and be told
(a client loop on a loaded machine took over 0.1 s; the suite caught it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# The server's logger: "drained" is one of the server's shutdown lines, as before the split.
log = logging.getLogger("services.servicekit.server")

# After SIGTERM, how long the server must see no new RPC before it stops taking them.
DRAIN_QUIET_SECONDS = 0.1
# While refusing, how long no RPC must arrive before the server stops.
REFUSE_QUIET_SECONDS = 0.5
SHUTTING_DOWN = "the service is shutting down: re-send the request"


async def _refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
    await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)


class Arrivals(grpc.aio.ServerInterceptor):
    """Notes when the last RPC arrived, so shutdown can tell when arrivals stop; once
    `refusing`, answers the services' new RPCs UNAVAILABLE (health and reflection go on).

    `services` gives the full names of the services whose RPCs are refused."""

    def __init__(self, services: Callable[[], list[str]]) -> None:
        self.last = 0.0
        self.refusing = False
        self._services = services

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        self.last = time.monotonic()
        handler = await continuation(details)
        if not self.refusing or handler is None:
            return handler
        if details.method.rpartition("/")[0][1:] not in self._services():
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _refuse, request_deserializer=handler.request_deserializer
            )
        return grpc.unary_unary_rpc_method_handler(_refuse, request_deserializer=handler.request_deserializer)

    async def drain(self, in_flight: Callable[[], int], limit: float) -> None:
        """Before the server stops taking RPCs (see the module's docstring): serve until
        arrivals pause, then refuse until `in_flight()` is 0 and arrivals pause again;
        each phase at most `limit` seconds."""
        started = time.monotonic()
        deadline = started + limit
        while True:
            now = time.monotonic()
            quiet = now - max(self.last, started)
            if quiet >= DRAIN_QUIET_SECONDS or now >= deadline:
                break
            await asyncio.sleep(min(DRAIN_QUIET_SECONDS - quiet, deadline - now))
        self.refusing = True
        drained = time.monotonic()
        deadline = drained + limit
        # Until those in flight are done and every client that kept sending was told.
        while time.monotonic() < deadline and (  # noqa: ASYNC110 (counters, no event)
            in_flight() > 0 or time.monotonic() - self.last < REFUSE_QUIET_SECONDS
        ):
            await asyncio.sleep(0.01)
        log.info(
            "drained",
            extra={
                "serving_seconds": round(drained - started, 3),
                "refusing_seconds": round(time.monotonic() - drained, 3),
                "in_flight": in_flight(),
            },
        )
