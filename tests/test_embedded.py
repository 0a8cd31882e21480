"""`make test` on a machine with nothing on 127.0.0.1:5432 / 6379 runs against the
embedded servers `make up` uses; where something listens (CI), it is used as is."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.support import free_port, resolve_database_url, resolve_redis_url
from tools import embedded


@pytest.fixture
def folder() -> Iterator[Path]:
    """Outside pytest's private (0700) tmp tree: as root, PostgreSQL runs as an
    unprivileged user, which must reach the folder."""
    path = Path(tempfile.mkdtemp(prefix="cosnap-embedded-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def owned() -> Iterator[list[embedded.Started]]:
    started: list[embedded.Started] = []
    yield started
    for server in started:
        embedded.stop(server)


def test_a_configured_url_is_used_as_is(folder: Path, owned: list[embedded.Started]) -> None:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    assert resolve_database_url("postgresql://elsewhere/x", url, folder, owned) == "postgresql://elsewhere/x"
    assert resolve_redis_url("redis://elsewhere:1/0", "redis://127.0.0.1:1/0", folder, owned) == (
        "redis://elsewhere:1/0"
    )
    assert owned == [] and list(folder.iterdir()) == []


def test_a_listening_default_is_used_as_is(folder: Path, owned: list[embedded.Started]) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        database = f"postgresql://postgres@127.0.0.1:{port}/test"
        assert resolve_database_url(None, database, folder, owned) == database
        assert resolve_redis_url(None, f"redis://127.0.0.1:{port}/0", folder, owned) == (
            f"redis://127.0.0.1:{port}/0"
        )
    assert owned == []


async def test_nothing_listening_starts_the_embedded_servers(
    folder: Path, owned: list[embedded.Started]
) -> None:
    port = free_port()  # nothing listens there
    database = resolve_database_url(None, f"postgresql://postgres@127.0.0.1:{port}/test", folder, owned)
    cache = resolve_redis_url(None, f"redis://127.0.0.1:{port}/0", folder, owned)
    assert len(owned) == 2
    assert f"host={folder / 'pgdata'}" in database
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT current_database()") == "test"
        await conn.execute("CREATE TABLE kept (n int)")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(cache)
    try:
        await client.set("kept", "1")
    finally:
        await client.aclose()
    for server in owned:
        embedded.stop(server)
        assert server.process.returncode is not None
    owned.clear()

    # A second run finds the data of the first (no second initdb, the snapshot reloaded).
    assert (
        resolve_database_url(None, f"postgresql://postgres@127.0.0.1:{port}/test", folder, owned) == database
    )
    cache_again = resolve_redis_url(None, f"redis://127.0.0.1:{port}/0", folder, owned)
    conn = await asyncpg.connect(database)
    try:
        assert await conn.fetchval("SELECT count(*) FROM kept") == 0
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(cache_again)
    try:
        assert await client.get("kept") == b"1"
    finally:
        await client.aclose()
    assert not (folder / "pgdata.init").exists()
