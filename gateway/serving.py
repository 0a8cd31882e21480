"""Serving the edge: aiohttp's app runner, except that the HTTP errors aiohttp answers
by itself (a malformed request line, a header above the limits) are google.rpc.Status
JSON like every other answer of the edge, instead of aiohttp's plain text."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
from aiohttp import http_exceptions, web, web_protocol, web_request, web_server

from gateway.status import status_json

_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 413: grpc.StatusCode.RESOURCE_EXHAUSTED}


def describe(status: int, exc: BaseException | None) -> str:
    """A client-facing description of an HTTP-level error (never a library's text)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return "request line or header too long"
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return "malformed HTTP request: bad method"
    if isinstance(exc, http_exceptions.BadHttpMessage) or status == 400:
        return "malformed HTTP request"
    if status == 413:
        return "request too large"
    if status == 504:
        return "the edge did not answer in time"
    return "internal edge error"


class _JsonErrorHandler(web_protocol.RequestHandler):
    def handle_error(
        self,
        request: web_request.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once a body went out
        code = _CODES.get(
            status, grpc.StatusCode.DEADLINE_EXCEEDED if status == 504 else grpc.StatusCode.INTERNAL
        )
        response = web.Response(
            status=status, body=status_json(code, describe(status, exc)), content_type="application/json"
        )
        response.force_close()
        return response


class _JsonErrorServer(web_server.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        # aiohttp's Server builds its RequestHandler from these same private fields.
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """web.AppRunner whose connections answer HTTP-level errors as JSON statuses."""

    async def _make_server(self) -> web_server.Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


class ListenError(OSError):
    """The edge's port cannot be bound."""


async def serve(
    app: web.Application, host: str, port: int, on_listening: Callable[[], None] | None = None
) -> None:
    """Serve `app` on host:port until SIGTERM or SIGINT; ListenError if the port is taken."""
    runner = EdgeRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise ListenError(
                exc.errno, f"cannot listen on {host}:{port} (EDGE_PORT): {exc.strerror}"
            ) from None
        if on_listening is not None:
            on_listening()
        await stop.wait()
    finally:
        await runner.cleanup()
