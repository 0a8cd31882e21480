"""The writer: one flush is one transaction; the optimistic policy; poison isolation.

A flush first tries the optimistic statements (every id new) for events,
metrics and steps. When an id of one kind existed already, that kind is redone
with ON CONFLICT, and so is that kind in its next ``PESSIMISTIC_FLUSHES``
flushes: a client re-sending batches, or web-vitals re-reporting CLS, then
costs ON CONFLICT's price, not a failed attempt per flush.

Within one flush the same key twice is deduplicated in Python (the row
contract says how): the first wins, except where the latest value wins
(metrics: a superseded report counts as accepted, an identical one as a
duplicate).

Poison isolation: validation should refuse everything PostgreSQL cannot store,
but when a flush fails for a *data* error anyway (the database refused a
value: SQLSTATE classes 22, 23 and 54, or a value the driver cannot encode),
the flush is split in halves and each half written on its own, recursively,
so that only the request(s) holding the bad data get an error (INVALID_ARGUMENT:
re-sending it cannot help) and every other request commits. A lost
connection, a shutdown, anything else fails the whole flush with UNAVAILABLE
(the client re-sends; the ids make that safe) and, being one transaction,
leaves nothing behind.

Retried in a fresh transaction: deadlocks and serialization failures between
replicas, and a row for a partition that does not exist yet (created first).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeAlias

import asyncpg
import grpc
from asyncpg.pool import PoolConnectionProxy
from prometheus_client import Counter, Histogram

from services.servicekit.errors import ServiceError, unavailable

from . import sql
from .batcher import Request
from .rows import CONTRACTS, Kind

log = logging.getLogger(__name__)

FLUSHES = Counter("analytics_ingest_flushes", "Group-commit flushes, by result.", ["result"])
FLUSH_ROWS = Histogram(
    "analytics_ingest_flush_rows",
    "Rows per group-commit flush.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
)
FLUSH_SECONDS = Histogram(
    "analytics_ingest_flush_seconds",
    "Duration of a group-commit flush (COPY to COMMIT).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
ROWS_STORED = Counter("analytics_ingest_rows", "Ingested items, by kind and outcome.", ["kind", "outcome"])
REJECTED = Counter(
    "analytics_ingest_rejected_requests", "Requests whose data the database refused (isolated).", ["kind"]
)

_RETRYABLE = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
_DATA_SQLSTATE_CLASSES = ("22", "23", "54")  # data exception, integrity, program limit exceeded

Records = dict[Kind, list[tuple[Any, ...]]]
# A pool connection, held across flushes.
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def is_data_error(exc: BaseException) -> bool:
    """The database (or the driver, encoding a value) refused the data itself."""
    if isinstance(exc, asyncpg.PostgresError):
        state = getattr(exc, "sqlstate", None) or ""
        return state[:2] in _DATA_SQLSTATE_CLASSES and not isinstance(exc, asyncpg.UniqueViolationError)
    if isinstance(exc, asyncpg.InterfaceError | OSError):
        # Lost connections and a closed pool are not data; the driver's own DataError
        # (a value its codec cannot encode) is a ValueError too.
        return isinstance(exc, ValueError)
    return isinstance(exc, ValueError | TypeError | OverflowError | UnicodeError)


def refused(kind: Kind) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"the database refused this batch of {CONTRACTS[kind].label}: it holds a value that cannot be stored",
    )


class _KeyConflict(Exception):
    """An optimistic statement met an id that exists (or is being inserted) already."""

    def __init__(self, kind: Kind) -> None:
        super().__init__(kind)
        self.kind = kind


def _one_tuple(microseconds: int) -> tuple[int]:
    return (microseconds,)


def _first(value: tuple[int]) -> int:
    return value[0]


def dedupe(batch: list[Request]) -> tuple[Records, dict[int, int]]:
    """Rows to COPY per kind, each tagged with its request's seq, and per seq the rows
    accepted in Python (a metric report superseded by a later one in the same flush)."""
    records: Records = {}
    superseded: dict[int, int] = {}
    seen_once: dict[Kind, set[Any]] = {}
    latest: dict[Kind, dict[Any, tuple[int, int]]] = {}  # key -> (index in out, seq)
    for request in batch:
        contract = CONTRACTS[request.kind]
        seq = request.seq
        out = records.setdefault(request.kind, [])
        if not contract.last_wins:
            seen = seen_once.setdefault(request.kind, set())
            if len(contract.key) == 1:
                k = contract.index(contract.key[0])
                for row in request.rows:
                    key = row[k]
                    if key not in seen:
                        seen.add(key)
                        out.append((seq, *row))
            else:
                for row in request.rows:
                    key = contract.key_of(row)
                    if key not in seen:
                        seen.add(key)
                        out.append((seq, *row))
            continue
        assert contract.compare is not None
        compare = contract.index(contract.compare)
        where = latest.setdefault(request.kind, {})
        for row in request.rows:
            key = contract.key_of(row)
            found = where.get(key)
            if found is None:
                where[key] = (len(out), seq)
                out.append((seq, *row))
                continue
            index, earlier_seq = found
            previous = out[index]
            if previous[1 + compare] != row[compare]:  # a new value: the last report wins
                superseded[earlier_seq] = superseded.get(earlier_seq, 0) + 1
                out[index] = ()  # dropped below
                where[key] = (len(out), seq)
                out.append((seq, *row))
    for kind, rows in records.items():
        if CONTRACTS[kind].last_wins:
            records[kind] = [r for r in rows if r]
    return records, superseded


class Writer:
    PESSIMISTIC_FLUSHES = 16

    def __init__(
        self, pool: asyncpg.Pool, ensure_partitions: Callable[[], Awaitable[Any]] | None = None
    ) -> None:
        self._pool = pool
        self._ensure_partitions = ensure_partitions
        self._idle: list[Connection] = []  # prepared connections, not in use
        # Per prepared connection (by id, dropped on release): the kinds whose staging table
        # it has. A table is created the first time a flush on that connection holds its
        # kind: at every COMMIT, PostgreSQL truncates every ON COMMIT DELETE ROWS table of
        # the session, used or not (about 0.2 ms of its CPU per table on this machine).
        self._staged: dict[int, set[Kind]] = {}
        self._pessimistic = dict.fromkeys(Kind, 0)  # per kind, flushes left that start with ON CONFLICT
        # Counters for tests and the benchmark.
        self.flushes = 0
        self.failed_flushes = 0
        self.isolating_flushes = 0  # flushes split to find a request with refused data
        self.rows_flushed = 0
        self.optimistic_fallbacks = 0  # flushes redone with ON CONFLICT (an id existed already)
        self.connections_prepared = 0  # pool connections given staging tables and the codec

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._release(conn)

    # -- a flush ----------------------------------------------------------------------------
    async def write(self, batch: list[Request]) -> None:
        """Write the batch and settle every request's future."""
        started = time.perf_counter()
        try:
            accepted = await self._commit(batch)
        except Exception as exc:
            if is_data_error(exc):
                await self._isolate(batch, exc)
                return
            self.failed_flushes += 1
            FLUSHES.labels("error").inc()
            log.error(
                "flush failed",
                extra={"requests": len(batch), "error": repr(exc)},
                exc_info=not isinstance(exc, asyncpg.PostgresError | OSError | asyncpg.InterfaceError),
            )
            error = exc if isinstance(exc, ServiceError) else unavailable("could not store the batch")
            for request in batch:
                request.fail(error)
            return
        total = 0
        for request in batch:
            n = len(request.rows)
            total += n
            ok = accepted.get(request.seq, 0)
            label = CONTRACTS[request.kind].label
            ROWS_STORED.labels(label, "accepted").inc(ok)
            ROWS_STORED.labels(label, "duplicate").inc(n - ok)
            request.answer(ok)
        self.flushes += 1
        self.rows_flushed += total
        FLUSHES.labels("ok").inc()
        FLUSH_ROWS.observe(total)
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def _isolate(self, batch: list[Request], exc: BaseException) -> None:
        if len(batch) == 1:
            request = batch[0]
            FLUSHES.labels("refused").inc()
            REJECTED.labels(CONTRACTS[request.kind].label).inc()
            log.warning(
                "the database refused a request's data",
                extra={"kind": CONTRACTS[request.kind].label, "rows": len(request.rows), "error": repr(exc)},
            )
            request.fail(refused(request.kind))
            return
        self.isolating_flushes += 1
        middle = len(batch) // 2
        await self.write(batch[:middle])
        await self.write(batch[middle:])

    async def _commit(self, batch: list[Request]) -> dict[int, int]:
        """The batch in one transaction, retried as needed; {seq: accepted}."""
        records, accepted = dedupe(batch)
        optimistic: set[Kind] = set()
        for kind in records:
            if kind not in sql.OPTIMISTIC_SQL:
                continue
            if self._pessimistic[kind]:
                self._pessimistic[kind] -= 1
            else:
                optimistic.add(kind)
        retries = 0
        while True:
            try:
                stored = await self._write(records, optimistic)
                break
            except _KeyConflict as conflict:
                # One of the ids exists already (a re-sent item), or another transaction
                # inserted it meanwhile: redo that kind with ON CONFLICT (at most once per kind).
                optimistic.discard(conflict.kind)
                self._pessimistic[conflict.kind] = self.PESSIMISTIC_FLUSHES
                self.optimistic_fallbacks += 1
            except _RETRYABLE:
                retries += 1
                if retries > 2:
                    raise
            except asyncpg.CheckViolationError as exc:
                # "no partition of relation ... found for row": create, then retry.
                if retries >= 2 or self._ensure_partitions is None or "partition" not in str(exc):
                    raise
                retries += 1
                log.warning("row outside the existing partitions; creating partitions")
                await self._ensure_partitions()
        for seq, n in stored.items():
            accepted[seq] = accepted.get(seq, 0) + n
        return accepted

    # -- connections ------------------------------------------------------------------------
    async def _connection(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.is_closed():
                return conn
            await self._release(conn)
        conn = await self._pool.acquire()
        try:
            await conn.execute(sql.SESSION_SETUP)
            # Rows carry timestamps as PostgreSQL's int64 microseconds (validation.py): COPY
            # writes them as they are, about 0.7 us less per timestamp than from a datetime.
            await conn.set_type_codec(
                "timestamptz", schema="pg_catalog", encoder=_one_tuple, decoder=_first, format="tuple"
            )
        except BaseException:
            await self._release(conn)
            raise
        self.connections_prepared += 1
        self._staged[id(conn)] = set()
        return conn

    async def _stage_tables(self, conn: Connection, kinds: Iterable[Kind]) -> None:
        """The staging tables of `kinds` on `conn`, created outside any transaction (a
        rolled-back CREATE would leave the bookkeeping wrong)."""
        staged = self._staged[id(conn)]
        missing = [kind for kind in kinds if kind not in staged]
        if missing:
            await conn.execute("\n".join(CONTRACTS[kind].staging_ddl() for kind in missing))
            staged.update(missing)

    async def _release(self, conn: Connection) -> None:
        """Back to the pool with the default timestamptz codec, or closed."""
        self._staged.pop(id(conn), None)
        try:
            await conn.reset_type_codec("timestamptz", schema="pg_catalog")
        except Exception:
            conn.terminate()  # never lend our codec to the pool's other users
        with contextlib.suppress(Exception):
            await self._pool.release(conn, timeout=5)

    async def _write(self, records: Records, optimistic: set[Kind]) -> dict[int, int]:
        """One transaction: stage, deduplicate, store, roll up; {seq: accepted}."""
        conn = await self._connection()
        try:
            await self._stage_tables(conn, records)
            accepted = await self._transaction(conn, records, optimistic)
        except (_KeyConflict, asyncpg.PostgresError) as exc:
            if isinstance(exc, _KeyConflict) or is_data_error(exc) or isinstance(exc, _RETRYABLE):
                self._idle.append(conn)  # the server rolled the transaction back: the connection is fine
            else:
                await self._release(conn)
            raise
        except BaseException:
            # The connection may be broken: give it back to the pool, which resets or drops it.
            await self._release(conn)
            raise
        self._idle.append(conn)
        return accepted

    async def _transaction(self, conn: Connection, records: Records, optimistic: set[Kind]) -> dict[int, int]:
        accepted: dict[int, int] = {}
        async with conn.transaction():
            for kind in Kind:  # the same table order in every flush
                rows = records.get(kind)
                if not rows:
                    continue
                contract = CONTRACTS[kind]
                await conn.copy_records_to_table(
                    contract.stage, records=rows, columns=contract.copy_columns, schema_name="pg_temp"
                )
                if kind in optimistic:
                    try:
                        await conn.execute(sql.OPTIMISTIC_SQL[kind])
                    except asyncpg.UniqueViolationError as exc:
                        raise _KeyConflict(kind) from exc
                    for row in rows:  # all new: every staged row is accepted
                        accepted[row[0]] = accepted.get(row[0], 0) + 1
                    continue
                if kind is Kind.METRICS:
                    status = await conn.execute(sql.METRICS_NEW_SQL)
                    if int(status.rsplit(" ", 1)[-1]) < len(rows):
                        await conn.execute(sql.METRICS_OLD_SQL)
                    await conn.execute(sql.METRICS_JOIN_BY_INDEX)
                for seq, n in await conn.fetch(sql.CONFLICT_SQL[kind], len(rows)):
                    accepted[seq] = accepted.get(seq, 0) + n
                if kind is Kind.METRICS:
                    await conn.execute(sql.METRICS_JOIN_DEFAULT)
        return accepted
