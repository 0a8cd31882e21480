"""gRPC status -> HTTP, as Envoy's grpc_json_transcoder does with `convert_grpc_status: true`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Envoy's Grpc::Utility::grpcToHttpStatus.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


def http_status(code: grpc.StatusCode) -> int:
    return GRPC_TO_HTTP.get(code, 500)


def status_json(code: grpc.StatusCode, message: str) -> bytes:
    """A google.rpc.Status without details, as JSON (defaults omitted like proto3 JSON)."""
    body: dict[str, Any] = {}
    if code.value[0]:
        body["code"] = code.value[0]
    if message:
        body["message"] = message
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class StatusRenderer:
    """Renders a failed call's status, details included, with the edge's descriptor pool."""

    def __init__(self, pool: DescriptorPool) -> None:
        self.pool = pool
        self._status_class: type[Message] | None
        try:
            self._status_class = GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))
        except KeyError:
            self._status_class = None

    def render(
        self,
        code: grpc.StatusCode,
        details: str | None,
        trailing_metadata: Sequence[tuple[str, str | bytes]] | None,
    ) -> tuple[int, bytes]:
        """HTTP status and google.rpc.Status JSON body of a failed call."""
        rich = self._rich_status(code, trailing_metadata or ())
        if rich is not None:
            return http_status(code), rich
        return http_status(code), status_json(code, details or "")

    def _rich_status(
        self,
        code: grpc.StatusCode,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> bytes | None:
        if self._status_class is None:
            return None
        for key, value in metadata:
            if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
                continue
            try:
                status = self._status_class.FromString(value)
                printed = json_format.MessageToDict(status, descriptor_pool=self.pool)
            except (DecodeError, TypeError, KeyError, json_format.Error):
                return None  # undecodable details (e.g. an unknown Any type): plain status
            if cast(Any, status).code != code.value[0]:
                return None  # inconsistent with grpc-status: trust grpc-status
            return json.dumps(printed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return None
