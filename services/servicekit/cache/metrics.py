"""Prometheus metrics of every named cache (the `cache` label is its name)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CACHE_REQUESTS = Counter(
    "cache_requests",
    "Cache lookups by cache, level (l1, l2) and result (hit, miss, error).",
    ["cache", "level", "result"],
)
CACHE_LOADS = Counter(
    "cache_loads", "Loader calls after a miss on both levels, by result.", ["cache", "result"]
)
CACHE_REDIS_ERRORS = Counter("cache_redis_errors", "Redis operations of the cache that failed.", ["cache"])
CACHE_REDIS_AVAILABLE = Gauge(
    "cache_redis_available", "1 while the cache considers Redis reachable.", ["cache"]
)
