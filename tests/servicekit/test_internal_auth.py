"""Service tokens, internal RPCs only services can call, and server-streaming RPCs
through the kit's interceptor exactly like unary ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.auth import Access, ServiceTokens, current_principal, issue_token
from services.servicekit.channels import service_channel
from services.servicekit.clock import ManualClock
from services.servicekit.errors import ServiceError
from services.servicekit.logs import request_id
from services.servicekit.server import ServiceApp
from tests.support import JWT_SECRET

pytestmark = pytest.mark.timeout(60)

OTHER_SECRET = "another-secret-of-32-bytes-or-more!!"
Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


# --------------------------------------------------------------------------- service tokens


def _claims(token: str) -> dict[str, Any]:
    """The verified claims of a token minted on a manual clock (time checks left out)."""
    return jwt.decode(
        token, JWT_SECRET, algorithms=["HS256"], options={"verify_exp": False, "verify_iat": False}
    )


def test_service_tokens_are_minted_short_lived_and_refreshed_before_expiry() -> None:
    clock = ManualClock()
    tokens = ServiceTokens(JWT_SECRET, "analytics", ttl_seconds=300, refresh_before=60, clock=clock)
    first = tokens.token()
    claims = _claims(first)
    assert (claims["sub"], claims["role"]) == ("analytics", "service")
    assert claims["exp"] - claims["iat"] == 300
    assert claims["iat"] == int(clock.time())
    clock.advance(239)  # 61 s left: still the same token
    assert tokens.token() == first and tokens.minted == 1
    clock.advance(2)  # 59 s left: a new one
    second = tokens.token()
    assert second != first and tokens.minted == 2
    assert _claims(second)["exp"] == claims["exp"] + 241
    assert tokens.metadata() == ("authorization", f"Bearer {second}")
    with pytest.raises(ValueError):
        ServiceTokens(JWT_SECRET, "x", ttl_seconds=60, refresh_before=60)


# --------------------------------------------------------------------------- internal RPCs


class Recorder(monitoring_pb2_grpc.MonitoringServiceServicer):
    """Internal RPCs that answer and record who called."""

    def __init__(self) -> None:
        self.callers: list[tuple[str, str, str]] = []

    async def RecordApiTimings(
        self, request: monitoring_pb2.RecordApiTimingsRequest, context: Any
    ) -> monitoring_pb2.RecordApiTimingsResponse:
        principal = current_principal.get()
        assert principal is not None
        self.callers.append((principal.subject, principal.role, request_id.get()))
        return monitoring_pb2.RecordApiTimingsResponse(accepted=len(request.timings))

    async def GetServiceSummary(self, request: Any, context: Any) -> monitoring_pb2.GetServiceSummaryResponse:
        return monitoring_pb2.GetServiceSummaryResponse(open_critical_alerts=7)


def module(name: str, wire: Any) -> SimpleNamespace:
    return SimpleNamespace(
        __name__=f"{name}.app", NAME=name, SETTINGS=monitoring_app.SETTINGS, MIGRATIONS=None, wire=wire
    )


@pytest.fixture
async def recorder(start_service: Any) -> tuple[ServiceApp, Recorder]:
    servicer = Recorder()

    async def wire(app: ServiceApp) -> None:
        app.add_service(
            monitoring_app.SERVICE,
            servicer,
            monitoring_pb2_grpc.add_MonitoringServiceServicer_to_server,
            monitoring_app.ACCESS,
        )

    return await start_service(module("monitoring", wire)), servicer


async def test_internal_rpcs_refuse_everything_but_a_service_token(recorder: Any) -> None:
    app, servicer = recorder
    internal = [m for m, level in monitoring_app.ACCESS.items() if level is Access.INTERNAL]
    assert sorted(internal) == ["GetServiceSummary", "RecordApiTimings", "ReportServiceStats"]
    requests = {
        "RecordApiTimings": monitoring_pb2.RecordApiTimingsRequest(),
        "ReportServiceStats": monitoring_pb2.ReportServiceStatsRequest(),
        "GetServiceSummary": monitoring_pb2.GetServiceSummaryRequest(),
    }
    cases: list[tuple[Metadata, grpc.StatusCode]] = [
        ((), grpc.StatusCode.UNAUTHENTICATED),
        (bearer("not-a-jwt"), grpc.StatusCode.UNAUTHENTICATED),
        (bearer(issue_token(OTHER_SECRET, "analytics", "service")), grpc.StatusCode.UNAUTHENTICATED),
        (
            bearer(issue_token(JWT_SECRET, "analytics", "service", ttl_seconds=-10)),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (bearer(issue_token(JWT_SECRET, "analytics", "superuser")), grpc.StatusCode.UNAUTHENTICATED),
        (bearer(issue_token(JWT_SECRET, "u1", "user")), grpc.StatusCode.PERMISSION_DENIED),
        (bearer(issue_token(JWT_SECRET, "root", "admin")), grpc.StatusCode.PERMISSION_DENIED),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(ch)
        for method in internal:
            for metadata, expected in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await getattr(stub, method)(requests[method], metadata=metadata, timeout=5)
                assert err.value.code() == expected, (method, metadata)
        # A hand-made service token with the right secret passes.
        ok = await stub.RecordApiTimings(
            monitoring_pb2.RecordApiTimingsRequest(timings=[monitoring_pb2.ApiTiming()]),
            metadata=bearer(issue_token(JWT_SECRET, "effects", "service")),
            timeout=5,
        )
        assert ok.accepted == 1
    assert [c[:2] for c in servicer.callers] == [("effects", "service")]


async def test_service_channel_attaches_the_callers_token(recorder: Any, start_service: Any) -> None:
    monitoring, servicer = recorder

    async def wire(app: ServiceApp) -> None:
        pass

    caller = await start_service(module("analytics", wire))
    stub = monitoring_pb2_grpc.MonitoringServiceStub(caller.service_channel(f"127.0.0.1:{monitoring.port}"))
    address = f"127.0.0.1:{monitoring.port}"
    assert caller.service_channel(address) is caller.service_channel(address)
    rid = request_id.set("req-from-analytics")
    try:
        # A user's authorization set by the caller is replaced, never forwarded.
        reply = await stub.RecordApiTimings(
            monitoring_pb2.RecordApiTimingsRequest(),
            metadata=bearer(issue_token(JWT_SECRET, "u1", "admin")),
            timeout=5,
        )
    finally:
        request_id.reset(rid)
    assert reply.accepted == 0
    assert (await stub.GetServiceSummary(monitoring_pb2.GetServiceSummaryRequest())).open_critical_alerts == 7
    assert servicer.callers == [(caller.name, "service", "req-from-analytics")]
    assert caller.service_tokens.minted == 1  # reused across calls


# --------------------------------------------------------------------------- server streaming

# A real proto service with a server-streaming RPC (built at run time: no such RPC is in
# protos/ yet) whose messages are monitoring's.
_FILE = descriptor_pb2.FileDescriptorProto(
    name="cosnap/test/v1/stream_test.proto",
    package="cosnap.test.v1",
    dependency=[monitoring_pb2.DESCRIPTOR.name],
    syntax="proto3",
)
_SERVICE = _FILE.service.add(name="StreamTestService")
for _name, _client_streaming in (("Watch", False), ("WatchInternal", False), ("Upload", True)):
    _SERVICE.method.add(
        name=_name,
        input_type=".cosnap.monitoring.v1.GetSystemHealthRequest",
        output_type=".cosnap.monitoring.v1.ComponentHealth",
        server_streaming=True,
        client_streaming=_client_streaming,
    )
descriptor_pool.Default().AddSerializedFile(_FILE.SerializeToString())
STREAM_SERVICE = descriptor_pool.Default().FindServiceByName("cosnap.test.v1.StreamTestService")
WATCH = "/cosnap.test.v1.StreamTestService/Watch"
WATCH_INTERNAL = "/cosnap.test.v1.StreamTestService/WatchInternal"
STREAM_ACCESS = {"Watch": Access.ADMIN, "WatchInternal": Access.INTERNAL, "Upload": Access.ADMIN}


class Streamer:
    """`Watch` yields `count` messages (the caller's subject, the request id), then ends as
    `mode` says; `WatchInternal` writes through context.write()."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.count = 3
        self.started = 0
        self.cancelled = asyncio.Event()

    async def Watch(
        self, request: monitoring_pb2.GetSystemHealthRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[monitoring_pb2.ComponentHealth]:
        self.started += 1
        principal = current_principal.get()
        assert principal is not None
        for i in range(self.count):
            yield monitoring_pb2.ComponentHealth(
                name=principal.subject, detail=request_id.get(), latency_ms=i
            )
        if self.mode == "service-error":
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "stream ended early")
        if self.mode == "crash":
            raise RuntimeError("secret detail that must not leak")
        if self.mode == "forever":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

    async def WatchInternal(
        self, request: monitoring_pb2.GetSystemHealthRequest, context: grpc.aio.ServicerContext
    ) -> None:
        principal = current_principal.get()
        assert principal is not None
        await context.write(monitoring_pb2.ComponentHealth(name=principal.subject, status=principal.role))


def add_streamer(servicer: Streamer, server: grpc.aio.Server) -> None:
    handlers = {
        name: grpc.unary_stream_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=monitoring_pb2.GetSystemHealthRequest.FromString,
            response_serializer=monitoring_pb2.ComponentHealth.SerializeToString,
        )
        for name in ("Watch", "WatchInternal")
    }
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(STREAM_SERVICE.full_name, handlers)]
    )


def test_client_streaming_rpcs_are_refused_at_registration() -> None:
    app = ServiceApp("probe", monitoring_app.SETTINGS())
    with pytest.raises(ValueError, match="client-streaming"):
        app.add_service(STREAM_SERVICE, Streamer(), add_streamer, STREAM_ACCESS)


@pytest.fixture
async def streamer(start_service: Any) -> tuple[ServiceApp, Streamer, list[tuple[str, str, float]]]:
    servicer = Streamer()
    timings: list[tuple[str, str, float]] = []

    async def wire(app: ServiceApp) -> None:
        # The kit refuses client streams: register the two server-streaming RPCs only.
        app.add_service(
            _ServerStreamsOnly(STREAM_SERVICE),
            servicer,
            add_streamer,
            {k: v for k, v in STREAM_ACCESS.items() if k != "Upload"},
        )
        app.timing_sink = lambda method, code, ms: timings.append((method, code, ms))

    return await start_service(module("streamer", wire)), servicer, timings


class _ServerStreamsOnly:
    """The service's descriptor without its client-streaming method (what add_service reads)."""

    def __init__(self, descriptor: Any) -> None:
        self.full_name = descriptor.full_name
        self.methods = [m for m in descriptor.methods if not m.client_streaming]


async def _watch(ch: grpc.aio.Channel, metadata: Metadata, method: str = WATCH) -> list[Any]:
    call = ch.unary_stream(
        method,
        request_serializer=monitoring_pb2.GetSystemHealthRequest.SerializeToString,
        response_deserializer=monitoring_pb2.ComponentHealth.FromString,
    )(monitoring_pb2.GetSystemHealthRequest(), metadata=metadata, timeout=5)
    return [m async for m in call]


async def test_streaming_rpcs_are_authenticated_like_unary_ones(streamer: Any) -> None:
    app, servicer, timings = streamer
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        for metadata, expected in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (bearer("not-a-jwt"), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(issue_token(OTHER_SECRET, "root", "admin")), grpc.StatusCode.UNAUTHENTICATED),
            (bearer(issue_token(JWT_SECRET, "u1", "user")), grpc.StatusCode.PERMISSION_DENIED),
            (bearer(issue_token(JWT_SECRET, "analytics", "service")), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _watch(ch, metadata)
            assert err.value.code() == expected, metadata
        assert servicer.started == 0  # refused before the handler ran

        admin = bearer(issue_token(JWT_SECRET, "root", "admin"))
        messages = await _watch(ch, (*admin, ("x-request-id", "rid-stream-1")))
        assert [(m.name, m.detail, m.latency_ms) for m in messages] == [
            ("root", "rid-stream-1", 0),
            ("root", "rid-stream-1", 1),
            ("root", "rid-stream-1", 2),
        ]
        # Internal streams: a service token only; context.write() handlers are wrapped too.
        for metadata, expected in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            (admin, grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await _watch(ch, metadata, WATCH_INTERNAL)
            assert err.value.code() == expected
    tokens = ServiceTokens(JWT_SECRET, "effects")
    async with service_channel(f"127.0.0.1:{app.port}", tokens) as ch:
        [message] = await _watch(ch, (), WATCH_INTERNAL)
        assert (message.name, message.status) == ("effects", "service")
    codes = [(m, c) for m, c, _ in timings]
    assert codes == [
        (WATCH, "UNAUTHENTICATED"),
        (WATCH, "UNAUTHENTICATED"),
        (WATCH, "UNAUTHENTICATED"),
        (WATCH, "PERMISSION_DENIED"),
        (WATCH, "PERMISSION_DENIED"),
        (WATCH, "OK"),
        (WATCH_INTERNAL, "UNAUTHENTICATED"),
        (WATCH_INTERNAL, "PERMISSION_DENIED"),
        (WATCH_INTERNAL, "OK"),
    ]
    assert all(ms >= 0 for _, _, ms in timings)


async def test_streaming_errors_are_mapped_after_messages(streamer: Any) -> None:
    app, servicer, timings = streamer
    admin = bearer(issue_token(JWT_SECRET, "root", "admin"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        for mode, code, details in [
            ("service-error", grpc.StatusCode.FAILED_PRECONDITION, "stream ended early"),
            ("crash", grpc.StatusCode.INTERNAL, "internal error"),
        ]:
            servicer.mode = mode
            received: list[Any] = []
            call = ch.unary_stream(
                WATCH,
                request_serializer=monitoring_pb2.GetSystemHealthRequest.SerializeToString,
                response_deserializer=monitoring_pb2.ComponentHealth.FromString,
            )(monitoring_pb2.GetSystemHealthRequest(), metadata=admin, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for message in call:
                    received.append(message)
            assert len(received) == 3  # what was sent before the error arrived
            assert (err.value.code(), err.value.details()) == (code, details)
    assert [c for _, c, _ in timings] == ["FAILED_PRECONDITION", "INTERNAL"]


async def test_a_stream_the_client_leaves_is_cancelled_and_counted(streamer: Any) -> None:
    app, servicer, timings = streamer
    servicer.mode = "forever"
    admin = bearer(issue_token(JWT_SECRET, "root", "admin"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        call = ch.unary_stream(
            WATCH,
            request_serializer=monitoring_pb2.GetSystemHealthRequest.SerializeToString,
            response_deserializer=monitoring_pb2.ComponentHealth.FromString,
        )(monitoring_pb2.GetSystemHealthRequest(), metadata=admin)
        assert [await call.read() for _ in range(3)][-1].latency_ms == 2
        call.cancel()
        await asyncio.wait_for(servicer.cancelled.wait(), 5)
    for _ in range(100):
        if timings:
            break
        await asyncio.sleep(0.01)
    [(method, code, _ms)] = timings
    assert (method, code) == (WATCH, "CANCELLED")
