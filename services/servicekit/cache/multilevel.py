"""The public face of the cache: :class:`MultiLevelCache` (reads through L1 then
Redis then the loader, single-flight per key (:mod:`.singleflight`); writes and
invalidations on every level and replica)."""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, cast

from ..clock import SYSTEM_CLOCK, Clock
from ..redis_client import RedisClient
from .codec import Deserializer, Serializer, json_deserializer, json_serializer, unwrap, wrap
from .invalidation import Invalidations
from .l1 import L1, MISSING
from .metrics import CACHE_LOADS, CACHE_REQUESTS
from .redis_state import RedisLink
from .singleflight import Flight, Flights

log = logging.getLogger("services.servicekit.cache")

T = TypeVar("T")


class MultiLevelCache(Generic[T]):
    """L1 (in-process) + L2 (Redis) cache for one named kind of value.

    Args:
        redis: shared ``redis.asyncio.Redis`` or ``RedisCluster`` client
            (``decode_responses=False``); not closed here.
        prefix: per-service key prefix, e.g. ``"analytics"``.
        name: the cache's name, e.g. ``"task"``; also the ``cache`` label of the metrics.
        l1_max_entries: L1 size bound (least recently used entries are evicted); 0 disables L1.
        l1_ttl: cap on an entry's lifetime in L1 (bounds staleness if an invalidation is lost).
        serializer / deserializer: value <-> bytes for Redis; JSON by default,
            :func:`bytes_passthrough` for raw bytes.
        l2_timeout: upper bound in seconds of one Redis operation, whatever the client's retry
            policy; exceeding it counts as an outage. ``None`` leaves it to the client.
        retry_backoff / retry_backoff_max: after a Redis failure, L2 is skipped for
            ``retry_backoff`` seconds, doubling per further failure up to ``retry_backoff_max``.
        clock: expiry (both levels) and the retry window run on it; a
            :class:`~services.servicekit.clock.ManualClock` makes them testable without waiting.
    """

    def __init__(
        self,
        redis: RedisClient,
        *,
        prefix: str,
        name: str,
        l1_max_entries: int = 10_000,
        l1_ttl: float | None = None,
        serializer: Serializer = json_serializer,
        deserializer: Deserializer = json_deserializer,
        l2_timeout: float | None = 1.0,
        retry_backoff: float = 1.0,
        retry_backoff_max: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if redis.get_encoder().decode_responses:
            raise ValueError("MultiLevelCache needs a Redis client with decode_responses=False")
        self._redis = redis
        self.prefix = prefix
        self.name = name
        # "cache.v2": values are enveloped (codec); replicas of an older version, which
        # stored bare values under "cache", never read these nor these theirs.
        self._key_prefix = f"{prefix}:cache.v2:{name}:"
        self._clock = clock
        self._l1 = L1(l1_max_entries, l1_ttl, clock)
        self._dumps = serializer
        self._loads = deserializer
        self._link = RedisLink(
            name, timeout=l2_timeout, backoff=retry_backoff, backoff_max=retry_backoff_max, clock=clock
        )
        self._inv = Invalidations(
            redis,
            self._link,
            channel=f"{prefix}:cache-invalidate:{name}",
            key_prefix=self._key_prefix,
            origin=uuid.uuid4().hex,
            drop_key=self._drop_local,
            drop_prefix=self._drop_local_prefix,
        )
        self.channel = self._inv.channel
        self._flights = Flights()
        self._epoch = 0  # bumped by every local drop; guards L1 fills of plain get()

        self._l1_hits = 0
        self._l2_hits = 0
        self._misses = 0
        self._loads_ok = 0
        self._load_errors = 0
        self._coalesced = 0

        self._m_l1_hit = CACHE_REQUESTS.labels(name, "l1", "hit")
        self._m_l1_miss = CACHE_REQUESTS.labels(name, "l1", "miss")
        self._m_l2_hit = CACHE_REQUESTS.labels(name, "l2", "hit")
        self._m_l2_miss = CACHE_REQUESTS.labels(name, "l2", "miss")
        self._m_l2_error = CACHE_REQUESTS.labels(name, "l2", "error")
        self._m_load_ok = CACHE_LOADS.labels(name, "ok")
        self._m_load_error = CACHE_LOADS.labels(name, "error")

    # ------------------------------------------------------------------ lifecycle

    async def start(self, wait: float = 2.0) -> None:
        """Start the invalidation subscriber; wait up to ``wait`` s for it to subscribe.

        Never raises if Redis is down: the cache then starts degraded and recovers later.
        """
        self._inv.start()
        if wait > 0:
            try:
                async with asyncio.timeout(wait):
                    await self._inv.subscribed_event.wait()
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Stop the subscriber and cancel in-progress loads. The Redis client stays open."""
        await self._flights.cancel_all()
        await self._inv.close()

    async def __aenter__(self) -> MultiLevelCache[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ state

    @property
    def redis_available(self) -> bool:
        """False while the cache considers Redis down (it serves from L1 and the loader)."""
        return self._link.available

    @property
    def subscribed(self) -> bool:
        """True while the invalidation subscriber is subscribed to the channel."""
        return self._inv.subscribed

    def redis_key(self, key: str) -> str:
        """The Redis key holding ``key``."""
        return self._key_prefix + key

    def encode(self, value: T, ttl: float) -> bytes:
        """The bytes this cache stores in Redis for ``value`` living ``ttl`` seconds."""
        return wrap(self._dumps(value), self._clock.time() + ttl)

    def stats(self) -> dict[str, float]:
        """Snapshot of this instance's counters.

        ``hits`` = L1 + L2 hits; ``misses`` = lookups that missed both levels (in
        ``get_or_load`` each one is a loader call); ``coalesced`` = callers that joined a load
        already in progress; ``hit_rate`` = hits / (hits + misses).
        """
        hits = self._l1_hits + self._l2_hits
        total = hits + self._misses
        return {
            "hits": hits,
            "misses": self._misses,
            "l1_hits": self._l1_hits,
            "l2_hits": self._l2_hits,
            "loads": self._loads_ok + self._load_errors,
            "load_errors": self._load_errors,
            "coalesced": self._coalesced,
            "invalidations_received": self._inv.received,
            "l1_size": len(self._l1),
            "hit_rate": hits / total if total else 0.0,
        }

    # ------------------------------------------------------------------ public API

    async def get(self, key: str) -> T | None:
        """The cached value, or None if neither level holds it."""
        value = self._l1_get(key)
        if value is not MISSING:
            return cast(T, value)
        value = await self._l2_get(key, None)
        if value is MISSING:
            self._misses += 1
            return None
        return cast(T, value)

    async def set(self, key: str, value: T, ttl: float) -> None:
        """Store ``value`` for ``ttl`` seconds in both levels; other replicas drop their L1 copy.

        ``ttl <= 0`` means "do not cache": the key is invalidated instead.
        """
        if ttl <= 0:
            await self.invalidate(key)
            return
        raw = self.encode(value, ttl)
        self._mark_flight_stale(key)
        self._l1.put(key, value, ttl)
        if not self._link.allowed():
            self._inv.remember(key=key)
            return

        async def op() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self.redis_key(key), raw, px=_px(ttl))
                self._inv.publish_in(pipe, self._inv.message(key=key))
                await pipe.execute()

        if await self._link.call(op) is MISSING:
            self._inv.remember(key=key)

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | Callable[[T], float],
    ) -> T:
        """The cached value, else ``await loader()`` stored for ``ttl`` seconds.

        ``ttl`` may be a callable of the loaded value (e.g. depending on a task's state);
        ``ttl <= 0`` means the value is returned but not cached. Concurrent misses of one key
        share a single loader call; its exception reaches every waiter and is not cached.
        Cancelling one waiter does not cancel the load for the others.
        """
        value = self._l1_get(key)
        if value is not MISSING:
            return cast(T, value)
        flight, joined = self._flights.join(key, lambda f: self._load(key, loader, ttl, f))
        if joined:
            self._coalesced += 1
        assert flight.task is not None
        return cast(T, await asyncio.shield(flight.task))

    async def invalidate(self, key: str) -> None:
        """Drop ``key`` here and in Redis, and tell every replica to drop it from L1.

        During an outage the Redis delete and the broadcast are replayed on recovery.
        """
        self._drop_local(key)
        if not self._link.allowed():
            self._inv.remember(key=key)
            return

        async def op() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.redis_key(key))
                self._inv.publish_in(pipe, self._inv.message(key=key))
                await pipe.execute()

        if await self._link.call(op) is MISSING:
            self._inv.remember(key=key)

    async def invalidate_prefix(self, key_prefix: str = "") -> None:
        """Invalidate every key starting with ``key_prefix`` (all keys if empty), everywhere."""
        self._drop_local_prefix(key_prefix)
        if not self._link.allowed():
            self._inv.remember(prefix=key_prefix)
            return
        if await self._link.call(lambda: self._inv.delete_prefix(key_prefix)) is MISSING:
            self._inv.remember(prefix=key_prefix)

    async def clear(self) -> None:
        """Invalidate all keys of this cache, everywhere."""
        await self.invalidate_prefix("")

    # ------------------------------------------------------------------ L1

    def _l1_get(self, key: str) -> Any:
        value = self._l1.get(key)
        if value is MISSING:
            self._m_l1_miss.inc()
        else:
            self._l1_hits += 1
            self._m_l1_hit.inc()
        return value

    def _drop_local(self, key: str) -> None:
        self._l1.pop(key)
        self._mark_flight_stale(key)

    def _drop_local_prefix(self, key_prefix: str) -> None:
        self._epoch += 1
        self._l1.drop_prefix(key_prefix)
        self._flights.mark_stale_prefix(key_prefix)

    def _mark_flight_stale(self, key: str) -> None:
        self._epoch += 1
        self._flights.mark_stale(key)

    # ------------------------------------------------------------------ loading

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | Callable[[T], float],
        flight: Flight,
    ) -> T:
        cached = await self._l2_get(key, flight)
        if cached is not MISSING:
            return cast(T, cached)
        self._misses += 1
        try:
            value = await loader()
        except Exception:
            self._load_errors += 1
            self._m_load_error.inc()
            raise
        self._loads_ok += 1
        self._m_load_ok.inc()
        seconds = ttl(value) if callable(ttl) else ttl
        if seconds > 0 and not flight.stale:
            raw = self.encode(value, seconds)
            self._l1.put(key, value, seconds)
            if self._link.allowed():
                await self._link.call(lambda: self._redis.set(self.redis_key(key), raw, px=_px(seconds)))
        return value

    # ------------------------------------------------------------------ L2

    async def _l2_get(self, key: str, flight: Flight | None) -> Any:
        """Value from Redis (also put in L1), or MISSING on a miss or when Redis is unusable.

        An entry whose expiry (on the cache's clock) has passed is a miss. L1 is not filled
        if the key was invalidated meanwhile: ``flight.stale`` for loads, any local
        invalidation (``_epoch``) for plain ``get()``.
        """
        epoch = self._epoch
        if not self._link.allowed():
            self._m_l2_error.inc()
            return MISSING
        raw = await self._link.call(lambda: self._redis.get(self.redis_key(key)))
        if raw is MISSING:
            self._m_l2_error.inc()
            return MISSING
        if raw is None:
            self._m_l2_miss.inc()
            return MISSING
        try:
            expires_at, payload = unwrap(raw)
            remaining = expires_at - self._clock.time()
            if remaining <= 0:
                self._m_l2_miss.inc()
                return MISSING
            value = self._loads(payload)
        except Exception:
            log.warning("cache %s: undecodable value in Redis for %r", self.name, key)
            self._m_l2_miss.inc()
            return MISSING
        self._l2_hits += 1
        self._m_l2_hit.inc()
        fresh = not flight.stale if flight is not None else epoch == self._epoch
        if fresh:
            self._l1.put(key, value, remaining)
        return value


def _px(ttl: float) -> int:
    """Redis expiry in ms of an entry living ``ttl`` seconds (Redis frees it on real time)."""
    return max(1, math.ceil(ttl * 1000))
