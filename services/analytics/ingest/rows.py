"""The row contract of every kind of ingested item: one column list per kind.

Validation builds each item's row as a tuple in exactly this order; the writer
COPYs it under these column names (behind the request's ``seq``); the staging
tables are created from the same list. Code that reads a row field does it by
name through :meth:`RowContract.index`, never by a bare position.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

Row = tuple[Any, ...]


class Kind(enum.IntEnum):
    """Kinds of items; a flush writes them in this order (the same table order in every flush)."""

    EVENTS = 0
    METRICS = 1
    STEPS = 2
    REVENUE = 3
    TASK_ENDS = 4


@dataclass(frozen=True)
class Column:
    name: str
    sql: str  # the staging column's type (and collation)


@dataclass(frozen=True)
class RowContract:
    kind: Kind
    label: str  # metrics label and log name
    stage: str  # the per-connection temporary staging table
    columns: tuple[Column, ...]  # what validation produces, in order
    key: tuple[str, ...]  # the idempotency key
    last_wins: bool = False  # a later report of the same key replaces the value (metrics)
    compare: str | None = None  # with last_wins: the column that tells a new value from a repeat
    staging_only: str = ""  # extra staging columns the SQL fills, after the row's
    names: tuple[str, ...] = field(init=False)
    copy_columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(c.name for c in self.columns)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "copy_columns", ("seq", *names))

    def index(self, name: str) -> int:
        """Position of a column in a row as validation builds it."""
        return self.names.index(name)

    def key_of(self, row: Row) -> Any:
        """The row's idempotency key (a value, or a tuple for several columns)."""
        if len(self.key) == 1:
            return row[self.index(self.key[0])]
        return tuple(row[self.index(k)] for k in self.key)

    def as_dict(self, row: Row) -> dict[str, Any]:
        """A row by column name (tests, logs)."""
        return dict(zip(self.names, row, strict=True))

    def staging_ddl(self) -> str:
        """CREATE TEMP TABLE for this kind: seq, the row's columns, the SQL's own columns."""
        columns = ["seq bigint NOT NULL", *(f"{c.name} {c.sql}" for c in self.columns)]
        columns.append("received_at timestamptz NOT NULL DEFAULT now()")
        if self.staging_only:
            columns.append(self.staging_only)
        body = ",\n    ".join(columns)
        return f"CREATE TEMP TABLE IF NOT EXISTS {self.stage} (\n    {body}\n) ON COMMIT DELETE ROWS;"


# occurred_at is PostgreSQL's own timestamp representation, int64 microseconds since
# 2000-01-01 UTC (validation.PG_EPOCH_SECONDS): the writer's connections COPY it as is.
# received_at is the flush's transaction time, filled in by PostgreSQL.
_ID = 'text COLLATE "C" NOT NULL'
_TS = "timestamptz NOT NULL"

EVENTS = RowContract(
    Kind.EVENTS,
    "events",
    "stage_events",
    (
        Column("event_id", _ID),
        Column("session_id", _ID),
        Column("user_id", "text"),
        Column("event_type", "text NOT NULL"),
        Column("page", "text"),
        Column("properties", "jsonb"),
        Column("occurred_at", _TS),
    ),
    key=("event_id",),
)

METRICS = RowContract(
    Kind.METRICS,
    "metrics",
    "stage_metrics",
    (
        Column("name", _ID),
        Column("metric_id", _ID),
        Column("session_id", "text NOT NULL"),
        Column("user_id", "text"),
        Column("value", "double precision NOT NULL"),
        Column("delta", "double precision NOT NULL"),
        Column("rating", "text"),
        Column("navigation_type", "text"),
        Column("page", "text"),
        Column("attributes", "jsonb"),
        Column("occurred_at", _TS),
        Column("bin", "integer NOT NULL"),
    ),
    key=("name", "metric_id"),
    last_wins=True,
    compare="value",
    # Filled by the ON CONFLICT path: is the key new, did its value change, and where the
    # old value's rollup contribution sits.
    staging_only=(
        "is_new boolean NOT NULL DEFAULT false, changed boolean NOT NULL DEFAULT false,\n"
        "    old_occurred_at timestamptz, old_value double precision, old_page text, old_bin integer,\n"
        "    old_rating text"
    ),
)

STEPS = RowContract(
    Kind.STEPS,
    "steps",
    "stage_steps",
    (
        Column("step_id", _ID),
        Column("session_id", _ID),
        Column("user_id", "text"),
        Column("step", "smallint NOT NULL"),
        Column("effect_id", "text"),
        Column("properties", "jsonb"),
        Column("occurred_at", _TS),
    ),
    key=("step_id",),
)

REVENUE = RowContract(
    Kind.REVENUE,
    "revenue",
    "stage_revenue",
    (
        Column("order_id", _ID),
        Column("user_id", "text NOT NULL"),
        Column("session_id", "text"),
        Column("amount", "numeric NOT NULL"),  # a Decimal at the currency's minor units
        Column("currency", "text NOT NULL"),
        Column("effect_id", "text"),
        Column("occurred_at", _TS),
    ),
    key=("order_id",),
)

TASK_ENDS = RowContract(
    Kind.TASK_ENDS,
    "task_ends",
    "stage_task_ends",
    (
        Column("task_id", _ID),
        Column("effect_id", "text NOT NULL"),
        Column("user_id", "text NOT NULL"),
        Column("status", "text NOT NULL"),
        Column("cost_seconds", "numeric NOT NULL"),  # a Decimal, milliseconds kept
        Column("cost_coins", "numeric"),  # a Decimal or None
        Column("region", "text"),
        Column("occurred_at", _TS),
    ),
    key=("task_id",),
)

CONTRACTS: dict[Kind, RowContract] = {c.kind: c for c in (EVENTS, METRICS, STEPS, REVENUE, TASK_ENDS)}
