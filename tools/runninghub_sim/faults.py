"""Fault injection: latency, HTTP 5xx, connection resets, hangs, scripted replies.

Rules apply per endpoint (short name, e.g. `ai-app/run`, or `*` for all). Each
fault can strike `before` the request is handled (nothing happened upstream) or
`after` (the work is done, e.g. the task exists, but the client never learns
it): the ambiguous failure a client must reconcile. A script gives the next N
replies of one endpoint exactly: an int is a business code, `http:503` an HTTP
status, `reset`, `hang`, or `ok` (handled normally).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Any

PHASES = ("before", "after", "random")


@dataclass
class FaultRule:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    error_status: int = 503
    reset_rate: float = 0.0
    timeout_rate: float = 0.0
    phase: str = "before"

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> FaultRule:
        rule = cls()
        names = {
            "latencyMs": "latency_ms",
            "jitterMs": "jitter_ms",
            "errorRate": "error_rate",
            "errorStatus": "error_status",
            "resetRate": "reset_rate",
            "timeoutRate": "timeout_rate",
            "phase": "phase",
        }
        for key, value in raw.items():
            if key == "endpoint":
                continue
            attr = names.get(key, key)
            if attr not in rule.__dict__:
                raise ValueError(f"unknown fault field {key!r}")
            if attr == "phase":
                if value not in PHASES:
                    raise ValueError(f"phase must be one of {PHASES}")
            elif attr == "error_status":
                if not isinstance(value, int) or isinstance(value, bool) or not 500 <= value <= 599:
                    raise ValueError("errorStatus must be a 5xx status")
            else:
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{key} must be a non-negative number")
                if attr.endswith("_rate") and value > 1:
                    raise ValueError(f"{key} must be at most 1")
                value = float(value)
            setattr(rule, attr, value)
        if rule.error_rate + rule.reset_rate + rule.timeout_rate > 1:
            raise ValueError("errorRate + resetRate + timeoutRate must be at most 1")
        return rule

    def to_json(self) -> dict[str, Any]:
        return {
            "latencyMs": self.latency_ms,
            "jitterMs": self.jitter_ms,
            "errorRate": self.error_rate,
            "errorStatus": self.error_status,
            "resetRate": self.reset_rate,
            "timeoutRate": self.timeout_rate,
            "phase": self.phase,
        }


@dataclass(frozen=True)
class Action:
    """What to do with one request: kind is ok, code, http, reset or hang."""

    kind: str = "ok"
    phase: str = "before"
    value: int = 0  # the business code or HTTP status
    delay: float = 0.0  # seconds of latency first


OK = Action()


def parse_step(step: Any) -> Action:
    if isinstance(step, int) and not isinstance(step, bool):
        return Action("code", value=step)
    if isinstance(step, str):
        head, _, tail = step.partition(":")
        phase = "before"
        if head in ("reset", "hang", "ok") or head.startswith("http"):
            if tail in ("before", "after") and not head.startswith("http"):
                phase = tail
            if head == "ok":
                return OK
            if head in ("reset", "hang"):
                return Action(head, phase=phase)
            status_text, _, maybe_phase = tail.partition(":")
            if status_text.isdigit() and 500 <= int(status_text) <= 599:
                if maybe_phase in ("before", "after"):
                    phase = maybe_phase
                return Action("http", phase=phase, value=int(status_text))
    raise ValueError(
        f"bad script step {step!r}: use a business code, 'ok', 'reset[:after]', 'hang[:after]' or 'http:5xx[:after]'"
    )


class Faults:
    def __init__(self, seed: int) -> None:
        self.rules: dict[str, FaultRule] = {}
        self.scripts: dict[str, deque[Action]] = {}
        self.rand = random.Random(seed)

    def reset(self, seed: int) -> None:
        self.rules.clear()
        self.scripts.clear()
        self.rand = random.Random(seed)

    def set_rule(self, endpoint: str, rule: FaultRule) -> None:
        self.rules[endpoint] = rule

    def script(self, endpoint: str, steps: list[Any]) -> None:
        actions = [parse_step(s) for s in steps]
        self.scripts.setdefault(endpoint, deque()).extend(actions)

    def decide(self, endpoint: str) -> Action:
        queue = self.scripts.get(endpoint)
        if queue:
            return queue.popleft()
        rule = self.rules.get(endpoint) or self.rules.get("*")
        if rule is None:
            return OK
        delay = (rule.latency_ms + self.rand.uniform(0, rule.jitter_ms)) / 1000.0
        phase = rule.phase if rule.phase != "random" else self.rand.choice(("before", "after"))
        roll = self.rand.random()
        if roll < rule.error_rate:
            return Action("http", phase, rule.error_status, delay)
        if roll < rule.error_rate + rule.reset_rate:
            return Action("reset", phase, 0, delay)
        if roll < rule.error_rate + rule.reset_rate + rule.timeout_rate:
            return Action("hang", phase, 0, delay)
        return Action("ok", "before", 0, delay)

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": {k: r.to_json() for k, r in self.rules.items()},
            "scripts": {k: len(v) for k, v in self.scripts.items() if v},
        }
