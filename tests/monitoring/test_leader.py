"""Two monitoring replicas on one database, in this process with a
controllable clock: only the leader evaluates and notifies, each notification
is sent once, and when the leader's loop stops and its lock connection is cut
the other takes over within seconds (test_leader_process.py SIGKILLs a real
leader process). Notifications are retried against a receiver that fails at
first."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from cosnap.monitoring.v1 import monitoring_pb2
from services.monitoring import app as monitoring_app
from services.servicekit.clock import ManualClock
from services.servicekit.server import ServiceApp
from tests.monitoring.conftest import Connect, Receiver, StartMonitoring
from tests.support import eventually, unique_name

ENDPOINT = "/cosnap.effects.v1.EffectsService/GetTask"


async def feed(app: ServiceApp, connect: Connect, clock: ManualClock, ms: float) -> None:
    t = monitoring_pb2.ApiTiming(service="effects", endpoint=ENDPOINT, status_code="OK", duration_ms=ms)
    t.observed_at.FromDatetime(clock.now())
    await connect(app).RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[t] * 100))


def leaders(*apps: ServiceApp) -> list[ServiceApp]:
    return [a for a in apps if monitoring_app.state(a).engine.election.leading]


async def evaluated(*apps: ServiceApp, timeout: float = 20.0) -> None:
    """Until the leader among `apps` has completed a pass that began after this call (its
    loop's second pass from now: the first may have begun before), whatever the load."""
    (leader,) = leaders(*apps)
    engine = monitoring_app.state(leader).engine
    seen, passes = engine.last_pass, 0
    for _ in range(int(timeout / 0.01)):
        if engine.last_pass is not seen:
            seen, passes = engine.last_pass, passes + 1
            if passes == 2:
                return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the leader made no pass within {timeout} s")


async def test_two_replicas_notify_once_and_the_second_takes_over(
    start_monitoring: StartMonitoring, connect: Connect, make_receiver: Callable[..., Awaitable[Receiver]]
) -> None:
    receiver = await make_receiver()
    clock = ManualClock(datetime.now(UTC).replace(second=0, microsecond=0))
    schema = unique_name("monitoring")
    settings = {
        "monitoring_webhook_urls": receiver.url,
        "monitoring_eval_interval_seconds": 0.1,
        "monitoring_notify_backoff_seconds": 0.01,
    }
    first = await start_monitoring(clock, schema=schema, **settings)
    second = await start_monitoring(clock, schema=schema, **settings)
    await eventually(lambda: len(leaders(first, second)) == 1)

    for _ in range(3):  # slow for 3 minutes: the 3 s rule fires (for = 2m)
        clock.advance(60)
        await feed(first, connect, clock, 3500.0)
        await evaluated(first, second)  # the leader saw this minute (a missed one delays `for`)
    await receiver.wait_for(1)
    await asyncio.sleep(1.0)  # ~10 more passes on each replica
    assert receiver.alerts() == [("firing", "ApiLatencyHigh", "warning")]
    assert len(leaders(first, second)) == 1

    # the leader dies: its loop stops and its lock connection is cut without a goodbye
    (leader,) = leaders(first, second)
    other = second if leader is first else first
    engine = monitoring_app.state(leader).engine
    assert engine.task is not None
    engine.task.cancel()
    assert engine.election.conn is not None
    engine.election.conn.terminate()
    # within seconds (each try opens a connection: slow on a loaded machine, hence 15 s)
    await eventually(lambda: leaders(other) == [other], timeout=15.0)

    for _ in range(8):  # fast again: resolved after the window and keep_firing_for
        clock.advance(60)
        await feed(other, connect, clock, 10.0)
        await evaluated(other)
    await receiver.wait_for(2)
    await asyncio.sleep(1.0)
    assert receiver.alerts() == [
        ("firing", "ApiLatencyHigh", "warning"),
        ("resolved", "ApiLatencyHigh", "warning"),
    ]
    assert other.pool is not None
    sent = await other.pool.fetch("SELECT status, attempts, sent_at FROM notifications ORDER BY id")
    assert [(r["status"], r["attempts"]) for r in sent] == [("firing", 1), ("resolved", 1)]


async def test_notifications_are_retried_until_the_receiver_takes_them(
    start_monitoring: StartMonitoring, connect: Connect, make_receiver: Callable[..., Awaitable[Receiver]]
) -> None:
    flaky = await make_receiver(fail_first=7)  # more failures than one round's 3 tries
    steady = await make_receiver()
    clock = ManualClock(datetime.now(UTC).replace(second=0, microsecond=0))
    app = await start_monitoring(
        clock,
        monitoring_webhook_urls=f"flaky={flaky.url},steady={steady.url}",
        monitoring_notify_attempts=3,
        monitoring_notify_backoff_seconds=0.01,
    )
    engine = monitoring_app.state(app).engine
    for _ in range(3):
        clock.advance(60)
        await feed(app, connect, clock, 3500.0)
        await engine.step()
    await steady.wait_for(1)  # one receiver failing never holds up another
    await flaky.wait_for(1, timeout=30)
    assert flaky.attempts == 8
    assert flaky.alerts() == steady.alerts() == [("firing", "ApiLatencyHigh", "warning")]
    assert flaky.bodies == [{**steady.bodies[0], "receiver": "flaky"}]
    assert app.pool is not None
    pool = app.pool
    for _ in range(100):  # the mark follows the receiver's 200
        if await pool.fetchval("SELECT count(*) FROM notifications WHERE sent_at IS NULL") == 0:
            break
        await asyncio.sleep(0.05)
    rows = await pool.fetch("SELECT receiver, attempts, sent_at FROM notifications ORDER BY receiver")
    assert [(r["receiver"], r["attempts"], r["sent_at"] is not None) for r in rows] == [
        ("flaky", 3, True),
        ("steady", 1, True),
    ]


async def test_an_unreachable_receiver_never_delays_evaluation(
    start_monitoring: StartMonitoring, connect: Connect
) -> None:
    clock = ManualClock(datetime.now(UTC).replace(second=0, microsecond=0))
    # a port nobody listens on, a long timeout and many retries
    app = await start_monitoring(
        clock,
        monitoring_webhook_urls="http://127.0.0.1:9/hook",
        monitoring_notify_timeout_seconds=30,
        monitoring_notify_attempts=50,
    )
    engine = monitoring_app.state(app).engine
    for _ in range(3):
        clock.advance(60)
        await feed(app, connect, clock, 3500.0)
        result = await asyncio.wait_for(engine.step(), 5.0)
    assert result is not None and result.find("ApiLatencyHigh", "warning", "firing")
    for _ in range(8):
        clock.advance(60)
        await feed(app, connect, clock, 10.0)
        result = await asyncio.wait_for(engine.step(), 5.0)
        if result is not None and result.find("ApiLatencyHigh", "warning", "resolved"):
            break
    else:
        raise AssertionError("not resolved")
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM notifications WHERE sent_at IS NULL") == 2
