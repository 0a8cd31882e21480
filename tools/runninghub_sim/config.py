"""The simulator's tunables: timings of the task lifecycle, quirk rates, webhooks, keys.

Changeable at run time through `PUT /__sim/config` (camelCase keys) or the handle.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class SimConfig:
    queue_seconds: float = 2.0  # QUEUED for this long after create
    run_seconds: float = 8.0  # then RUNNING for this long
    outputs_lag_seconds: float = 2.0  # after SUCCESS, /outputs answers code 0 with null data this long
    fail_rate: float = 0.0  # share of tasks that end FAILED (805 with failedReason)
    numeric_id_rate: float = 0.1  # share of create replies whose taskId is a JSON number
    running_null_rate: float = 0.2  # share of /outputs calls on a running task answered code 0, data null
    webhook_retries: int = 3  # further attempts after a failed delivery
    webhook_retry_delay_seconds: float = 2.0  # doubled after each failed attempt
    webhook_timeout_seconds: float = 5.0
    webhook_duplicate_rate: float = 0.0  # share of deliveries sent twice
    webhook_on_validation_failure: bool = False  # a task refused by validation never ran: no TASK_END
    allow_external_webhooks: bool = False  # only loopback webhook URLs unless set
    default_concurrency: int = 50  # keys registered on first use (enterprise-like)
    default_coins: int = 1_000_000
    open_keys: bool = True  # any well-formed key is accepted and registered on first use
    max_upload_bytes: int = 30 * 1024 * 1024
    hang_seconds: float = 600.0  # how long an injected timeout holds the connection
    seed: int = 0

    @classmethod
    def fast(cls, **overrides: Any) -> SimConfig:
        """Timings for tests: a task is done in well under a second."""
        base = cls(
            queue_seconds=0.05,
            run_seconds=0.15,
            outputs_lag_seconds=0.05,
            webhook_retry_delay_seconds=0.05,
            webhook_timeout_seconds=2.0,
        )
        return base.updated(overrides)

    def updated(self, changes: dict[str, Any]) -> SimConfig:
        """A copy with `changes` applied (snake_case or camelCase keys), validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        values = dataclasses.asdict(self)
        for raw_key, value in changes.items():
            key = _snake(raw_key)
            if key not in fields:
                raise ValueError(f"unknown config field {raw_key!r}")
            kind = type(values[key])
            if kind is bool:
                if not isinstance(value, bool):
                    raise ValueError(f"{raw_key} must be a boolean")
            elif kind is int:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(f"{raw_key} must be an integer")
                if value < 0:
                    raise ValueError(f"{raw_key} must not be negative")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise ValueError(f"{raw_key} must be a finite number")
                if value < 0 or (key.endswith("_rate") and value > 1):
                    raise ValueError(f"{raw_key} out of range")
                value = float(value)
            values[key] = value
        return SimConfig(**values)

    def to_json(self) -> dict[str, Any]:
        return {_camel(k): v for k, v in dataclasses.asdict(self).items()}


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)
