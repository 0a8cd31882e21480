"""Acknowledged means durable: the analytics service runs as a real process, batches
arrive concurrently, the process is SIGKILLed mid-stream and restarted; every
acknowledged id is in the database and every batch is there entirely or not at all.
A SIGTERM (graceful stop) under load loses nothing acknowledged either."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tests.support import free_port, service_env, spawn_service, unique_name, wait_serving

BATCH = 20
WORKERS = 32


@dataclass
class Load:
    sent: dict[str, list[str]] = field(default_factory=dict)  # batch -> ids
    acked: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)


async def drive(address: str, load: Load, stop: asyncio.Event, tag: str) -> None:
    """WORKERS concurrent clients sending BATCH-event batches until `stop` or an error."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)

        async def worker(w: int) -> None:
            n = 0
            while not stop.is_set():
                batch = f"{tag}-w{w}-b{n}"
                ids = [f"{batch}-{i}" for i in range(BATCH)]
                load.sent[batch] = ids
                request = analytics_pb2.RecordEventsRequest(
                    events=[
                        analytics_pb2.Event(event_id=i, session_id=f"s{w}", event_type="durable") for i in ids
                    ]
                )
                try:
                    reply = await stub.RecordEvents(request, timeout=30)
                except grpc.aio.AioRpcError:
                    load.failed.add(batch)
                    return
                assert reply.accepted == BATCH, reply
                load.acked.add(batch)
                n += 1

        await asyncio.gather(*(worker(w) for w in range(WORKERS)))


async def stored(db: asyncpg.Connection, schema: str) -> dict[str, int]:
    """Stored events per batch (raw rows, cross-checked against the key table)."""
    rows = await db.fetch(
        f"""SELECT regexp_replace(e.event_id, '-[0-9]+$', '') AS batch, count(*) AS n, count(k.event_id) AS keys
            FROM "{schema}".events e LEFT JOIN "{schema}".event_keys k USING (event_id) GROUP BY 1"""
    )
    assert all(r["n"] == r["keys"] for r in rows)
    assert await db.fetchval(f'SELECT count(*) FROM "{schema}".event_keys') == sum(r["n"] for r in rows)
    return {r["batch"]: r["n"] for r in rows}


async def sessions_gone(db: asyncpg.Connection, schema: str, timeout: float = 15.0) -> None:
    """Until no PostgreSQL session of the service (application_name = its schema) is left."""
    deadline = time.monotonic() + timeout
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
    while await db.fetchval(sql, schema):
        assert time.monotonic() < deadline, "the killed service's sessions did not end"
        await asyncio.sleep(0.05)


def start(schema: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    proc = spawn_service("analytics", service_env(schema, GRPC_PORT=str(port)), log)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=30)
    except TimeoutError:
        proc.kill()
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc


async def run_until(
    address: str, load: Load, tag: str, seconds: float, kill: signal.Signals, proc: subprocess.Popen[bytes]
) -> None:
    stop = asyncio.Event()
    driver = asyncio.create_task(drive(address, load, stop, tag))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(load.acked) < 2 * WORKERS:
        await asyncio.sleep(0.05)
        assert not driver.done(), "the load stopped early"
    os.kill(proc.pid, kill)
    await asyncio.wait_for(driver, 30)
    stop.set()


async def test_sigkill_loses_no_acknowledged_batch(tmp_path: Path, admin_pg: asyncpg.Connection) -> None:
    schema = unique_name("durable")
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "analytics.log"
    proc = await asyncio.to_thread(start, schema, port, log)
    try:
        load = Load()
        await run_until(address, load, "k", 1.5, signal.SIGKILL, proc)
        assert proc.wait(10) == -signal.SIGKILL
        assert load.acked and load.failed  # killed mid-stream: some acknowledged, some in flight
        # A COMMIT the killed process had already sent may still land: read the database
        # once its sessions are gone, so that what is stored now is final.
        await sessions_gone(admin_pg, schema)

        counts = await stored(admin_pg, schema)
        missing = [b for b in load.acked if counts.get(b) != BATCH]
        assert not missing, f"acknowledged but not stored: {missing[:5]}"
        partial = {b: n for b, n in counts.items() if n != BATCH}
        assert not partial, f"half-written batches: {partial}"
        assert set(counts) <= set(load.sent)

        # Restarted, the service takes the unacknowledged batches again: exactly what was
        # not committed is accepted, the rest is reported as duplicates.
        proc = await asyncio.to_thread(start, schema, port, log)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
            for batch in sorted(load.failed):
                reply = await stub.RecordEvents(
                    analytics_pb2.RecordEventsRequest(
                        events=[
                            analytics_pb2.Event(event_id=i, session_id="s", event_type="durable")
                            for i in load.sent[batch]
                        ]
                    )
                )
                committed = counts.get(batch, 0)
                assert (reply.accepted, reply.duplicates) == (BATCH - committed, committed)
        counts = await stored(admin_pg, schema)
        assert all(counts.get(b) == BATCH for b in load.sent)
        rollup = await admin_pg.fetchval(
            f"""SELECT sum(count) FROM "{schema}".rollup_events WHERE event_type = 'durable'"""
        )
        assert rollup == sum(counts.values())  # rollups were committed with the rows, never apart

        # A graceful stop under load: in-flight requests finish, the queue is flushed.
        load2 = Load()
        await run_until(address, load2, "t", 1.0, signal.SIGTERM, proc)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        counts = await stored(admin_pg, schema)
        assert all(counts.get(b) == BATCH for b in load2.acked)
        assert all(n == BATCH for n in counts.values())
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- service log ---\n{log.read_text()[-4000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
