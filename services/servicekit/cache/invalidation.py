"""Invalidation across replicas: every drop of a key (or of a key prefix) is
broadcast on the cache's pub/sub channel so that each replica drops its L1
copy; broadcasts that fail during a Redis outage are remembered and replayed
on recovery; one subscriber task per cache receives them, reconnecting with
backoff, and clears L1 after every resubscription (broadcasts sent while it was
not subscribed are lost).

The subscriber paces real network I/O (poll, ping, reconnect), so it runs on
real time whatever clock the cache was given.

Against a Redis Cluster the channel is a shard channel (Redis 7 sharded
pub/sub: ``SPUBLISH`` / ``SSUBSCRIBE``): it lives on the master owning its
slot, every subscriber of every replica connects there, and a message costs
that shard only instead of a broadcast over the whole cluster bus.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from redis.exceptions import ConnectionError as RedisConnectionError

from ..redis_client import RedisClient, is_cluster
from .l1 import MISSING
from .redis_state import L2_ERRORS, RedisLink

log = logging.getLogger("services.servicekit.cache")

MAX_PENDING: Final = 10_000  # invalidations remembered during an outage
PUBSUB_POLL: Final = 1.0  # seconds a subscriber read waits before checking its health
PUBSUB_PING_EVERY: Final = 5.0  # ping an idle subscription this often; no answer = dead


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so ``text`` matches literally in SCAN MATCH."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class Invalidations:
    """Broadcast, receive and replay invalidations of one named cache.

    Args:
        redis / link: the client and its availability tracker.
        channel: the pub/sub channel of the cache.
        key_prefix: the Redis key prefix of the cache's entries.
        origin: this instance's tag; its own broadcasts are skipped when they echo back.
        drop_key / drop_prefix: drop local copies (L1 and loads in flight).
    """

    def __init__(
        self,
        redis: RedisClient,
        link: RedisLink,
        *,
        channel: str,
        key_prefix: str,
        origin: str,
        drop_key: Callable[[str], None],
        drop_prefix: Callable[[str], None],
    ) -> None:
        self._redis = redis
        self._cluster = is_cluster(redis)
        self._link = link
        self.channel = channel
        self._key_prefix = key_prefix
        self._origin = origin
        self._drop_key = drop_key
        self._drop_prefix = drop_prefix
        self._pending_keys: set[str] = set()
        self._pending_prefixes: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = False
        self.subscribed_event = asyncio.Event()
        self.received = 0

    # ------------------------------------------------------------------ messages

    def message(self, *, key: str | None = None, prefix: str | None = None) -> bytes:
        body: dict[str, str] = {"o": self._origin}
        if key is not None:
            body["k"] = key
        else:
            body["p"] = prefix or ""
        return json.dumps(body, separators=(",", ":")).encode()

    def on_message(self, data: bytes | str) -> None:
        try:
            body = json.loads(data)
            if body.get("o") == self._origin:
                return  # our own broadcast: L1 was already updated when it was sent
            self.received += 1
            if "k" in body:
                self._drop_key(str(body["k"]))
            else:
                self._drop_prefix(str(body.get("p", "")))
        except (ValueError, AttributeError):
            log.warning("cache channel %s: malformed invalidation message %r", self.channel, data)

    # ------------------------------------------------------------------ Redis side

    def publish_in(self, pipe: Any, message: bytes) -> None:
        """Queue the broadcast of ``message`` in a pipeline."""
        if self._cluster:
            pipe.spublish(self.channel, message)
        else:
            pipe.publish(self.channel, message)

    async def publish(self, message: bytes) -> None:
        if self._cluster:
            await self._redis.spublish(self.channel, message)
        else:
            await self._redis.publish(self.channel, message)

    async def delete_prefix(self, key_prefix: str) -> None:
        """Delete every entry under ``key_prefix`` in Redis and broadcast it (raises on errors)."""
        match = glob_escape(self._key_prefix + key_prefix) + "*"
        batch: list[bytes] = []
        async for rkey in self._redis.scan_iter(match=match, count=500):
            batch.append(rkey)
            if len(batch) >= 500:
                await self._redis.unlink(*batch)
                batch.clear()
        if batch:
            await self._redis.unlink(*batch)
        await self.publish(self.message(prefix=key_prefix))

    # ------------------------------------------------------------------ replay

    @property
    def pending(self) -> bool:
        return bool(self._pending_keys or self._pending_prefixes)

    def remember(self, *, key: str | None = None, prefix: str | None = None) -> None:
        """Keep a failed invalidation (or write) to replay when Redis is back."""
        if prefix is not None:
            self._pending_prefixes.add(prefix)
        elif key is not None:
            if len(self._pending_keys) >= MAX_PENDING:
                self._pending_keys.clear()
                self._pending_prefixes = {""}  # too many: invalidate the whole cache instead
            else:
                self._pending_keys.add(key)

    async def replay(self) -> None:
        """Replay invalidations that failed during an outage; keep them if Redis fails again."""
        prefixes, keys = self._pending_prefixes, self._pending_keys
        self._pending_prefixes, self._pending_keys = set(), set()
        keys = {k for k in keys if not any(k.startswith(p) for p in prefixes)}

        async def op() -> None:
            for prefix in prefixes:
                await self.delete_prefix(prefix)
            if keys:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.delete(self._key_prefix + key)
                        self.publish_in(pipe, self.message(key=key))
                    await pipe.execute()

        if await self._link.call(op) is MISSING:
            self._pending_prefixes |= prefixes
            for key in keys:
                self.remember(key=key)

    # ------------------------------------------------------------------ subscriber

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._closing = False
            self._task = asyncio.create_task(self._subscribe_loop(), name=f"cache-subscriber:{self.channel}")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.subscribed = False
        self.subscribed_event.clear()

    @property
    def closing(self) -> bool:
        """True once close() began (read through a property: close() sets it while the loop awaits)."""
        return self._closing

    async def _subscribe_loop(self) -> None:
        """Receive invalidations; reconnect with backoff and resubscribe after failures."""
        link = self._link
        backoff = link.backoff_initial
        first = True
        while not self._closing:
            pubsub: Any = self._redis.pubsub()
            try:
                async with asyncio.timeout(link.timeout):
                    if self._cluster:
                        await self._redis.initialize()  # the cluster's slot map
                        await pubsub.ssubscribe(self.channel)
                    else:
                        await pubsub.subscribe(self.channel)
                last_read = time.monotonic()
                ping_sent: float | None = None
                while not self._closing:
                    # The bound also covers redis-py's own reconnect attempts inside the read.
                    async with asyncio.timeout(PUBSUB_POLL + (link.timeout or PUBSUB_POLL)):
                        if self._cluster:
                            msg = await pubsub.get_sharded_message(timeout=PUBSUB_POLL)
                        else:
                            msg = await pubsub.get_message(timeout=PUBSUB_POLL)
                    now = time.monotonic()
                    if msg is None:
                        if ping_sent is not None and now - ping_sent > PUBSUB_PING_EVERY:
                            raise RedisConnectionError("no answer to PING on the subscription")
                        if ping_sent is None and now - last_read > PUBSUB_PING_EVERY:
                            await _ping(pubsub, self._cluster)
                            ping_sent = now
                    else:
                        last_read, ping_sent = now, None
                        kind = msg["type"]
                        if kind in ("message", "smessage"):
                            self.on_message(msg["data"])
                        elif kind in ("subscribe", "ssubscribe"):  # first subscription or a reconnect
                            if not first:
                                self._drop_prefix("")
                            first = False
                            self.subscribed = True
                            self.subscribed_event.set()
                            link.mark_up()
                            backoff = link.backoff_initial
                    if not link.available and link.allowed():
                        await link.call(self._redis.ping)  # notice recovery without traffic
                    if link.available and self.pending:
                        await self.replay()
            except asyncio.CancelledError:
                raise
            except L2_ERRORS as exc:  # includes TimeoutError
                link.failed(exc)
            except Exception:
                log.exception("cache channel %s: subscriber failed", self.channel)
            finally:
                self.subscribed = False
                self.subscribed_event.clear()
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            if self.closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, link.backoff_max)


async def _ping(pubsub: Any, cluster: bool) -> None:
    """PING the subscription's connection(s); the answer arrives as a message."""
    if cluster:  # the shard channel's node connection(s)
        for node_pubsub in list(pubsub.node_pubsub_mapping.values()):
            await node_pubsub.ping()
    else:
        await pubsub.ping()
