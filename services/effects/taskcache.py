"""What the task cache holds for GetTask: the task's owner (checked on every
poll), its state, the reply ready to send, and until when that state needs no
word from RunningHub.

A poll is answered from the cache alone: an open task whose state is due for a
refresh is still answered at once, and the refresh runs in the background (one
per task and interval across replicas, by the Redis lease in taskrefresh.py), so
no poll waits on RunningHub, the database or the lease. The cached state is kept
for `HOLD_INTERVALS` refresh intervals, so a task polled now and then stays
cached between refreshes.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from cosnap.effects.v1 import effects_pb2

from .envelope import FINAL_STATES, RUNNING
from .taskstore import TaskRow

HOLD_INTERVALS = 10


@dataclass(frozen=True)
class CachedTask:
    owner: str
    status: str
    body: bytes  # the Task message
    # Unix time after which an open task's state is refreshed; 0 for an ended task.
    fresh_until: float = 0.0
    # The GetTask reply, built once per cached value (never mutated: gRPC only serializes it).
    reply: effects_pb2.GetTaskResponse = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        reply = effects_pb2.GetTaskResponse(task=effects_pb2.Task.FromString(self.body))
        object.__setattr__(self, "reply", reply)

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATES

    def due(self, now: float) -> bool:
        """An open task whose state should be asked about again."""
        return not self.final and now >= self.fresh_until


def refresh_interval(status: str, queued: float, running: float) -> float:
    return running if status == RUNNING else queued


def cached(row: TaskRow, interval: float) -> CachedTask:
    """The row's state, fresh for `interval` after RunningHub was last asked about it."""
    fresh_until = 0.0 if row.final else row.checked_at.timestamp() + interval
    return CachedTask(row.owner, row.status, row.to_proto().SerializeToString(), fresh_until)


def _dump(value: CachedTask) -> bytes:
    return json.dumps(
        {
            "o": value.owner,
            "s": value.status,
            "t": base64.b64encode(value.body).decode(),
            "f": value.fresh_until,
        }
    ).encode()


def _load(raw: bytes) -> CachedTask:
    data = json.loads(raw)
    # A value written before "f" existed is due at once (refreshed on its first poll).
    return CachedTask(data["o"], data["s"], base64.b64decode(data["t"]), float(data.get("f", 0.0)))


TASK_CACHE_OPTIONS: dict[str, Any] = {"serializer": _dump, "deserializer": _load}
