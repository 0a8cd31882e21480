"""Values to and from Redis: the serializers, and the envelope carrying each
entry's expiry so that every level expires it on the cache's clock."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any, Final

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]

_HEADER: Final = struct.Struct(">cd")  # version, expiry (wall-clock seconds; inf = none)
_VERSION: Final = b"\x02"


def json_serializer(value: Any) -> bytes:
    """Default serializer: compact JSON, UTF-8."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def json_deserializer(raw: bytes) -> Any:
    """Default deserializer: JSON."""
    return json.loads(raw)


def bytes_passthrough(value: Any) -> Any:
    """Serializer and deserializer for values that already are ``bytes``."""
    return value


# Options of a cache of raw bytes (serialized protobuf messages, say):
# ``await app.cache("name", **RAW_BYTES)``.
RAW_BYTES: dict[str, Any] = {"serializer": bytes_passthrough, "deserializer": bytes_passthrough}


def wrap(payload: bytes, expires_at: float) -> bytes:
    """The bytes stored in Redis: a 9-byte header (version, wall-clock expiry) and the payload."""
    return _HEADER.pack(_VERSION, expires_at) + payload


def unwrap(raw: bytes) -> tuple[float, bytes]:
    """(expiry, payload) of stored bytes; ValueError if they are not an envelope."""
    if len(raw) < _HEADER.size or raw[:1] != _VERSION:
        raise ValueError("not a cache envelope")
    _, expires_at = _HEADER.unpack_from(raw)
    if math.isnan(expires_at):
        raise ValueError("not a cache envelope")
    return expires_at, raw[_HEADER.size :]
