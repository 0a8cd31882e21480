"""The one server interceptor every service runs: request id, authentication,
timing (Prometheus and the monitoring reporter) and error mapping."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from .auth import Access, AuthError, authorize, current_principal, verify
from .errors import ServiceError
from .logs import request_id

log = logging.getLogger(__name__)

# Bucket edges sit on the alert thresholds (3 s warning, 5 s critical).
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to answer an RPC.",
    ["grpc_service", "grpc_method"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30),
)
RPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs answered, by status.",
    ["grpc_service", "grpc_method", "grpc_code"],
)

TimingSink = Callable[[str, str, float], None]  # (method, status code name, duration ms)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        access: Mapping[str, Access],
        jwt_secret: str,
        timing_sink: TimingSink | None = None,
    ) -> None:
        self._access = access
        self._secret = jwt_secret
        self._sink = timing_sink

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        access = self._access.get(details.method)
        if handler is None or access is None or handler.unary_unary is None:
            return handler  # health, reflection: not ours to wrap
        metadata = dict(details.invocation_metadata or ())
        behavior = handler.unary_unary
        method = details.method
        service, _, name = method[1:].rpartition("/")

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            rid = metadata.get("x-request-id") or uuid.uuid4().hex
            rid_token = request_id.set(rid)
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                principal = verify(metadata.get("authorization"), self._secret)
                authorize(access, principal)
                current_principal.set(principal)
                return await behavior(request, context)
            except AuthError as exc:
                code = grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
                await context.abort(code, str(exc))
            except ServiceError as exc:
                code = exc.code
                status = exc.to_status()
                await context.abort(status.code, status.details, status.trailing_metadata)
            except NotImplementedError:
                # The generated base servicer's answer for an RPC not built yet.
                code = grpc.StatusCode.UNIMPLEMENTED
                await context.abort(code, f"{name} is not implemented yet")
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error", extra={"method": method})
                await context.abort(code, "internal error")
            finally:
                elapsed = time.perf_counter() - started
                RPC_SECONDS.labels(service, name).observe(elapsed)
                RPC_HANDLED.labels(service, name, code.name).inc()
                if self._sink is not None:
                    self._sink(method, code.name, elapsed * 1000.0)
                request_id.reset(rid_token)

        return grpc.unary_unary_rpc_method_handler(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
