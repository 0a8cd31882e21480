"""MultiLevelCache against real Redis: the shared one (TEST_REDIS_URL), a local Redis Cluster
(three masters started once per session; every test not about a single server's outage runs
against both) and private redis-servers. Expiry runs on a ManualClock: no test waits for an
entry to expire."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import uuid4

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.servicekit.cache import CACHE_REQUESTS, MultiLevelCache, bytes_passthrough
from services.servicekit.cache.codec import unwrap
from services.servicekit.clock import ManualClock
from services.servicekit.redis_client import RedisClient, connect_redis
from tests.servicekit.redis_cluster import RedisCluster
from tests.support import eventually

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
RUN_PREFIX = f"test-{uuid4().hex[:8]}"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _client(url: str, **kwargs: Any) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5, **kwargs)


def stored(raw: bytes | None) -> bytes:
    """The payload of a value the cache stored in Redis (without its expiry envelope)."""
    assert raw is not None
    return unwrap(raw)[1]


class Loader:
    """Counts its calls; returns the next value, or raises ``error`` if set. A gated loader
    signals ``started`` and waits for ``gate`` before answering."""

    def __init__(self, value: Any = "v", gated: bool = False) -> None:
        self.value = value
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()
        self.started = asyncio.Event()
        self.calls = 0
        self.error: Exception | None = None

    async def __call__(self) -> Any:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


class RedisServer:
    """A private, throw-away redis-server on a free port (no persistence)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.write(b"PING\r\n")
                pong = await asyncio.wait_for(reader.readline(), 0.5)
                writer.close()
                if pong.startswith(b"+PONG"):
                    return
            except (OSError, TimeoutError):
                pass
            if time.monotonic() > deadline or self.proc.returncode is not None:
                raise RuntimeError(f"redis-server did not start on port {self.port}")
            await asyncio.sleep(0.02)

    async def kill(self) -> None:
        """SIGKILL: no shutdown, clients just see their sockets die."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        self.proc = None


SINGLE_ONLY = pytest.mark.parametrize("redis_client", ["single"], indirect=True)


@pytest.fixture(scope="session")
async def cluster() -> AsyncIterator[RedisCluster]:
    """Three masters on free ports, started once (about a second)."""
    server = RedisCluster()
    try:
        await server.start()
        yield server
    finally:
        await server.stop()


@pytest.fixture(params=["single", "cluster"])
async def redis_client(request: pytest.FixtureRequest, cluster: RedisCluster) -> AsyncIterator[RedisClient]:
    if request.param == "cluster":
        client = connect_redis(cluster.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    else:
        client = _client(REDIS_URL)
    yield client
    keys = [k async for k in client.scan_iter(match=f"{RUN_PREFIX}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer()
    await server.start()
    yield server
    await server.kill()


@pytest.fixture
async def make_cache(redis_client: RedisClient) -> AsyncIterator[Callable[..., Any]]:
    """Factory of started caches (closed at teardown); default client is the shared Redis."""
    caches: list[MultiLevelCache[Any]] = []

    async def make(name: str, *, client: RedisClient | None = None, **kwargs: Any) -> MultiLevelCache[Any]:
        kwargs.setdefault("l2_timeout", 0.5)
        kwargs.setdefault("retry_backoff", 0.1)
        kwargs.setdefault("retry_backoff_max", 0.3)
        cache: MultiLevelCache[Any] = MultiLevelCache(
            client or redis_client, prefix=RUN_PREFIX, name=name, **kwargs
        )
        await cache.start()
        assert cache.subscribed
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        await cache.close()


def _name() -> str:
    return f"c{uuid4().hex[:6]}"


@SINGLE_ONLY
async def test_l1_hit_does_not_touch_redis(private_redis: RedisServer, make_cache: Any) -> None:
    client = _client(private_redis.url)
    try:
        clock = ManualClock()
        cache = await make_cache(_name(), client=client, l1_ttl=0.3, clock=clock)
        await cache.set("k", {"a": 1}, ttl=60)
        assert stored(await client.get(cache.redis_key("k"))) == b'{"a":1}'

        # Hot hits: count the commands the private server processes meanwhile.
        await client.config_resetstat()
        for _ in range(200):
            assert await cache.get("k") == {"a": 1}
            assert await cache.get_or_load("k", Loader(), ttl=60) == {"a": 1}
        stats = await client.info("commandstats")
        assert all(k.startswith("cmdstat_config") for k in stats), stats  # only CONFIG RESETSTAT
        assert cache.stats()["l1_hits"] == 400

        # The Redis key is deleted behind the cache's back: L1 still answers until its TTL.
        await client.delete(cache.redis_key("k"))
        clock.advance(0.29)
        assert await cache.get("k") == {"a": 1}
        clock.advance(0.02)
        assert await cache.get("k") is None
        assert cache.stats()["misses"] == 1
    finally:
        await client.aclose()


async def test_l2_hit_from_a_second_instance(make_cache: Any, redis_client: RedisClient) -> None:
    name = _name()
    a = await make_cache(name)
    b = await make_cache(name)
    loader_a, loader_b = Loader({"n": 1}), Loader({"n": 2})
    assert await a.get_or_load("k", loader_a, ttl=30) == {"n": 1}
    assert await b.get_or_load("k", loader_b, ttl=30) == {"n": 1}
    assert (loader_a.calls, loader_b.calls) == (1, 0)
    assert b.stats()["l2_hits"] == 1 and b.stats()["misses"] == 0
    # B now holds it in L1, with the remaining Redis TTL.
    assert await b.get_or_load("k", loader_b, ttl=30) == {"n": 1}
    assert b.stats()["l1_hits"] == 1
    assert a.stats()["hits"] == 0 and a.stats()["misses"] == 1 and a.stats()["loads"] == 1
    assert CACHE_REQUESTS.labels(name, "l2", "hit")._value.get() == 1
    assert await redis_client.exists(f"{RUN_PREFIX}:cache.v2:{name}:k") == 1


async def test_ttl_callable_per_value_in_l1_and_l2(make_cache: Any, redis_client: RedisClient) -> None:
    clock = ManualClock()
    cache = await make_cache(_name(), clock=clock)

    def ttl_of(task: dict[str, str]) -> float:
        return {"running": 0.3, "done": 30.0, "failed": 0.0}[task["state"]]

    running, done, failed = (
        Loader({"state": "running"}),
        Loader({"state": "done"}),
        Loader({"state": "failed"}),
    )
    assert await cache.get_or_load("t1", running, ttl_of) == {"state": "running"}
    assert await cache.get_or_load("t2", done, ttl_of) == {"state": "done"}
    assert await cache.get_or_load("t3", failed, ttl_of) == {"state": "failed"}

    assert 0 < await redis_client.pttl(cache.redis_key("t1")) <= 300
    assert 29_000 < await redis_client.pttl(cache.redis_key("t2")) <= 30_000
    assert await redis_client.exists(cache.redis_key("t3")) == 0  # ttl 0: not cached
    # Each entry carries its expiry on the cache's clock.
    raw_t1 = await redis_client.get(cache.redis_key("t1"))
    assert raw_t1 is not None and unwrap(raw_t1)[0] == pytest.approx(clock.time() + 0.3)

    for _ in range(3):
        await cache.get_or_load("t1", running, ttl_of)
        await cache.get_or_load("t2", done, ttl_of)
        await cache.get_or_load("t3", failed, ttl_of)
    assert (running.calls, done.calls, failed.calls) == (1, 1, 4)

    clock.advance(0.35)
    other = await make_cache(cache.name, clock=clock)  # an empty L1: what Redis holds
    assert await other.get("t1") is None  # expired in L2 ...
    assert await cache.get("t1") is None  # ... and in L1
    assert await other.get("t2") == {"state": "done"}
    await cache.get_or_load("t1", running, ttl_of)
    assert running.calls == 2
    assert await cache.get("t2") == {"state": "done"}

    # set() with an explicit TTL; an L2 hit gives L1 only the remaining lifetime.
    await cache.set("s", [1, 2], ttl=0.3)
    assert 0 < await redis_client.pttl(cache.redis_key("s")) <= 300
    clock.advance(0.2)
    third = await make_cache(cache.name, clock=clock)
    assert await third.get("s") == [1, 2]  # from L2, 0.1 s left
    clock.advance(0.11)
    assert await cache.get("s") is None
    assert await third.get("s") is None


async def test_l1_ttl_caps_the_entry_ttl(make_cache: Any, redis_client: RedisClient) -> None:
    clock = ManualClock()
    cache = await make_cache(_name(), l1_ttl=0.2, clock=clock)
    loader = Loader("x")
    await cache.get_or_load("k", loader, ttl=30)
    assert await redis_client.pttl(cache.redis_key("k")) > 29_000  # L2 keeps the entry TTL
    await redis_client.set(cache.redis_key("k"), cache.encode("changed", 30), px=30_000)
    assert await cache.get("k") == "x"
    clock.advance(0.25)
    assert await cache.get("k") == "changed"  # L1 expired at its cap, refilled from L2
    assert loader.calls == 1


async def test_single_flight(make_cache: Any) -> None:
    cache = await make_cache(_name())
    loader = Loader({"big": True}, gated=True)
    waiters = asyncio.gather(*(cache.get_or_load("k", loader, ttl=10) for _ in range(50)))
    await loader.started.wait()
    loader.gate.set()
    results = await waiters
    assert loader.calls == 1
    assert results == [{"big": True}] * 50
    assert cache.stats()["coalesced"] == 49 and cache.stats()["misses"] == 1

    # An error reaches every waiter, is not cached, and the next call retries.
    failing = Loader(gated=True)
    failing.error = RuntimeError("db down")
    waiting = asyncio.gather(
        *(cache.get_or_load("e", failing, ttl=10) for _ in range(50)), return_exceptions=True
    )
    await failing.started.wait()
    failing.gate.set()
    outcomes = await waiting
    assert failing.calls == 1
    assert all(isinstance(o, RuntimeError) and str(o) == "db down" for o in outcomes)
    failing.error = None
    failing.value = "ok"
    assert await cache.get_or_load("e", failing, ttl=10) == "ok"
    assert failing.calls == 2
    assert cache.stats()["load_errors"] == 1


async def test_cancelling_one_waiter_does_not_cancel_the_load(make_cache: Any) -> None:
    cache = await make_cache(_name())
    loader = Loader("v", gated=True)
    first = asyncio.create_task(cache.get_or_load("k", loader, ttl=10))
    second = asyncio.create_task(cache.get_or_load("k", loader, ttl=10))
    await loader.started.wait()
    first.cancel()
    await asyncio.sleep(0)
    loader.gate.set()
    assert await second == "v"
    assert first.cancelled()
    assert loader.calls == 1
    assert await cache.get("k") == "v"


async def test_invalidation_reaches_other_instances(make_cache: Any, redis_client: RedisClient) -> None:
    name = _name()
    a = await make_cache(name)
    b = await make_cache(name)
    loader_a, loader_b = Loader("old"), Loader("old")
    await a.get_or_load("k", loader_a, ttl=30)
    await b.get_or_load("k", loader_b, ttl=30)  # L2 hit, now in B's L1 as well
    assert b.stats()["l2_hits"] == 1

    loader_a.value = loader_b.value = "new"
    await a.invalidate("k")
    assert await redis_client.exists(a.redis_key("k")) == 0
    assert await a.get("k") is None  # A dropped its own entry immediately
    await eventually(lambda: b.stats()["invalidations_received"] == 1)
    assert await b.get_or_load("k", loader_b, ttl=30) == "new"
    assert loader_b.calls == 1

    # set() on one instance also replaces the others' L1 copy.
    await a.set("k", "newest", ttl=30)
    await eventually(lambda: b.stats()["invalidations_received"] == 2)
    assert await b.get("k") == "newest"

    # invalidate_prefix drops matching keys on every level and instance.
    for key in ("user:1", "user:2", "other"):
        await a.set(key, key, ttl=30)
        assert await b.get(key) == key
    await b.invalidate_prefix("user:")
    assert await redis_client.exists(a.redis_key("user:1"), a.redis_key("user:2")) == 0
    await eventually(lambda: a.stats()["invalidations_received"] == 1)
    assert await a.get("user:1") is None and await b.get("user:2") is None
    assert await a.get("other") == "other"


async def test_invalidation_during_load_is_not_overwritten(make_cache: Any) -> None:
    cache = await make_cache(_name())
    loader = Loader("stale", gated=True)
    task = asyncio.create_task(cache.get_or_load("k", loader, ttl=30))
    await loader.started.wait()
    await cache.invalidate("k")
    loader.gate.set()
    assert await task == "stale"  # the caller still gets its answer ...
    assert await cache.get("k") is None  # ... but it is not cached


async def test_l1_lru_bound(make_cache: Any, redis_client: RedisClient) -> None:
    cache = await make_cache(_name(), l1_max_entries=3)
    for key in ("a", "b", "c"):
        await cache.set(key, key, ttl=30)
    assert await cache.get("a") == "a"  # a is now the most recently used
    await cache.set("d", "d", ttl=30)  # evicts b
    assert cache.stats()["l1_size"] == 3
    await redis_client.delete(*(cache.redis_key(k) for k in "abcd"))  # only L1 can answer now
    assert await cache.get("b") is None
    assert [await cache.get(k) for k in ("a", "c", "d")] == ["a", "c", "d"]


async def test_bytes_passthrough(make_cache: Any, redis_client: RedisClient) -> None:
    name = _name()
    a = await make_cache(name, serializer=bytes_passthrough, deserializer=bytes_passthrough)
    b = await make_cache(name, serializer=bytes_passthrough, deserializer=bytes_passthrough)
    await a.set("png", b"\x89PNG\x00\xff", ttl=30)
    assert stored(await redis_client.get(a.redis_key("png"))) == b"\x89PNG\x00\xff"
    assert await b.get("png") == b"\x89PNG\x00\xff"


@SINGLE_ONLY
async def test_redis_outage_and_recovery(
    private_redis: RedisServer, make_cache: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client_a, client_b, probe = (
        _client(private_redis.url),
        _client(private_redis.url),
        _client(private_redis.url, retry=Retry(NoBackoff(), 2)),  # survives its stale socket
    )
    try:
        name = _name()
        a = await make_cache(name, client=client_a)
        b = await make_cache(name, client=client_b)
        await a.set("hot", "hot-value", ttl=60)
        assert stored(await probe.get(a.redis_key("hot"))) == b'"hot-value"'

        await private_redis.kill()
        caplog.set_level(logging.WARNING, logger="services.servicekit.cache")
        started = time.monotonic()
        assert await a.get("hot") == "hot-value"  # L1 hit
        loader = Loader("from-db")
        for i in range(20):
            assert await a.get_or_load(f"cold{i}", loader, ttl=60) == "from-db"  # L1 miss
        assert loader.calls == 20
        assert await a.get("never-set") is None
        await a.set("written", "w", ttl=60)  # L1 only, no error
        await a.invalidate("hot")  # local now; replayed on recovery
        assert await a.get("written") == "w"
        assert not a.redis_available
        # No per-call connect timeouts (22 calls would wait seconds each); generous for a loaded machine.
        assert time.monotonic() - started < 4.0
        # Single-flight still holds without Redis.
        slow = Loader("x", gated=True)
        together = asyncio.gather(*(a.get_or_load("sf", slow, ttl=60) for _ in range(20)))
        await slow.started.wait()
        slow.gate.set()
        await together
        assert slow.calls == 1
        await eventually(lambda: not b.redis_available and not b.subscribed)
        outage_warnings = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
        assert len(outage_warnings) == 2, outage_warnings  # once per instance, not per call

        await private_redis.start()  # same port, empty data set
        await eventually(lambda: a.redis_available and b.redis_available, timeout=5)
        await eventually(lambda: a.subscribed and b.subscribed, timeout=5)

        # Back to normal: writes reach Redis again ...
        await a.set("after", {"ok": True}, ttl=60)
        assert stored(await probe.get(a.redis_key("after"))) == b'{"ok":true}'
        assert await b.get("after") == {"ok": True}
        # ... and invalidation broadcasts flow between the instances again.
        await a.invalidate("after")
        await eventually(lambda: b.stats()["l1_size"] == 0)
        assert await b.get("after") is None
        assert len([r for r in caplog.records if "Redis unavailable" in r.getMessage()]) == 2
    finally:
        for client in (client_a, client_b, probe):
            await client.aclose()


@SINGLE_ONLY
async def test_stalled_redis_times_out_and_invalidations_are_replayed(
    private_redis: RedisServer, make_cache: Any
) -> None:
    """A frozen server (SIGSTOP) costs at most l2_timeout once; missed invalidations are replayed."""
    assert private_redis.proc is not None
    client_a, client_b = _client(private_redis.url), _client(private_redis.url)
    try:
        name = _name()
        # Wide enough that a loaded machine cannot blur them: one timeout (1 s) is told apart
        # from two, and the calls after it stay inside the backoff window (3 s).
        opts = {"l2_timeout": 1.0, "retry_backoff": 3.0, "retry_backoff_max": 3.0}
        a = await make_cache(name, client=client_a, **opts)
        b = await make_cache(name, client=client_b, **opts)
        await a.set("k", "old", ttl=60)
        await eventually(lambda: b.stats()["invalidations_received"] == 1)  # set() broadcasts too
        assert await b.get("k") == "old"

        private_redis.proc.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert await a.get("missing") is None  # times out after l2_timeout
            timed_out = time.monotonic()
            assert timed_out - started < 2.0  # at most l2_timeout, however the client retries
            assert not a.redis_available
            await a.invalidate("k")  # inside the backoff window: nothing sent, kept for replay
            assert await a.get_or_load("k", Loader("new"), ttl=60) == "new"
            assert time.monotonic() - timed_out < 1.0  # no second wait for the frozen server
            assert await b.get("k") == "old"  # B cannot hear about it yet
        finally:
            private_redis.proc.send_signal(signal.SIGCONT)

        await eventually(lambda: a.redis_available, timeout=8)
        await eventually(lambda: b.stats()["invalidations_received"] == 2)  # the replay
        assert await client_a.exists(a.redis_key("k")) == 0
        assert await b.get_or_load("k", Loader("newer"), ttl=60) == "newer"
    finally:
        for client in (client_a, client_b):
            await client.aclose()


@SINGLE_ONLY
async def test_start_while_redis_is_down_then_recover(private_redis: RedisServer, make_cache: Any) -> None:
    await private_redis.kill()
    client = _client(private_redis.url)
    try:
        cache: MultiLevelCache[Any] = MultiLevelCache(
            client, prefix=RUN_PREFIX, name=_name(), l2_timeout=0.5, retry_backoff=0.1, retry_backoff_max=0.3
        )
        await cache.start(wait=0.3)  # does not raise
        try:
            assert not cache.subscribed
            assert await cache.get_or_load("k", Loader("v"), ttl=30) == "v"
            await eventually(lambda: not cache.redis_available)
            await private_redis.start()
            await eventually(lambda: cache.subscribed and cache.redis_available, timeout=5)
            await cache.set("k2", "v2", ttl=30)
            assert stored(await client.get(cache.redis_key("k2"))) == b'"v2"'
        finally:
            await cache.close()
    finally:
        await client.aclose()


def test_rejects_decoding_client() -> None:
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    with pytest.raises(ValueError, match="decode_responses"):
        MultiLevelCache(client, prefix=RUN_PREFIX, name="x")


async def test_values_not_in_the_envelope_are_misses(make_cache: Any, redis_client: RedisClient) -> None:
    """A bare value (an older version's, or anything else) in a cache key is a miss, never an error."""
    cache = await make_cache(_name())
    for raw in (b'"bare json"', b"", b"\x02short", cache.encode("x", 30)[:-1]):
        await redis_client.set(cache.redis_key("k"), raw, px=30_000)
        assert await cache.get("k") is None
    loader = Loader("fresh")
    assert await cache.get_or_load("k", loader, ttl=30) == "fresh" and loader.calls == 1
    assert stored(await redis_client.get(cache.redis_key("k"))) == b'"fresh"'


@SINGLE_ONLY  # makes its own cluster client
async def test_cluster_spreads_keys_and_invalidates_on_every_master(
    cluster: RedisCluster, make_cache: Any
) -> None:
    client = connect_redis(cluster.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    try:
        assert isinstance(client, aioredis.RedisCluster)
        name = _name()
        a = await make_cache(name, client=client)
        b = await make_cache(name, client=client)
        keys = [f"user:{i}" for i in range(30)]
        for key in keys:
            await a.set(key, key, ttl=60)
        masters = {client.get_node_from_key(a.redis_key(k)).name for k in keys}
        assert len(masters) == 3  # one cache's keys spread over the cluster (no shared hash tag)
        assert [await b.get(k) for k in keys] == keys
        await b.invalidate_prefix("user:")  # SCAN and UNLINK on every master
        assert await client.exists(*(a.redis_key(k) for k in keys)) == 0
        await eventually(lambda: a.stats()["invalidations_received"] == 1)
        assert a.stats()["l1_size"] == 0
        # The channel is a shard channel: SPUBLISH reaches the subscribers, PUBLISH does not.
        node = client.get_node_from_key(a.channel)
        counts = await client.execute_command("PUBSUB SHARDNUMSUB", a.channel, target_nodes=node)
        assert [(bytes(c), int(n)) for c, n in counts] == [(a.channel.encode(), 2)]
        await a.close()
        await b.close()
    finally:
        await client.aclose()


@SINGLE_ONLY  # the parameter is the shared fixtures' Redis; the service uses the cluster
async def test_a_service_on_a_cluster_url(cluster: RedisCluster, start_service: Any) -> None:
    from services.monitoring import app as monitoring_app

    app = await start_service(monitoring_app, redis_url=cluster.url)
    assert isinstance(app.redis, aioredis.RedisCluster)
    one = await app.cache("things")
    other = MultiLevelCache(app.redis, prefix=app.redis_prefix, name="things")
    await other.start()
    try:
        await one.set("k", {"v": 1}, ttl=30)
        assert await other.get("k") == {"v": 1}
        await one.set("k", {"v": 2}, ttl=30)
        await eventually(lambda: other.stats()["invalidations_received"] == 2)  # each set() broadcasts
        assert await other.get("k") == {"v": 2}
    finally:
        await other.close()


async def test_rejects_decoding_cluster_client(cluster: RedisCluster) -> None:
    client = connect_redis(cluster.url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            MultiLevelCache(client, prefix=RUN_PREFIX, name="x")
    finally:
        await client.aclose()
