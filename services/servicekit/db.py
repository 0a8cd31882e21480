"""PostgreSQL through an asyncpg pool: one schema per service, ordered migrations.

Migrations are the `NNNN_name.sql` files of a service's `migrations/` folder,
applied in order, each in its own transaction, under an advisory lock keyed by
the schema, so concurrent replicas (or a Kubernetes Job) never apply one twice.
SQL uses unqualified names: the pool's `search_path` is the service's schema.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = logging.getLogger(__name__)

# A plain connection or one acquired from a pool: every helper here takes either.
Connection: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
CONNECT_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    TimeoutError,
)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path) -> list[Migration]:
    migrations = []
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise ValueError(f"migration file name must look like 0001_name.sql: {path}")
        migrations.append(Migration(int(match[1]), match[2], path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {folder}")
    return migrations


def check_schema_name(schema: str) -> str:
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"invalid schema name {schema!r}")
    return schema


async def create_pool(
    dsn: str, schema: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 30.0
) -> asyncpg.Pool:
    """Open a pool whose connections use `schema`, retrying with backoff for
    up to `connect_timeout` seconds while PostgreSQL is unreachable."""
    check_schema_name(schema)
    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(CONNECT_ERRORS),
        wait=wait_exponential(multiplier=0.2, max=3),
        stop=stop_after_delay(connect_timeout),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "postgres unreachable, retrying",
            extra={"attempt": rs.attempt_number, "error": str(rs.outcome and rs.outcome.exception())},
        ),
    ):
        with attempt:
            return await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                server_settings={"search_path": f'"{schema}",public', "application_name": schema},
                command_timeout=60,
            )
    raise AssertionError("unreachable")


async def migrate(conn: Connection, schema: str, migrations: list[Migration]) -> list[int]:
    """Apply the pending migrations to `schema`; returns the versions applied."""
    check_schema_name(schema)
    lock_key = int.from_bytes(hashlib.sha256(f"migrate:{schema}".encode()).digest()[:8], "big", signed=True)
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", lock_key)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        rows = await conn.fetch(f'SELECT version, checksum FROM "{schema}".schema_migrations')
        done = {r["version"]: r["checksum"] for r in rows}
        for m in migrations:
            if m.version in done:
                if done[m.version] != m.checksum:
                    raise RuntimeError(f"migration {m.version:04d}_{m.name} was changed after it was applied")
                continue
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}", public')
                await conn.execute(m.sql)
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations (version, name, checksum) VALUES ($1, $2, $3)',
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied_now.append(m.version)
            log.info(
                "migration applied",
                extra={"schema": schema, "version": m.version, "migration": m.name},
            )
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)
    return applied_now


async def migrate_dsn(dsn: str, schema: str, folder: Path, connect_timeout: float = 30.0) -> list[int]:
    """Migrate over a single connection (the `migrate` command, a Kubernetes Job)."""
    pool = await create_pool(dsn, schema, min_size=1, max_size=1, connect_timeout=connect_timeout)
    try:
        async with pool.acquire() as conn:
            return await migrate(conn, schema, load_migrations(folder))
    finally:
        await pool.close()


async def ping(pool: asyncpg.Pool, timeout: float = 2.0) -> None:
    """Raise unless PostgreSQL answers within `timeout` seconds."""
    async with pool.acquire(timeout=timeout) as conn:
        await conn.fetchval("SELECT 1", timeout=timeout)
