"""Channels from one service to another, carrying the caller's `service` token.

Every call on a channel made here sends ``authorization: Bearer <service token>``
(minted and refreshed by :class:`~services.servicekit.auth.ServiceTokens`) and the
request id of the RPC being served, if any, so logs of both sides line up.
Use it through the app: ``stub = MonitoringServiceStub(app.service_channel(addr))``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from .auth import ServiceTokens
from .logs import request_id

__all__ = ["CHANNEL_OPTIONS", "ServiceTokenInterceptor", "ServiceTokenStreamInterceptor", "service_channel"]

# Keepalive so a peer that vanished is noticed, and reconnects that pick up new replicas.
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


class _TokenDetails:
    """Adds the service token (replacing any `authorization` the caller set) and the request id."""

    def __init__(self, tokens: ServiceTokens) -> None:
        self._tokens = tokens

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        pairs = [(k, v) for k, v in (details.metadata or ()) if k not in ("authorization", "x-request-id")]
        pairs.append(self._tokens.metadata())
        rid = request_id.get()
        if rid:
            pairs.append(("x-request-id", rid))
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*pairs),
            details.credentials,
            details.wait_for_ready,
        )


class ServiceTokenInterceptor(_TokenDetails, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class ServiceTokenStreamInterceptor(_TokenDetails, grpc.aio.UnaryStreamClientInterceptor):
    # grpc files an interceptor under its first matching kind only: one class per kind.
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


def service_channel(
    address: str, tokens: ServiceTokens, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """An insecure (in-cluster) channel to `address` whose calls carry `tokens`' service token."""
    return grpc.aio.insecure_channel(
        address,
        options=list(options),
        interceptors=[ServiceTokenInterceptor(tokens), ServiceTokenStreamInterceptor(tokens)],
    )
