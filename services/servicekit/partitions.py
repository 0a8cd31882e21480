"""Daily range partitions of a service's raw tables, and retention.

A service names its partitioned parents (range-partitioned on a timestamp)
and the plain tables whose old rows are deleted; `DailyPartitions` creates
`<parent>_pYYYYMMDD` partitions (UTC days) for [today - retention, today +
days_ahead] at start-up and every `interval_seconds` after that, drops the
partitions lying entirely before the retention cutoff (cheap, unlike DELETE)
and deletes aged rows older than the start of the hour holding the aged
cutoff (whole hours, so hourly and finer rollups lose the same hours). Each
pass runs in one transaction under an advisory lock keyed by `lock_name` and
the schema, so replicas never race; creating what already exists is a no-op,
so every replica may run it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import asyncpg

from .db import Connection, check_schema_name

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HOUR = timedelta(hours=1)
_SUFFIX = re.compile(r"^(?P<parent>[a-z_]+)_p(?P<day>\d{8})$")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def partition_name(parent: str, day: date) -> str:
    return f"{parent}_p{day:%Y%m%d}"


def midnight(day: date) -> datetime:
    """The start of a UTC day (where its partition begins)."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


@dataclass
class MaintenanceResult:
    created: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    deleted_rows: int = 0


class DailyPartitions:
    """Partition maintenance of one schema.

    Args:
        parents: the partitioned tables, in the order writers touch them.
        aged_tables: (table, timestamp column) pairs whose old rows are deleted.
        lock_name: names the advisory lock (with the schema).
        retention_days: raw partitions wholly before now - retention are dropped.
        aged_retention_days: the retention of `aged_tables` (default: `retention_days`).
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        schema: str,
        *,
        parents: Sequence[str],
        aged_tables: Sequence[tuple[str, str]],
        lock_name: str,
        retention_days: int,
        days_ahead: int,
        aged_retention_days: int | None = None,
        interval_seconds: float = 3600.0,
        lock_timeout_seconds: float = 10.0,
    ) -> None:
        for name in [*parents, *(t for pair in aged_tables for t in pair)]:
            if not _IDENT.match(name):
                raise ValueError(f"invalid table or column name {name!r}")
        self._pool = pool
        self.schema = check_schema_name(schema)
        self.parents = tuple(parents)
        self.aged_tables = tuple(aged_tables)
        self.retention_days = retention_days
        self.aged_retention_days = retention_days if aged_retention_days is None else aged_retention_days
        self.days_ahead = days_ahead
        self.interval_seconds = interval_seconds
        self.lock_timeout_ms = int(lock_timeout_seconds * 1000)
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"{lock_name}:{schema}".encode()).digest()[:8], "big", signed=True
        )

    def cutoff(self, now: datetime) -> datetime:
        """Raw rows before this instant are past the retention."""
        return now - timedelta(days=self.retention_days)

    def aged_cutoff(self, now: datetime) -> datetime:
        """Aged rows before this instant (the start of the hour holding the aged cutoff) go."""
        cutoff = now - timedelta(days=self.aged_retention_days)
        return _EPOCH + (cutoff - _EPOCH) // _HOUR * _HOUR

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
            for parent in self.parents:
                days = existing.get(parent, {})
                for day in wanted:
                    if day in days:
                        continue
                    name = partition_name(parent, day)
                    await conn.execute(
                        f'CREATE TABLE IF NOT EXISTS {q}."{name}" PARTITION OF {q}."{parent}" '
                        f"FOR VALUES FROM ('{midnight(day).isoformat()}') "
                        f"TO ('{midnight(day + timedelta(days=1)).isoformat()}')"
                    )
                    result.created.append(name)
                if not retire:
                    continue
                for day, name in sorted(days.items()):
                    if midnight(day + timedelta(days=1)) <= cutoff:
                        await conn.execute(f'DROP TABLE IF EXISTS {q}."{name}"')
                        result.dropped.append(name)
            if retire:
                aged = self.aged_cutoff(now)
                for table, column in self.aged_tables:
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
        """Create missing partitions only (a writer's answer to a row without one)."""
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
            list(self.parents),
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
        """Passes every `interval_seconds` (the first one ran at start-up); errors are logged and retried sooner."""
        delay = self.interval_seconds
        while True:
            await asyncio.sleep(delay)
            try:
                await self.run_once()
                delay = self.interval_seconds
            except Exception as exc:
                log.error("partition maintenance failed", extra={"schema": self.schema, "error": repr(exc)})
                delay = min(60.0, self.interval_seconds)
