"""The one server interceptor every service runs: request id, authentication,
timing (Prometheus and the monitoring reporter) and error mapping."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeAlias, cast

import grpc
from prometheus_client import Counter, Gauge, Histogram

from .auth import Access, AuthError, VerifiedTokens, authorize, current_principal
from .clock import SYSTEM_CLOCK, Clock
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

IN_FLIGHT = Gauge("grpc_server_in_flight", "RPCs being served (streams included).")

TimingSink = Callable[[str, str, float], None]  # (method, status code name, duration ms)

if TYPE_CHECKING:  # the stubs' generics are not subscriptable at run time
    AioContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    UnaryBehavior: TypeAlias = Callable[[Any, AioContext], Awaitable[Any]]
    StreamBehavior: TypeAlias = Callable[[Any, AioContext], AsyncIterator[Any]]
    # A server-streaming behaviour that yields each response already serialized.
    SerializedStream: TypeAlias = Callable[[Any, AioContext], AsyncIterator[bytes]]
# types-grpcio describes RpcMethodHandler for the threaded server (sync callables taking
# grpc.ServicerContext). On grpc.aio its behaviours are coroutine functions or async
# generator functions taking an aio context: the casts below say so, where they are read.


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every RPC of the services registered with an access level, unary and
    server-streaming alike (client-streaming RPCs are refused at registration).

    For a server stream, authentication happens before the first message, the
    status is the stream's final one, and the latency recorded is the time to
    the first message (or to the end, if none was sent): a live stream that
    stays open for minutes must not read as a slow endpoint.

    ``serialized`` maps a server-streaming method (``/package.Service/Method``)
    to a behaviour that yields its responses as bytes already serialized (one
    encoding shared by many streams): it is served in place of the servicer's
    method, with no response serializer, behind the same authentication, timing
    and error mapping. The client sees the same messages.
    """

    def __init__(
        self,
        access: Mapping[str, Access],
        jwt_secret: str,
        timing_sink: TimingSink | None = None,
        clock: Clock = SYSTEM_CLOCK,
        max_cached_tokens: int = 4096,
        serialized: Mapping[str, SerializedStream] | None = None,
    ) -> None:
        self._access = access
        self._serialized = dict(serialized or {})
        # Tokens verified once are remembered (exp still checked on every call).
        self.tokens = VerifiedTokens(jwt_secret, max_cached_tokens, clock)
        self._sink = timing_sink
        self.in_flight = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        access = self._access.get(details.method)
        if handler is None or access is None:
            return handler  # health, reflection: not ours to wrap
        call = _Call(self, access, details)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                call.unary(cast("UnaryBehavior", handler.unary_unary)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            serialized = self._serialized.get(details.method)
            if serialized is not None:
                return grpc.unary_stream_rpc_method_handler(
                    call.stream(serialized),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=None,  # the bytes are sent as they are
                )
            return grpc.unary_stream_rpc_method_handler(
                call.stream(cast("UnaryBehavior | StreamBehavior", handler.unary_stream)),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # Client streams are refused by ServiceApp.add_service; never serve one unchecked.
        raise RuntimeError(f"{details.method}: client-streaming RPCs are not supported by the kit")


class _Call:
    """What one RPC's wrapper needs: its method, access level and metadata."""

    def __init__(self, owner: ServiceInterceptor, access: Access, details: grpc.HandlerCallDetails) -> None:
        self.owner = owner
        self.access = access
        self.method = details.method
        self.service, _, self.name = details.method[1:].rpartition("/")
        # Text values only: binary (`-bin`) metadata never carries what is read here.
        self.metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}

    def _begin(self) -> contextvars.Token[str]:
        """Request id, then authentication (raises AuthError)."""
        rid_token = request_id.set(self.metadata.get("x-request-id") or uuid.uuid4().hex)
        self.owner.in_flight += 1
        IN_FLIGHT.inc()
        return rid_token

    def _authenticate(self) -> None:
        try:
            principal = self.owner.tokens.verify(self.metadata.get("authorization"))
        except AuthError:
            if self.access is not Access.PUBLIC:
                raise
            principal = None  # public RPCs never answer 401: a bad token is served as anonymous
        authorize(self.access, principal)
        current_principal.set(principal)

    async def _fail(self, exc: Exception, context: AioContext) -> NoReturn:
        """Map an exception to the RPC's status and abort with it (raises AbortError)."""
        if isinstance(exc, AuthError):
            code = grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
            await context.abort(code, str(exc))
        if isinstance(exc, ServiceError):
            status = exc.to_status()
            await context.abort(status.code, status.details, status.trailing_metadata)
        if isinstance(exc, NotImplementedError):
            # The generated base servicer's answer for an RPC not built yet.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.name} is not implemented yet")
        log.exception("unhandled error", extra={"method": self.method}, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise AssertionError("unreachable")  # context.abort always raises

    def _end(self, code: grpc.StatusCode, seconds: float, rid_token: contextvars.Token[str]) -> None:
        self.owner.in_flight -= 1
        IN_FLIGHT.dec()
        RPC_SECONDS.labels(self.service, self.name).observe(seconds)
        RPC_HANDLED.labels(self.service, self.name, code.name).inc()
        sink = self.owner._sink
        if sink is not None:
            try:
                sink(self.method, code.name, seconds * 1000.0)
            except Exception:  # a sink must never fail the RPC
                log.exception("timing sink failed")
        with contextlib.suppress(ValueError):  # a generator may be closed in another context
            request_id.reset(rid_token)

    def unary(self, behavior: UnaryBehavior) -> UnaryBehavior:
        async def wrapped(request: Any, context: AioContext) -> Any:
            rid_token = self._begin()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                self._authenticate()
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except Exception as exc:
                code = _code_of(exc)
                await self._fail(exc, context)
            finally:
                self._end(code, time.perf_counter() - started, rid_token)

        return wrapped

    def stream(self, behavior: UnaryBehavior | StreamBehavior) -> UnaryBehavior | StreamBehavior:
        if not inspect.isasyncgenfunction(behavior):
            # A handler writing with context.write(): a coroutine like a unary one.
            return self.unary(cast("UnaryBehavior", behavior))
        messages = cast("StreamBehavior", behavior)

        async def wrapped(request: Any, context: AioContext) -> AsyncIterator[Any]:
            rid_token = self._begin()
            started = time.perf_counter()
            first: float | None = None
            code = grpc.StatusCode.OK
            try:
                self._authenticate()
                async for message in messages(request, context):
                    if first is None:
                        first = time.perf_counter()
                    yield message
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _aborted_code(context)
                raise
            except Exception as exc:
                code = _code_of(exc)
                await self._fail(exc, context)
            finally:
                self._end(code, (first if first is not None else time.perf_counter()) - started, rid_token)

        return wrapped


def _aborted_code(context: AioContext) -> grpc.StatusCode:
    # The stubs declare code() as StatusCode, but grpc.aio answers None until a code is set.
    code = cast("grpc.StatusCode | None", context.code())
    return code if code is not None else grpc.StatusCode.UNKNOWN


def _code_of(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, AuthError):
        return grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL
