"""Two-level cache: an in-process LRU/TTL dict (L1) in front of Redis (L2).

One :class:`MultiLevelCache` per named cache and process. Reads check L1 first, so a hot hit
costs a dict lookup and never touches Redis. Misses are single-flight per key: concurrent
callers share one loader call. Invalidations delete the Redis key and are broadcast on a
pub/sub channel so that every replica drops its L1 copy.

Redis is optional at run time: when it is unreachable the cache serves from L1 and the loader,
never raises Redis errors, reports ``redis_available == False``, backs off before trying Redis
again, and recovers by itself.

Keys in Redis are ``f"{prefix}:cache:{name}:{key}"``; the invalidation channel is
``f"{prefix}:cache-invalidate:{name}"``. The Redis client must use ``decode_responses=False``.
Values returned from L1 are shared objects: treat them as immutable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar, cast

import redis.asyncio as aioredis
from google.protobuf.message import Message
from prometheus_client import Counter, Gauge
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

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

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Serializer = Callable[[Any], bytes]
Deserializer = Callable[[bytes], Any]

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

# Errors meaning "Redis is unreachable": the cache degrades to L1 + loader and backs off.
_OUTAGE_ERRORS: Final = (RedisConnectionError, RedisTimeoutError, OSError)
# Every other Redis error is logged and treated as an L2 miss; none reaches the caller.
_L2_ERRORS: Final = (RedisError, OSError)

_MISSING: Final = object()
_MAX_PENDING: Final = 10_000  # invalidations remembered during an outage
_PUBSUB_POLL: Final = 1.0  # seconds a subscriber read waits before checking its health
_PUBSUB_PING_EVERY: Final = 5.0  # ping an idle subscription this often; no answer = dead


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


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so ``text`` matches literally in SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Flight:
    """One in-progress load; ``stale`` is set when the key is invalidated meanwhile."""

    __slots__ = ("stale", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.stale = False


class MultiLevelCache(Generic[T]):
    """L1 (in-process) + L2 (Redis) cache for one named kind of value.

    Args:
        redis: shared ``redis.asyncio.Redis`` client (``decode_responses=False``); not closed here.
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
    """

    def __init__(
        self,
        redis: aioredis.Redis,
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
    ) -> None:
        if l1_max_entries < 0:
            raise ValueError("l1_max_entries must be >= 0")
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("MultiLevelCache needs a Redis client with decode_responses=False")
        self._redis = redis
        self.prefix = prefix
        self.name = name
        self._key_prefix = f"{prefix}:cache:{name}:"
        self.channel = f"{prefix}:cache-invalidate:{name}"
        self._l1_max = l1_max_entries
        self._l1_ttl = l1_ttl
        self._dumps = serializer
        self._loads = deserializer
        self._l2_timeout = l2_timeout
        self._backoff_initial = retry_backoff
        self._backoff_max = max(retry_backoff_max, retry_backoff)

        self._l1: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        self._epoch = 0  # bumped by every local drop; guards L1 fills of plain get()
        self._origin = uuid.uuid4().hex  # tags our own broadcasts; their echo is skipped

        self._redis_ok = True
        self._backoff = retry_backoff
        self._retry_at = 0.0
        self._pending_keys: set[str] = set()  # invalidations to replay once Redis is back
        self._pending_prefixes: set[str] = set()

        self._subscriber: asyncio.Task[None] | None = None
        self._subscribed = False
        self._subscribed_event = asyncio.Event()
        self._closing = False

        self._l1_hits = 0
        self._l2_hits = 0
        self._misses = 0
        self._loads_ok = 0
        self._load_errors = 0
        self._coalesced = 0
        self._invalidations_received = 0

        self._m_l1_hit = CACHE_REQUESTS.labels(name, "l1", "hit")
        self._m_l1_miss = CACHE_REQUESTS.labels(name, "l1", "miss")
        self._m_l2_hit = CACHE_REQUESTS.labels(name, "l2", "hit")
        self._m_l2_miss = CACHE_REQUESTS.labels(name, "l2", "miss")
        self._m_l2_error = CACHE_REQUESTS.labels(name, "l2", "error")
        self._m_load_ok = CACHE_LOADS.labels(name, "ok")
        self._m_load_error = CACHE_LOADS.labels(name, "error")
        self._m_redis_errors = CACHE_REDIS_ERRORS.labels(name)
        self._m_available = CACHE_REDIS_AVAILABLE.labels(name)
        self._m_available.set(1)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, wait: float = 2.0) -> None:
        """Start the invalidation subscriber; wait up to ``wait`` s for it to subscribe.

        Never raises if Redis is down: the cache then starts degraded and recovers later.
        """
        if self._subscriber is None or self._subscriber.done():
            self._closing = False
            self._subscriber = asyncio.create_task(
                self._subscribe_loop(), name=f"cache-subscriber:{self.channel}"
            )
        if wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._subscribed_event.wait()

    async def close(self) -> None:
        """Stop the subscriber and cancel in-progress loads. The Redis client stays open."""
        self._closing = True
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        if self._subscriber is not None:
            tasks.append(self._subscriber)
            self._subscriber = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._subscribed = False
        self._subscribed_event.clear()

    async def __aenter__(self) -> MultiLevelCache[T]:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ state

    @property
    def redis_available(self) -> bool:
        """False while the cache considers Redis down (it serves from L1 and the loader)."""
        return self._redis_ok

    @property
    def subscribed(self) -> bool:
        """True while the invalidation subscriber is subscribed to the channel."""
        return self._subscribed

    def redis_key(self, key: str) -> str:
        """The Redis key holding ``key``."""
        return self._key_prefix + key

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
            "invalidations_received": self._invalidations_received,
            "l1_size": len(self._l1),
            "hit_rate": hits / total if total else 0.0,
        }

    # ------------------------------------------------------------------ public API

    async def get(self, key: str) -> T | None:
        """The cached value, or None if neither level holds it."""
        value = self._l1_get(key)
        if value is not _MISSING:
            return cast(T, value)
        value = await self._l2_get(key, None)
        if value is _MISSING:
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
        raw = self._dumps(value)
        self._mark_flight_stale(key)
        self._l1_put(key, value, ttl)
        if not self._l2_allowed():
            self._remember_pending(key=key)
            return

        async def op() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(self.redis_key(key), raw, px=max(1, int(ttl * 1000)))
                pipe.publish(self.channel, self._message(key=key))
                await pipe.execute()

        if await self._l2_call(op) is _MISSING:
            self._remember_pending(key=key)

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
        if value is not _MISSING:
            return cast(T, value)
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            task = asyncio.create_task(self._load(key, loader, ttl, flight))
            flight.task = task
            self._flights[key] = flight
            task.add_done_callback(lambda t, k=key, f=flight: self._flight_done(k, f, t))
        else:
            self._coalesced += 1
        assert flight.task is not None
        return cast(T, await asyncio.shield(flight.task))

    async def invalidate(self, key: str) -> None:
        """Drop ``key`` here and in Redis, and tell every replica to drop it from L1.

        During an outage the Redis delete and the broadcast are replayed on recovery.
        """
        self._drop_local(key)
        if not self._l2_allowed():
            self._remember_pending(key=key)
            return

        async def op() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.redis_key(key))
                pipe.publish(self.channel, self._message(key=key))
                await pipe.execute()

        if await self._l2_call(op) is _MISSING:
            self._remember_pending(key=key)

    async def invalidate_prefix(self, key_prefix: str = "") -> None:
        """Invalidate every key starting with ``key_prefix`` (all keys if empty), everywhere."""
        self._drop_local_prefix(key_prefix)
        if not self._l2_allowed():
            self._remember_pending(prefix=key_prefix)
            return
        if await self._l2_call(lambda: self._delete_prefix(key_prefix)) is _MISSING:
            self._remember_pending(prefix=key_prefix)

    async def clear(self) -> None:
        """Invalidate all keys of this cache, everywhere."""
        await self.invalidate_prefix("")

    # ------------------------------------------------------------------ L1

    def _l1_get(self, key: str) -> Any:
        entry = self._l1.get(key)
        if entry is not None:
            if entry[0] > time.monotonic():
                self._l1.move_to_end(key)
                self._l1_hits += 1
                self._m_l1_hit.inc()
                return entry[1]
            del self._l1[key]
        self._m_l1_miss.inc()
        return _MISSING

    def _l1_put(self, key: str, value: Any, ttl: float) -> None:
        if self._l1_max == 0:
            return
        if self._l1_ttl is not None:
            ttl = min(ttl, self._l1_ttl)
        if ttl <= 0:
            self._l1.pop(key, None)
            return
        self._l1[key] = (time.monotonic() + ttl, value)
        self._l1.move_to_end(key)
        while len(self._l1) > self._l1_max:
            self._l1.popitem(last=False)

    def _drop_local(self, key: str) -> None:
        self._l1.pop(key, None)
        self._mark_flight_stale(key)

    def _drop_local_prefix(self, key_prefix: str) -> None:
        self._epoch += 1
        if not key_prefix:
            self._l1.clear()
        else:
            for k in [k for k in self._l1 if k.startswith(key_prefix)]:
                del self._l1[k]
        for k, flight in self._flights.items():
            if k.startswith(key_prefix):
                flight.stale = True

    def _mark_flight_stale(self, key: str) -> None:
        self._epoch += 1
        flight = self._flights.get(key)
        if flight is not None:
            flight.stale = True

    # ------------------------------------------------------------------ loading

    async def _load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        ttl: float | Callable[[T], float],
        flight: _Flight,
    ) -> T:
        cached = await self._l2_get(key, flight)
        if cached is not _MISSING:
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
            raw = self._dumps(value)
            self._l1_put(key, value, seconds)
            if self._l2_allowed():
                await self._l2_call(
                    lambda: self._redis.set(self.redis_key(key), raw, px=max(1, int(seconds * 1000)))
                )
        return value

    def _flight_done(self, key: str, flight: _Flight, task: asyncio.Task[Any]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, so an unawaited failure logs nothing

    # ------------------------------------------------------------------ L2

    async def _l2_get(self, key: str, flight: _Flight | None) -> Any:
        """Value from Redis (also put in L1), or _MISSING on a miss or when Redis is unusable.

        L1 is not filled if the key was invalidated meanwhile: ``flight.stale`` for loads,
        any local invalidation (``_epoch``) for plain ``get()``.
        """
        epoch = self._epoch
        if not self._l2_allowed():
            self._m_l2_error.inc()
            return _MISSING

        async def op() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(self.redis_key(key))
                pipe.pttl(self.redis_key(key))
                return cast(list[Any], await pipe.execute())

        result = await self._l2_call(op)
        if result is _MISSING:
            self._m_l2_error.inc()
            return _MISSING
        raw, pttl = result
        if raw is None:
            self._m_l2_miss.inc()
            return _MISSING
        try:
            value = self._loads(raw)
        except Exception:
            log.warning("cache %s: undecodable value in Redis for %r", self.name, key)
            self._m_l2_miss.inc()
            return _MISSING
        self._l2_hits += 1
        self._m_l2_hit.inc()
        fresh = not flight.stale if flight is not None else epoch == self._epoch
        if fresh:
            if pttl is not None and pttl > 0:
                self._l1_put(key, value, pttl / 1000)
            elif pttl == -1:  # no expiry in Redis: only the L1 cap bounds it
                self._l1_put(key, value, self._l1_ttl if self._l1_ttl is not None else math.inf)
        return value

    def _l2_allowed(self) -> bool:
        """Whether to try Redis now; while it is down, one probe per backoff window."""
        if self._redis_ok:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + self._backoff  # other callers keep skipping during the probe
        return True

    async def _l2_call(self, op: Callable[[], Awaitable[R]]) -> Any:
        """Run a Redis operation; on failure record it and return _MISSING (never raises)."""
        try:
            async with asyncio.timeout(self._l2_timeout):
                try:
                    result = await op()
                except RedisConnectionError:
                    if not self._redis_ok:
                        raise
                    # Likely a pooled connection that died (e.g. Redis restarted): redis-py
                    # dropped it, so one immediate retry tells a stale socket from an outage.
                    result = await op()
        except _OUTAGE_ERRORS as exc:  # includes TimeoutError from asyncio.timeout
            self._m_redis_errors.inc()
            self._mark_down(exc)
            return _MISSING
        except _L2_ERRORS as exc:
            self._m_redis_errors.inc()
            log.warning("cache %s: Redis error: %r", self.name, exc)
            return _MISSING
        self._mark_up()
        return result

    def _mark_down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._redis_ok:
            self._redis_ok = False
            self._backoff = self._backoff_initial
            self._m_available.set(0)
            log.warning("cache %s: Redis unavailable (%r); serving from L1 and loader", self.name, exc)
        else:
            self._backoff = min(self._backoff * 2, self._backoff_max)
        self._retry_at = now + self._backoff

    def _mark_up(self) -> None:
        if not self._redis_ok:
            self._redis_ok = True
            self._backoff = self._backoff_initial
            self._m_available.set(1)
            log.info("cache %s: Redis available again", self.name)

    async def _delete_prefix(self, key_prefix: str) -> None:
        match = _glob_escape(self._key_prefix + key_prefix) + "*"
        batch: list[bytes] = []
        async for rkey in self._redis.scan_iter(match=match, count=500):
            batch.append(rkey)
            if len(batch) >= 500:
                await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            await self._redis.unlink(*batch)
        await self._redis.publish(self.channel, self._message(prefix=key_prefix))

    # ------------------------------------------------------------------ invalidation

    def _message(self, *, key: str | None = None, prefix: str | None = None) -> bytes:
        body: dict[str, str] = {"o": self._origin}
        if key is not None:
            body["k"] = key
        else:
            body["p"] = prefix or ""
        return json.dumps(body, separators=(",", ":")).encode()

    def _on_message(self, data: bytes | str) -> None:
        try:
            body = json.loads(data)
            if body.get("o") == self._origin:
                return  # our own broadcast: L1 was already updated when it was sent
            self._invalidations_received += 1
            if "k" in body:
                self._drop_local(str(body["k"]))
            else:
                self._drop_local_prefix(str(body.get("p", "")))
        except (ValueError, AttributeError):
            log.warning("cache %s: malformed invalidation message %r", self.name, data)

    def _remember_pending(self, *, key: str | None = None, prefix: str | None = None) -> None:
        """Keep a failed invalidation (or write) to replay when Redis is back."""
        if prefix is not None:
            self._pending_prefixes.add(prefix)
        elif key is not None:
            if len(self._pending_keys) >= _MAX_PENDING:
                self._pending_keys.clear()
                self._pending_prefixes = {""}  # too many: invalidate the whole cache instead
            else:
                self._pending_keys.add(key)

    async def _flush_pending(self) -> None:
        """Replay invalidations that failed during an outage; keep them if Redis fails again."""
        prefixes, keys = self._pending_prefixes, self._pending_keys
        self._pending_prefixes, self._pending_keys = set(), set()
        keys = {k for k in keys if not any(k.startswith(p) for p in prefixes)}

        async def op() -> None:
            for prefix in prefixes:
                await self._delete_prefix(prefix)
            if keys:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.delete(self.redis_key(key))
                        pipe.publish(self.channel, self._message(key=key))
                    await pipe.execute()

        if await self._l2_call(op) is _MISSING:
            self._pending_prefixes |= prefixes
            for key in keys:
                self._remember_pending(key=key)

    async def _subscribe_loop(self) -> None:
        """Receive invalidations; reconnect with backoff and resubscribe after failures.

        After every (re)subscription other than the first, L1 is cleared: broadcasts sent
        while we were not subscribed are lost.
        """
        backoff = self._backoff_initial
        first = True
        while not self._closing:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(self._l2_timeout):
                    await pubsub.subscribe(self.channel)
                last_read = time.monotonic()
                ping_sent: float | None = None
                while not self._closing:
                    # The bound also covers redis-py's own reconnect attempts inside the read.
                    async with asyncio.timeout(_PUBSUB_POLL + (self._l2_timeout or _PUBSUB_POLL)):
                        msg = await pubsub.get_message(timeout=_PUBSUB_POLL)
                    now = time.monotonic()
                    if msg is None:
                        if ping_sent is not None and now - ping_sent > _PUBSUB_PING_EVERY:
                            raise RedisConnectionError("no answer to PING on the subscription")
                        if ping_sent is None and now - last_read > _PUBSUB_PING_EVERY:
                            await pubsub.ping()
                            ping_sent = now
                    else:
                        last_read, ping_sent = now, None
                        kind = msg["type"]
                        if kind == "message":
                            self._on_message(msg["data"])
                        elif kind == "subscribe":  # first subscription or redis-py reconnect
                            if not first:
                                self._drop_local_prefix("")
                            first = False
                            self._subscribed = True
                            self._subscribed_event.set()
                            self._mark_up()
                            backoff = self._backoff_initial
                    if not self._redis_ok and self._l2_allowed():
                        await self._l2_call(self._redis.ping)  # notice recovery without traffic
                    if self._redis_ok and (self._pending_keys or self._pending_prefixes):
                        await self._flush_pending()
            except asyncio.CancelledError:
                raise
            except _L2_ERRORS as exc:  # includes TimeoutError
                self._m_redis_errors.inc()
                if isinstance(exc, _OUTAGE_ERRORS):
                    self._mark_down(exc)
                else:
                    log.warning("cache %s: subscriber error: %r", self.name, exc)
            except Exception:
                log.exception("cache %s: subscriber failed", self.name)
            finally:
                self._subscribed = False
                self._subscribed_event.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._backoff_max)


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
