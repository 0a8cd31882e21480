"""What remembering verified tokens saves: server CPU per RPC of an echo behind the kit's
interceptor, a user's token on every call, with PyJWT on every call (as before) and with
the kit's `VerifiedTokens`; a bare grpc.aio echo is the same-run floor.

`python -m bench.token_cache [--seconds 3] [--rounds 3] [--concurrency 16]`. Each server
runs in its own process; its CPU (user + system, from /proc) is read around a closed-loop
load of RecordEvents with one event, so the figure does not depend on how busy the
machine's other processes keep the cores (throughput would).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench.cpu import cpu_seconds
from bench.echo import serve as serve_echo
from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.servicekit.auth import Access, Principal, VerifiedTokens, issue_token, verify
from services.servicekit.interceptors import ServiceInterceptor
from tests.support import free_port

METHOD = "/cosnap.analytics.v1.AnalyticsService/RecordEvents"
SECRET = "bench-secret-of-at-least-32-bytes-long!!"
MODES = ("bare", "verify_every_call", "cached")
ROOT = Path(__file__).resolve().parent.parent


class _EveryCall(VerifiedTokens):
    """The interceptor's verification before the cache: PyJWT on every call."""

    def verify(self, authorization: str | None) -> Principal | None:
        return verify(authorization, SECRET)


async def serve(port: int, mode: str) -> None:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if mode != "bare":
        interceptor = ServiceInterceptor({METHOD: Access.USER}, SECRET)
        if mode == "verify_every_call":
            interceptor.tokens = _EveryCall(SECRET)
        interceptors.append(interceptor)
    await serve_echo(port, interceptors)


async def _load(address: str, seconds: float, concurrency: int, pid: int) -> dict[str, float]:
    token = issue_token(SECRET, "bench-user", "user", ttl_seconds=3600)
    metadata = (("authorization", f"Bearer {token}"),)
    request = analytics_pb2.RecordEventsRequest(
        events=[analytics_pb2.Event(event_id="e", session_id="s", event_type="page_view")]
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = analytics_pb2_grpc.AnalyticsServiceStub(channel)
        for _ in range(200):  # warm-up (connection, first verification)
            await stub.RecordEvents(request, metadata=metadata, timeout=5)
        done = 0
        stop_at = 0.0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < stop_at:
                await stub.RecordEvents(request, metadata=metadata, timeout=5)
                done += 1

        cpu0 = cpu_seconds(pid)
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu0
    return {"rpcs": done, "rps": round(done / elapsed), "cpu_us_per_rpc": round(cpu / done * 1e6, 1)}


def _spawn(port: int, mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.token_cache", "--serve", str(port), mode],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )


async def _measure(mode: str, seconds: float, concurrency: int) -> dict[str, float]:
    port = free_port()
    proc = _spawn(port, mode)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        if line.strip() != b"ready":
            raise RuntimeError(f"{mode} server did not start")
        return await _load(f"127.0.0.1:{port}", seconds, concurrency, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(proc.wait, 10)


async def run(seconds: float, rounds: int, concurrency: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for _ in range(rounds):  # interleaved, so a change of machine load hits every mode
        for mode in MODES:
            runs[mode].append(await _measure(mode, seconds, concurrency))
    result: dict[str, Any] = {"seconds": seconds, "rounds": rounds, "concurrency": concurrency}
    for mode, measured in runs.items():
        result[mode] = {
            "cpu_us_per_rpc": statistics.median(m["cpu_us_per_rpc"] for m in measured),
            "cpu_us_per_rpc_range": [
                min(m["cpu_us_per_rpc"] for m in measured),
                max(m["cpu_us_per_rpc"] for m in measured),
            ],
            "rps": statistics.median(m["rps"] for m in measured),
        }
    return result


def print_result(result: dict[str, Any]) -> None:
    bare, every, cached = (result[m]["cpu_us_per_rpc"] for m in MODES)
    print(
        f"token cache ({result['rounds']} rounds x {result['seconds']} s, concurrency {result['concurrency']},"
        " server CPU per RPC, medians)"
    )
    for mode in MODES:
        r = result[mode]
        low, high = r["cpu_us_per_rpc_range"]
        print(f"  {mode:18} {r['cpu_us_per_rpc']:7.1f} us/RPC ({low}-{high}), {r['rps']:,.0f} req/s")
    print(
        f"  the interceptor costs {every - bare:.1f} us/RPC with PyJWT on every call,"
        f" {cached - bare:.1f} us/RPC with the cache; the cache saves {every - cached:.1f} us/RPC"
        f" ({(every - cached) / every * 100:.0f} % of the server's CPU per RPC)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.token_cache")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(int(args.serve[0]), args.serve[1]))
        return
    print_result(asyncio.run(run(args.seconds, args.rounds, args.concurrency)))


if __name__ == "__main__":
    main()
