"""Accounts (one per API key) and tasks, whose state follows from the clock.

A task is QUEUED until `started_at`, RUNNING until `ended_at`, then SUCCESS or
FAILED; a successful task's outputs appear at `outputs_at` (after a lag). State
is computed when asked, so a thousand pollers cost nothing but a dict lookup.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

QUEUED, RUNNING, SUCCESS, FAILED = "QUEUED", "RUNNING", "SUCCESS", "FAILED"


def key_id(key: str) -> str:
    """What logs and counters show instead of a key."""
    return "k-" + hashlib.sha256(key.encode()).hexdigest()[:10]


@dataclass
class Account:
    key: str
    api_type: str = "NORMAL"  # NORMAL, SHARED, EXCLUSIVE
    concurrency: int = 50
    coins: int = 1_000_000
    valid: bool = True
    free_user: bool = False
    busy_code: int = 421  # answered on create at the concurrency limit (421, 804 or 415)
    personal_queue_limit: int = 1000

    def to_json(self) -> dict[str, Any]:
        return {
            "keyId": key_id(self.key),
            "apiType": self.api_type,
            "concurrency": self.concurrency,
            "coins": self.coins,
            "valid": self.valid,
            "freeUser": self.free_user,
            "busyCode": self.busy_code,
        }


@dataclass
class Task:
    task_id: str
    key: str
    app_id: str
    kind: str  # "webapp" or "workflow"
    created_at: float
    started_at: float
    ended_at: float
    outputs_at: float
    outcome: str
    coins: int
    output_nodes: tuple[tuple[str, str], ...]
    files_base: str
    webhook_url: str | None
    prompt_tips: str
    values: dict[str, Any]
    client_id: str = field(default_factory=lambda: secrets.token_hex(16))
    failed_reason: dict[str, Any] | None = None
    validation_failed: bool = False
    cancelled: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def status(self, now: float) -> str:
        if self.validation_failed or now >= self.ended_at:
            return self.outcome
        return RUNNING if now >= self.started_at else QUEUED

    def active(self, now: float) -> bool:
        return self.status(now) in (QUEUED, RUNNING)

    def done_at(self) -> float:
        """When TASK_END is due: outputs ready, or the failure."""
        return self.outputs_at if self.outcome == SUCCESS else self.ended_at

    def cost_seconds(self) -> int:
        return max(0, round(self.ended_at - self.started_at))

    def outputs(self, cost_as_number: bool = False) -> list[dict[str, Any]]:
        cost: int | str = self.cost_seconds() if cost_as_number else str(self.cost_seconds())
        return [
            {
                "fileUrl": f"{self.files_base}/__sim/files/output/{self.task_id}_{node}.{ext}",
                "fileType": ext,
                "taskCostTime": cost,
                "nodeId": node,
                "thirdPartyConsumeMoney": None,
                "consumeMoney": None,
                "consumeCoins": str(self.coins),
            }
            for node, ext in self.output_nodes
        ]

    def finish(self, now: float, outcome: str, lag: float, reason: dict[str, Any] | None) -> None:
        """End the task now (a cancel, or a test finishing it early)."""
        self.started_at = min(self.started_at, now)
        self.ended_at = now
        self.outputs_at = now + lag
        self.outcome = outcome
        self.failed_reason = reason if outcome == FAILED else None
        self.changed.set()

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "taskId": self.task_id,
            "keyId": key_id(self.key),
            "appId": self.app_id,
            "kind": self.kind,
            "status": self.status(now),
            "outcome": self.outcome,
            "outputsReady": self.status(now) == SUCCESS and now >= self.outputs_at,
            "cancelled": self.cancelled,
            "validationFailed": self.validation_failed,
            "webhookUrl": self.webhook_url,
            "values": self.values,
        }


def failure_reason(node_id: str, node_name: str, exc_type: str, message: str) -> dict[str, Any]:
    return {
        "current_outputs": "{}",
        "exception_type": exc_type,
        "node_name": node_name,
        "current_inputs": "{}",
        "traceback": '["  File \\"/workspace/ComfyUI/execution.py\\", line 496, in execute\\n"]',
        "node_id": node_id,
        "exception_message": message,
    }


class TaskIds:
    """19-digit ids, increasing, unique within the simulator."""

    def __init__(self, rand: Callable[[int], int]) -> None:
        self._rand = rand
        self._next = 1_904_000_000_000_000_000 + rand(10**16)

    def next(self) -> str:
        self._next += 1 + self._rand(4096)
        return str(self._next)
