"""Daily range partitions of the raw tables, and retention.

Partitions `events_pYYYYMMDD`, `metrics_pYYYYMMDD` and `funnel_steps_pYYYYMMDD`
(UTC days) are created for [today - retention, today + days_ahead] at start-up
and hourly after that; partitions lying entirely before the retention cutoff
are dropped (cheap, unlike DELETE), and key-table and rollup rows older than
the start of the hour holding the cutoff are deleted (whole hours: the hourly
rollups stay the sums of the 5-minute ones). Each pass runs in one transaction
under an advisory lock keyed by the schema, so replicas never race; creating
what already exists is a no-op, so every replica may run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from services.servicekit.db import Connection, check_schema_name

log = logging.getLogger(__name__)

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
    ("rollup_sessions", "hour_start"),
    ("rollup_funnel", "bucket_start"),
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR = timedelta(hours=1)
_SUFFIX = re.compile(r"^(?P<parent>[a-z_]+)_p(?P<day>\d{8})$")


def partition_name(parent: str, day: date) -> str:
    return f"{parent}_p{day:%Y%m%d}"


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass
class MaintenanceResult:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    deleted_rows: int = 0


class PartitionMaintainer:
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
        self._pool = pool
        self.schema = check_schema_name(schema)
        self.retention_days = retention_days
        self.days_ahead = days_ahead
        self.interval_seconds = interval_seconds
        self.lock_timeout_ms = int(lock_timeout_seconds * 1000)
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"analytics-partitions:{schema}".encode()).digest()[:8], "big", signed=True
        )

    def cutoff(self, now: datetime) -> datetime:
        """Rows before this instant are past the retention."""
        return now - timedelta(days=self.retention_days)

    def aged_cutoff(self, now: datetime) -> datetime:
        """Key and rollup rows before this instant (the start of the hour holding the cutoff) go."""
        return _EPOCH + (self.cutoff(now) - _EPOCH) // _HOUR * _HOUR

    async def run_once(self, now: datetime | None = None, *, retire: bool = True) -> MaintenanceResult:
        """Create the partitions due; with `retire`, drop and delete what the retention expired."""
        now = now or datetime.now(UTC)
        cutoff = self.cutoff(now)
        first, last = cutoff.date(), now.date() + timedelta(days=self.days_ahead)
        wanted = [first + timedelta(days=i) for i in range((last - first).days + 1)]
        result = MaintenanceResult()
        q = f'"{self.schema}"'
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = {self.lock_timeout_ms}")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self._lock_key)
            existing = await self._partitions(conn)
            # Parents in a fixed order (the order flushes touch them in).
            for parent in PARTITIONED:
                days = existing.get(parent, {})
                for day in wanted:
                    if day in days:
                        continue
                    name = partition_name(parent, day)
                    await conn.execute(
                        f'CREATE TABLE IF NOT EXISTS {q}."{name}" PARTITION OF {q}."{parent}" '
                        f"FOR VALUES FROM ('{_midnight(day).isoformat()}') "
                        f"TO ('{_midnight(day + timedelta(days=1)).isoformat()}')"
                    )
                    result.created.append(name)
                if not retire:
                    continue
                for day, name in sorted(days.items()):
                    if _midnight(day + timedelta(days=1)) <= cutoff:
                        await conn.execute(f'DROP TABLE IF EXISTS {q}."{name}"')
                        result.dropped.append(name)
            if retire:
                aged = self.aged_cutoff(now)
                for table, column in AGED_TABLES:
                    status = await conn.execute(f'DELETE FROM {q}."{table}" WHERE {column} < $1', aged)
                    result.deleted_rows += int(status.rsplit(" ", 1)[-1])
        if result.created or result.dropped or result.deleted_rows:
            log.info(
                "partition maintenance",
                extra={
                    "partitions_created": len(result.created),
                    "partitions_dropped": result.dropped,
                    "deleted_rows": result.deleted_rows,
                },
            )
        return result

    async def ensure(self) -> MaintenanceResult:
        """Create missing partitions only (the committer's answer to a row without one)."""
        return await self.run_once(retire=False)

    async def _partitions(self, conn: Connection) -> dict[str, dict[date, str]]:
        rows = await conn.fetch(
            """
            SELECT parent.relname AS parent, child.relname AS child
            FROM pg_inherits i
            JOIN pg_class child ON child.oid = i.inhrelid
            JOIN pg_class parent ON parent.oid = i.inhparent
            JOIN pg_namespace n ON n.oid = parent.relnamespace
            WHERE n.nspname = $1 AND parent.relname = ANY($2::text[]) AND child.relkind = 'r'
            """,
            self.schema,
            list(PARTITIONED),
        )
        out: dict[str, dict[date, str]] = {}
        for row in rows:
            match = _SUFFIX.match(row["child"])
            if match is None or match["parent"] != row["parent"]:
                continue  # not ours (a default partition, a hand-made one): left alone
            day = datetime.strptime(match["day"], "%Y%m%d").date()
            out.setdefault(row["parent"], {})[day] = row["child"]
        return out

    async def run_forever(self) -> None:
        """Hourly passes (the first one ran at start-up); errors are logged and retried sooner."""
        delay = self.interval_seconds
        while True:
            await asyncio.sleep(delay)
            try:
                await self.run_once()
                delay = self.interval_seconds
            except Exception as exc:
                log.error("partition maintenance failed", extra={"error": repr(exc)})
                delay = min(60.0, self.interval_seconds)
