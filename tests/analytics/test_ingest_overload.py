"""Overload: PostgreSQL stalls behind a TCP proxy the test controls while clients keep
sending. The analytics service (a real process) holds at most
ANALYTICS_MAX_PENDING_ROWS rows, answers RESOURCE_EXHAUSTED beyond them, its memory
stays bounded, and after the stall (and after a cut of every connection) every
acknowledged event is stored, once."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tests.support import DATABASE_URL, free_port, service_env, spawn_service, unique_name, wait_serving
from tests.tcp_proxy import TcpProxy

BATCH = 20
CLIENTS = 96
MAX_PENDING_ROWS = 400  # far below CLIENTS * BATCH = 1920 rows in flight


@dataclass
class Load:
    acked: set[str] = field(default_factory=set)  # event ids acknowledged
    batches_acked: int = 0
    exhausted: int = 0
    unavailable: int = 0
    other: list[str] = field(default_factory=list)
    progress: asyncio.Event = field(default_factory=asyncio.Event)  # set on each acknowledgement

    async def until_acked(self, batches: int, timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while self.batches_acked < batches:
                self.progress.clear()
                await self.progress.wait()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
    assert match
    return int(match[1])


def pending_rows(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    match = re.search(r"^analytics_ingest_pending_rows ([0-9.e+]+)$", text, re.M)
    assert match
    return float(match[1])


async def drive(address: str, load: Load, stop: asyncio.Event, tag: str) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)

        async def client(c: int) -> None:
            n = 0
            while not stop.is_set():
                ids = [f"{tag}-c{c}-b{n}-{i}" for i in range(BATCH)]
                n += 1
                request = analytics_pb2.RecordEventsRequest(
                    events=[
                        analytics_pb2.Event(event_id=i, session_id=f"s{c}", event_type="load") for i in ids
                    ]
                )
                try:
                    reply = await stub.RecordEvents(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        load.exhausted += 1
                        await asyncio.sleep(0.05)  # a client backing off, as after a 429
                    elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                        load.unavailable += 1
                        await asyncio.sleep(0.05)
                    else:
                        load.other.append(f"{exc.code()}: {exc.details()}")
                    continue
                assert (reply.accepted, reply.duplicates) == (BATCH, 0)
                load.acked.update(ids)
                load.batches_acked += 1
                load.progress.set()

        await asyncio.gather(*(client(c) for c in range(CLIENTS)))


async def test_a_stalled_database_sheds_load_with_bounded_memory_and_loses_nothing(tmp_path: Path) -> None:
    target = urlsplit(DATABASE_URL)
    proxy = await TcpProxy.start(target.hostname or "127.0.0.1", target.port or 5432)
    netloc = f"{target.username}@127.0.0.1:{proxy.port}" if target.username else f"127.0.0.1:{proxy.port}"
    schema = unique_name("overload")
    port, metrics_port = free_port(), free_port()
    env = service_env(
        schema,
        DATABASE_URL=urlunsplit(target._replace(netloc=netloc)),
        GRPC_PORT=str(port),
        METRICS_PORT=str(metrics_port),
        ANALYTICS_MAX_PENDING_ROWS=str(MAX_PENDING_ROWS),
        MONITORING_ADDR="",
    )
    service = spawn_service("analytics", env, tmp_path / "analytics.log")
    db = await asyncpg.connect(DATABASE_URL)  # the test's own connection: not through the proxy
    load, stop = Load(), asyncio.Event()
    driver: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}", 60)
        driver = asyncio.create_task(drive(f"127.0.0.1:{port}", load, stop, "load"))
        await load.until_acked(50)  # flowing: acknowledgements come
        rss_before = rss_kib(service.pid)

        # 1. PostgreSQL stalls for 4 s under full load.
        proxy.stall()
        acked_at_stall = load.batches_acked
        exhausted_at_stall = load.exhausted
        rss_peak, pending_peak = rss_before, 0.0
        for _ in range(40):
            await asyncio.sleep(0.1)
            rss_peak = max(rss_peak, rss_kib(service.pid))
            pending_peak = max(pending_peak, await asyncio.to_thread(pending_rows, metrics_port))
        # Nothing can commit; the service sheds what it cannot hold, at once, and keeps
        # at most MAX_PENDING_ROWS rows (whole requests) waiting.
        assert load.batches_acked - acked_at_stall <= MAX_PENDING_ROWS // BATCH + 2 * 2  # in-flight flushes
        assert load.exhausted - exhausted_at_stall > CLIENTS  # every client was told to back off
        assert 0 < pending_peak <= MAX_PENDING_ROWS
        # Memory: a few MiB of buffers, not a queue growing with the clients' retries.
        assert rss_peak - rss_before < 40 * 1024, (rss_before, rss_peak)
        assert load.other == []

        # 2. It flows again: the queued requests commit, new ones are acknowledged.
        proxy.resume()
        resumed_at = load.batches_acked
        await load.until_acked(resumed_at + 100)

        # 3. Every connection to PostgreSQL is cut mid-stream: the flushes in flight fail
        # (UNAVAILABLE, nothing acknowledged), the pool reconnects, acknowledgements resume.
        proxy.cut()
        cut_at = load.batches_acked
        await load.until_acked(cut_at + 100)
        stop.set()
        await asyncio.wait_for(driver, 90)
        assert load.other == []
        assert rss_kib(service.pid) - rss_before < 40 * 1024
    finally:
        stop.set()
        if driver is not None and not driver.done():
            driver.cancel()
            with contextlib.suppress(BaseException):
                await driver
        service.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            service.wait(30)
        if service.poll() is None:
            service.kill()
            service.wait(10)
        await proxy.close()
    try:
        stored = {r["event_id"] for r in await db.fetch(f'SELECT event_id FROM "{schema}".events')}
        keys = await db.fetchval(f'SELECT count(*) FROM "{schema}".event_keys')
        missing = load.acked - stored
        assert not missing, f"{len(missing)} acknowledged events not stored"
        assert keys == len(stored)  # each stored once
    finally:
        await db.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await db.close()
