"""The Redis client of a service: one Redis (``redis://``, ``rediss://``,
``unix://``) or a Redis Cluster (``redis+cluster://host:port``, or
``rediss+cluster://`` with TLS: any node of the cluster; the others are
discovered), chosen by ``REDIS_URL``."""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

__all__ = ["CLUSTER_SCHEMES", "RedisClient", "connect_redis", "is_cluster"]

RedisClient: TypeAlias = aioredis.Redis | RedisCluster
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, RedisCluster)


def connect_redis(url: str, **options: Any) -> RedisClient:
    """A client for ``url`` (connections open lazily: this never waits for Redis).

    Defaults: 1 s socket and connect timeouts, and one quick retry (after a
    Redis restart each pooled socket fails once)."""
    options.setdefault("socket_timeout", 1.0)
    options.setdefault("socket_connect_timeout", 1.0)
    options.setdefault("retry", Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=1))
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() in CLUSTER_SCHEMES:
        return RedisCluster.from_url(f"{scheme.lower().split('+')[0]}://{rest}", **options)
    options.setdefault("health_check_interval", 15)
    return aioredis.Redis.from_url(url, **options)
