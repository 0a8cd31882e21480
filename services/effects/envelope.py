"""RunningHub's reply envelope `{"code", "msg", "data"}` and what each case means.

Pure functions, no I/O: the client hands them the bytes it received, the webhook
receiver the `eventData` string. Every case of the reference is covered: task ids
as numbers or strings, `promptTips.node_errors` on a create answered with code 0,
outputs states 804 / 813 / 805, code 0 with `null` data, outputs lagging behind
SUCCESS (an empty list), `taskCostTime` as a string or a number.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

# Task states as the public contract spells them.
QUEUED = "QUEUED"
RUNNING = "RUNNING"
SUCCEEDED = "SUCCEEDED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# Business codes whose meaning the service acts on.
OK = 0
SERVER_ERROR = 500
BACK_PRESSURE = {
    415: "exclusive machines busy",
    421: "concurrency limit reached",
    804: "a task is still running",
}
TASK_RUNNING = 804
TASK_FAILED = 805
TASK_NOT_FOUND = (807, 423)
TASK_QUEUED = 813
UPLOAD_FAILED = 808
# Creates refused for certain: nothing was created upstream.
CREATE_REFUSED = {
    301: "bad or missing parameter",
    380: "workflow not found (or wrong region)",
    412: "wrong URL path",
    416: "insufficient RunningHub balance",
    433: "workflow validation failed",
    801: "free RunningHub user",
    802: "RunningHub key invalid",
    803: "the parameters do not match the app",
    809: "file too large",
    810: "workflow never saved and run on the website",
    814: "personal queue full",
    901: "webapp not found (or wrong region)",
}
KNOWN_CODES = frozenset(
    {
        OK,
        SERVER_ERROR,
        TASK_FAILED,
        TASK_QUEUED,
        UPLOAD_FAILED,
        *BACK_PRESSURE,
        *TASK_NOT_FOUND,
        *CREATE_REFUSED,
    }
)


class EnvelopeError(ValueError):
    """The reply is not an envelope (not JSON, not an object, no integer code)."""


@dataclass(frozen=True)
class Envelope:
    code: int
    msg: str
    data: Any


@dataclass(frozen=True)
class Output:
    url: str
    file_type: str
    node_id: str


@dataclass(frozen=True)
class Failure:
    node_name: str = ""
    exception_type: str = ""
    message: str = ""


@dataclass(frozen=True)
class TaskState:
    """What one outputs reply (or a webhook's eventData) says about a task.

    `status` is None when RunningHub does not know the task (807 / 423).
    """

    status: str | None
    outputs: tuple[Output, ...] = ()
    failure: Failure | None = None
    cost_seconds: float | None = None
    cost_coins: str | None = None
    # True when RunningHub answered SUCCESS without the outputs yet (a lag).
    lagging: bool = field(default=False)


@dataclass(frozen=True)
class Created:
    task_id: str
    status: str  # QUEUED, RUNNING or FAILED
    failure: Failure | None = None


def parse(raw: bytes | str) -> Envelope:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # RecursionError: hostile nesting
        raise EnvelopeError("reply is not JSON") from exc
    return from_object(body)


def from_object(body: Any) -> Envelope:
    if not isinstance(body, dict):
        raise EnvelopeError("reply is not a JSON object")
    code = body.get("code")
    if isinstance(code, bool) or not isinstance(code, int):
        if isinstance(code, str) and code.strip().lstrip("-").isdigit():
            code = int(code)
        else:
            raise EnvelopeError("reply has no integer code")
    msg = body.get("msg")
    return Envelope(code=code, msg=msg if isinstance(msg, str) else "", data=body.get("data"))


def task_id(value: Any) -> str:
    """A RunningHub id as a string, whether it came as a JSON string or number."""
    if isinstance(value, bool):
        raise EnvelopeError("task id is not a number or string")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # precision may already be lost; RunningHub sends ints as such
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 32:
        return value.strip()
    raise EnvelopeError("task id is not a number or string")


def _text(value: Any, limit: int = 2000) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text.replace("\x00", "")[:limit]


def _json_maybe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def node_errors_failure(prompt_tips: Any) -> Failure | None:
    """A failure when `promptTips` (a JSON string) carries non-empty `node_errors`."""
    tips = _json_maybe(prompt_tips)
    if not isinstance(tips, dict):
        return None
    errors = tips.get("node_errors")
    if not errors:
        return None
    node_name, message = "", ""
    if isinstance(errors, dict):
        node_id, detail = next(iter(errors.items()))
        node_name = str(node_id)
        if isinstance(detail, dict):
            node_name = _text(detail.get("class_type") or node_id, 200)
            inner = detail.get("errors")
            if isinstance(inner, list) and inner and isinstance(inner[0], dict):
                message = _text(inner[0].get("message") or inner[0].get("details"))
    error = tips.get("error")
    if not message and isinstance(error, dict):
        message = _text(error.get("message"))
    return Failure(
        node_name=node_name,
        exception_type="validation",
        message=message or "RunningHub refused the workflow's inputs",
    )


def created(env: Envelope) -> Created:
    """The task a successful create (code 0) made. Raises EnvelopeError without a task id."""
    data = env.data if isinstance(env.data, dict) else None
    if data is None or data.get("taskId") is None:
        raise EnvelopeError("create reply without taskId")
    tid = task_id(data["taskId"])
    failure = node_errors_failure(data.get("promptTips"))
    raw_status = str(data.get("taskStatus") or "").upper()
    if failure is not None or raw_status == "FAILED":
        return Created(tid, FAILED, failure or Failure(message="RunningHub failed the task at once"))
    return Created(tid, RUNNING if raw_status == "RUNNING" else QUEUED)


def _seconds(value: Any) -> float | None:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and 0 <= seconds < 10**9 else None


def failure_of(data: Any) -> Failure:
    reason = _json_maybe(data.get("failedReason")) if isinstance(data, dict) else None
    if isinstance(reason, dict):
        return Failure(
            node_name=_text(reason.get("node_name") or reason.get("node_id"), 200),
            exception_type=_text(reason.get("exception_type"), 200),
            message=_text(reason.get("exception_message")) or "the task failed on RunningHub",
        )
    if isinstance(reason, str) and reason:
        return Failure(message=_text(reason))
    return Failure(message="the task failed on RunningHub")


def task_state(env: Envelope) -> TaskState:
    """The task's state from an outputs reply. Raises EnvelopeError for a code
    that says nothing about the task (the caller reports it as an upstream error)."""
    if env.code == OK:
        items = env.data
        if isinstance(items, list) and items:
            outputs: list[Output] = []
            cost: float | None = None
            coins: str | None = None
            for item in items:
                if not isinstance(item, dict):
                    continue
                url = _text(item.get("fileUrl"), 4000)
                if url:
                    outputs.append(
                        Output(url, _text(item.get("fileType"), 40), _text(item.get("nodeId"), 100))
                    )
                seconds = _seconds(item.get("taskCostTime"))
                if seconds is not None:
                    cost = max(cost or 0.0, seconds)
                if coins is None and item.get("consumeCoins") not in (None, ""):
                    coins = _text(item.get("consumeCoins"), 40)
            if outputs:
                return TaskState(SUCCEEDED, tuple(outputs), cost_seconds=cost, cost_coins=coins)
            return TaskState(RUNNING, lagging=True)
        if isinstance(items, list):
            return TaskState(RUNNING, lagging=True)  # SUCCESS seen, outputs not listed yet
        return TaskState(RUNNING)  # code 0 with null data: still running
    if env.code == TASK_RUNNING:
        return TaskState(RUNNING)
    if env.code == TASK_QUEUED:
        return TaskState(QUEUED)
    if env.code == TASK_FAILED:
        data = env.data if isinstance(env.data, dict) else {}
        return TaskState(FAILED, failure=failure_of(data), cost_seconds=_seconds(data.get("taskCostTime")))
    if env.code in TASK_NOT_FOUND:
        return TaskState(None)
    raise EnvelopeError(f"outputs answered code {env.code}")


def webhook_event(body: bytes) -> tuple[str, Envelope]:
    """(RunningHub task id, the outputs envelope) of a TASK_END callback.

    `eventData` is the outputs reply as a JSON string: parsed a second time.
    """
    try:
        outer = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise EnvelopeError("webhook body is not JSON") from exc
    if not isinstance(outer, dict):
        raise EnvelopeError("webhook body is not a JSON object")
    if outer.get("event") not in (None, "TASK_END"):
        raise EnvelopeError("webhook event is not TASK_END")
    tid = task_id(outer.get("taskId"))
    event_data = outer.get("eventData")
    if isinstance(event_data, str):
        try:
            event_data = json.loads(event_data)
        except (ValueError, RecursionError) as exc:
            raise EnvelopeError("eventData is not JSON") from exc
    return tid, from_object(event_data)
