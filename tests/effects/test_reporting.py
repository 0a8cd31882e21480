"""Task ends reported to analytics, end to end: the real effects service (behind the
edge, against the RunningHub simulator) and the real analytics service, effects
calling analytics' internal RecordTaskEnds with its service token. Analytics takes
task ends from a service token only, so a row in its task_ends table is a server fact
that came from effects."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
from prometheus_client import REGISTRY

from cosnap.analytics.v1 import analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.effects.reporting import TaskEndReporter
from services.effects.taskstore import TaskRow
from services.servicekit.server import ServiceApp
from tests.conftest import StartService
from tests.effects.conftest import Env, EnvFactory
from tests.support import eventually, free_port

REASON = {
    "node_id": "7",
    "node_name": "KSampler",
    "exception_type": "torch.OutOfMemoryError",
    "exception_message": "CUDA out of memory",
    "traceback": "...",
}


async def stored_ends(analytics: ServiceApp, task_ids: list[str]) -> dict[str, asyncpg.Record]:
    assert analytics.pool is not None
    rows = await analytics.pool.fetch(
        "SELECT task_id, effect_id, user_id, status, cost_seconds, cost_coins, region, occurred_at"
        " FROM task_ends WHERE task_id = ANY($1::text[])",
        task_ids,
    )
    return {row["task_id"]: row for row in rows}


def sim_task(env: Env, task_id: str) -> Any:
    """The simulator's own record of the RunningHub task made for our task."""
    found = [t for t in env.sim().tasks.values() if t.webhook_url and task_id in t.webhook_url]
    assert len(found) == 1, found
    return found[0]


def metric(result: str) -> float:
    return REGISTRY.get_sample_value("effects_task_end_reports_total", {"result": result}) or 0.0


async def test_task_ends_are_stored_by_analytics_as_server_facts(
    effects_env: EnvFactory, start_service: StartService
) -> None:
    analytics = await start_service(analytics_app)
    env = await effects_env(analytics_addr=f"127.0.0.1:{analytics.port}")
    env.sim().plan(
        [
            {"outcome": "SUCCESS", "queueSeconds": 0.05, "runSeconds": 1.6},
            {"outcome": "FAILED", "queueSeconds": 0.05, "runSeconds": 0.2, "failedReason": REASON},
        ],
        env.keys["global"],
    )
    status, ok = await env.start(user="ruth")
    assert status == 200, ok
    status, bad = await env.start(user="sam")
    assert status == 200, bad
    done = await env.poll(ok["taskId"], user="ruth")
    failed = await env.poll(bad["taskId"], user="sam")
    assert (done["status"], failed["status"]) == ("SUCCEEDED", "FAILED")

    ids = [ok["taskId"], bad["taskId"]]

    async def both_stored() -> bool:
        return len(await stored_ends(analytics, ids)) == 2

    await eventually(both_stored, 15, "task ends in analytics")
    stored = await stored_ends(analytics, ids)
    upstream = sim_task(env, ok["taskId"])
    assert upstream.cost_seconds() == 2  # the simulator's run time of the planned 1.6 s
    succeeded = stored[ok["taskId"]]
    assert dict(succeeded) | {"occurred_at": None} == {
        "task_id": ok["taskId"],
        "effect_id": "portrait-upscale",
        "user_id": "ruth",
        "status": "SUCCEEDED",
        "cost_seconds": Decimal("2.000"),
        "cost_coins": Decimal(upstream.coins),
        "region": "global",
        "occurred_at": None,
    }
    failure = stored[bad["taskId"]]
    assert dict(failure) | {"occurred_at": None} == {
        "task_id": bad["taskId"],
        "effect_id": "portrait-upscale",
        "user_id": "sam",
        "status": "FAILED",
        "cost_seconds": Decimal("0.000"),  # RunningHub reports no run time for a failure
        "cost_coins": None,  # nor coins: NULL, not zero
        "region": "global",
        "occurred_at": None,
    }
    # When each task ended, as effects recorded it.
    ended = {
        str(r["task_id"]): r["updated_at"]
        for r in await env.pool.fetch(
            "SELECT task_id, updated_at FROM tasks WHERE task_id = ANY($1::uuid[])", ids
        )
    }
    for task_id in ids:
        assert stored[task_id]["occurred_at"] == ended[task_id]
    reporter = env.state.reporter
    assert reporter is not None
    assert reporter.dropped == 0 and reporter.pending == 0 and reporter.rejected == 0


async def test_a_task_is_not_held_back_while_analytics_hangs_and_the_buffer_is_bounded(
    effects_env: EnvFactory, start_service: StartService
) -> None:
    """Analytics accepts connections and never answers: every task still ends; the
    buffer keeps the newest ends up to its bound and counts the dropped; the ends it
    kept reach analytics once analytics is back at that address."""
    port = free_port()
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await reader.read()  # until the client gives up

    hanging = await asyncio.start_server(silent, "127.0.0.1", port)
    env = await effects_env(
        analytics_addr=f"127.0.0.1:{port}",
        effects_report_buffer=2,
        effects_report_timeout_seconds=0.5,
        effects_report_max_backoff_seconds=0.5,
    )
    reporter = env.state.reporter
    assert reporter is not None
    dropped_before, errors_before = metric("dropped"), metric("error")

    started = []
    for _ in range(4):
        status, task = await env.start(user="ruth")
        assert status == 200, task
        started.append(task["taskId"])
    finals = await asyncio.gather(*(env.poll(task_id, user="ruth") for task_id in started))
    assert [f["status"] for f in finals] == ["SUCCEEDED"] * 4
    # Every task ended while not one report had got through.
    assert reporter.sent == 0

    async def settled() -> bool:
        tried = bool(connections) and metric("error") > errors_before
        return tried and reporter.dropped == 2 and reporter.pending == 2

    await eventually(settled, 10, "tries timed out, the oldest ends dropped beyond the buffer of 2")
    assert metric("dropped") - dropped_before == 2
    assert reporter.sent == 0

    hanging.close()
    for writer in connections:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await hanging.wait_closed()
    analytics = await start_service(analytics_app, grpc_port=port)

    async def delivered() -> bool:
        return reporter.pending == 0 and len(await stored_ends(analytics, started)) == 2

    await eventually(delivered, 20, "the kept ends delivered once analytics is back")
    assert set(await stored_ends(analytics, started)) < set(started)
    assert reporter.sent == 2 and reporter.dropped == 2


def row(task_id: str, owner: str, coins: str | None, seconds: float | None) -> TaskRow:
    now = datetime.now(UTC)
    return TaskRow(
        task_id=task_id,
        owner=owner,
        request_id="r",
        effect_id="portrait-upscale",
        region="global",
        status="SUCCEEDED",
        create_state="done",
        rh_task_id="1",
        outputs=[],
        failure=None,
        cost_seconds=seconds,
        cost_coins=coins,
        created_at=now,
        updated_at=now,
        checked_at=now,
    )


async def test_odd_figures_are_bounded_and_one_refused_end_does_not_hold_the_others(
    effects_env: EnvFactory, start_service: StartService
) -> None:
    analytics = await start_service(analytics_app)
    env = await effects_env()
    stub = analytics_pb2_grpc.AnalyticsServiceStub(env.app.service_channel(f"127.0.0.1:{analytics.port}"))
    reporter = TaskEndReporter(stub)
    ids = [str(uuid.uuid4()) for _ in range(4)]
    reporter.offer(row(ids[0], "ruth", "12.345678", 3.25))  # coins rounded to 4 places
    reporter.offer(row(ids[1], "ruth", "a lot", float("nan")))  # not a number: not reported
    reporter.offer(row(ids[2], "x" * 10_000, "1", 1.0))  # analytics will never take this user id
    reporter.offer(row(ids[3], "sam", "0", 1e12))  # run time bounded to a week
    assert await reporter._send_once()

    async def stored() -> bool:
        return len(await stored_ends(analytics, ids)) == 3

    await eventually(stored, 10, "the three valid ends")
    rows = await stored_ends(analytics, ids)
    assert ids[2] not in rows
    assert (rows[ids[0]]["cost_coins"], rows[ids[0]]["cost_seconds"]) == (
        Decimal("12.3457"),
        Decimal("3.250"),
    )
    assert (rows[ids[1]]["cost_coins"], rows[ids[1]]["cost_seconds"]) == (None, Decimal("0.000"))
    assert (rows[ids[3]]["cost_coins"], rows[ids[3]]["cost_seconds"]) == (Decimal("0"), Decimal("604800.000"))
    assert (reporter.sent, reporter.rejected, reporter.pending) == (3, 1, 0)
