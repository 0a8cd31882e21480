"""Effects benchmark: many pollers over running tasks, through gRPC.

1. spawns the RunningHub simulator (`python -m tools.runninghub_sim`, tasks that
   stay RUNNING for the whole run), `python -m services.effects` on a throwaway
   schema, and the naive pass-through `python -m bench.effects_naive` (baseline),
   each in its own process;
2. starts TASKS tasks through the real CreateTask;
3. for `seconds`, `pollers` concurrent pollers each call GetTask on one task every
   `interval` seconds (as frontends do), first against the service, then against
   the naive pass-through, the same client and load;
4. reports, for both, upstream calls (the simulator's outputs counter) per task
   per second and GetTask p50 / p99, and the reduction in upstream calls.
Goal: at least 95 % fewer upstream calls than naive, GetTask p99 under 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.cpu import cpu_seconds
from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.servicekit.auth import issue_token
from tests.support import DATABASE_URL, JWT_SECRET, ROOT, free_port, service_env, spawn_service, wait_serving

TASKS = 50
POLLERS = 1000
SECONDS = 30.0
INTERVAL = 2.0  # frontends poll every 2 to 5 s (RunningHub's own node: 2 s queued, 5 s running)
USERS = 5
CLIENT_POLLERS = 250  # pollers per client process by default
KEY = "bench-global-key-000000000000"


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # the child process owns it
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=out, env=dict(os.environ))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as reply:
                    if reply.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            await asyncio.sleep(0.1)


async def _wait_grpc(address: str, timeout: float = 60.0) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout)


async def _outputs_calls(sim_url: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(sim_url + "/__sim/counters") as reply:
        return int((await reply.json())["calls"].get("outputs", 0))


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def _handling_buckets(metrics_url: str) -> dict[float, float]:
    """GetTask's server-side handling-time histogram (the kit's interceptor): {le: count}."""
    async with aiohttp.ClientSession() as http, http.get(metrics_url) as reply:
        text = await reply.text()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "grpc_server_handling_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("grpc_method") == "GetTask":
                out[float(sample.labels["le"])] = sample.value
    return out


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The upper bound (ms) of the histogram bucket holding the q-quantile of the window."""
    counts = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    if not counts or counts[-1][1] <= 0:
        return 0.0
    total = counts[-1][1]
    for le, cumulative in counts:
        if cumulative >= q * total:
            return le * 1000
    return math.inf


async def _pollers(
    address: str,
    tasks: list[tuple[str, str]],
    first: int,
    count: int,
    total: int,
    seconds: float,
    interval: float,
    start: float,
) -> tuple[list[float], int, float]:
    """Pollers first..first+count-1 of `total`, from `start` (wall clock) for `seconds`;
    (latencies ms, errors, this process's CPU seconds while polling)."""
    channels = [grpc.aio.insecure_channel(address) for _ in range(2)]
    for channel in channels:
        await channel.channel_ready()
    stubs = [effects_pb2_grpc.EffectsServiceStub(c) for c in channels]
    latencies: list[float] = []
    errors = 0
    loop = asyncio.get_running_loop()
    begin = loop.time() + max(0.0, start - time.time())
    end = begin + seconds
    rand = random.Random(first)

    async def poller(i: int) -> None:
        nonlocal errors
        task_id, token = tasks[i % len(tasks)]
        stub = stubs[i % len(stubs)]
        metadata = (("authorization", f"Bearer {token}"),)
        request = effects_pb2.GetTaskRequest(task_id=task_id)
        next_at = begin + rand.uniform(0, interval)
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            if loop.time() >= end:
                return
            began = time.perf_counter()
            try:
                await stub.GetTask(request, metadata=metadata, timeout=10)
                latencies.append((time.perf_counter() - began) * 1000)
            except grpc.aio.AioRpcError:
                errors += 1
            next_at += interval

    await asyncio.sleep(max(0.0, begin - loop.time()))
    cpu = time.process_time()
    await asyncio.gather(*(poller(i) for i in range(first, first + count)))
    cpu = time.process_time() - cpu
    for channel in channels:
        await channel.close()
    return latencies, errors, cpu


def _warm(seconds: float) -> None:
    """Occupies one client process for a moment (so each of them is started)."""
    time.sleep(seconds)


def _client_process(
    address: str,
    tasks: list[tuple[str, str]],
    first: int,
    count: int,
    total: int,
    seconds: float,
    interval: float,
    start: float,
) -> tuple[list[float], int, float]:
    """One client process (its own event loop and gRPC channels)."""
    return asyncio.run(_pollers(address, tasks, first, count, total, seconds, interval, start))


async def poll(
    address: str,
    tasks: list[tuple[str, str]],
    pollers: int,
    seconds: float,
    interval: float,
    sim_url: str,
    pid: int,
    clients: int,
    metrics_url: str | None = None,
) -> dict[str, float]:
    """`pollers` loops of GetTask, each on one task, every `interval` s, for `seconds`,
    spread over `clients` processes so that the client's own event loop does not
    queue the replies it measures; `pid` is the server process whose CPU is counted."""
    share = [pollers // clients + (1 if c < pollers % clients else 0) for c in range(clients)]
    firsts = [sum(share[:c]) for c in range(clients)]
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        # The client processes start (and import gRPC) before the window, not in it.
        await asyncio.gather(*(loop.run_in_executor(pool, _warm, 0.5) for _ in range(clients)))
        start = time.time() + 1.0  # each connects meanwhile
        runs = [
            loop.run_in_executor(
                pool, _client_process, address, tasks, firsts[c], share[c], pollers, seconds, interval, start
            )
            for c in range(clients)
        ]
        await asyncio.sleep(max(0.0, start - time.time()))
        before, cpu_before = await _outputs_calls(sim_url), cpu_seconds(pid)
        buckets_before = await _handling_buckets(metrics_url) if metrics_url else {}
        results = await asyncio.gather(*runs)
        cpu = cpu_seconds(pid) - cpu_before
        upstream = await _outputs_calls(sim_url) - before
        buckets_after = await _handling_buckets(metrics_url) if metrics_url else {}
    latencies = [ms for run, _, _ in results for ms in run]
    errors = sum(e for _, e, _ in results)
    client_cpu = sum(c for _, _, c in results)
    return {
        "polls": len(latencies),
        "errors": errors,
        "polls_per_second": len(latencies) / seconds,
        "upstream_calls": upstream,
        "upstream_per_task_second": upstream / len(tasks) / seconds,
        "p50_ms": _percentile(latencies, 0.50),
        "p99_ms": _percentile(latencies, 0.99),
        "cpu_ms_per_poll": cpu * 1000 / len(latencies) if latencies else 0.0,
        # All client processes together: a share of the same cores as the server.
        "client_cpu_ms_per_poll": client_cpu * 1000 / len(latencies) if latencies else 0.0,
        # Inside the server (the interceptor's histogram; bucket upper bounds), when it has one.
        "server_p50_ms": _bucket_quantile(buckets_before, buckets_after, 0.50),
        "server_p99_ms": _bucket_quantile(buckets_before, buckets_after, 0.99),
    }


async def _start_tasks(address: str, count: int) -> list[tuple[str, str]]:
    tokens = [issue_token(JWT_SECRET, f"bench-user-{u}", ttl_seconds=3600) for u in range(USERS)]
    out: list[tuple[str, str]] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = effects_pb2_grpc.EffectsServiceStub(channel)
        for i in range(count):
            token = tokens[i % USERS]
            reply = await stub.CreateTask(
                effects_pb2.CreateTaskRequest(
                    effect_id="portrait-upscale",
                    request_id=f"bench-{i}",
                    inputs={"image": "https://cdn.cosnap.ai/bench/portrait.png"},
                ),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=30,
            )
            out.append((reply.task.task_id, token))
    return out


async def run(
    scale: float = 1.0,
    pollers: int = POLLERS,
    seconds: float = SECONDS,
    interval: float = INTERVAL,
    log_dir: Path | None = None,
    clients: int = 0,
) -> dict[str, Any]:
    log_dir = log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    pollers = max(10, int(pollers * scale))
    schema = f"bench_effects_{uuid.uuid4().hex[:8]}"
    sim_port, port, metrics_port, naive_port = free_port(), free_port(), free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    config = json.dumps({"queueSeconds": 0, "runSeconds": 100_000, "defaultConcurrency": 1000})
    sim = _spawn(
        ["-m", "tools.runninghub_sim", "--region", "global", "--port", str(sim_port), "--config", config,
         "--log-level", "WARNING"],
        log_dir / "bench-sim.log",
    )  # fmt: skip
    env = service_env(
        schema,
        GRPC_PORT=str(port),
        METRICS_PORT=str(metrics_port),
        LOG_LEVEL="WARNING",
        MONITORING_ADDR="",
        RUNNINGHUB_GLOBAL_URL=sim_url,
        RUNNINGHUB_GLOBAL_API_KEY=KEY,
        EFFECTS_RATE_LIMIT_TASKS="0",
    )
    service = spawn_service("effects", env, log_dir / "bench-effects.log")
    naive: subprocess.Popen[bytes] | None = None
    result: dict[str, Any] = {"tasks": TASKS, "pollers": pollers, "seconds": seconds, "interval": interval}
    try:
        await _wait_http(sim_url + "/__sim/health")
        await asyncio.to_thread(wait_serving, f"127.0.0.1:{port}", 60)
        tasks = await _start_tasks(f"127.0.0.1:{port}", TASKS)
        naive = _spawn(
            ["-m", "bench.effects_naive", str(naive_port), DATABASE_URL, schema, sim_url, KEY],
            log_dir / "bench-effects-naive.log",
        )
        assert naive is not None
        await _wait_grpc(f"127.0.0.1:{naive_port}")  # started before the service's window, not in it
        clients = clients or max(1, -(-pollers // CLIENT_POLLERS))
        result["clients"] = clients
        result["service"] = await poll(
            f"127.0.0.1:{port}",
            tasks,
            pollers,
            seconds,
            interval,
            sim_url,
            service.pid,
            clients,
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
        result["naive"] = await poll(
            f"127.0.0.1:{naive_port}", tasks, pollers, seconds, interval, sim_url, naive.pid, clients
        )
        naive_calls = result["naive"]["upstream_per_task_second"]
        result["upstream_reduction"] = (
            1 - result["service"]["upstream_per_task_second"] / naive_calls if naive_calls else 0.0
        )
    finally:
        for proc in (naive, service, sim):
            if proc is not None:
                _stop(proc)
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return result


def print_result(result: dict[str, Any]) -> None:
    print(
        f"\neffects: {result['pollers']} pollers over {result['tasks']} running tasks, one GetTask per "
        f"poller every {result['interval']:g} s, {result['seconds']:g} s each, from {result['clients']} client"
        " process(es)"
    )
    print(
        f"{'':>22} {'polls/s':>9} {'errors':>7} {'upstream/task/s':>16} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'server CPU ms/poll':>19}"
    )
    for name in ("naive", "service"):
        r = result[name]
        print(
            f"{name:>22} {r['polls_per_second']:>9.0f} {r['errors']:>7} {r['upstream_per_task_second']:>16.3f}"
            f" {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['cpu_ms_per_poll']:>19.3f}"
        )
    r = result["service"]
    print(
        f"service, inside the server (handling-time histogram, bucket bounds): p50 <= {r['server_p50_ms']:g} ms,"
        f" p99 <= {r['server_p99_ms']:g} ms; the clients' CPU {r['client_cpu_ms_per_poll']:.3f} ms per poll"
        f" ({r['client_cpu_ms_per_poll'] * r['polls_per_second'] / 1000:.2f} cores)"
    )
    print(
        f"upstream calls: {result['upstream_reduction'] * 100:.1f} % fewer than naive (goal >= 95 %); "
        f"service p99 {result['service']['p99_ms']:.1f} ms (goal < 20 ms)"
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.effects")
    parser.add_argument("--pollers", type=int, default=POLLERS)
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--interval", type=float, default=INTERVAL)
    parser.add_argument(
        "--clients", type=int, default=0, help=f"client processes (default: one per {CLIENT_POLLERS} pollers)"
    )
    args = parser.parse_args()
    print_result(asyncio.run(run(1.0, args.pollers, args.seconds, args.interval, clients=args.clients)))
