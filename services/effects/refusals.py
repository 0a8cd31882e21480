"""How a start that cannot go ahead is answered: RunningHub's refusals of a
create, by code (as the reference says), and the per-user limit."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2

from services.servicekit.errors import ServiceError, unavailable

from . import envelope


def refused(code: int, message: str) -> ServiceError:
    if code in (301,):
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"RunningHub refused the inputs: {message}")
    if code in (814,):
        return ServiceError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"RunningHub's queue is full: {message}")
    if code in envelope.BACK_PRESSURE or code in (416, 801, 802):
        return unavailable(f"effects are unavailable for now: {message} (RunningHub {code})")
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, f"the effect cannot run: {message} (RunningHub {code})"
    )


def rate_limited(limit: int, window_ms: int, wait: float) -> ServiceError:
    """429 with a RetryInfo saying when the user may start again."""
    info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=int(wait) + 1))
    detail = any_pb2.Any()
    detail.Pack(info)
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"at most {limit} tasks per {window_ms // 1000} s; try again in {wait:.0f} s",
        [detail],
    )
