"""Task rows in PostgreSQL, and their public shape (the Task message).

Every state change is a conditional UPDATE (`WHERE status IN open states`), so a
late poll, a replayed webhook or a racing replica can never move a task that has
ended, and the first writer of a final state wins.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from cosnap.effects.v1 import effects_pb2

from .envelope import FINAL_STATES, Failure, TaskState

COLUMNS = (
    "task_id, owner, request_id, effect_id, region, status, create_state, rh_task_id, outputs,"
    " failure, cost_seconds, cost_coins, created_at, updated_at, checked_at"
)
OPEN = "status IN ('QUEUED', 'RUNNING')"


@dataclass(frozen=True)
class TaskRow:
    task_id: str
    owner: str
    request_id: str
    effect_id: str
    region: str
    status: str
    create_state: str
    rh_task_id: str | None
    outputs: list[dict[str, str]]
    failure: dict[str, str] | None
    cost_seconds: float | None
    cost_coins: str | None
    created_at: datetime
    updated_at: datetime
    checked_at: datetime  # when RunningHub was last asked about it (or the create answered)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    @classmethod
    def of(cls, record: asyncpg.Record) -> TaskRow:
        failure = record["failure"]
        return cls(
            task_id=str(record["task_id"]),
            owner=record["owner"],
            request_id=record["request_id"],
            effect_id=record["effect_id"],
            region=record["region"],
            status=record["status"],
            create_state=record["create_state"],
            rh_task_id=record["rh_task_id"],
            outputs=json.loads(record["outputs"]),
            failure=json.loads(failure) if failure is not None else None,
            cost_seconds=record["cost_seconds"],
            cost_coins=record["cost_coins"],
            created_at=record["created_at"],
            updated_at=record["updated_at"],
            checked_at=record["checked_at"],
        )

    def to_proto(self) -> effects_pb2.Task:
        task = effects_pb2.Task(
            task_id=self.task_id,
            effect_id=self.effect_id,
            region=self.region,
            status=self.status,
            request_id=self.request_id,
            cost_seconds=self.cost_seconds or 0.0,
        )
        task.created_at.FromDatetime(self.created_at)
        task.updated_at.FromDatetime(self.updated_at)
        for out in self.outputs:
            task.outputs.add(url=out["url"], file_type=out["fileType"], node_id=out["nodeId"])
        if self.failure:
            task.failure.node_name = self.failure.get("nodeName", "")
            task.failure.exception_type = self.failure.get("exceptionType", "")
            task.failure.message = self.failure.get("message", "")
        return task


def failure_json(failure: Failure) -> str:
    return json.dumps(
        {"nodeName": failure.node_name, "exceptionType": failure.exception_type, "message": failure.message}
    )


def parse_task_id(text: str) -> uuid.UUID | None:
    if len(text) > 64:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _inserted_row(record: asyncpg.Record | None, task_id: uuid.UUID) -> TaskRow:
    """The row this request inserted: only its own create path deletes it, so a
    missing row is a broken invariant, not a state to serve."""
    if record is None:
        raise LookupError(f"task {task_id} vanished while being created")
    return TaskRow.of(record)


class TaskStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def get(self, task_id: uuid.UUID) -> TaskRow | None:
        record = await self._pool.fetchrow(f"SELECT {COLUMNS} FROM tasks WHERE task_id = $1", task_id)
        return TaskRow.of(record) if record is not None else None

    async def by_request(self, owner: str, request_id: str) -> TaskRow | None:
        record = await self._pool.fetchrow(
            f"SELECT {COLUMNS} FROM tasks WHERE owner = $1 AND request_id = $2", owner, request_id
        )
        return TaskRow.of(record) if record is not None else None

    async def insert(
        self,
        task_id: uuid.UUID,
        owner: str,
        request_id: str,
        effect_id: str,
        region: str,
        webapp_id: str,
        instance_type: str,
        node_info: list[dict[str, str]],
    ) -> bool:
        """Insert-first: False when (owner, request_id) already has a row."""
        inserted = await self._pool.fetchval(
            "INSERT INTO tasks (task_id, owner, request_id, effect_id, region, webapp_id, instance_type,"
            " node_info, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, 'QUEUED')"
            " ON CONFLICT (owner, request_id) DO NOTHING RETURNING true",
            task_id,
            owner,
            request_id,
            effect_id,
            region,
            webapp_id,
            instance_type,
            json.dumps(node_info),
        )
        return bool(inserted)

    async def delete_pending(self, task_id: uuid.UUID) -> None:
        """Forget a row whose create surely made no task (so its requestId may be sent again)."""
        await self._pool.execute(
            "DELETE FROM tasks WHERE task_id = $1 AND create_state = 'pending' AND rh_task_id IS NULL",
            task_id,
        )

    async def created(
        self, task_id: uuid.UUID, rh_task_id: str, status: str, failure: Failure | None
    ) -> TaskRow:
        """RunningHub made the task: keep its id; a webhook that came first wins the status."""
        record = await self._pool.fetchrow(
            "UPDATE tasks SET rh_task_id = $2, create_state = 'done', checked_at = now(),"
            f" status = CASE WHEN {OPEN} THEN $3 ELSE status END,"
            f" failure = CASE WHEN {OPEN} AND $3 = 'FAILED' THEN $4::jsonb ELSE failure END,"
            f" ended_at = CASE WHEN {OPEN} AND $3 = 'FAILED' THEN now() ELSE ended_at END,"
            f" updated_at = CASE WHEN {OPEN} AND status <> $3 THEN now() ELSE updated_at END"
            f" WHERE task_id = $1 RETURNING {COLUMNS}",
            task_id,
            rh_task_id,
            status,
            failure_json(failure) if failure else None,
        )
        return _inserted_row(record, task_id)

    async def mark_ambiguous(self, task_id: uuid.UUID) -> TaskRow:
        record = await self._pool.fetchrow(
            f"UPDATE tasks SET create_state = 'ambiguous' WHERE task_id = $1 RETURNING {COLUMNS}", task_id
        )
        return _inserted_row(record, task_id)

    async def adopt(self, task_id: uuid.UUID, rh_task_id: str) -> bool:
        """Attach the RunningHub id a confirmed webhook revealed (ambiguous or racing create)."""
        try:
            done = await self._pool.fetchval(
                "UPDATE tasks SET rh_task_id = $2, create_state = 'done'"
                " WHERE task_id = $1 AND rh_task_id IS NULL RETURNING true",
                task_id,
                rh_task_id,
            )
        except asyncpg.UniqueViolationError:
            return False  # that RunningHub task belongs to another row
        return bool(done)

    async def apply(self, task_id: uuid.UUID, state: TaskState) -> tuple[TaskRow | None, bool]:
        """Record what RunningHub said; (the row, whether it just ended)."""
        status = state.status
        if status in FINAL_STATES:
            # A failure after the user asked to cancel is the cancel (RunningHub reports
            # an interrupted task as failed).
            record = await self._pool.fetchrow(
                "UPDATE tasks SET status = CASE WHEN $2 = 'FAILED' AND cancel_requested_at IS NOT NULL"
                " THEN 'CANCELLED' ELSE $2 END,"
                " outputs = $3::jsonb, failure = CASE WHEN cancel_requested_at IS NULL THEN $4::jsonb END,"
                " cost_seconds = $5, cost_coins = $6, ended_at = now(), updated_at = now(), checked_at = now()"
                f" WHERE task_id = $1 AND {OPEN} RETURNING {COLUMNS}",
                task_id,
                status,
                json.dumps(
                    [{"url": o.url, "fileType": o.file_type, "nodeId": o.node_id} for o in state.outputs]
                ),
                failure_json(state.failure) if state.failure else None,
                state.cost_seconds,
                state.cost_coins,
            )
            if record is not None:
                return TaskRow.of(record), True
        elif status is not None:
            record = await self._pool.fetchrow(
                "UPDATE tasks SET status = $2, checked_at = now(),"
                " updated_at = CASE WHEN status <> $2 THEN now() ELSE updated_at END"
                f" WHERE task_id = $1 AND {OPEN} RETURNING {COLUMNS}",
                task_id,
                status,
            )
            if record is not None:
                return TaskRow.of(record), False
        return await self.get(task_id), False

    async def request_cancel(self, task_id: uuid.UUID, requested: bool) -> None:
        """Record (or withdraw) a user's cancel of an open task, before RunningHub hears of it."""
        await self._pool.execute(
            f"UPDATE tasks SET cancel_requested_at = CASE WHEN $2 THEN now() END WHERE task_id = $1 AND {OPEN}",
            task_id,
            requested,
        )

    async def end(
        self, task_id: uuid.UUID, status: str, failure: Failure | None
    ) -> tuple[TaskRow | None, bool]:
        """End an open task locally (cancelled, or failed for want of word)."""
        record = await self._pool.fetchrow(
            "UPDATE tasks SET status = $2, failure = $3::jsonb, ended_at = now(), updated_at = now()"
            f" WHERE task_id = $1 AND {OPEN} RETURNING {COLUMNS}",
            task_id,
            status,
            failure_json(failure) if failure else None,
        )
        if record is not None:
            return TaskRow.of(record), True
        return await self.get(task_id), False

    async def unconfirmed(self, older_than_seconds: float) -> list[uuid.UUID]:
        """Open tasks whose create never produced a RunningHub id in time."""
        rows = await self._pool.fetch(
            f"SELECT task_id FROM tasks WHERE {OPEN} AND rh_task_id IS NULL"
            " AND created_at < now() - make_interval(secs => $1) LIMIT 500",
            older_than_seconds,
        )
        return [r["task_id"] for r in rows]

    async def unchecked(self, older_than_seconds: float, limit: int = 100) -> list[uuid.UUID]:
        """Open tasks with a RunningHub id nobody asked about lately (lost webhooks, no pollers)."""
        rows = await self._pool.fetch(
            f"SELECT task_id FROM tasks WHERE {OPEN} AND rh_task_id IS NOT NULL"
            " AND checked_at < now() - make_interval(secs => $1) ORDER BY checked_at LIMIT $2",
            older_than_seconds,
            limit,
        )
        return [r["task_id"] for r in rows]

    async def node_info(self, task_id: uuid.UUID) -> dict[str, Any]:
        record = await self._pool.fetchrow(
            "SELECT webapp_id, instance_type, node_info FROM tasks WHERE task_id = $1", task_id
        )
        assert record is not None
        return {
            "webapp_id": record["webapp_id"],
            "instance_type": record["instance_type"],
            "node_info": json.loads(record["node_info"]),
        }
