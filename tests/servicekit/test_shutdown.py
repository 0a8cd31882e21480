"""Graceful shutdown finishes what is in flight: the analytics service runs as a real
process, 64 clients (each on its own connection) have requests in flight when it
gets SIGTERM; every one of them gets its real answer (none CANCELLED) and every
acknowledged event is stored. Clients that keep sending after SIGTERM are refused
with UNAVAILABLE (re-send), never CANCELLED."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import urllib.request
from collections import Counter
from pathlib import Path

import asyncpg
import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from tests.support import free_port, service_env, spawn_service, unique_name, wait_serving

CLIENTS = 64


def start(schema: str, port: int, log: Path, **env: str) -> subprocess.Popen[bytes]:
    proc = spawn_service("analytics", service_env(schema, GRPC_PORT=str(port), **env), log)
    try:
        wait_serving(f"127.0.0.1:{port}", timeout=60)
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise AssertionError(log.read_text()[-3000:]) from None
    return proc


def events(ids: list[str]) -> analytics_pb2.RecordEventsRequest:
    return analytics_pb2.RecordEventsRequest(
        events=[analytics_pb2.Event(event_id=i, session_id="s", event_type="shutdown") for i in ids]
    )


async def stored(db: asyncpg.Connection, schema: str, ids: list[str]) -> set[str]:
    rows = await db.fetch(f'SELECT event_id FROM "{schema}".event_keys WHERE event_id = ANY($1)', ids)
    return {r["event_id"] for r in rows}


async def channels(address: str) -> list[grpc.aio.Channel]:
    """One connection per client, connected before the test starts."""
    opened = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(CLIENTS)
    ]
    await asyncio.gather(*(ch.channel_ready() for ch in opened))
    return opened


def arrived(metrics_port: int) -> int:
    """RecordEvents calls the service has received: in flight plus answered."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    lines = urllib.request.urlopen(url, timeout=5).read().decode().splitlines()
    in_flight = sum(float(x.split()[-1]) for x in lines if x.startswith("grpc_server_in_flight "))
    answered = sum(
        float(x.split()[-1])
        for x in lines
        if x.startswith("grpc_server_handled_total{") and 'grpc_method="RecordEvents"' in x
    )
    return int(in_flight + answered)


async def test_sigterm_answers_every_request_in_flight(tmp_path: Path, admin_pg: asyncpg.Connection) -> None:
    schema = unique_name("shutdown")
    port, metrics_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "analytics.log"
    # Flushes wait 2 s for more rows, so the requests are still in flight at SIGTERM.
    proc = await asyncio.to_thread(
        start, schema, port, log, ANALYTICS_FLUSH_INTERVAL_MS="2000", METRICS_PORT=str(metrics_port)
    )
    opened = await channels(address)
    try:
        ids = [f"inflight-{c}" for c in range(CLIENTS)]
        stubs = [analytics_pb2_grpc.AnalyticsServiceStub(ch) for ch in opened]
        calls = [stub.RecordEvents(events([i]), timeout=30) for stub, i in zip(stubs, ids, strict=True)]
        for _ in range(600):  # every request has reached the service (not a fixed sleep: load)
            if await asyncio.to_thread(arrived, metrics_port) >= CLIENTS:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the requests did not all reach the service")
        os.kill(proc.pid, signal.SIGTERM)
        results = await asyncio.gather(*calls, return_exceptions=True)
        codes = Counter(r.code().name if isinstance(r, grpc.aio.AioRpcError) else "OK" for r in results)
        assert codes == {"OK": CLIENTS}, codes
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert await stored(admin_pg, schema, ids) == set(ids)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- service log ---\n{log.read_text()[-4000:]}") from None
    finally:
        await asyncio.gather(*(ch.close() for ch in opened))
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


async def test_sigterm_under_continuous_load_never_cancels(
    tmp_path: Path, admin_pg: asyncpg.Connection
) -> None:
    schema = unique_name("shutdown")
    port = free_port()
    address = f"127.0.0.1:{port}"
    log = tmp_path / "analytics.log"
    proc = await asyncio.to_thread(start, schema, port, log)
    opened = await channels(address)
    acked: list[str] = []
    codes: Counter[str] = Counter()
    sent = 0
    warmed_up = asyncio.Event()
    try:

        async def client(c: int, channel: grpc.aio.Channel) -> None:
            nonlocal sent
            stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
            n = 0
            while True:  # until the service refuses: it is going away
                event_id = f"load-{c}-{n}"
                sent += 1
                try:
                    await stub.RecordEvents(events([event_id]), timeout=30)
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1
                    return
                codes["OK"] += 1
                acked.append(event_id)
                if codes["OK"] >= 4 * CLIENTS:
                    warmed_up.set()
                n += 1

        load = asyncio.gather(*(client(c, ch) for c, ch in enumerate(opened)))
        await asyncio.wait_for(warmed_up.wait(), 60)
        os.kill(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(load, 60)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        assert set(codes) <= {"OK", "UNAVAILABLE"}, codes
        assert await stored(admin_pg, schema, acked) == set(acked)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- service log ---\n{log.read_text()[-4000:]}") from None
    finally:
        await asyncio.gather(*(ch.close() for ch in opened))
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)
