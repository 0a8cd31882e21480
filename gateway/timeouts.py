"""How long each edge waits for each RPC: one table for the local edge and Envoy's routes
(tests/gateway/test_route_parity.py checks gateway/envoy.yaml against it).

A 504 tells a client to retry, so the deadline is the longest a healthy call may take plus
a margin, not a round 60 s for everything: an ingest call that has not answered in 10 s is
stuck behind a failing database, while starting an effect task waits for RunningHub (the
effects service gives it up to 45 s) and an upload streams up to 30 MiB to it."""

from __future__ import annotations

# The effects service's own limit for one RunningHub call.
RUNNINGHUB_SECONDS = 45.0
RUNNINGHUB_MARGIN_SECONDS = 15.0

DEFAULT_SECONDS = 15.0
INGEST_SECONDS = 10.0
REPORT_SECONDS = 30.0
RUNNINGHUB_CALL_SECONDS = RUNNINGHUB_SECONDS + RUNNINGHUB_MARGIN_SECONDS

# Keyed by the gRPC path; methods not listed get DEFAULT_SECONDS.
TIMEOUTS: dict[str, float] = {
    # Ingest: group-committed, answered after COMMIT; 503/504 mean "re-send".
    "/cosnap.analytics.v1.AnalyticsService/RecordEvents": INGEST_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/RecordPerformanceMetrics": INGEST_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/RecordFunnelSteps": INGEST_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/RecordRevenue": INGEST_SECONDS,
    "/cosnap.monitoring.v1.MonitoringService/ReportPerformanceAlerts": INGEST_SECONDS,
    # Reports computed over up to 30 days of rollups when the cache is cold.
    "/cosnap.analytics.v1.AnalyticsService/GetFunnelReport": REPORT_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/GetPerformanceDashboard": REPORT_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/GetEngagementReport": REPORT_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/GetUserEngagement": REPORT_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/GetRevenueAttribution": REPORT_SECONDS,
    "/cosnap.analytics.v1.AnalyticsService/ListWeeklyReports": REPORT_SECONDS,
    # A past week's report is drawn on demand the first time (charts in a worker thread).
    "/cosnap.analytics.v1.AnalyticsService/GetWeeklyReport": 60.0,
    # Calls that wait for RunningHub.
    "/cosnap.effects.v1.EffectsService/UploadInput": RUNNINGHUB_CALL_SECONDS,
    "/cosnap.effects.v1.EffectsService/CreateTask": RUNNINGHUB_CALL_SECONDS,
    "/cosnap.effects.v1.EffectsService/CancelTask": RUNNINGHUB_CALL_SECONDS,
    "/cosnap.effects.v1.EffectsService/GetTask": RUNNINGHUB_CALL_SECONDS,
    "/cosnap.effects.v1.EffectsService/ListEffects": RUNNINGHUB_CALL_SECONDS,
    "/cosnap.effects.v1.EffectsService/GetEffect": RUNNINGHUB_CALL_SECONDS,
}


def timeout_for(grpc_path: str, server_streaming: bool = False) -> float | None:
    """Seconds the edge waits for the whole call; None for a server stream (no deadline:
    it ends when the client goes away)."""
    if server_streaming:
        return None
    return TIMEOUTS.get(grpc_path, DEFAULT_SECONDS)
