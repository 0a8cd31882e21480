"""Uploads of input images: the type is read from the bytes (JPEG, PNG, WebP),
never from the declared content type; at most 30 MiB; passed to RunningHub's
upload, whose `fileName` is what a LoadImage node takes."""

from __future__ import annotations

import grpc

from cosnap.effects.v1 import effects_pb2
from services.servicekit.errors import ServiceError, invalid_argument, unavailable

from .runninghub import BusinessError, Regions, UpstreamError

MAX_BYTES = 30 * 1024 * 1024


def sniff(data: bytes) -> tuple[str, str] | None:
    """(extension, content type) by magic bytes, or None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg", "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png", "image/png"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", "image/webp"
    return None


class Uploads:
    def __init__(self, regions: Regions, default_region: str, max_bytes: int = MAX_BYTES) -> None:
        self._regions = regions
        self._default = default_region
        self._max = max_bytes

    async def upload(self, request: effects_pb2.UploadInputRequest) -> effects_pb2.UploadInputResponse:
        region = request.region or self._default
        if region not in self._regions:
            raise invalid_argument([("region", "must be cn or global")])
        data = request.file.data
        if not data:
            raise invalid_argument([("file", "the body is empty")])
        if len(data) > self._max:
            raise invalid_argument([("file", f"at most {self._max // (1024 * 1024)} MiB")])
        kind = sniff(data)
        if kind is None:
            raise invalid_argument([("file", "not a JPEG, PNG or WebP image")])
        extension, content_type = kind
        try:
            name = await self._regions[region].upload(data, f"input.{extension}", content_type)
        except UpstreamError as exc:
            raise unavailable(str(exc)) from None
        except BusinessError as exc:
            if exc.code == 809:
                raise invalid_argument([("file", "too large for RunningHub")]) from None
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE, f"RunningHub refused the upload: {exc.message}"
            ) from None
        return effects_pb2.UploadInputResponse(file_name=name, region=region, size_bytes=len(data))
