"""Server-streaming RPCs at the local edge: Server-Sent Events or newline-delimited JSON.

A route whose method streams its replies (``returns (stream ...)``) is served as

* ``text/event-stream`` when the request's ``Accept`` names it: one SSE event
  per message, ``event:`` its ``kind`` field when it has one (``snapshot``,
  ``heartbeat``) else ``message``, ``data:`` the message as JSON (the same JSON
  as a unary reply: zero values printed);
* ``application/x-ndjson`` otherwise: one JSON object per line.

The status of the call is known before the first byte: the edge waits for the
first message, so a refused call (401, 403, 400, 429...) is an ordinary JSON
error response. An error after that ends the stream with a last event
``event: error`` (SSE) or a ``{"error": {...}}`` line (NDJSON). The call has no
deadline. A client that goes away is noticed within :data:`POLL_SECONDS` (one
poller for every open stream checks the connections) and its gRPC call is
cancelled, which the service sees at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import web
from google.protobuf.message import Message

if TYPE_CHECKING:
    from gateway.app import Edge
    from gateway.routes import Route

POLL_SECONDS = 0.1
SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


class _Watcher:
    """One task polling every open stream's connection; cancels the calls whose client left."""

    def __init__(self) -> None:
        self._open: dict[int, tuple[web.Request, grpc.aio.Call]] = {}  # by id(request)
        self._task: asyncio.Task[None] | None = None

    def add(self, request: web.Request, call: grpc.aio.Call) -> None:
        self._open[id(request)] = (request, call)
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._poll())

    def discard(self, request: web.Request) -> None:
        self._open.pop(id(request), None)

    async def _poll(self) -> None:
        while self._open:
            await asyncio.sleep(POLL_SECONDS)
            for key, (request, call) in list(self._open.items()):
                transport = request.transport
                if transport is None or transport.is_closing():
                    call.cancel()
                    self._open.pop(key, None)


_WATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watcher] = weakref.WeakKeyDictionary()


def _watcher() -> _Watcher:
    loop = asyncio.get_running_loop()
    watcher = _WATCHERS.get(loop)
    if watcher is None:
        watcher = _WATCHERS[loop] = _Watcher()
    return watcher


def wants_sse(request: web.Request) -> bool:
    return any(
        part.split(";")[0].strip().lower() == SSE for part in request.headers.get("Accept", "").split(",")
    )


def _sse(kind: str, payload: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n"


async def serve_stream(
    request: web.Request,
    call: grpc.aio.UnaryStreamCall[Any, Any],
    to_json: Callable[[Message], dict[str, Any]],
    render_error: Callable[[grpc.aio.AioRpcError], tuple[int, bytes]],
    headers: dict[str, str],
) -> web.StreamResponse:
    """Relay `call` to the client; returns an error response when the call fails before replying."""
    messages: AsyncIterator[Message] = call.__aiter__()
    try:
        first: Message | None = await messages.__anext__()
    except StopAsyncIteration:
        first = None
    except grpc.aio.AioRpcError as err:
        status, payload = render_error(err)
        return web.Response(status=status, body=payload, content_type="application/json")

    sse = wants_sse(request)
    response = web.StreamResponse(
        headers={
            **headers,
            "Content-Type": SSE if sse else NDJSON,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    watcher = _watcher()
    watcher.add(request, call)

    def encode(message: Message) -> bytes:
        body = to_json(message)
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        if sse:
            kind = body.get("kind")
            return _sse(kind if isinstance(kind, str) and kind.isidentifier() else "message", payload)
        return payload + b"\n"

    try:
        if first is not None:
            await response.write(encode(first))
        async for message in messages:
            await response.write(encode(message))
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.CANCELLED:
            status, payload = render_error(err)
            with contextlib.suppress(ConnectionError):
                if sse:
                    await response.write(_sse("error", payload))
                else:
                    await response.write(b'{"error":' + payload + b"}\n")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the edge itself is stopping this handler
        # Otherwise the call was cancelled because the client went away.
    except ConnectionError:
        pass  # the client went away while we wrote
    finally:
        watcher.discard(request)
        call.cancel()
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


async def stream_route(
    edge: Edge, request: web.Request, route: Route, message: Message, metadata: list[tuple[str, str]]
) -> web.StreamResponse:
    """Serve a server-streaming route of `edge` (no deadline; see the module docstring)."""
    address = edge.settings.backends.get(route.service)
    channel = edge.channels.get(address) if address else None
    if channel is None:
        return web.Response(
            status=503,
            body=json.dumps({"code": 14, "message": f"no backend configured for {route.service}"}).encode(),
            content_type="application/json",
        )
    output = edge.transcoder.message_class(route.method.output_type)
    method = channel.unary_stream(
        route.grpc_path, request_serializer=_serialize, response_deserializer=output.FromString
    )
    call = method(message, metadata=metadata)

    def render_error(err: grpc.aio.AioRpcError) -> tuple[int, bytes]:
        rendered = edge.statuses.render(err.code(), err.details(), tuple(err.trailing_metadata() or ()))
        return rendered.http, rendered.body

    def to_json(reply: Message) -> dict[str, Any]:
        return edge.transcoder.to_dict(reply, with_defaults=True)

    headers = {"x-request-id": dict(metadata).get("x-request-id", "")}
    return await serve_stream(request, call, to_json, render_error, headers)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
