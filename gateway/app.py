"""The local REST edge: an aiohttp app that transcodes REST/JSON to gRPC like Envoy does."""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TypeAlias
from urllib.parse import unquote

import brotli
import grpc
from aiohttp import web
from google.protobuf.message import Message

from gateway import docs
from gateway.config import Settings
from gateway.routes import Route, RouteTable, build_routes, load_descriptors
from gateway.status import StatusRenderer, status_json
from gateway.streaming import stream_route
from gateway.timeouts import timeout_for
from gateway.transcode import TranscodeError, Transcoder

access_log = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")

MIN_COMPRESS_BYTES = 1024
COMPRESSIBLE = ("application/json", "text/", "application/javascript", "application/xml")
CORS_ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id"
CORS_EXPOSE_HEADERS = "x-request-id"
FORWARDED_HEADERS = ("authorization",)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", 64 << 20),
]

REQUEST_ID = web.RequestKey("request_id", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
UnaryCall: TypeAlias = "grpc.aio.UnaryUnaryMultiCallable[Message, Message]"


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def error_response(
    http: int,
    code: grpc.StatusCode,
    message: str,
    violations: Sequence[tuple[str, str]] = (),
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        status=http,
        body=status_json(code, message, violations),
        content_type="application/json",
        headers=headers,
    )


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body exceeds the limit of {limit} bytes")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (by Content-Length, then as read)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    buffer = bytearray()
    async for chunk in request.content.iter_any():
        buffer += chunk
        if len(buffer) > limit:
            raise BodyTooLarge(limit)
    return bytes(buffer)


def parse_query(raw: str) -> list[tuple[str, str]]:
    """Query parameters, percent-decoded; '+' stays '+' (Envoy's default)."""
    pairs: list[tuple[str, str]] = []
    for part in raw.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def choose_encoding(accept_encoding: str) -> str | None:
    """'br' or 'gzip' (preferring br at equal quality), or None."""
    quality: dict[str, float] = {}
    for item in accept_encoding.split(","):
        token, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if token:
            quality[token.lower()] = q
    wildcard = quality.get("*", 0.0)
    best = max(("br", "gzip"), key=lambda enc: quality.get(enc, wildcard))
    return best if quality.get(best, wildcard) > 0 else None


class Edge:
    """Route table, gRPC channels and the request handling around them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        descriptors = load_descriptors(settings.descriptor_set)
        self.routes: RouteTable = build_routes(descriptors.pool, descriptors.services)
        self.transcoder = Transcoder(descriptors.pool)
        self.statuses = StatusRenderer(descriptors.pool)
        self.channels: dict[str, grpc.aio.Channel] = {}
        self._calls: dict[str, UnaryCall] = {}
        self._origins = frozenset(o for o in settings.cors_origins if not o.endswith(":*"))
        self._any_port = frozenset(o[:-2] for o in settings.cors_origins if o.endswith(":*"))

    # -- lifecycle --------------------------------------------------------------------------

    async def channels_ctx(self, app: web.Application) -> AsyncIterator[None]:
        for address in sorted(set(self.settings.backends.values())):
            self.channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        yield
        for channel in self.channels.values():
            await channel.close()
        self.channels.clear()
        self._calls.clear()

    def _call(self, route: Route) -> UnaryCall | None:
        call = self._calls.get(route.grpc_path)
        if call is None:
            address = self.settings.backends.get(route.service)
            channel = self.channels.get(address) if address else None
            if channel is None:
                return None
            output = self.transcoder.message_class(route.method.output_type)
            call = channel.unary_unary(
                route.grpc_path,
                request_serializer=_serialize,
                response_deserializer=output.FromString,
            )
            self._calls[route.grpc_path] = call
        return call

    # -- handlers ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def transcode(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.rel_url.raw_path
        match = self.routes.match(request.method, raw_path)
        if match is None:
            # Envoy (reject_unknown_method) answers 404 for an unknown path and for a known
            # path with the wrong HTTP method alike.
            return error_response(
                404,
                grpc.StatusCode.NOT_FOUND,
                f"no route for {request.method} {raw_path}",
            )
        route = match.route
        body = b""
        if route.body:
            settings = self.settings
            limit = settings.max_upload_bytes if route.raw_body else settings.max_body_bytes
            try:
                body = await read_body(request, limit)
            except BodyTooLarge as exc:
                return error_response(413, grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            message = self.transcoder.build_request(
                route,
                match.bindings,
                parse_query(request.rel_url.raw_query_string),
                body,
                request.headers.get("Content-Type", ""),
            )
        except TranscodeError as exc:
            return error_response(400, grpc.StatusCode.INVALID_ARGUMENT, str(exc), exc.violations)

        if route.method.server_streaming:  # SSE or NDJSON: gateway/streaming.py
            return await stream_route(self, request, route, message, self._metadata(request))
        call = self._call(route)
        if call is None:
            return error_response(
                503,
                grpc.StatusCode.UNAVAILABLE,
                f"no backend configured for {route.service}",
            )
        try:
            reply = await call(
                message,
                timeout=self.timeout_for(route),
                metadata=self._metadata(request),
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            rendered = self.statuses.render(code, err.details(), tuple(err.trailing_metadata() or ()))
            if not rendered.deliberate:
                log.warning(
                    "backend error",
                    extra={"route": route.grpc_path, "code": code.name, "details": err.details()},
                )
            headers = {}
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                retry_after = rendered.retry_after or self.settings.retry_after_seconds
                headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
            return web.Response(
                status=rendered.http, body=rendered.body, content_type="application/json", headers=headers
            )
        payload, content_type = self.transcoder.render_response(route, reply)
        return web.Response(body=payload, headers={"Content-Type": content_type})

    def timeout_for(self, route: Route) -> float | None:
        """The RPC's deadline from gateway/timeouts.py (Envoy's route timeout), capped by
        EDGE_GRPC_TIMEOUT_SECONDS."""
        seconds = timeout_for(route.grpc_path, route.method.server_streaming)
        cap = self.settings.grpc_timeout_seconds
        return cap if seconds is None else min(seconds, cap)

    def _metadata(self, request: web.Request) -> list[tuple[str, str]]:
        metadata = [("x-request-id", request[REQUEST_ID])]
        for name in FORWARDED_HEADERS:
            value = request.headers.get(name)
            if value is not None:
                metadata.append((name, value))
        forwarded = [v for v in (request.headers.get("X-Forwarded-For"), request.remote) if v]
        if forwarded:
            metadata.append(("x-forwarded-for", ", ".join(forwarded)))
        return metadata

    # -- middleware: request id, CORS, compression, errors, access log ----------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        request[REQUEST_ID] = request_id
        origin = request.headers.get("Origin")
        allowed = origin if origin and self._origin_allowed(origin) else None
        response: web.StreamResponse
        try:
            preflight = allowed and request.method == "OPTIONS"
            if preflight and "Access-Control-Request-Method" in request.headers:
                response = self._preflight()
            else:
                response = await handler(request)
        except web.HTTPException as exc:  # aiohttp's own answers, as JSON statuses
            code = grpc.StatusCode.NOT_FOUND if exc.status == 404 else grpc.StatusCode.UNKNOWN
            response = error_response(exc.status, code, exc.reason)
        except Exception:
            log.exception("unhandled error for %s %s", request.method, request.path)
            response = error_response(500, grpc.StatusCode.INTERNAL, "internal edge error")
        response.headers["x-request-id"] = request_id
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
            response.headers.add("Vary", "Origin")
        if isinstance(response, web.Response):
            self._compress(request, response)
        access_log.info(
            json.dumps(
                {
                    "method": request.method,
                    "path": request.path,
                    "status": response.status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                    "request_id": request_id,
                },
            ),
        )
        return response

    def _origin_allowed(self, origin: str) -> bool:
        if origin in self._origins or "*" in self._origins:
            return True
        host, colon, port = origin.rpartition(":")
        if colon and port.isdigit() and host in self._any_port:
            return True
        return origin in self._any_port  # the default port of a `:*` entry

    def _preflight(self) -> web.Response:
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
                "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                "Access-Control-Max-Age": str(self.settings.cors_max_age_seconds),
            },
        )

    @staticmethod
    def _compress(request: web.Request, response: web.Response) -> None:
        body = response.body
        content_type = response.headers.get("Content-Type", "")
        if not isinstance(body, bytes) or not content_type.startswith(COMPRESSIBLE):
            return
        if "Content-Encoding" in response.headers:
            return
        response.headers.add("Vary", "Accept-Encoding")
        if len(body) < MIN_COMPRESS_BYTES:
            return
        encoding = choose_encoding(request.headers.get("Accept-Encoding", ""))
        if encoding == "br":
            response.body = brotli.compress(body, quality=5)
        elif encoding == "gzip":
            response.body = gzip.compress(body, compresslevel=6)
        else:
            return
        response.headers["Content-Encoding"] = encoding


EDGE = web.AppKey("edge", Edge)


def create_app(settings: Settings | None = None) -> web.Application:
    """The edge as an aiohttp application; gRPC channels open on startup, close on cleanup."""
    settings = settings or Settings()
    edge = Edge(settings)
    app = web.Application(
        middlewares=[edge.middleware],
        # Bodies are read and limited by the edge itself (JSON 413), never by aiohttp.
        client_max_size=max(settings.max_body_bytes, settings.max_upload_bytes) + 1,
    )
    app[EDGE] = edge
    app.cleanup_ctx.append(edge.channels_ctx)
    app.router.add_get("/healthz", edge.healthz)
    docs.setup(app, edge.transcoder.pool, edge.routes)  # /api/openapi.json, /api/docs, /metrics
    app.router.add_route("*", "/{tail:.*}", edge.transcode)
    return app
