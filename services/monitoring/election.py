"""Leader election through PostgreSQL: the leader is the replica holding a
session-level advisory lock on a connection of its own.

The lock lives as long as that connection: when the leader's process dies
(or its connection is cut) PostgreSQL drops the session and releases the
lock, and the next replica to try takes it, within one evaluation interval.
The leader does its writes on the same connection, so a leader that lost
its connection cannot write anything after its successor took over. TCP
keepalives make PostgreSQL notice a silently vanished peer within ~15 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging

import asyncpg
from prometheus_client import Gauge

from services.servicekit.db import check_schema_name

log = logging.getLogger(__name__)

IS_LEADER = Gauge("monitoring_leader", "1 while this replica evaluates the alert rules.")


class Election:
    def __init__(
        self, dsn: str, schema: str, name: str = "monitoring-rules", connect_timeout: float = 5.0
    ) -> None:
        self._dsn = dsn
        self._schema = check_schema_name(schema)
        self._timeout = connect_timeout
        self.key = int.from_bytes(
            hashlib.sha256(f"{name}:{schema}".encode()).digest()[:8], "big", signed=True
        )
        self.conn: asyncpg.Connection | None = None

    @property
    def leading(self) -> bool:
        return self.conn is not None and not self.conn.is_closed()

    async def try_lead(self) -> bool:
        """Take the lock if it is free; True while this replica holds it."""
        if self.leading:
            return True
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self._timeout,
            server_settings={
                "search_path": f'"{self._schema}",public',
                "application_name": f"{self._schema}-leader",
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "3",
            },
        )
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key, timeout=self._timeout)
        except BaseException:
            conn.terminate()
            raise
        if not got:
            await conn.close()
            return False
        self.conn = conn
        IS_LEADER.set(1)
        log.info("leading alert evaluation")
        return True

    def lose(self) -> None:
        """Give up after an error on the connection (the lock goes with it)."""
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None
            IS_LEADER.set(0)
            log.warning("no longer leading alert evaluation")

    async def resign(self) -> None:
        """Release the lock at shutdown, so another replica takes over at once."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.execute("SELECT pg_advisory_unlock($1)", self.key)
                await self.conn.close(timeout=2)
            self.lose()
