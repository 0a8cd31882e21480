"""Ingestion end to end on a real analytics service (PostgreSQL, Redis): group commit,
deduplication, latest-value-wins metrics with moving rollups, server-side ratings,
failed flushes, and the REST edge."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import aiohttp
import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc
from services.analytics import app as analytics_app
from services.analytics import sketch
from services.analytics.validation import Limits, Row, validate_events
from services.servicekit.errors import bad_request_violations
from services.servicekit.server import ServiceApp
from tests.conftest import StartService
from tests.support import eventually


@dataclass
class Svc:
    app: ServiceApp
    stub: analytics_pb2_grpc.AnalyticsServiceStub
    db: asyncpg.Connection  # search_path = the service's schema

    @property
    def committer(self) -> Any:
        return analytics_app.state(self.app).committer


@pytest.fixture
async def svc(start_service: StartService, admin_pg: asyncpg.Connection) -> AsyncIterator[Svc]:
    app = await start_service(analytics_app)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
    assert app.pool is not None
    async with app.pool.acquire() as conn:
        yield Svc(app, analytics_pb2_grpc.AnalyticsServiceStub(channel), conn)
    await channel.close()


def uid(prefix: str = "id") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def ts(moment: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def event(event_id: str, **fields: Any) -> analytics_pb2.Event:
    fields.setdefault("session_id", "sess-1")
    fields.setdefault("event_type", "effect_click")
    return analytics_pb2.Event(event_id=event_id, **fields)


def event_rows(count: int, **fields: Any) -> list[Row]:
    """`count` new events as the committer takes them: validated rows."""
    request = analytics_pb2.RecordEventsRequest(events=[event(uid("ev"), **fields) for _ in range(count)])
    return validate_events(request, time.time(), Limits())


def metric(metric_id: str, name: str, value: float, **fields: Any) -> analytics_pb2.PerformanceMetric:
    fields.setdefault("session_id", "sess-1")
    return analytics_pb2.PerformanceMetric(metric_id=metric_id, name=name, value=value, **fields)


# ------------------------------------------------------------------------------- events


async def test_events_are_stored_with_rollups_and_resends_are_duplicates(svc: Svc) -> None:
    at = datetime.now(UTC).replace(microsecond=123000) - timedelta(minutes=1)
    ids = [uid("ev") for _ in range(3)]
    request = analytics_pb2.RecordEventsRequest(
        events=[
            event(ids[0], event_type="page_view", page="/home", timestamp=ts(at), user_id="u1"),
            event(ids[1], event_type="page_view", page="/home", timestamp=ts(at)),
            event(ids[2], event_type="effect_click", timestamp=ts(at), properties={"a": {"b": [1, "x"]}}),
        ]
    )
    reply = await svc.stub.RecordEvents(request)
    assert (reply.accepted, reply.duplicates) == (3, 0)

    rows = await svc.db.fetch("SELECT * FROM events WHERE event_id = ANY($1) ORDER BY event_id", ids)
    assert len(rows) == 3
    by_id = {r["event_id"]: r for r in rows}
    assert by_id[ids[0]]["occurred_at"] == at
    assert by_id[ids[0]]["user_id"] == "u1" and by_id[ids[1]]["user_id"] is None
    assert json.loads(by_id[ids[2]]["properties"]) == {"a": {"b": [1, "x"]}}
    assert await svc.db.fetchval("SELECT count(*) FROM event_keys WHERE event_id = ANY($1)", ids) == 3

    bucket = datetime.fromtimestamp(at.timestamp() // 300 * 300, UTC)
    counts = {
        (r["event_type"], r["page"]): r["count"]
        for r in await svc.db.fetch("SELECT * FROM rollup_events WHERE bucket_start = $1", bucket)
    }
    assert counts == {("page_view", "/home"): 2, ("effect_click", ""): 1}
    sessions = await svc.db.fetch("SELECT * FROM rollup_sessions")
    assert [(r["session_id"], r["user_id"]) for r in sessions] == [("sess-1", "u1")]

    # The whole batch again, plus one new event: only the new one is stored.
    new_id = uid("ev")
    request.events.append(event(new_id, event_type="page_view", page="/home", timestamp=ts(at)))
    reply = await svc.stub.RecordEvents(request)
    assert (reply.accepted, reply.duplicates) == (1, 3)
    assert await svc.db.fetchval("SELECT count(*) FROM events") == 4
    assert (
        await svc.db.fetchval(
            "SELECT count FROM rollup_events WHERE bucket_start = $1 AND event_type = 'page_view'", bucket
        )
        == 3
    )


async def test_same_event_id_twice_in_a_batch_first_wins(svc: Svc) -> None:
    eid = uid("ev")
    reply = await svc.stub.RecordEvents(
        analytics_pb2.RecordEventsRequest(
            events=[event(eid, event_type="first"), event(eid, event_type="second")]
        )
    )
    assert (reply.accepted, reply.duplicates) == (1, 1)
    assert await svc.db.fetchval("SELECT event_type FROM events WHERE event_id = $1", eid) == "first"


async def test_missing_timestamp_gets_the_receive_time(svc: Svc) -> None:
    eid = uid("ev")
    before = datetime.now(UTC)
    await svc.stub.RecordEvents(analytics_pb2.RecordEventsRequest(events=[event(eid)]))
    after = datetime.now(UTC)
    row = await svc.db.fetchrow("SELECT occurred_at, received_at FROM events WHERE event_id = $1", eid)
    # occurred_at: when the request arrived; received_at: the flush's commit transaction, just after.
    assert before - timedelta(microseconds=1) <= row["occurred_at"] <= row["received_at"] <= after


async def test_concurrent_requests_are_grouped_and_all_stored(svc: Svc) -> None:
    committer = svc.committer
    flushes_before = committer.flushes
    ids = [uid("ev") for _ in range(300)]

    async def send(i: int) -> analytics_pb2.RecordEventsResponse:
        return await svc.stub.RecordEvents(
            analytics_pb2.RecordEventsRequest(events=[event(ids[i], session_id=f"s{i % 7}")])
        )

    replies = await asyncio.gather(*(send(i) for i in range(len(ids))))
    assert all((r.accepted, r.duplicates) == (1, 0) for r in replies)
    flushes = committer.flushes - flushes_before
    assert 1 <= flushes < len(ids) // 2, flushes  # grouped: far fewer transactions than requests
    assert await svc.db.fetchval("SELECT count(*) FROM events WHERE event_id = ANY($1)", ids) == len(ids)
    assert await svc.db.fetchval("SELECT sum(count) FROM rollup_events") == len(ids)
    assert await svc.db.fetchval("SELECT count(*) FROM rollup_sessions") == 7

    # The same ids from many concurrent requests again: every one is a duplicate.
    replies = await asyncio.gather(*(send(i) for i in range(len(ids))))
    assert all((r.accepted, r.duplicates) == (0, 1) for r in replies)
    assert await svc.db.fetchval("SELECT sum(count) FROM rollup_events") == len(ids)


async def test_duplicates_across_requests_in_one_flush_are_counted_once(svc: Svc) -> None:
    eid = uid("ev")
    replies = await asyncio.gather(
        *(svc.stub.RecordEvents(analytics_pb2.RecordEventsRequest(events=[event(eid)])) for _ in range(20))
    )
    assert sum(r.accepted for r in replies) == 1
    assert sum(r.duplicates for r in replies) == 19
    assert await svc.db.fetchval("SELECT count(*) FROM events WHERE event_id = $1", eid) == 1


async def test_racing_insert_of_a_new_id_falls_back_and_counts_a_duplicate(svc: Svc) -> None:
    """The optimistic key insert (anti-join + plain INSERT) meets an id another
    transaction is inserting: it waits, gets a unique violation once that one
    commits, and the flush is redone with ON CONFLICT: a duplicate, not an error."""
    eid, sid = uid("ev"), uid("st")
    assert svc.app.pool is not None
    async with svc.app.pool.acquire() as other:
        tx = other.transaction()
        await tx.start()
        await other.execute("INSERT INTO event_keys (event_id, occurred_at) VALUES ($1, now())", eid)
        await other.execute("INSERT INTO step_keys (step_id, occurred_at) VALUES ($1, now())", sid)
        fallbacks = svc.committer.optimistic_fallbacks
        sending = asyncio.gather(
            svc.stub.RecordEvents(analytics_pb2.RecordEventsRequest(events=[event(eid), event(uid("ev"))])),
            svc.stub.RecordFunnelSteps(
                analytics_pb2.RecordFunnelStepsRequest(
                    steps=[analytics_pb2.FunnelStep(step_id=sid, session_id="s", step="effect_viewed")]
                )
            ),
        )
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'"
        )

        async def flush_waits() -> bool:
            return bool(await svc.db.fetchval(waiting, svc.app.schema))

        await eventually(flush_waits, 30, "a flush waiting on our uncommitted keys")
        assert not sending.done()
        await tx.commit()
        events_reply, steps_reply = await asyncio.wait_for(sending, 10)
    assert (events_reply.accepted, events_reply.duplicates) == (1, 1)
    assert (steps_reply.accepted, steps_reply.duplicates) == (0, 1)
    assert svc.committer.optimistic_fallbacks > fallbacks
    assert await svc.db.fetchval("SELECT count(*) FROM events WHERE event_id = $1", eid) == 0
    assert await svc.db.fetchval("SELECT count(*) FROM funnel_steps WHERE step_id = $1", sid) == 0


async def test_after_a_resend_the_next_flushes_start_with_on_conflict(svc: Svc) -> None:
    """A flush holding an existing id fails its optimistic attempt once and is redone; the
    next PESSIMISTIC_FLUSHES flushes go straight to ON CONFLICT; then optimism returns."""
    committer = svc.committer
    sent = [uid("ev") for _ in range(3)]
    assert (
        await svc.stub.RecordEvents(analytics_pb2.RecordEventsRequest(events=[event(sent[0])]))
    ).accepted == 1

    def batch(*ids: str) -> analytics_pb2.RecordEventsRequest:
        return analytics_pb2.RecordEventsRequest(events=[event(i) for i in ids])

    async def send(*ids: str) -> tuple[int, int]:
        reply = await svc.stub.RecordEvents(batch(*ids))
        return reply.accepted, reply.duplicates

    fallbacks, prepared = committer.optimistic_fallbacks, committer.connections_prepared
    assert await send(sent[0], sent[1]) == (1, 1)  # optimistic, fails, redone
    assert committer.optimistic_fallbacks == fallbacks + 1
    assert committer.connections_prepared == prepared  # rolled back cleanly: its connection is kept
    for _ in range(committer.PESSIMISTIC_FLUSHES):  # one request per flush: sent one by one
        assert await send(sent[1], uid("ev")) == (1, 1)
    assert committer.optimistic_fallbacks == fallbacks + 1  # no failed attempt meanwhile
    assert await send(sent[2]) == (1, 0)  # optimistic again, and it succeeds

    # Each kind on its own: a re-reported metric sends metrics to ON CONFLICT, not events.
    mid = uid("m")
    for value in (0.1, 0.12):
        reply = await svc.stub.RecordPerformanceMetrics(
            analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(mid, "CLS", value)])
        )
        assert (reply.accepted, reply.duplicates) == (1, 0)
    assert committer.optimistic_fallbacks == fallbacks + 2
    assert await send(sent[2]) == (0, 1)  # events are still optimistic: a failed attempt
    assert committer.optimistic_fallbacks == fallbacks + 3
    stored = await svc.db.fetchval("SELECT count(*) FROM events WHERE event_id = ANY($1)", sent)
    assert stored == 3
    assert await svc.db.fetchval("SELECT sum(count) FROM rollup_events") == await svc.db.fetchval(
        "SELECT count(*) FROM events"
    )


async def test_failed_flush_fails_every_request_and_writes_nothing(svc: Svc) -> None:
    # A rollup write that fails for one event type, after the keys and raw rows
    # of the same transaction were written.
    await svc.db.execute(
        """
        CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN IF NEW.event_type = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$;
        CREATE TRIGGER boom BEFORE INSERT ON rollup_events FOR EACH ROW EXECUTE FUNCTION boom();
        """
    )
    bad = [uid("bad") for _ in range(5)]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RecordEvents(
            analytics_pb2.RecordEventsRequest(
                events=[event(i, event_type="fine") for i in bad[:4]] + [event(bad[4], event_type="boom")]
            )
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    for table, column in (("events", "event_id"), ("event_keys", "event_id")):
        assert await svc.db.fetchval(f"SELECT count(*) FROM {table} WHERE {column} = ANY($1)", bad) == 0
    assert await svc.db.fetchval("SELECT count(*) FROM rollup_events") == 0
    assert svc.committer.failed_flushes >= 1

    # The flush's connection went back to the pool without the committer's timestamptz
    # codec (ints in, ints out): every idle connection of the pool reads datetimes.
    pool = svc.app.pool
    assert pool is not None
    connections = [await pool.acquire() for _ in range(pool.get_idle_size())]
    try:
        for conn in connections:
            assert isinstance(await conn.fetchval("SELECT now()"), datetime)
    finally:
        for conn in connections:
            await pool.release(conn)

    # The committer carries on; the failed ids were never stored, so they are new now.
    reply = await svc.stub.RecordEvents(
        analytics_pb2.RecordEventsRequest(events=[event(i, event_type="fine") for i in bad[:4]])
    )
    assert (reply.accepted, reply.duplicates) == (4, 0)


# ------------------------------------------------------------------------------ metrics


async def test_web_vitals_are_rated_on_the_server(svc: Svc) -> None:
    cases = {
        "LCP": (1200, "good"),
        "INP": (350, "needs-improvement"),
        "CLS": (0.4, "poor"),
        "PAGE_LOAD": (9000, None),
    }
    metrics = [metric(uid(name), name, value, page="/p") for name, (value, _) in cases.items()]
    reply = await svc.stub.RecordPerformanceMetrics(
        analytics_pb2.RecordPerformanceMetricsRequest(metrics=metrics)
    )
    assert (reply.accepted, reply.duplicates) == (4, 0)
    rows = await svc.db.fetch("SELECT name, rating FROM metrics")
    assert {r["name"]: r["rating"] for r in rows} == {name: rating for name, (_, rating) in cases.items()}
    stats = {r["name"]: r for r in await svc.db.fetch("SELECT * FROM rollup_metrics")}
    assert (stats["LCP"]["good"], stats["LCP"]["needs_improvement"], stats["LCP"]["poor"]) == (1, 0, 0)
    assert (stats["INP"]["good"], stats["INP"]["needs_improvement"], stats["INP"]["poor"]) == (0, 1, 0)
    assert (stats["CLS"]["good"], stats["CLS"]["needs_improvement"], stats["CLS"]["poor"]) == (0, 0, 1)
    assert (stats["PAGE_LOAD"]["good"], stats["PAGE_LOAD"]["poor"], stats["PAGE_LOAD"]["count"]) == (0, 0, 1)


async def sketch_mismatches(db: asyncpg.Connection) -> list[asyncpg.Record]:
    """(hour, name, bin) whose hourly sketch count differs from the sum of its 5-minute,
    per-page counts, or where either count is negative; [] when the two agree."""
    return await db.fetch(
        """
        WITH five AS (
            SELECT date_bin('1 hour', bucket_start, timestamptz 'epoch') AS hour_start, name, bin,
                   sum(count) AS five, min(count) AS least
            FROM rollup_metric_bins GROUP BY 1, 2, 3
        )
        SELECT hour_start, name, bin, five.five, h.count AS hourly
        FROM five FULL JOIN rollup_metric_bins_hourly h USING (hour_start, name, bin)
        WHERE coalesce(five.five, 0) <> coalesce(h.count, 0) OR five.least < 0 OR h.count < 0
        """
    )


async def _metric_state(svc: Svc, name: str) -> dict[str, Any]:
    raw = await svc.db.fetch("SELECT value, rating, delta FROM metrics WHERE name = $1", name)
    stats = await svc.db.fetchrow("SELECT * FROM rollup_metrics WHERE name = $1", name)
    bins = await svc.db.fetch(
        "SELECT bin, sum(count) AS n FROM rollup_metric_bins WHERE name = $1 GROUP BY bin HAVING sum(count) <> 0",
        name,
    )
    hourly = await svc.db.fetch(
        "SELECT bin, sum(count) AS n FROM rollup_metric_bins_hourly WHERE name = $1 GROUP BY bin"
        " HAVING sum(count) <> 0",
        name,
    )
    assert await sketch_mismatches(svc.db) == []
    return {
        "raw": [(r["value"], r["rating"], r["delta"]) for r in raw],
        "count": stats["count"],
        "sum": stats["sum"],
        "ratings": (stats["good"], stats["needs_improvement"], stats["poor"]),
        "bins": {r["bin"]: r["n"] for r in bins},
        "hourly_bins": {r["bin"]: r["n"] for r in hourly},
    }


async def test_latest_metric_value_wins_and_the_rollup_moves(svc: Svc) -> None:
    at = datetime.now(UTC) - timedelta(minutes=2)
    mid = uid("v3-cls")

    async def report(value: float, delta: float) -> tuple[int, int]:
        reply = await svc.stub.RecordPerformanceMetrics(
            analytics_pb2.RecordPerformanceMetricsRequest(
                metrics=[metric(mid, "CLS", value, delta=delta, page="/x", timestamp=ts(at))]
            )
        )
        return reply.accepted, reply.duplicates

    assert await report(0.05, 0.05) == (1, 0)
    state = await _metric_state(svc, "CLS")
    assert state["raw"] == [(0.05, "good", 0.05)]
    assert (state["count"], state["ratings"], state["bins"]) == (1, (1, 0, 0), {sketch.bin_of(0.05): 1})
    assert state["sum"] == Decimal("0.05")  # exact: numeric

    # CLS grows: the same (name, id) reported again with a later, larger value.
    later = at + timedelta(minutes=1)  # a later timestamp does not move the row: the first one's is kept
    reply = await svc.stub.RecordPerformanceMetrics(
        analytics_pb2.RecordPerformanceMetricsRequest(
            metrics=[metric(mid, "CLS", 0.3, delta=0.25, page="/x", timestamp=ts(later))]
        )
    )
    assert (reply.accepted, reply.duplicates) == (1, 0)
    state = await _metric_state(svc, "CLS")
    assert state["raw"] == [(0.3, "poor", 0.25)]  # updated in place, still one row
    assert state["count"] == 1  # moved, not added
    assert state["sum"] == Decimal("0.3")
    assert state["ratings"] == (0, 0, 1)
    assert state["bins"] == state["hourly_bins"] == {sketch.bin_of(0.3): 1}
    key = await svc.db.fetchrow("SELECT * FROM metric_keys WHERE metric_id = $1", mid)
    assert (key["value"], key["rating"], key["bin"], key["occurred_at"]) == (
        0.3,
        "poor",
        sketch.bin_of(0.3),
        at,
    )

    # The identical report again is a duplicate and changes nothing.
    assert await report(0.3, 0.25) == (0, 1)
    assert await _metric_state(svc, "CLS") == state


async def test_same_metric_twice_in_a_batch_last_wins(svc: Svc) -> None:
    mid = uid("v3-inp")
    reply = await svc.stub.RecordPerformanceMetrics(
        analytics_pb2.RecordPerformanceMetricsRequest(
            metrics=[metric(mid, "INP", 100), metric(mid, "INP", 600), metric(mid, "INP", 600)]
        )
    )
    assert (reply.accepted, reply.duplicates) == (2, 1)
    state = await _metric_state(svc, "INP")
    assert state["raw"] == [(600.0, "poor", 0.0)]
    assert (state["count"], state["ratings"], state["bins"]) == (1, (0, 0, 1), {sketch.bin_of(600): 1})


async def test_concurrent_metric_updates_keep_the_rollup_consistent(svc: Svc) -> None:
    ids = [uid("m") for _ in range(10)]
    values = [100.0, 250.0, 700.0, 150.0, 800.0]

    async def send(value: float) -> None:
        await svc.stub.RecordPerformanceMetrics(
            analytics_pb2.RecordPerformanceMetricsRequest(metrics=[metric(i, "INP", value) for i in ids])
        )

    for value in values:  # each round concurrent with the next request's validation, not the DB order
        await asyncio.gather(send(value), send(value))
    state = await _metric_state(svc, "INP")
    assert state["count"] == len(ids)
    assert state["sum"] == 800 * len(ids)
    assert state["ratings"] == (0, 0, len(ids))
    assert state["bins"] == state["hourly_bins"] == {sketch.bin_of(800.0): len(ids)}
    assert await svc.db.fetchval("SELECT count(*) FROM metrics") == len(ids)


async def test_hourly_sketch_stays_the_sum_of_the_5_minute_one(svc: Svc) -> None:
    """rollup_metric_bins_hourly (per hour, no page) equals rollup_metric_bins summed per hour
    after new metrics over several hours and pages, re-reports (latest value wins, also with a
    later timestamp in another hour, also twice in one batch) and concurrent flushes."""
    hour = datetime.fromtimestamp(datetime.now(UTC).timestamp() // 3600 * 3600, UTC) - timedelta(hours=3)
    times = [hour + timedelta(minutes=m) for m in (1, 7, 33, 59, 61, 62, 118, 125)]
    pages = ["/a", "/b", ""]
    names = ["LCP", "INP", "CLS"]
    ids = [uid("h") for _ in range(48)]

    def spec(i: int, value: float, at: datetime | None = None) -> analytics_pb2.PerformanceMetric:
        name = names[i % 3]
        return metric(
            ids[i],
            name,
            value / 1000 if name == "CLS" else value,  # CLS is at most 100
            page=pages[i % len(pages)],
            timestamp=ts(at or times[i % len(times)]),
        )

    async def send(*items: analytics_pb2.PerformanceMetric) -> tuple[int, int]:
        reply = await svc.stub.RecordPerformanceMetrics(
            analytics_pb2.RecordPerformanceMetricsRequest(metrics=list(items))
        )
        return reply.accepted, reply.duplicates

    assert await send(*(spec(i, 100.0 + 37 * i) for i in range(len(ids)))) == (len(ids), 0)
    assert await sketch_mismatches(svc.db) == []
    hours = await svc.db.fetch("SELECT DISTINCT hour_start FROM rollup_metric_bins_hourly ORDER BY 1")
    assert [r["hour_start"] for r in hours] == [hour, hour + timedelta(hours=1), hour + timedelta(hours=2)]

    # Re-reports: new values (one a timestamp two hours later), unchanged ones, the same id twice
    # in one batch, and two concurrent requests moving overlapping ids.
    moved = await send(
        spec(0, 5000.0, at=times[0] + timedelta(hours=2)),
        spec(1, 100.0 + 37),  # unchanged: a duplicate
        spec(2, 9.0),
        spec(2, 11.0),  # the last in the batch wins
    )
    assert moved == (3, 1)
    await asyncio.gather(
        send(*(spec(i, 3000.0 + i) for i in range(3, 30))),
        send(*(spec(i, 4000.0 + i) for i in range(20, 48))),
    )
    assert await sketch_mismatches(svc.db) == []

    # The contribution stayed in the first report's hour (and 5-minute bucket), at the new bin.
    first_hour = await svc.db.fetch(
        "SELECT bin, count FROM rollup_metric_bins_hourly WHERE hour_start = $1 AND name = 'LCP' AND count <> 0",
        hour,
    )
    counts = {r["bin"]: r["count"] for r in first_hour}
    assert counts.get(sketch.bin_of(5000.0)) == 1
    assert sketch.bin_of(100.0) not in counts
    total = await svc.db.fetchval("SELECT sum(count) FROM rollup_metric_bins_hourly")
    assert total == await svc.db.fetchval("SELECT count(*) FROM metrics") == len(ids)
    current = await svc.db.fetch("SELECT name, bin, count(*) AS n FROM metric_keys GROUP BY 1, 2")
    hourly = await svc.db.fetch(
        "SELECT name, bin, sum(count) AS n FROM rollup_metric_bins_hourly GROUP BY 1, 2 HAVING sum(count) <> 0"
    )
    assert {(r["name"], r["bin"]): r["n"] for r in hourly} == {(r["name"], r["bin"]): r["n"] for r in current}


# -------------------------------------------------------------------------------- steps


async def test_funnel_steps_are_stored_once_with_rollups(svc: Svc) -> None:
    ids = [uid("st") for _ in range(3)]
    steps = [
        analytics_pb2.FunnelStep(step_id=ids[0], session_id="s", step="effect_viewed", effect_id="e1"),
        analytics_pb2.FunnelStep(step_id=ids[1], session_id="s", step="effect_started", effect_id="e1"),
        analytics_pb2.FunnelStep(step_id=ids[2], session_id="s", step="effect_viewed"),
    ]
    reply = await svc.stub.RecordFunnelSteps(analytics_pb2.RecordFunnelStepsRequest(steps=steps))
    assert (reply.accepted, reply.duplicates) == (3, 0)
    reply = await svc.stub.RecordFunnelSteps(analytics_pb2.RecordFunnelStepsRequest(steps=steps[:2]))
    assert (reply.accepted, reply.duplicates) == (0, 2)
    rows = await svc.db.fetch("SELECT step, effect_id FROM funnel_steps ORDER BY step, effect_id")
    assert [(r["step"], r["effect_id"]) for r in rows] == [(2, "e1"), (2, None), (3, "e1")]
    rollup = await svc.db.fetch("SELECT step, effect_id, sum(count) AS n FROM rollup_funnel GROUP BY 1, 2")
    assert {(r["step"], r["effect_id"]): r["n"] for r in rollup} == {(2, "e1"): 1, (2, ""): 1, (3, "e1"): 1}


# -------------------------------------------------------------------------- shutdown


async def test_shutdown_flushes_queued_rows_and_then_refuses(start_service: StartService) -> None:
    app = await start_service(analytics_app)
    committer = analytics_app.state(app).committer
    rows = event_rows(50)
    from services.analytics.ingest import Kind

    pending = [asyncio.ensure_future(committer.submit(Kind.EVENTS, [row])) for row in rows]
    await asyncio.sleep(0)
    await committer.close()
    assert [await p for p in pending] == [(1, 0)] * 50
    assert app.pool is not None
    assert await app.pool.fetchval("SELECT count(*) FROM events") == 50
    with pytest.raises(Exception, match="shutting down"):
        await committer.submit(Kind.EVENTS, rows[:1])


# ------------------------------------------------------------------------ the REST edge


def counts(body: dict[str, Any]) -> tuple[int, int]:
    """(accepted, duplicates) of a JSON reply: both always present, zeros included."""
    assert set(body) == {"accepted", "duplicates"}, body
    return body["accepted"], body["duplicates"]


async def test_rest_edge_ingests_and_rejects_with_field_violations(svc: Svc, start_edge: Any) -> None:
    base = await start_edge(svc.app)
    eid = uid("ev")
    async with aiohttp.ClientSession() as http:
        body = {"events": [{"eventId": eid, "sessionId": "s-rest", "eventType": "page_view", "page": "/"}]}
        async with http.post(f"{base}/api/analytics/events", json=body) as resp:
            assert resp.status == 200
            assert counts(await resp.json()) == (1, 0)
        async with http.post(f"{base}/api/analytics/events", json=body) as resp:
            assert counts(await resp.json()) == (0, 1)

        bad = {
            "events": [
                {"eventId": uid("ev"), "sessionId": "s", "eventType": "ok_type"},
                {"eventId": "", "sessionId": "s", "eventType": "Bad-Type"},
            ]
        }
        async with http.post(f"{base}/api/analytics/events", json=bad) as resp:
            assert resp.status == 400
            payload = await resp.json()
        assert payload["code"] == 3
        (detail,) = payload["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        fields = sorted(v["field"] for v in detail["fieldViolations"])
        assert fields == ["events[1].eventId", "events[1].eventType"]

        metric_body = {"metrics": [{"metricId": uid("m"), "sessionId": "s", "name": "LCP", "value": 5000}]}
        async with http.post(f"{base}/api/analytics/performance/metrics", json=metric_body) as resp:
            assert resp.status == 200
            assert counts(await resp.json()) == (1, 0)
        too_many = {
            "steps": [{"stepId": f"x{i}", "sessionId": "s", "step": "effect_viewed"} for i in range(501)]
        }
        async with http.post(f"{base}/api/analytics/funnel", json=too_many) as resp:
            assert resp.status == 400
            payload = await resp.json()
            assert [v["field"] for v in payload["details"][0]["fieldViolations"]] == ["steps"]
    assert await svc.db.fetchval("SELECT count(*) FROM events") == 1
    assert await svc.db.fetchval("SELECT rating FROM metrics") == "poor"
    assert await svc.db.fetchval("SELECT count(*) FROM funnel_steps") == 0


async def test_invalid_item_fails_the_whole_grpc_batch(svc: Svc) -> None:
    good = [event(uid("ev")) for _ in range(3)]
    bad = analytics_pb2.Event(event_id=uid("ev"), session_id="", event_type="x")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await svc.stub.RecordEvents(analytics_pb2.RecordEventsRequest(events=[*good, bad]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in bad_request_violations(err.value)] == ["events[3].sessionId"]
    assert await svc.db.fetchval("SELECT count(*) FROM events") == 0
    assert await svc.db.fetchval("SELECT count(*) FROM event_keys") == 0


async def test_parallel_flushes_under_a_backlog(svc: Svc) -> None:
    from services.analytics.ingest import GroupCommitter, Kind

    assert svc.app.pool is not None
    committer = GroupCommitter(svc.app.pool, max_rows=100, concurrency=2, parallel_min_rows=1)
    await committer.start()
    try:
        batches = [event_rows(10, session_id=f"s{b}", event_type="bulk") for b in range(60)]
        # Every id twice: once alone, once again in a later request (a duplicate whichever flush it lands in).
        replies = await asyncio.gather(
            *(committer.submit(Kind.EVENTS, rows) for rows in batches),
            *(committer.submit(Kind.EVENTS, rows[:1]) for rows in batches),
        )
    finally:
        await committer.close()
    assert replies[:60] == [(10, 0)] * 60
    assert replies[60:] == [(0, 1)] * 60
    assert committer.max_parallel == 2
    assert committer.flushes >= 7  # 700 rows, at most 100 a flush
    assert await svc.db.fetchval("SELECT count(*) FROM events WHERE event_type = 'bulk'") == 600
    assert await svc.db.fetchval("SELECT sum(count) FROM rollup_events WHERE event_type = 'bulk'") == 600


async def test_a_connection_stages_only_the_kinds_it_has_written(svc: Svc) -> None:
    """Every COMMIT truncates all of a session's ON COMMIT DELETE ROWS tables, so the
    writer creates a kind's staging table on a connection only when it first writes it."""
    from services.analytics.ingest import GroupCommitter, Kind
    from services.analytics.validation import validate_metrics

    assert svc.app.pool is not None
    committer = GroupCommitter(svc.app.pool, concurrency=1)
    await committer.start()

    async def staging_tables() -> set[str]:
        (conn,) = committer.writer._idle  # the one connection, between flushes
        rows = await conn.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'"
        )
        return {r["relname"] for r in rows}

    try:
        events = event_rows(5, event_type="staged")
        assert await committer.submit(Kind.EVENTS, events) == (5, 0)
        assert await staging_tables() == {"stage_events"}
        assert await committer.submit(Kind.EVENTS, event_rows(3, event_type="staged")) == (3, 0)
        assert await staging_tables() == {"stage_events"}
        request = analytics_pb2.RecordPerformanceMetricsRequest(
            metrics=[metric(uid("m"), "LCP", 1200.0, page="/staged")]
        )
        rows = validate_metrics(request, time.time(), Limits())
        assert await committer.submit(Kind.METRICS, rows) == (1, 0)
        assert await staging_tables() == {"stage_events", "stage_metrics"}
        assert await committer.submit(Kind.EVENTS, events) == (0, 5)  # re-sent: duplicates
    finally:
        await committer.close()
    assert committer.connections_prepared == 1
    assert await svc.db.fetchval("SELECT count(*) FROM events WHERE event_type = 'staged'") == 8
    assert await svc.db.fetchval("SELECT count(*) FROM metrics WHERE page = '/staged'") == 1
