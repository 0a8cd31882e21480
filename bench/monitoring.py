"""Monitoring benchmark: timing records ingested per second beside a bare gRPC
echo, and the health endpoint's latency at 500 requests per second.

`python -m bench.monitoring [--scale S] [--rounds N]` (or `await run(scale)`):

1. spawns `python -m services.monitoring` (a throwaway schema) and
   `python -m bench.echo` (a bare grpc.aio server), each in its own process;
2. per round: the echo server's requests/s (batches of 1 event, 32 callers),
   then RecordApiTimings with batches of 1 and of 500 timings (what the kit's
   reporter sends), requests/s and timings/s; the ratio batch-1 req/s / echo
   req/s is taken within the round, the median over rounds reported;
   then the reporter's cost: `bench.monitoring_echo` (the echo behind the kit's
   interceptor) without and with the kit's reporter shipping every RPC's timing
   to the monitoring process, back to back, req/s and p50 (goal: under 5 %
   fewer req/s);
3. GetSystemHealth at an open-loop 500 requests/s for 4 s (every request sent
   at its scheduled time whatever the earlier ones do): p50 / p99 / max, and
   how many health computations the cache let through;
4. checks every acknowledged timing was stored and drops the schema.

Uses TEST_DATABASE_URL / TEST_REDIS_URL (defaults: the local test instances).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import grpc

from bench.ingest import _percentile, _requests, _spawn_echo, _stop, _wait_answering
from cosnap.analytics.v1 import analytics_pb2
from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.auth import ServiceTokens
from tests.support import DATABASE_URL, JWT_SECRET, ROOT, free_port, service_env, spawn_service, wait_serving

CONCURRENCY = 32
ROUNDS = 3
REQUESTS = {1: 3000, 500: 200}  # batch size -> requests per round at scale 1
HEALTH_RATE = 500
HEALTH_SECONDS = 4.0
ECHO = "/cosnap.analytics.v1.AnalyticsService/RecordEvents"
RECORD = "/cosnap.monitoring.v1.MonitoringService/RecordApiTimings"
HEALTH = "/cosnap.monitoring.v1.MonitoringService/GetSystemHealth"
ENDPOINTS = tuple(f"/cosnap.effects.v1.EffectsService/M{i}" for i in range(12))
CODES = ("OK",) * 97 + ("INTERNAL", "UNAVAILABLE", "NOT_FOUND")


_TOKENS = ServiceTokens(JWT_SECRET, "effects")  # the timings are effects'


def metadata() -> Sequence[tuple[str, str]]:
    """What a service's stub attaches to an internal call: its service token."""
    return (_TOKENS.metadata(),)


def _timing_requests(batch: int, count: int) -> list[bytes]:
    out = []
    now = datetime.now(UTC)
    for r in range(count):
        request = monitoring_pb2.RecordApiTimingsRequest()
        for i in range(batch):
            n = r * batch + i
            t = request.timings.add(
                service="effects",
                endpoint=ENDPOINTS[n % len(ENDPOINTS)],
                status_code=CODES[n % len(CODES)],
                duration_ms=(n * 7919 % 5000) / 10,
                instance=f"effects-{n % 3}",
            )
            t.observed_at.FromDatetime(now)
        out.append(request.SerializeToString())
    return out


async def drive(address: str, method: str, payloads: list[bytes], batch: int) -> dict[str, float]:
    latencies: list[float] = []
    accepted = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            method, response_deserializer=analytics_pb2.RecordEventsResponse.FromString
        )
        await call(payloads[0], timeout=30, metadata=metadata())
        queue = iter(payloads[1:])

        async def worker() -> None:
            nonlocal accepted
            for payload in queue:
                started = time.perf_counter()
                reply = await call(payload, timeout=60, metadata=metadata())
                latencies.append(time.perf_counter() - started)
                accepted += reply.accepted

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    requests = len(payloads) - 1
    return {
        "requests_per_second": round(requests / elapsed, 1),
        "records_per_second": round(requests * batch / elapsed, 1),
        "accepted": accepted + batch,
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
    }


async def health_load(address: str, rate: int, seconds: float) -> dict[str, float]:
    """Open loop: request i leaves at start + i / rate; latency from its own send."""
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(
            HEALTH,
            request_serializer=monitoring_pb2.GetSystemHealthRequest.SerializeToString,
            response_deserializer=monitoring_pb2.GetSystemHealthResponse.FromString,
        )
        await call(monitoring_pb2.GetSystemHealthRequest(), timeout=10)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        statuses: dict[str, int] = {}

        async def one(i: int) -> None:
            nonlocal errors
            await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            began = time.perf_counter()
            try:
                reply = await call(monitoring_pb2.GetSystemHealthRequest(), timeout=10)
                statuses[reply.status] = statuses.get(reply.status, 0) + 1
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - began)

        total = int(rate * seconds)
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        elapsed = time.perf_counter() - began
    return {
        "requests": total,
        "achieved_per_second": round(total / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
        "errors": errors,
        "statuses": statuses,  # type: ignore[dict-item]
    }


async def run(scale: float = 1.0, log_dir: Path | None = None, rounds: int = ROUNDS) -> dict[str, Any]:
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    schema = f"bench_monitoring_{uuid.uuid4().hex[:8]}"
    plan = {batch: max(CONCURRENCY * 2, int(n * scale)) for batch, n in REQUESTS.items()}
    measured: dict[str, list[dict[str, float]]] = {
        "echo": [],
        "batch_1": [],
        "batch_500": [],
        "kit_echo": [],
        "kit_echo_reporter": [],
    }
    ratios: list[float] = []
    costs: list[float] = []
    expected = 0
    echo_port, port = free_port(), free_port()
    echo = _spawn_echo(echo_port, log_dir / "bench-echo.log")
    env = service_env(schema, GRPC_PORT=str(port), METRICS_PORT="0", LOG_LEVEL="WARNING")
    service = spawn_service("monitoring", env, log_dir / "bench-monitoring.log")
    address = f"127.0.0.1:{port}"
    plain_port, reporting_port = free_port(), free_port()
    plain = _spawn_kit_echo(plain_port, None, log_dir / "bench-kit-echo.log")
    reporting = _spawn_kit_echo(reporting_port, address, log_dir / "bench-kit-echo-reporter.log")
    result: dict[str, Any] = {"concurrency": CONCURRENCY, "scale": scale, "rounds": rounds}
    try:
        for p in (echo_port, plain_port, reporting_port):
            await _wait_answering(f"127.0.0.1:{p}")
        await asyncio.to_thread(wait_serving, address, 60)
        for _ in range(rounds):
            measured["echo"].append(
                await drive(f"127.0.0.1:{echo_port}", ECHO, _requests(1, plan[1], "e"), 1)
            )
            for batch in plan:
                figures = await drive(address, RECORD, _timing_requests(batch, plan[batch]), batch)
                expected += plan[batch] * batch
                measured[f"batch_{batch}"].append(figures)
            ratios.append(
                measured["batch_1"][-1]["requests_per_second"] / measured["echo"][-1]["requests_per_second"]
            )
            echo_payloads = _requests(1, plan[1], "k")
            for name, kit_port in (("kit_echo", plain_port), ("kit_echo_reporter", reporting_port)):
                measured[name].append(await drive(f"127.0.0.1:{kit_port}", ECHO, echo_payloads, 1))
            costs.append(
                1
                - measured["kit_echo_reporter"][-1]["requests_per_second"]
                / measured["kit_echo"][-1]["requests_per_second"]
            )
        result["health"] = await health_load(address, HEALTH_RATE, HEALTH_SECONDS * max(1.0, scale))
    finally:
        for proc in (reporting, plain, service, echo):
            _stop(proc)
    conn = await asyncpg.connect(DATABASE_URL)
    try:
        result["stored_timings"] = await conn.fetchval(
            f"SELECT count(*) FROM \"{schema}\".api_timings WHERE service = 'effects'"
        )
        result["rolled_up_timings"] = await conn.fetchval(
            f"SELECT sum(requests) FROM \"{schema}\".api_rollup_minute WHERE service = 'effects'"
        )
        result["expected_timings"] = expected
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
    for name, runs in measured.items():
        result[name] = sorted(runs, key=lambda f: f["requests_per_second"])[len(runs) // 2]
    result["ratio_batch1_vs_echo"] = round(statistics.median(ratios), 3)
    result["ratio_batch1_vs_echo_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    result["reporter_cost"] = round(statistics.median(costs), 3)
    result["reporter_cost_range"] = [round(min(costs), 3), round(max(costs), 3)]
    return result


def _spawn_kit_echo(port: int, monitoring: str | None, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "bench.monitoring_echo", str(port), *([monitoring] if monitoring else [])],
        cwd=ROOT,
        stdout=out,
        stderr=out,
        env={**os.environ, "AUTH_JWT_SECRET": JWT_SECRET},
    )


def print_result(result: dict[str, Any]) -> None:
    echo, one, many, health = result["echo"], result["batch_1"], result["batch_500"], result["health"]
    low, high = result["ratio_batch1_vs_echo_range"]
    low_cost, high_cost = result["reporter_cost_range"]
    print(
        f"monitoring (concurrency {result['concurrency']}, {result['rounds']} rounds, medians)\n"
        f"  baseline echo (bare grpc.aio, batch 1): {echo['requests_per_second']:,} req/s, p99 {echo['p99_ms']} ms\n"
        f"  RecordApiTimings batch 1: {one['requests_per_second']:,} req/s, p99 {one['p99_ms']} ms"
        f" = {result['ratio_batch1_vs_echo']} of echo ({low}-{high})\n"
        f"  RecordApiTimings batch 500: {many['records_per_second']:,} timings/s"
        f" ({many['requests_per_second']:,} req/s, p50 {many['p50_ms']} ms, p99 {many['p99_ms']} ms)"
        f" = {round(many['records_per_second'] / echo['requests_per_second'], 1)}x echo's req/s\n"
        f"  stored {result['stored_timings']:,} raw / {result['rolled_up_timings']:,} rolled up"
        f" of {result['expected_timings']:,} acknowledged\n"
        f"  kit echo without / with the reporter: {result['kit_echo']['requests_per_second']:,} /"
        f" {result['kit_echo_reporter']['requests_per_second']:,} req/s, p50 {result['kit_echo']['p50_ms']} /"
        f" {result['kit_echo_reporter']['p50_ms']} ms: the reporter costs {round(result['reporter_cost'] * 100, 1)} %"
        f" of req/s ({round(low_cost * 100, 1)} to {round(high_cost * 100, 1)}; goal < 5 %)\n"
        f"  GetSystemHealth at {HEALTH_RATE}/s open loop ({health['requests']} requests,"
        f" {health['achieved_per_second']}/s achieved): p50 {health['p50_ms']} ms, p99 {health['p99_ms']} ms,"
        f" max {health['max_ms']} ms, errors {health['errors']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    print_result(asyncio.run(run(args.scale, rounds=args.rounds)))


if __name__ == "__main__":
    main()
