"""Alert rules with a controllable clock, on a real monitoring service: data
goes in through RecordApiTimings and ReportServiceStats (stamped with the
clock's time), the evaluation is stepped by hand, notifications arrive at a
local HTTP receiver in Alertmanager's format."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.monitoring.evaluator import Pass
from services.monitoring.rules import RulesError, load_rules, parse_rule
from services.servicekit.clock import ManualClock
from services.servicekit.server import ServiceApp
from tests.monitoring.conftest import Connect, ConnectClient, Receiver, StartMonitoring

ENDPOINT = "/cosnap.effects.v1.EffectsService/GetTask"
Feed = Callable[["Driver"], Awaitable[None]]


@dataclass
class Driver:
    app: ServiceApp
    stub: monitoring_pb2_grpc.MonitoringServiceStub
    clock: ManualClock

    async def step(self) -> Pass:
        result = await monitoring_app.state(self.app).engine.step()
        assert result is not None, "this replica should lead"
        return result

    async def minute(self, feed: Feed) -> Pass:
        """One minute later: the minute's data, then a pass."""
        self.clock.advance(60)
        await feed(self)
        return await self.step()

    async def alerts(self) -> list[Any]:
        assert self.app.pool is not None
        return list(await self.app.pool.fetch("SELECT * FROM alerts ORDER BY seq"))


def latency(ms: float, n: int = 100) -> Feed:
    async def feed(d: Driver) -> None:
        stamp = d.clock.now()
        timings = []
        for _ in range(n):
            t = monitoring_pb2.ApiTiming(
                service="effects", endpoint=ENDPOINT, status_code="OK", duration_ms=ms, instance="effects-0"
            )
            t.observed_at.FromDatetime(stamp)
            timings.append(t)
        await d.stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=timings))

    return feed


def errors(rate: float, n: int = 100) -> Feed:
    async def feed(d: Driver) -> None:
        stamp = d.clock.now()
        failing = round(rate * n)
        timings = []
        for i in range(n):
            t = monitoring_pb2.ApiTiming(
                service="effects",
                endpoint=ENDPOINT,
                status_code="INTERNAL" if i < failing else "OK",
                duration_ms=5.0,
            )
            t.observed_at.FromDatetime(stamp)
            timings.append(t)
        await d.stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=timings))

    return feed


def memory(ratio: float) -> Feed:
    async def feed(d: Driver) -> None:
        request = monitoring_pb2.ReportServiceStatsRequest(
            service="effects", instance="effects-0", heap_used_bytes=int(ratio * 1000), heap_limit_bytes=1000
        )
        request.observed_at.FromDatetime(d.clock.now())
        await d.stub.ReportServiceStats(request)

    return feed


def cache(hit_rate: float, lookups: int = 200) -> Feed:
    async def feed(d: Driver) -> None:
        hits = round(hit_rate * lookups)
        request = monitoring_pb2.ReportServiceStatsRequest(
            service="effects",
            instance="effects-0",
            caches=[monitoring_pb2.CacheStats(cache="catalog", hits=hits, misses=lookups - hits)],
        )
        request.observed_at.FromDatetime(d.clock.now())
        await d.stub.ReportServiceStats(request)

    return feed


@pytest.fixture
async def driver(
    start_monitoring: StartMonitoring, connect: Connect, make_receiver: Callable[..., Awaitable[Receiver]]
) -> tuple[Driver, Receiver]:
    receiver = await make_receiver()
    clock = ManualClock(datetime.now(UTC).replace(second=0, microsecond=0))
    app = await start_monitoring(
        clock, monitoring_webhook_urls=f"ops={receiver.url}", monitoring_notify_backoff_seconds=0.01
    )
    d = Driver(app, connect(app), clock)
    await d.step()
    return d, receiver


def minutes(td: timedelta) -> int:
    return int(td.total_seconds() // 60)


DEFAULT_RULES = {(r.name, r.severity): r for r in load_rules()}
CASES = [
    ("ApiLatencyHigh", "warning", latency(3500.0), latency(10.0)),
    ("ApiLatencyHigh", "critical", latency(6000.0), latency(10.0)),
    ("ApiErrorRateHigh", "warning", errors(0.02), errors(0.0)),
    ("ApiErrorRateHigh", "critical", errors(0.10), errors(0.0)),
    ("MemoryHigh", "warning", memory(0.9), memory(0.5)),
    ("CacheHitRateLow", "warning", cache(0.4), cache(0.95)),
]


def test_every_default_rule_is_covered_and_thresholds_are_the_products() -> None:
    assert set(DEFAULT_RULES) == {(n, s) for n, s, _, _ in CASES}
    assert DEFAULT_RULES[("ApiLatencyHigh", "warning")].threshold == 3000.0
    assert DEFAULT_RULES[("ApiLatencyHigh", "critical")].threshold == 5000.0
    assert DEFAULT_RULES[("ApiErrorRateHigh", "warning")].threshold == 0.01
    assert DEFAULT_RULES[("ApiErrorRateHigh", "critical")].threshold == 0.05
    assert DEFAULT_RULES[("MemoryHigh", "warning")].threshold == 0.8
    low = DEFAULT_RULES[("CacheHitRateLow", "warning")]
    assert (low.threshold, low.below) == (0.6, True)


@pytest.mark.parametrize(("name", "severity", "bad", "good"), CASES, ids=[f"{n}-{s}" for n, s, _, _ in CASES])
async def test_pending_then_firing_then_resolved(
    driver: tuple[Driver, Receiver], name: str, severity: str, bad: Feed, good: Feed
) -> None:
    d, receiver = driver
    rule = DEFAULT_RULES[(name, severity)]
    first = await d.minute(bad)
    assert first.find(name, severity, "pending")
    assert not first.find(name, severity, "firing") or rule.for_ == timedelta(0)
    # pending for exactly `for`: firing at the first pass at least `for` after the first
    fired_after = None
    for k in range(1, 30):
        result = await d.minute(bad)
        if result.find(name, severity, "firing"):
            fired_after = k
            break
        assert await d.alerts() == []
    assert fired_after == minutes(rule.for_)
    await receiver.wait_for(1)
    assert receiver.alerts() == [("firing", name, severity)]  # a critical inhibits its warning
    body = receiver.bodies[0]
    assert body["version"] == "4" and body["status"] == "firing" and body["receiver"] == "ops"
    alert = body["alerts"][0]
    assert alert["endsAt"] == "0001-01-01T00:00:00Z"
    assert alert["labels"]["service"] == "effects"
    assert set(alert["annotations"]) == {"summary", "description"}
    assert len(alert["fingerprint"]) == 16 and body["groupKey"].startswith("{}:{")
    (open_alert,) = await d.alerts()
    assert (open_alert["source"], open_alert["severity"], open_alert["state"]) == (name, severity, "open")

    resolved_after = None
    for k in range(1, 30):
        result = await d.minute(good)
        if result.find(name, severity, "resolved"):
            resolved_after = k
            break
    assert resolved_after is not None
    await receiver.wait_for(2)
    # (once a critical resolves, its warning may be announced while the rate falls through 1 %)
    assert receiver.alerts()[:2] == [("firing", name, severity), ("resolved", name, severity)]
    assert receiver.bodies[1]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    (closed,) = [a for a in await d.alerts() if a["severity"] == severity]
    assert (closed["state"], closed["resolution_note"]) == ("resolved", "condition cleared")


async def test_no_flapping_around_the_threshold(driver: tuple[Driver, Receiver]) -> None:
    d, receiver = driver
    for _ in range(3):
        await d.minute(latency(3200.0))
    assert [t.to for t in (await d.minute(latency(3200.0))).transitions if t.severity == "warning"] == []
    await receiver.wait_for(1)
    # below 3 s but above the 2.5 s clear threshold, then above again, then below: no change
    for ms in (2800.0, 3200.0, 2800.0, 2900.0, 3100.0, 2700.0, 2800.0, 2800.0, 2800.0, 2800.0):
        result = await d.minute(latency(ms))
        assert not result.find("ApiLatencyHigh", "warning", "resolved"), ms
        assert not result.find("ApiLatencyHigh", "warning", "firing"), ms
    assert receiver.alerts() == [("firing", "ApiLatencyHigh", "warning")]
    assert len(await d.alerts()) == 1
    for _ in range(8):
        await d.minute(latency(10.0))
    await receiver.wait_for(2)
    assert receiver.alerts() == [
        ("firing", "ApiLatencyHigh", "warning"),
        ("resolved", "ApiLatencyHigh", "warning"),
    ]


async def test_pending_that_stops_is_forgotten_quietly(driver: tuple[Driver, Receiver]) -> None:
    d, receiver = driver
    assert (await d.minute(latency(3500.0))).find("ApiLatencyHigh", "warning", "pending")
    # fast requests dilute the slow minute below 5 % of the window before `for` (2 minutes) ends
    result = await d.minute(latency(10.0, n=2000))
    assert result.find("ApiLatencyHigh", "warning", "forgotten")
    for _ in range(3):
        result = await d.minute(latency(10.0, n=2000))
        assert result.transitions == []
    assert await d.alerts() == []
    assert d.app.pool is not None
    assert await d.app.pool.fetchval("SELECT count(*) FROM rule_states") == 0
    assert await d.app.pool.fetchval("SELECT count(*) FROM notifications") == 0
    assert receiver.bodies == []


async def test_critical_inhibits_warning_until_it_resolves(driver: tuple[Driver, Receiver]) -> None:
    d, receiver = driver
    for _ in range(3):
        result = await d.minute(latency(6000.0))
    assert result.find("ApiLatencyHigh", "critical", "firing")
    assert result.find("ApiLatencyHigh", "warning", "inhibited")
    await receiver.wait_for(1)
    assert receiver.alerts() == [("firing", "ApiLatencyHigh", "critical")]
    # now 3.5 s: below the critical's 4 s clear, above the warning's threshold
    announced = None
    for k in range(1, 15):
        result = await d.minute(latency(3500.0))
        if result.find("ApiLatencyHigh", "critical", "resolved"):
            assert result.find("ApiLatencyHigh", "warning", "firing")  # no longer inhibited: announced now
            announced = k
            break
        assert not result.find("ApiLatencyHigh", "warning", "firing")
    assert announced is not None
    await receiver.wait_for(3)
    assert sorted(receiver.alerts()) == sorted(
        [
            ("firing", "ApiLatencyHigh", "critical"),
            ("resolved", "ApiLatencyHigh", "critical"),
            ("firing", "ApiLatencyHigh", "warning"),
        ]
    )
    states = {(a["severity"], a["state"]) for a in await d.alerts()}
    assert states == {("critical", "resolved"), ("warning", "open")}


async def test_identical_alerts_are_one_alert_and_one_notification(driver: tuple[Driver, Receiver]) -> None:
    d, receiver = driver
    for _ in range(8):  # firing for 5 more passes
        await d.minute(latency(3500.0))
        await d.step()  # and passes in between, as a fast evaluation interval would make
    await receiver.wait_for(1)
    assert receiver.alerts() == [("firing", "ApiLatencyHigh", "warning")]
    (alert,) = await d.alerts()
    assert alert["state"] == "open" and alert["last_seen_at"] == d.clock.now()
    assert d.app.pool is not None
    assert await d.app.pool.fetchval("SELECT count(*) FROM rule_states") == 1
    # a second endpoint is a second alert (another fingerprint)
    other = latency(3500.0)

    async def two(dd: Driver) -> None:
        await other(dd)
        t = monitoring_pb2.ApiTiming(service="effects", endpoint="/x.Y/Z", status_code="OK", duration_ms=3500)
        t.observed_at.FromDatetime(dd.clock.now())
        await dd.stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[t] * 50))

    for _ in range(3):
        await d.minute(two)
    await receiver.wait_for(2)
    assert len(await d.alerts()) == 2


async def test_an_admin_resolving_a_rule_alert_starts_the_rule_over(
    driver: tuple[Driver, Receiver], admin_token: str, connect_client: ConnectClient
) -> None:
    d, receiver = driver
    for _ in range(3):
        await d.minute(latency(3500.0))
    (alert,) = await d.alerts()
    reply = await connect_client(d.app).ResolvePerformanceAlert(
        monitoring_pb2.ResolvePerformanceAlertRequest(alert_id=alert["alert_id"], note="looking into it"),
        metadata=(("authorization", f"Bearer {admin_token}"),),
    )
    assert reply.alert.state == "resolved" and reply.alert.resolution_note == "looking into it"
    result = await d.minute(latency(3500.0))
    assert result.find("ApiLatencyHigh", "warning", "pending")  # still slow: pending again
    await receiver.wait_for(2)
    assert receiver.alerts() == [
        ("firing", "ApiLatencyHigh", "warning"),
        ("resolved", "ApiLatencyHigh", "warning"),
    ]


def test_bad_rule_files_are_refused(tmp_path: Path) -> None:
    good = {
        "name": "X",
        "kind": "latency_p95",
        "severity": "warning",
        "above": 1.0,
        "window": "5m",
        "for": "1m",
    }
    parse_rule(good, "rule[0]")
    for change, message in [
        ({"kind": "nope"}, "kind"),
        ({"severity": "page"}, "severity"),
        ({"window": "5 minutes"}, "window"),
        ({"window": "10s"}, "window"),
        ({"clear": 2.0}, "clear"),
        ({"below": 1.0}, "exactly one"),
        ({"extra": 1}, "unknown"),
        ({"above": "1"}, "number"),
    ]:
        with pytest.raises(RulesError, match=message):
            parse_rule({**good, **change}, "rule[0]")
    path = tmp_path / "rules.toml"
    path.write_text("[[rule]]\nname = 'X'\n")
    with pytest.raises(RulesError, match="required"):
        load_rules(path)
    path.write_text("not toml [")
    with pytest.raises(RulesError):
        load_rules(path)
