"""Benchmark of the live dashboard stream's fan-out (``StreamPerformanceDashboard``):
what 100 open streams cost the server against one.

``python -m bench.stream [--seconds S] [--rounds N] [--clients N] [--live-events N]``
(``bench/business.py`` runs the same measurement on its own data at its end):

1. starts the analytics service as a separate process (own schema, which it migrates;
   no monitoring, so the snapshot's monitoring sections are empty);
2. records ``--live-events`` events (default 20,000, 2,000 sessions) through its
   ``RecordEvents`` RPC, spread over the last 60 s, so that every snapshot's queries
   (a sum over ``rollup_events``, a distinct count of sessions over ``events`` in the
   last 5 minutes) have real rows to read;
3. then, ``--rounds`` times, one window of ``--seconds`` each, interleaved: no stream
   (idle), 1 stream, ``--clients`` streams, all at a 1 s interval. For each window it
   reads the CPU seconds (``/proc``, user + system) of the service process and of the
   PostgreSQL backends the service holds (``pg_stat_activity.application_name`` is
   the service's schema; the backends' ``/proc/<pid>/stat``), the messages the
   clients received and the snapshots the service computed (its Prometheus counter
   ``analytics_live_snapshots_total``).

Printed per round and as the median over the rounds: service CPU and service + database
CPU for idle / 1 / N clients, the ratio N / 1 of each, and the marginal service CPU per
stream message ``(cpu_N - cpu_1) / (messages_N - messages_1)``. The load average is
recorded at the start and the end (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc

from bench import datagen
from bench.cpu import cpu_seconds
from bench.datagen import DATABASE_URL, REDIS_URL, SECRET
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.servicekit.auth import issue_token

ROOT = Path(__file__).resolve().parent.parent
SESSION_EVENTS = 10  # live events per session
METHOD = "/cosnap.analytics.v1.AnalyticsService/StreamPerformanceDashboard"
REQUEST = analytics_pb2.StreamPerformanceDashboardRequest(interval_seconds=1)


class _Server:
    """CPU seconds of the service process and of its PostgreSQL backends."""

    def __init__(self, pid: int, schema: str, admin: asyncpg.Connection, metrics_port: int) -> None:
        self.pid = pid
        self.schema = schema
        self._admin = admin
        self._metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    async def _backends(self) -> dict[int, float]:
        pids = await self._admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", self.schema
        )
        out = {}
        for row in pids:
            try:
                out[row["pid"]] = cpu_seconds(row["pid"])
            except OSError:  # the backend ended between the query and the read
                pass
        return out

    async def snapshots(self, http: aiohttp.ClientSession) -> float:
        async with http.get(self._metrics) as resp:
            text = await resp.text()
        for line in text.splitlines():
            if line.startswith("analytics_live_snapshots_total "):
                return float(line.split()[1])
        raise RuntimeError("analytics_live_snapshots_total not in the service's metrics")

    async def read(self, http: aiohttp.ClientSession) -> tuple[float, dict[int, float], float]:
        return cpu_seconds(self.pid), await self._backends(), await self.snapshots(http)

    @staticmethod
    def database_cpu(before: dict[int, float], after: dict[int, float]) -> tuple[float, int]:
        """CPU of the backends over a window (a backend that started in it counts whole);
        and how many backends ended in it (their CPU is not counted)."""
        used = sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())
        return used, len(before.keys() - after.keys())


async def _record_live_events(stub: analytics_pb2_grpc.AnalyticsServiceStub, count: int) -> None:
    now = datetime.now(UTC)
    events = []
    for i in range(count):
        event = analytics_pb2.Event(
            event_id=f"live{i}",
            session_id=f"ls{i // SESSION_EVENTS}",
            user_id=f"lu{i // (SESSION_EVENTS * 3)}",
            event_type="page_view",
            page="/live",
        )
        event.timestamp.FromDatetime(now - timedelta(seconds=60 * i / max(1, count)))
        events.append(event)
    for start in range(0, count, 500):
        await stub.RecordEvents(
            analytics_pb2.RecordEventsRequest(events=events[start : start + 500]), timeout=60
        )


async def _start(schema: str, grpc_port: int, metrics_port: int) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "DB_SCHEMA": schema,
        "REDIS_PREFIX": schema,
        "AUTH_JWT_SECRET": SECRET,
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(grpc_port),
        "METRICS_PORT": str(metrics_port),
        "LOG_LEVEL": "WARNING",
        "ANALYTICS_PREAGG_INTERVAL_SECONDS": "3600",
        "ANALYTICS_REPORT_CHECK_SECONDS": "3600",
        "ANALYTICS_STREAM_MAX_CLIENTS": "1000",
        "MAX_CONNECTION_AGE_SECONDS": "36000",
    }
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "services.analytics", env=env, cwd=ROOT)


async def _serving(channel: grpc.aio.Channel) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 120
    while True:
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("stream benchmark service did not start")
        await asyncio.sleep(0.2)


class _Floor:
    """CPU seconds of the bare grpc.aio server (``bench/stream_floor.py``)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    async def read(self, http: aiohttp.ClientSession) -> tuple[float, dict[int, float], float]:
        return cpu_seconds(self.pid), {}, 0.0


async def _window(
    open_call: Callable[[], Any],
    server: _Server | _Floor,
    http: aiohttp.ClientSession,
    streams: int,
    seconds: float,
) -> dict[str, Any]:
    """`streams` open streams (1 s interval) held for `seconds`, measured."""
    received = 0
    calls = [open_call() for _ in range(streams)]

    async def read(call: Any) -> None:
        nonlocal received
        async for _ in call:
            received += 1

    readers = [asyncio.ensure_future(read(c)) for c in calls]
    await asyncio.sleep(1.5)  # every stream open and past its first message
    received = 0
    cpu0, db0, snaps0 = await server.read(http)
    await asyncio.sleep(seconds)
    cpu1, db1, snaps1 = await server.read(http)
    got = received
    for call in calls:
        call.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.sleep(1)
    db, ended = _Server.database_cpu(db0, db1)
    return {
        "service_cpu_s": round(cpu1 - cpu0, 3),
        "database_cpu_s": round(db, 3),
        "total_cpu_s": round(cpu1 - cpu0 + db, 3),
        "messages": got,
        "snapshots": int(snaps1 - snaps0),
        "backends": len(db1),
        "backends_ended": ended,
    }


async def _floor(
    message: bytes, http: aiohttp.ClientSession, seconds: float, rounds: int, clients: int
) -> list[dict[str, Any]]:
    """The same windows against the bare grpc.aio server sending `message`."""
    from tests.support import free_port

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.stream_floor", str(port), message.hex(), cwd=ROOT
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), 60)
        method = channel.unary_stream(METHOD, request_serializer=REQUEST.SerializeToString)
        floor = _Floor(process.pid)
        await asyncio.sleep(1)
        out = []
        for r in range(rounds):
            row = {
                k: await _window(lambda: method(REQUEST), floor, http, n, seconds)
                for k, n in (("idle", 0), ("1", 1), (str(clients), clients))
            }
            row.update(_ratios(row, clients))
            out.append(row)
            print(f"  floor round {r + 1}: {json.dumps(row)}", flush=True)
        return out
    finally:
        await channel.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def stream_cpu(
    schema: str,
    seconds: float = 10.0,
    rounds: int = 3,
    clients: int = 100,
    live_events: int = 20_000,
    floor: bool = True,
) -> dict[str, Any]:
    """The measurement (module docstring) on `schema`, which the service migrates; with
    `floor`, then the same windows against ``bench/stream_floor.py``."""
    from tests.support import free_port

    grpc_port, metrics_port = free_port(), free_port()
    process = await _start(schema, grpc_port, metrics_port)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    admin = await asyncpg.connect(DATABASE_URL)
    http = aiohttp.ClientSession()
    try:
        await _serving(channel)
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        await _record_live_events(stub, live_events)
        metadata = (("authorization", f"Bearer {issue_token(SECRET, 'bench', role='admin')}"),)
        server = _Server(process.pid, schema, admin, metrics_port)
        await asyncio.sleep(2)  # start-up work settles

        def open_call() -> Any:
            return stub.StreamPerformanceDashboard(REQUEST, metadata=metadata)

        out: list[dict[str, Any]] = []
        for r in range(rounds):
            row = {
                k: await _window(open_call, server, http, n, seconds)
                for k, n in (("idle", 0), ("1", 1), (str(clients), clients))
            }
            row.update(_ratios(row, clients))
            out.append(row)
            print(f"  stream round {r + 1}: {json.dumps(row)}", flush=True)
        result = {"seconds": seconds, "clients": clients, "live_events": live_events, "rounds": out}
        if floor:
            # One message as the service sends it, for the bare server to send.
            raw = channel.unary_stream(METHOD, request_serializer=REQUEST.SerializeToString)
            call = raw(REQUEST, metadata=metadata)
            message = await asyncio.wait_for(call.read(), 30)
            call.cancel()
            result["floor"] = await _floor(message, http, seconds, rounds, clients)
        return result
    finally:
        await http.close()
        await admin.close()
        await channel.close()
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


def _ratios(row: dict[str, Any], clients: int) -> dict[str, Any]:
    one, many = row["1"], row[str(clients)]
    extra_msgs = many["messages"] - one["messages"]
    return {
        "service_ratio": round(many["service_cpu_s"] / one["service_cpu_s"], 2)
        if one["service_cpu_s"]
        else None,
        "total_ratio": round(many["total_cpu_s"] / one["total_cpu_s"], 2) if one["total_cpu_s"] else None,
        "marginal_us_per_message": (
            round((many["service_cpu_s"] - one["service_cpu_s"]) / extra_msgs * 1e6, 1)
            if extra_msgs
            else None
        ),
    }


def summary(rounds: list[dict[str, Any]], clients: str) -> dict[str, Any]:
    """Medians over the rounds, and whether N clients cost no more than one: the median
    difference at most one clock tick of ``/proc`` (its resolution) or 10 % of one client's."""

    def med(key: str, field: str) -> float:
        return round(statistics.median(r[key][field] for r in rounds), 3)

    out: dict[str, Any] = {
        f"{k}_{f}": med(k, f)
        for k in ("idle", "1", clients)
        for f in ("service_cpu_s", "database_cpu_s", "total_cpu_s")
    }
    for field in ("service_ratio", "total_ratio", "marginal_us_per_message"):
        values = [r[field] for r in rounds if r[field] is not None]
        out[field] = round(statistics.median(values), 2) if values else None
    tick = 1 / os.sysconf("SC_CLK_TCK")
    for what in ("service", "total"):
        extra = statistics.median(r[clients][f"{what}_cpu_s"] - r["1"][f"{what}_cpu_s"] for r in rounds)
        one = statistics.median(r["1"][f"{what}_cpu_s"] for r in rounds)
        out[f"{what}_no_more_than_one"] = extra <= max(tick, 0.1 * one) + 1e-9
    return out


def _print_rounds(label: str, rounds: list[dict[str, Any]], clients: str, database: bool) -> dict[str, Any]:
    for i, r in enumerate(rounds, 1):
        with_database = (
            f"; with the database {r['idle']['total_cpu_s']} / {r['1']['total_cpu_s']} / "
            f"{r[clients]['total_cpu_s']} s (ratio {r['total_ratio']}), snapshots {r['1']['snapshots']} / "
            f"{r[clients]['snapshots']}"
            if database
            else ""
        )
        print(
            f"    {label} round {i}: CPU idle {r['idle']['service_cpu_s']} / 1 {r['1']['service_cpu_s']} / "
            f"{clients} {r[clients]['service_cpu_s']} s (ratio {r['service_ratio']}){with_database}; "
            f"{r['marginal_us_per_message']} µs per extra message; messages {r['1']['messages']} / "
            f"{r[clients]['messages']}"
        )
    return summary(rounds, clients)


def print_stream(result: dict[str, Any]) -> None:
    clients = str(result["clients"])
    print(
        f"  live stream, {len(result['rounds'])} rounds of {result['seconds']} s at a 1 s interval, "
        f"{result['live_events']:,} events in the window:"
    )
    s = _print_rounds("service", result["rounds"], clients, database=True)
    print(
        f"    median: service {s['1_service_cpu_s']} -> {s[clients + '_service_cpu_s']} s (ratio "
        f"{s['service_ratio']}; no more than one client: {'met' if s['service_no_more_than_one'] else 'NOT met'}), "
        f"service + database {s['1_total_cpu_s']} -> {s[clients + '_total_cpu_s']} s (ratio "
        f"{s['total_ratio']}; no more than one client: {'met' if s['total_no_more_than_one'] else 'NOT met'}; "
        f"the database's part {s['1_database_cpu_s']} -> {s[clients + '_database_cpu_s']} s), "
        f"{s['marginal_us_per_message']} µs of service CPU per extra message"
    )
    if result.get("floor"):
        f = _print_rounds("bare grpc.aio", result["floor"], clients, database=False)
        print(
            f"    median, bare grpc.aio server: {f['1_service_cpu_s']} -> {f[clients + '_service_cpu_s']} s "
            f"(ratio {f['service_ratio']}), {f['marginal_us_per_message']} µs per extra message: the floor "
            f"of one message sent on one stream"
        )
        if s["marginal_us_per_message"] and f["marginal_us_per_message"]:
            print(
                f"    per extra message, service / bare grpc.aio: "
                f"{s['marginal_us_per_message'] / f['marginal_us_per_message']:.2f}x "
                f"(1.0: the service adds nothing per client beyond the transport's send)"
            )


async def run(seconds: float, rounds: int, clients: int, live_events: int, floor: bool) -> dict[str, Any]:
    schema = f"bench_stream_{uuid.uuid4().hex[:8]}"
    result: dict[str, Any] = {"load_average_start": os.getloadavg()}
    try:
        result.update(await stream_cpu(schema, seconds, rounds, clients, live_events, floor))
    finally:
        await datagen.drop(schema)
    result["load_average_end"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of one measured window")
    parser.add_argument("--rounds", type=int, default=3, help="idle / 1 / N windows, interleaved")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--live-events", type=int, default=20_000, help="events in the snapshot's window")
    parser.add_argument("--no-floor", action="store_true", help="skip the bare grpc.aio server's windows")
    args = parser.parse_args()
    result = asyncio.run(run(args.seconds, args.rounds, args.clients, args.live_events, not args.no_floor))
    print(f"stream benchmark; load average {result['load_average_start']} -> {result['load_average_end']}")
    print_stream(result)
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
