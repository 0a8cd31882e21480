"""Leader take-over with real processes: two monitoring replicas run as
`python -m services.monitoring` on one database (real clock, a rule of one
minute's window that fires at once); the leader is SIGKILLed (no goodbye, its
lock connection dropped by the kernel), the other replica leads within
seconds and carries the alert on, and the local webhook receiver gets the
firing and the resolved notification exactly once each."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.servicekit.auth import ServiceTokens
from services.servicekit.channels import service_channel
from tests.monitoring.conftest import Receiver
from tests.support import JWT_SECRET, eventually, free_port, service_env, spawn_service, unique_name

ENDPOINT = "/cosnap.effects.v1.EffectsService/GetTask"
RULES = """
[[rule]]
name = "ApiLatencyHigh"
kind = "latency_p95"
severity = "warning"
above = 3000.0
clear = 2500.0
window = "1m"
for = "0s"
keep_firing_for = "0s"
min_samples = 1
"""


class Replica:
    def __init__(self, schema: str, rules: Path, hook: str, log: Path) -> None:
        self.port, self.metrics_port, self.log = free_port(), free_port(), log
        env = service_env(
            schema,
            GRPC_PORT=str(self.port),
            METRICS_PORT=str(self.metrics_port),
            MONITORING_RULES_FILE=str(rules),
            MONITORING_WEBHOOK_URLS=f"ops={hook}",
            MONITORING_EVAL_INTERVAL_SECONDS="0.2",
            MONITORING_NOTIFY_BACKOFF_SECONDS="0.05",
        )
        self.proc: subprocess.Popen[bytes] = spawn_service("monitoring", env, log)

    async def serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                with contextlib.suppress(grpc.aio.AioRpcError):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                await asyncio.sleep(0.1)
        raise AssertionError(f"not serving: {self.log.read_text()[-3000:]}")

    async def leading(self, session: aiohttp.ClientSession) -> bool:
        """The replica's own `monitoring_leader` gauge."""
        async with session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as reply:
            text = await reply.text()
        (line,) = [x for x in text.splitlines() if x.startswith("monitoring_leader ")]
        return float(line.split()[1]) == 1.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def record(port: int, ms: float, n: int) -> None:
    channel = service_channel(f"127.0.0.1:{port}", ServiceTokens(JWT_SECRET, "effects"))
    async with channel:
        stub = monitoring_pb2_grpc.MonitoringServiceStub(channel)
        timing = monitoring_pb2.ApiTiming(
            service="effects", endpoint=ENDPOINT, status_code="OK", duration_ms=ms
        )
        await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[timing] * n))


async def test_the_leader_process_is_killed_and_the_other_takes_over(
    tmp_path: Path,
    admin_pg: asyncpg.Connection,
    make_receiver: Callable[..., Awaitable[Receiver]],
) -> None:
    receiver = await make_receiver()
    schema = unique_name("leader")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    first = Replica(schema, rules, receiver.url, tmp_path / "first.log")
    replicas = [first]
    try:
        await first.serving()  # migrations done once before the second starts
        second = Replica(schema, rules, receiver.url, tmp_path / "second.log")
        replicas.append(second)
        await second.serving()
        async with aiohttp.ClientSession() as session:

            async def leaders() -> list[Replica]:
                return [r for r in replicas if await r.leading(session)]

            async def one_leader() -> bool:
                return len(await leaders()) == 1

            await eventually(one_leader, 10, "one leader")

            # Slow RPCs (through the replica that does not lead): the rule fires, the leader notifies.
            (leader,) = await leaders()
            (other,) = [r for r in replicas if r is not leader]
            await record(other.port, 3500.0, 50)
            await receiver.wait_for(1)

            async def firing_marked_sent() -> bool:
                query = f'SELECT count(*) FROM "{schema}".notifications WHERE sent_at IS NOT NULL'
                return bool(await admin_pg.fetchval(query) == 1)

            await eventually(firing_marked_sent, 10, "the firing notification marked sent")
            await asyncio.sleep(1.0)  # ~5 more passes on each replica: nothing new
            assert receiver.alerts() == [("firing", "ApiLatencyHigh", "warning")]
            assert await leaders() == [leader]

            # SIGKILL the leader process: no resignation, no shutdown hook runs.
            leader.proc.kill()
            leader.proc.wait()
            replicas.remove(leader)

            async def other_leads() -> bool:
                return await other.leading(session)

            took = await eventually(other_leads, 10, "the other replica leading")
            print(f"take-over after SIGKILL: {took:.2f} s")

            # Fast RPCs drown the slow ones below the clear threshold: the new
            # leader resolves the alert the old one opened, and says so once.
            await record(other.port, 1.0, 2000)
            await receiver.wait_for(2)
            await asyncio.sleep(1.0)
        assert receiver.alerts() == [
            ("firing", "ApiLatencyHigh", "warning"),
            ("resolved", "ApiLatencyHigh", "warning"),
        ]
        rows = await admin_pg.fetch(
            f'SELECT status, attempts, sent_at FROM "{schema}".notifications ORDER BY id'
        )
        assert [(r["status"], r["attempts"], r["sent_at"] is not None) for r in rows] == [
            ("firing", 1, True),
            ("resolved", 1, True),
        ]
        alerts = await admin_pg.fetch(f'SELECT state, resolution_note FROM "{schema}".alerts')
        assert [(a["state"], a["resolution_note"]) for a in alerts] == [("resolved", "condition cleared")]
    finally:
        for replica in replicas:
            replica.stop()
