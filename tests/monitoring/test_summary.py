"""GetServiceSummary over a past window (a weekly report asks about the previous
ISO week): the rollups of that window only, and the alerts (rule and client)
opened and resolved within it, per severity; the window's end refused in the
future or before the retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest

from cosnap.monitoring.v1 import monitoring_pb2, monitoring_pb2_grpc
from services.monitoring import app as monitoring_app
from services.servicekit.clock import ManualClock
from services.servicekit.errors import bad_request_violations
from tests.monitoring.conftest import Connect, ConnectClient, StartMonitoring
from tests.monitoring.test_rules import ENDPOINT, Driver, latency

OTHER = "/cosnap.effects.v1.EffectsService/ListEffects"
WEEK = timedelta(days=7)


def activity(summary: monitoring_pb2.GetServiceSummaryResponse) -> dict[str, tuple[int, int]]:
    return {a.severity: (a.opened, a.resolved) for a in summary.alert_activity}


def requests(summary: monitoring_pb2.GetServiceSummaryResponse) -> dict[str, int]:
    return {e.endpoint: e.requests for e in summary.endpoints}


async def report(stub: monitoring_pb2_grpc.MonitoringServiceStub, alert_id: str, severity: str) -> None:
    alert = monitoring_pb2.PerformanceAlert(
        alert_id=alert_id,
        session_id="s-1",
        metric="LCP",
        severity=severity,
        threshold=4000,
        actual_value=9000,
    )
    reply = await stub.ReportPerformanceAlerts(monitoring_pb2.ReportPerformanceAlertsRequest(alerts=[alert]))
    assert reply.accepted == 1


def summary_request(end: datetime | None, window: timedelta) -> monitoring_pb2.GetServiceSummaryRequest:
    request = monitoring_pb2.GetServiceSummaryRequest()
    request.window.FromTimedelta(window)
    if end is not None:
        request.end.FromDatetime(end)
    return request


async def test_a_past_week_reads_its_own_rollups_and_alert_activity(
    start_monitoring: StartMonitoring, connect: Connect, connect_client: ConnectClient, admin_token: str
) -> None:
    real = datetime.now(UTC).replace(second=0, microsecond=0)
    this_monday = (real - timedelta(days=real.weekday())).replace(hour=0, minute=0)
    week_start, week_end = this_monday - WEEK, this_monday  # the previous ISO week
    clock = ManualClock(week_start - timedelta(minutes=30))
    app = await start_monitoring(clock, monitoring_raw_retention_days=20)
    stub = connect(app)
    admin = connect_client(app)
    auth = (("authorization", f"Bearer {admin_token}"),)
    d = Driver(app, stub, clock)

    # The week before: 100 timings and a critical client alert.
    await latency(10.0)(d)
    await report(stub, "before-1", "critical")

    # Within the week: slow RPCs until the critical latency rule fires, the
    # client alert of the week before resolved, a warning reported; then fast
    # RPCs until the rule alert resolves.
    clock.advance((week_start + timedelta(hours=1) - clock.now()).total_seconds())
    in_week = 0
    for _ in range(10):
        in_week += 30
        if (await d.minute(latency(6000.0, n=30))).find("ApiLatencyHigh", "critical", "firing"):
            break
    else:
        pytest.fail("the critical latency alert never fired")
    await admin.ResolvePerformanceAlert(
        monitoring_pb2.ResolvePerformanceAlertRequest(alert_id="before-1", note="fixed"), metadata=auth
    )
    await report(stub, "in-1", "warning")
    for _ in range(15):
        in_week += 30
        if (await d.minute(latency(10.0, n=30))).find("ApiLatencyHigh", "critical", "resolved"):
            break
    else:
        pytest.fail("the critical latency alert never resolved")

    # After the week: other timings, an error alert opened, the warning resolved.
    clock.advance((week_end + timedelta(minutes=30) - clock.now()).total_seconds())
    after = monitoring_pb2.ApiTiming(service="effects", endpoint=OTHER, status_code="OK", duration_ms=1.0)
    after.observed_at.FromDatetime(clock.now())
    await stub.RecordApiTimings(monitoring_pb2.RecordApiTimingsRequest(timings=[after] * 7))
    await report(stub, "after-1", "error")
    await admin.ResolvePerformanceAlert(
        monitoring_pb2.ResolvePerformanceAlertRequest(alert_id="in-1"), metadata=auth
    )
    clock.advance(1)  # a window ending now holds what came before now

    week = await stub.GetServiceSummary(summary_request(week_end, WEEK))
    assert requests(week) == {ENDPOINT: in_week}
    (e,) = week.endpoints
    assert e.p99_ms > 5000.0 and e.p50_ms <= 10.0
    # critical: the rule alert opened and resolved, the client one of the week before resolved
    assert activity(week) == {"critical": (1, 2), "warning": (1, 0)}
    # open counts are the alerts open now, whatever the window
    assert (week.open_warning_alerts, week.open_error_alerts, week.open_critical_alerts) == (0, 1, 0)

    week_before = await stub.GetServiceSummary(summary_request(week_start, WEEK))
    assert requests(week_before) == {ENDPOINT: 100}
    assert activity(week_before) == {"critical": (1, 0)}

    latest = await stub.GetServiceSummary(summary_request(None, timedelta(hours=24)))
    assert requests(latest) == {OTHER: 7}
    assert activity(latest) == {"warning": (0, 1), "error": (1, 0)}
    # an end of now is the same window as no end
    same = await stub.GetServiceSummary(summary_request(clock.now(), timedelta(hours=24)))
    assert requests(same) == {OTHER: 7} and activity(same) == activity(latest)


async def test_the_end_must_be_a_past_moment_within_the_retention(
    start_monitoring: StartMonitoring, connect: Connect
) -> None:
    clock = ManualClock(datetime.now(UTC))
    app = await start_monitoring(clock)
    stub = connect(app)
    now = clock.now()
    bad = [
        summary_request(now + timedelta(hours=1), WEEK),
        summary_request(now - timedelta(days=25), WEEK),  # starts 32 days ago; rollups keep 30
    ]
    epoch = monitoring_pb2.GetServiceSummaryRequest()
    epoch.end.SetInParent()
    huge = monitoring_pb2.GetServiceSummaryRequest()
    huge.end.seconds = 2**62
    for request in (*bad, epoch, huge):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetServiceSummary(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in bad_request_violations(info.value)] == ["end"]
    # the oldest week the retention still holds whole is answered
    await stub.GetServiceSummary(summary_request(now - timedelta(days=23), WEEK))


def test_rollups_are_kept_long_enough_for_the_previous_iso_week() -> None:
    assert monitoring_app.MonitoringSettings.model_fields["monitoring_rollup_retention_days"].default >= 15
    with pytest.raises(ValueError, match="monitoring_rollup_retention_days"):
        monitoring_app.MonitoringSettings(monitoring_rollup_retention_days=14)
