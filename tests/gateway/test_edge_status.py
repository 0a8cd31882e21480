"""Status rendering fallbacks and the small HTTP helpers."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import status_pb2

from gateway.app import choose_encoding, parse_query
from gateway.routes import load_descriptors
from gateway.status import Rendered, StatusRenderer
from tests.support import ROOT

DETAILS = "grpc-status-details-bin"


@pytest.fixture(scope="module")
def renderer() -> StatusRenderer:
    return StatusRenderer(load_descriptors(ROOT / "build" / "descriptor.binpb").pool)


def test_undecodable_details_fall_back_to_plain_status(renderer: StatusRenderer) -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/x.Unknown", value=b"\x08\x01")
    status = status_pb2.Status(code=3, message="rich", details=[unknown])
    code = grpc.StatusCode.INVALID_ARGUMENT
    plain = Rendered(400, b'{"code":3,"message":"plain"}', True)
    assert renderer.render(code, "plain", [(DETAILS, status.SerializeToString())]) == plain
    assert renderer.render(code, "plain", [(DETAILS, b"\xff\xff")]) == plain


def test_details_with_a_different_code_are_ignored(renderer: StatusRenderer) -> None:
    status = status_pb2.Status(code=5, message="not found")
    result = renderer.render(
        grpc.StatusCode.INTERNAL,
        "boom",
        [(DETAILS, status.SerializeToString())],
    )
    # Not the service's rich status: the library's words are replaced.
    assert result == Rendered(500, b'{"code":13,"message":"internal error"}', False)


def test_details_without_extra_details_render_as_status(renderer: StatusRenderer) -> None:
    status = status_pb2.Status(code=7, message="admins only")
    result = renderer.render(
        grpc.StatusCode.PERMISSION_DENIED,
        "x",
        [("other", "v"), (DETAILS, status.SerializeToString())],
    )
    assert result == Rendered(403, b'{"code":7,"message":"admins only"}', True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("", None),
        ("identity", None),
        ("gzip, br", "br"),
        ("br;q=0.1, gzip;q=0.9", "gzip"),
        ("gzip;q=0, br;q=0", None),
        ("*", "br"),
        ("*;q=0.5, br;q=0", "gzip"),
        ("GZIP", "gzip"),
    ],
)
def test_choose_encoding(header: str, expected: str | None) -> None:
    assert choose_encoding(header) == expected


def test_parse_query_keeps_plus_and_decodes_percent() -> None:
    assert parse_query("a=1+2&b=x%20y&&c&d=%2F") == [
        ("a", "1+2"),
        ("b", "x y"),
        ("c", ""),
        ("d", "/"),
    ]
