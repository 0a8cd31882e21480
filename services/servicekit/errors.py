"""Rich gRPC errors: INVALID_ARGUMENT with google.rpc.BadRequest field violations."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


class ServiceError(Exception):
    """An error a servicer raises to end an RPC with a chosen status.

    The error-mapping interceptor turns it into the gRPC status (with rich
    details in `grpc-status-details-bin`); anything else that escapes a
    servicer becomes INTERNAL with a generic message.
    """

    def __init__(self, code: grpc.StatusCode, message: str, details: Iterable[any_pb2.Any] = ()):
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)

    def to_status(self) -> grpc.Status:
        proto = status_pb2.Status(code=self.code.value[0], message=self.message)
        proto.details.extend(self.details)
        return rpc_status.to_status(proto)


class FieldViolations:
    """Collects every invalid field of a request before failing once."""

    def __init__(self) -> None:
        self._items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self._items.append((field, description))

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def raise_if_any(self, message: str = "invalid request") -> None:
        if self._items:
            raise invalid_argument(self._items, message)


def invalid_argument(violations: Iterable[tuple[str, str]], message: str = "invalid request") -> ServiceError:
    """An INVALID_ARGUMENT error naming every offending field."""
    bad = error_details_pb2.BadRequest()
    for field, description in violations:
        bad.field_violations.add(field=field, description=description)
    detail = any_pb2.Any()
    detail.Pack(bad)
    fields = ", ".join(v.field for v in bad.field_violations[:5])
    more = len(bad.field_violations) - 5
    summary = f"{message}: {fields}" + (f" and {more} more" if more > 0 else "")
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, summary, [detail])


def not_found(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, message)


def bad_request_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    """The field violations of a rich INVALID_ARGUMENT error (for callers and tests)."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            out: list[tuple[str, str]] = []
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):  # False for details of another type
                    out += [(v.field, v.description) for v in bad.field_violations]
            return out
    return []
