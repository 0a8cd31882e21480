"""Protobuf messages through a cache of raw bytes: :func:`get_or_load_message`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import Message

from .multilevel import MultiLevelCache

M = TypeVar("M", bound=Message)


async def get_or_load_message(
    cache: MultiLevelCache[bytes],
    key: str,
    message_type: type[M],
    loader: Callable[[], Awaitable[M]],
    ttl: float,
) -> M:
    """A protobuf message through a cache of raw bytes (:data:`RAW_BYTES`): stored
    serialized, so L1, Redis and every replica hold the same bytes."""

    async def load() -> bytes:
        return (await loader()).SerializeToString()

    return message_type.FromString(await cache.get_or_load(key, load, ttl))
