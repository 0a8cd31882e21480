"""gRPC status -> HTTP, as Envoy's grpc_json_transcoder does with `convert_grpc_status: true`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2

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


# Codes whose message may come from the gRPC library rather than from the service
# (a backend address, a transport error): the client gets this text instead.
PUBLIC_TEXT: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.UNAVAILABLE: "the service is unavailable: re-send the request",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service did not answer in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "the service is overloaded: re-send after Retry-After seconds",
    grpc.StatusCode.CANCELLED: "the request was cancelled",
    grpc.StatusCode.INTERNAL: "internal error",
    grpc.StatusCode.UNKNOWN: "internal error",
    grpc.StatusCode.DATA_LOSS: "internal error",
}
RETRY_INFO_TYPE = "type.googleapis.com/google.rpc.RetryInfo"


@dataclass(frozen=True)
class Rendered:
    """A failed call as the edge answers it."""

    http: int
    body: bytes
    deliberate: bool  # the service chose this status and its words (a rich status, or its own)
    retry_after: float | None = None  # seconds, from a google.rpc.RetryInfo detail


def http_status(code: grpc.StatusCode) -> int:
    return GRPC_TO_HTTP.get(code, 500)


BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"


def status_json(code: grpc.StatusCode, message: str, violations: Sequence[tuple[str, str]] = ()) -> bytes:
    """A google.rpc.Status as JSON (defaults omitted like proto3 JSON), with a
    google.rpc.BadRequest detail when `violations` (field, description) are given."""
    body: dict[str, Any] = {}
    if code.value[0]:
        body["code"] = code.value[0]
    if message:
        body["message"] = message
    if violations:
        body["details"] = [
            {
                "@type": BAD_REQUEST_TYPE,
                "fieldViolations": [{"field": f, "description": d} for f, d in violations],
            }
        ]
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
    ) -> Rendered:
        """HTTP status and google.rpc.Status JSON body of a failed call. A rich status
        (google.rpc.Status in the trailers) is the service's own and passes through;
        otherwise codes the gRPC library also produces get a fixed public text."""
        rich = self._rich_status(code, trailing_metadata or ())
        if rich is not None:
            return Rendered(http_status(code), rich[0], True, rich[1])
        if code in PUBLIC_TEXT:
            return Rendered(http_status(code), status_json(code, PUBLIC_TEXT[code]), False)
        return Rendered(http_status(code), status_json(code, details or ""), True)

    def _rich_status(
        self,
        code: grpc.StatusCode,
        metadata: Sequence[tuple[str, str | bytes]],
    ) -> tuple[bytes, float | None] | None:
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
            body = json.dumps(printed, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
            return body, _retry_delay(cast(Any, status).details)
        return None


def _retry_delay(details: Sequence[Any]) -> float | None:
    """Seconds of the first google.rpc.RetryInfo among a status's details."""
    for detail in details:
        if detail.type_url == RETRY_INFO_TYPE:
            try:
                info = error_details_pb2.RetryInfo.FromString(detail.value)
            except DecodeError:
                return None
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None
