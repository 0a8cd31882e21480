"""Migrations: ordered, once each, safe under concurrency, tamper-evident."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from services.servicekit import db
from tests.support import DATABASE_URL


def write(folder: Path, name: str, sql: str) -> None:
    (folder / name).write_text(sql)


async def test_applies_in_order_once(tmp_path: Path, schema: str, admin_pg: asyncpg.Connection) -> None:
    write(tmp_path, "0002_add.sql", "ALTER TABLE items ADD COLUMN label text;")
    write(tmp_path, "0001_init.sql", "CREATE TABLE items (id int PRIMARY KEY);")
    assert await db.migrate_dsn(DATABASE_URL, schema, tmp_path) == [1, 2]
    assert await db.migrate_dsn(DATABASE_URL, schema, tmp_path) == []
    columns = await admin_pg.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'items'",
        schema,
    )
    assert {r["column_name"] for r in columns} == {"id", "label"}
    rows = await admin_pg.fetch(f'SELECT version, name FROM "{schema}".schema_migrations ORDER BY version')
    assert [(r["version"], r["name"]) for r in rows] == [(1, "init"), (2, "add")]


async def test_concurrent_migrations_apply_each_version_once(
    tmp_path: Path, schema: str, admin_pg: asyncpg.Connection
) -> None:
    # A non-idempotent migration: running it twice would fail or double the rows.
    write(tmp_path, "0001_init.sql", "CREATE TABLE counter (n int); INSERT INTO counter VALUES (1);")
    write(tmp_path, "0002_slow.sql", "SELECT pg_sleep(0.2); INSERT INTO counter VALUES (2);")
    results = await asyncio.gather(*(db.migrate_dsn(DATABASE_URL, schema, tmp_path) for _ in range(6)))
    assert sorted(v for r in results for v in r) == [1, 2]
    assert sorted(await admin_pg.fetch(f'SELECT n FROM "{schema}".counter')) == [(1,), (2,)]


async def test_failed_migration_leaves_nothing_half_applied(
    tmp_path: Path, schema: str, admin_pg: asyncpg.Connection
) -> None:
    write(tmp_path, "0001_init.sql", "CREATE TABLE a (id int);")
    write(tmp_path, "0002_broken.sql", "CREATE TABLE b (id int); SELECT no_such_function();")
    with pytest.raises(asyncpg.UndefinedFunctionError):
        await db.migrate_dsn(DATABASE_URL, schema, tmp_path)
    tables = await admin_pg.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    assert {r["tablename"] for r in tables} == {"a", "schema_migrations"}
    versions = await admin_pg.fetch(f'SELECT version FROM "{schema}".schema_migrations')
    assert [r["version"] for r in versions] == [1]


async def test_changed_migration_is_refused(tmp_path: Path, schema: str) -> None:
    write(tmp_path, "0001_init.sql", "CREATE TABLE a (id int);")
    await db.migrate_dsn(DATABASE_URL, schema, tmp_path)
    write(tmp_path, "0001_init.sql", "CREATE TABLE a (id bigint);")
    with pytest.raises(RuntimeError, match="changed after it was applied"):
        await db.migrate_dsn(DATABASE_URL, schema, tmp_path)


def test_bad_file_names_and_duplicate_versions_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "init.sql", "SELECT 1;")
    with pytest.raises(ValueError, match=r"0001_name\.sql"):
        db.load_migrations(tmp_path)
    (tmp_path / "init.sql").unlink()
    write(tmp_path, "0001_a.sql", "SELECT 1;")
    write(tmp_path, "0001_b.sql", "SELECT 1;")
    with pytest.raises(ValueError, match="duplicate"):
        db.load_migrations(tmp_path)


def test_schema_names_are_checked() -> None:
    with pytest.raises(ValueError):
        db.check_schema_name('bad"; DROP SCHEMA public; --')
