"""Daily range partitions of the analytics raw tables, and retention.

Partitions `events_pYYYYMMDD`, `metrics_pYYYYMMDD` and `funnel_steps_pYYYYMMDD`
(UTC days) are created for [today - retention, today + days_ahead] at start-up
and hourly after that; partitions lying entirely before the retention cutoff
are dropped (cheap, unlike DELETE), and key-table and rollup rows older than
the start of the hour holding the cutoff are deleted (whole hours: the hourly
rollups stay the sums of the 5-minute ones). The mechanics (one transaction
under an advisory lock per pass, safe with every replica running it) are the
kit's `DailyPartitions`.
"""

from __future__ import annotations

import asyncpg

from services.servicekit.partitions import DailyPartitions, MaintenanceResult, partition_name

__all__ = ["AGED_TABLES", "PARTITIONED", "MaintenanceResult", "PartitionMaintainer", "partition_name"]

PARTITIONED = ("events", "metrics", "funnel_steps")
# (table, timestamp column) whose rows older than the start of the hour holding
# the cutoff are deleted: whole hours, so that the 5-minute and the hourly rollups
# lose the same hours (an hour's row stays the sum of its 5-minute rows), and a
# metric's key lives as long as its rollup contribution (a later report moves it).
AGED_TABLES = (
    ("event_keys", "occurred_at"),
    ("step_keys", "occurred_at"),
    ("metric_keys", "occurred_at"),
    ("rollup_metric_bins", "bucket_start"),
    ("rollup_metric_bins_hourly", "hour_start"),
    ("rollup_metrics", "bucket_start"),
    ("rollup_events", "bucket_start"),
    ("rollup_events_hourly", "hour_start"),
    ("rollup_sessions", "hour_start"),
    ("rollup_funnel", "bucket_start"),
    ("rollup_funnel_hourly", "hour_start"),
)


class PartitionMaintainer(DailyPartitions):
    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        retention_days: int,
        days_ahead: int,
        interval_seconds: float = 3600.0,
        lock_timeout_seconds: float = 10.0,
    ) -> None:
        super().__init__(
            pool,
            schema,
            parents=PARTITIONED,
            aged_tables=AGED_TABLES,
            lock_name="analytics-partitions",
            retention_days=retention_days,
            days_ahead=days_ahead,
            interval_seconds=interval_seconds,
            lock_timeout_seconds=lock_timeout_seconds,
        )
