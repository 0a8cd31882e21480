"""Monitoring benchmark: timing records ingested per second beside a bare gRPC
echo, and the health endpoint's latency at 500 requests per second.

`python -m bench.monitoring [--scale S] [--rounds N] [--reporter-only] [--aa]` (or `await run(scale)`;
`--aa` runs both kit echoes without the reporter: the noise floor of the pairing):

1. spawns `python -m services.monitoring` (a throwaway schema) and
   `python -m bench.echo` (a bare grpc.aio server), each in its own process;
2. per round: the echo server's requests/s (batches of 1 event, 32 callers),
   then RecordApiTimings with batches of 1 and of 500 timings (what the kit's
   reporter sends), requests/s and timings/s; the ratio batch-1 req/s / echo
   req/s is taken within the round, the median over rounds reported;
   then the reporter's cost: `bench.monitoring_echo` (the echo behind the kit's
   interceptor) without and with the kit's reporter shipping every RPC's timing
   to the monitoring process, both driven at the same time by one caller each
   (paired: what the neighbours do to the machine they do to both). The
   figure is each echo server process's CPU time per RPC (read from outside
   with the process's CPU clock, nanoseconds, every thread, over the run and
   the reporter's next flush): with / without - 1 within the round, the
   median over rounds (goal: under 5 %). CPU per RPC stays far steadier on a
   shared machine than req/s, which swings with the neighbours' load; req/s
   and p50 (at one caller) are shown beside it;
3. GetSystemHealth at an open-loop 500 requests/s for 4 s (every request sent
   at its scheduled time whatever the earlier ones do): p50 / p99 / max, and
   how many health computations the cache let through;
4. checks every acknowledged timing was stored and drops the schema.

Uses TEST_DATABASE_URL / TEST_REDIS_URL (defaults: the local test instances).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
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

from bench.cpu import cpu_seconds
from bench.ingest import _percentile, _requests, _spawn_echo, _stop, _wait_answering
from cosnap.analytics.v1 import analytics_pb2
from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.auth import ServiceTokens
from services.servicekit.reporter import MonitoringReporter, ReporterSettings
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


async def drive(
    address: str, method: str, payloads: list[bytes], batch: int, concurrency: int = CONCURRENCY
) -> dict[str, float]:
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
        await asyncio.gather(*(worker() for _ in range(concurrency)))
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


class ProcessCpu:
    """CPU seconds another process has used, all its threads (exited ones too): its
    CPU-time clock (clock_getcpuclockid, nanoseconds); /proc/<pid>/stat (clock ticks)
    where that clock is not available."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.clock: int | None = None
        clock = ctypes.c_int()
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
                time.clock_gettime_ns(clock.value)  # usable?
                self.clock = clock.value
        except (OSError, AttributeError):
            self.clock = None

    def seconds(self) -> float:
        if self.clock is not None:
            return time.clock_gettime_ns(self.clock) / 1e9
        return cpu_seconds(self.pid)


# The reporter flushes every second (ReporterSettings' default): a run's CPU is read after
# its last batch went out, the same wait for both servers.
SETTLE_SECONDS = 1.5
# One caller per echo for the CPU figure: with many, how many RPCs one loop turn serves
# (and so the CPU per RPC) follows the scheduling the neighbours leave, ±20 % per run here.
CPU_CONCURRENCY = 1


async def reporter_round(
    servers: dict[str, tuple[int, ProcessCpu]], payloads: list[bytes]
) -> dict[str, dict[str, float]]:
    """Both kit echoes driven at the same time (paired: whatever the neighbours do to the
    machine, they do to both): each one's req/s and p50, and its process's CPU µs per RPC."""
    before = {name: cpu.seconds() for name, (_, cpu) in servers.items()}
    runs = await asyncio.gather(
        *(drive(f"127.0.0.1:{port}", ECHO, payloads, 1, CPU_CONCURRENCY) for port, _ in servers.values())
    )
    await asyncio.sleep(SETTLE_SECONDS)
    out = {}
    for (name, (_, cpu)), figures in zip(servers.items(), runs, strict=True):
        figures["cpu_us_per_rpc"] = round((cpu.seconds() - before[name]) / len(payloads) * 1e6, 2)
        out[name] = figures
    return out


class _SinkStub:
    """Monitoring as far as the reporter sees it: takes the serialized batch and answers."""

    async def RecordApiTimings(
        self, request: monitoring_pb2.RecordApiTimingsRequest, timeout: float | None = None
    ) -> monitoring_pb2.RecordApiTimingsResponse:
        request.SerializeToString()
        return monitoring_pb2.RecordApiTimingsResponse(accepted=len(request.timings))

    async def ReportServiceStats(
        self, request: monitoring_pb2.ReportServiceStatsRequest, timeout: float | None = None
    ) -> monitoring_pb2.ReportServiceStatsResponse:
        request.SerializeToString()
        return monitoring_pb2.ReportServiceStatsResponse()


async def reporter_work_us(timings: int = 20_000) -> float:
    """CPU µs per RPC of the reporter's own Python work in this process: `record()`, then
    the batches built and serialized (the gRPC send itself left out)."""
    reporter = MonitoringReporter(
        _SinkStub(),  # type: ignore[arg-type]
        "echo",
        "echo-1",
        settings=ReporterSettings(buffer_size=timings, batch_size=500, close_timeout=60),
    )
    started = time.process_time()
    for i in range(timings):
        reporter.record(ECHO, "OK", float(i % 50))
    await reporter.close()  # sends every batch
    assert reporter.sent_timings == timings
    return (time.process_time() - started) / timings * 1e6


async def run(
    scale: float = 1.0,
    log_dir: Path | None = None,
    rounds: int = ROUNDS,
    reporter_only: bool = False,
    a_a: bool = False,
) -> dict[str, Any]:
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
    cpu_costs: list[float] = []
    expected = 0
    echo_port, port = free_port(), free_port()
    echo = _spawn_echo(echo_port, log_dir / "bench-echo.log")
    env = service_env(schema, GRPC_PORT=str(port), METRICS_PORT="0", LOG_LEVEL="WARNING")
    service = spawn_service("monitoring", env, log_dir / "bench-monitoring.log")
    address = f"127.0.0.1:{port}"
    plain_port, reporting_port = free_port(), free_port()
    plain = _spawn_kit_echo(plain_port, None, log_dir / "bench-kit-echo.log")
    # a_a: the second echo without the reporter too: the pairing's noise floor
    reporting = _spawn_kit_echo(
        reporting_port, None if a_a else address, log_dir / "bench-kit-echo-reporter.log"
    )
    servers = {
        "kit_echo": (plain_port, ProcessCpu(plain.pid)),
        "kit_echo_reporter": (reporting_port, ProcessCpu(reporting.pid)),
    }
    result: dict[str, Any] = {
        "concurrency": CONCURRENCY,
        "scale": scale,
        "rounds": rounds,
        "reporter_only": reporter_only,
        "a_a": a_a,
        "cpu_clock": "process CPU clock (ns)"
        if servers["kit_echo"][1].clock is not None
        else "/proc stat ticks",
    }
    try:
        for p in (echo_port, plain_port, reporting_port):
            await _wait_answering(f"127.0.0.1:{p}")
        await asyncio.to_thread(wait_serving, address, 60)
        # warm both kit echoes (imports, first connections) before anything is counted
        await reporter_round(servers, _requests(1, CONCURRENCY * 4, "w"))
        for _ in range(rounds):
            if not reporter_only:
                measured["echo"].append(
                    await drive(f"127.0.0.1:{echo_port}", ECHO, _requests(1, plan[1], "e"), 1)
                )
                for batch in plan:
                    figures = await drive(address, RECORD, _timing_requests(batch, plan[batch]), batch)
                    expected += plan[batch] * batch
                    measured[f"batch_{batch}"].append(figures)
                ratios.append(
                    measured["batch_1"][-1]["requests_per_second"]
                    / measured["echo"][-1]["requests_per_second"]
                )
            figures = await reporter_round(servers, _requests(1, plan[1], "k"))
            for name, run_figures in figures.items():
                measured[name].append(run_figures)
            plain_run, with_run = figures["kit_echo"], figures["kit_echo_reporter"]
            costs.append(1 - with_run["requests_per_second"] / plain_run["requests_per_second"])
            cpu_costs.append(with_run["cpu_us_per_rpc"] / plain_run["cpu_us_per_rpc"] - 1)
        if not reporter_only:
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
        if runs:
            result[name] = sorted(runs, key=lambda f: f["requests_per_second"])[len(runs) // 2]
    for name in servers:
        result[f"{name}_cpu_us_per_rpc"] = statistics.median(f["cpu_us_per_rpc"] for f in measured[name])
    if ratios:
        result["ratio_batch1_vs_echo"] = round(statistics.median(ratios), 3)
        result["ratio_batch1_vs_echo_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
    result["reporter_cost"] = round(statistics.median(costs), 3)
    result["reporter_cost_range"] = [round(min(costs), 3), round(max(costs), 3)]
    result["reporter_cpu_cost"] = round(statistics.median(cpu_costs), 4)
    result["reporter_cpu_cost_rounds"] = [round(c, 4) for c in cpu_costs]
    result["reporter_work_us_per_rpc"] = round(await reporter_work_us(), 2)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _spawn_kit_echo(port: int, monitoring: str | None, log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # the child process owns it
    return subprocess.Popen(
        [sys.executable, "-m", "bench.monitoring_echo", str(port), *([monitoring] if monitoring else [])],
        cwd=ROOT,
        stdout=out,
        stderr=out,
        # the same hash seed in both: no lasting layout difference between the two processes
        env={**os.environ, "AUTH_JWT_SECRET": JWT_SECRET, "PYTHONHASHSEED": "0"},
    )


def print_reporter_cost(result: dict[str, Any]) -> None:
    low_cost, high_cost = result["reporter_cost_range"]
    rounds = ", ".join(f"{c * 100:+.1f}" for c in result["reporter_cpu_cost_rounds"])
    a_a = " [A/A: both echoes WITHOUT the reporter: the noise floor]" if result["a_a"] else ""
    print(
        f"  the kit's reporter on an RPC: {result['reporter_cpu_cost'] * 100:+.1f} % echo server CPU per RPC,"
        f" the median of {result['rounds']} paired rounds ({rounds} %); goal < 5 %{a_a}\n"
        f"    CPU µs/RPC without / with it (medians over rounds, {result['cpu_clock']}):"
        f" {result['kit_echo_cpu_us_per_rpc']} / {result['kit_echo_reporter_cpu_us_per_rpc']}\n"
        f"    the reporter's own work (record, batches built and serialized, in-process):"
        f" {result['reporter_work_us_per_rpc']} µs per RPC\n"
        f"    req/s without / with it: {result['kit_echo']['requests_per_second']:,} /"
        f" {result['kit_echo_reporter']['requests_per_second']:,}, p50 {result['kit_echo']['p50_ms']} /"
        f" {result['kit_echo_reporter']['p50_ms']} ms at {CPU_CONCURRENCY} caller"
        f" ({result['reporter_cost'] * 100:+.1f} % fewer req/s,"
        f" rounds {low_cost * 100:+.1f} to {high_cost * 100:+.1f})\n"
        f"  load average at the end: {result['load_average']}"
    )


def print_result(result: dict[str, Any]) -> None:
    if result["reporter_only"]:
        print(f"monitoring reporter cost (scale {result['scale']}, {result['rounds']} rounds)")
        print_reporter_cost(result)
        return
    echo, one, many, health = result["echo"], result["batch_1"], result["batch_500"], result["health"]
    low, high = result["ratio_batch1_vs_echo_range"]
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
        f"  GetSystemHealth at {HEALTH_RATE}/s open loop ({health['requests']} requests,"
        f" {health['achieved_per_second']}/s achieved): p50 {health['p50_ms']} ms, p99 {health['p99_ms']} ms,"
        f" max {health['max_ms']} ms, errors {health['errors']}"
    )
    print_reporter_cost(result)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.monitoring")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--reporter-only", action="store_true", help="only the reporter's cost on an RPC (CPU per RPC)"
    )
    parser.add_argument(
        "--aa", action="store_true", help="both kit echoes without the reporter: the pairing's noise floor"
    )
    args = parser.parse_args()
    print_result(
        asyncio.run(run(args.scale, rounds=args.rounds, reporter_only=args.reporter_only, a_a=args.aa))
    )


if __name__ == "__main__":
    main()
