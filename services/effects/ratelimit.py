"""Per-user task limit in Redis: a sliding window (a sorted set per user,
checked and added to by one Lua script, so replicas share the count exactly).

Redis down: the limit is not enforced (logged and counted); the database's
idempotency still guards against duplicates, and refusing every user while
Redis is away would be the worse failure.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid

from prometheus_client import Counter
from redis.exceptions import RedisError

from services.servicekit.redis_client import RedisClient

log = logging.getLogger(__name__)

DECISIONS = Counter("effects_rate_limit", "Task starts checked by the per-user limit, by result.", ["result"])

# KEYS[1] the user's window; ARGV: now ms, window ms, limit, member.
# Returns {allowed (1/0), ms until the oldest entry leaves the window}.
_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[1], window)
  return {1, 0}
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, tonumber(oldest[2]) + window - now}
"""


class RateLimiter:
    def __init__(self, redis: RedisClient, prefix: str, limit: int, window_seconds: float) -> None:
        self._redis = redis
        self._prefix = f"{prefix}:task-limit:"
        self.limit = limit
        self.window_ms = int(window_seconds * 1000)
        self._script = redis.register_script(_SCRIPT)

    def _key(self, user: str) -> str:
        # Hashed: a user id of any length or content makes a bounded, safe key.
        return self._prefix + hashlib.sha256(user.encode()).hexdigest()[:32]

    async def acquire(self, user: str) -> float | None:
        """None when the user may start a task now (and it is counted), else the
        seconds until one may."""
        if self.limit <= 0:
            return None
        try:
            allowed, wait_ms = await self._script(
                keys=[self._key(user)],
                args=[int(time.time() * 1000), self.window_ms, self.limit, uuid.uuid4().hex],
            )
        except (RedisError, OSError) as exc:
            DECISIONS.labels("redis_down").inc()
            log.warning("task rate limit not enforced: Redis unavailable", extra={"error": repr(exc)})
            return None
        if int(allowed) == 1:
            DECISIONS.labels("allowed").inc()
            return None
        DECISIONS.labels("limited").inc()
        return max(0.001, int(wait_ms) / 1000)
