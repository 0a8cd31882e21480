"""Two-level cache: an in-process LRU/TTL dict (L1) in front of Redis (L2).

One :class:`MultiLevelCache` per named cache and process (``await app.cache(name)``).
Reads check L1 first, so a hot hit costs a dict lookup and never touches Redis.
Misses are single-flight per key: concurrent callers share one loader call.
Invalidations delete the Redis key and are broadcast on a pub/sub channel so
that every replica drops its L1 copy.

Redis is optional at run time: when it is unreachable the cache serves from L1
and the loader, never raises Redis errors, reports ``redis_available ==
False``, backs off before trying Redis again, and recovers by itself.

Keys in Redis are ``f"{prefix}:cache.v2:{name}:{key}"``; each value is stored in
an envelope carrying its expiry (:mod:`.codec`), so entries expire on the
cache's clock at both levels (Redis also drops them by itself, ``PX``). The
invalidation channel is ``f"{prefix}:cache-invalidate:{name}"``. The Redis
client must use ``decode_responses=False``. Values returned from L1 are shared
objects: treat them as immutable.

Modules, by concern: :mod:`.l1` (the in-process level), :mod:`.redis_state`
(Redis availability, timeouts, backoff), :mod:`.invalidation` (broadcast,
subscriber, replay after an outage), :mod:`.codec` (serializers, envelope),
:mod:`.singleflight` (one load per key at a time), :mod:`.multilevel` (the
public class), :mod:`.messages` (protobuf messages through a cache of bytes).
"""

from __future__ import annotations

from .codec import RAW_BYTES, bytes_passthrough, json_deserializer, json_serializer
from .messages import get_or_load_message
from .metrics import CACHE_LOADS, CACHE_REDIS_AVAILABLE, CACHE_REDIS_ERRORS, CACHE_REQUESTS
from .multilevel import MultiLevelCache

__all__ = [
    "CACHE_LOADS",
    "CACHE_REDIS_AVAILABLE",
    "CACHE_REDIS_ERRORS",
    "CACHE_REQUESTS",
    "RAW_BYTES",
    "MultiLevelCache",
    "bytes_passthrough",
    "get_or_load_message",
    "json_deserializer",
    "json_serializer",
]
