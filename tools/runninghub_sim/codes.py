"""RunningHub's business codes and the reply envelope every endpoint answers with.

Every documented reply is HTTP 200 with `{"code": int, "msg": str, "data": any}`;
`code` 0 is success. The messages are RunningHub's enum names as its
documentation and public clients show them.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

OK = 0
PARAMS_INVALID = 301
WORKFLOW_NOT_EXISTS = 380
TOKEN_INVALID = 412  # RunningHub answers it for a wrong URL path, despite the name
TASK_INSTANCE_MAXED = 415  # exclusive machines all busy
NOT_ENOUGH_WALLET = 416
TASK_QUEUE_MAXED = 421  # the key's concurrency limit
TASK_NOT_FOUND = 423
VALIDATE_PROMPT_FAILED = 433
SERVER_ERROR = 500
UNSUPPORTED_FREE_USER = 801
UNAUTHORIZED = 802
INVALID_NODE_INFO = 803
TASK_IS_RUNNING = 804
TASK_STATUS_ERROR = 805
USER_NOT_FOUND = 806
APIKEY_TASK_NOT_FOUND = 807
UPLOAD_FAILED = 808
FILE_SIZE_EXCEEDED = 809
WORKFLOW_NOT_SAVED = 810
TASK_IS_QUEUED = 813
PERSONAL_QUEUE_COUNT_LIMIT = 814
WEBAPP_NOT_EXISTS = 901

MESSAGES: dict[int, str] = {
    OK: "success",
    PARAMS_INVALID: "PARAMS_INVALID",
    WORKFLOW_NOT_EXISTS: "WORKFLOW_NOT_EXISTS",
    TOKEN_INVALID: "TOKEN_INVALID",
    TASK_INSTANCE_MAXED: "TASK_INSTANCE_MAXED",
    NOT_ENOUGH_WALLET: "TASK_CREATE_FAILED_BY_NOT_ENOUGH_WALLET",
    TASK_QUEUE_MAXED: "TASK_QUEUE_MAXED",
    TASK_NOT_FOUND: "TASK_NOT_FOUND",
    VALIDATE_PROMPT_FAILED: "VALIDATE_PROMPT_FAILED",
    SERVER_ERROR: "SERVER_ERROR",
    UNSUPPORTED_FREE_USER: "APIKEY_UNSUPPORTED_FREE_USER",
    UNAUTHORIZED: "APIKEY_UNAUTHORIZED",
    INVALID_NODE_INFO: "APIKEY_INVALID_NODE_INFO",
    TASK_IS_RUNNING: "APIKEY_TASK_IS_RUNNING",
    TASK_STATUS_ERROR: "APIKEY_TASK_STATUS_ERROR",
    USER_NOT_FOUND: "APIKEY_USER_NOT_FOUND",
    APIKEY_TASK_NOT_FOUND: "APIKEY_TASK_NOT_FOUND",
    UPLOAD_FAILED: "APIKEY_UPLOAD_FAILED",
    FILE_SIZE_EXCEEDED: "APIKEY_FILE_SIZE_EXCEEDED",
    WORKFLOW_NOT_SAVED: "WORKFLOW_NOT_SAVED_OR_NOT_RUNNING",
    TASK_IS_QUEUED: "APIKEY_TASK_IS_QUEUED",
    PERSONAL_QUEUE_COUNT_LIMIT: "PERSONAL_QUEUE_COUNT_LIMIT",
    WEBAPP_NOT_EXISTS: "WEBAPP_NOT_EXISTS",
}


def message(code: int) -> str:
    return MESSAGES.get(code, "ERROR")


def body(code: int, data: Any = None, msg: str | None = None) -> dict[str, Any]:
    return {"code": code, "msg": message(code) if msg is None else msg, "data": data}


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class Reply(Exception):
    """Raised by a handler to answer with a business code at once."""

    def __init__(self, code: int, data: Any = None, msg: str | None = None) -> None:
        super().__init__(message(code))
        self.code = code
        self.data = data
        self.msg = msg


SIM_CODE = web.ResponseKey("sim_code", int)


def envelope(code: int, data: Any = None, msg: str | None = None) -> web.Response:
    """The HTTP 200 reply; the business code travels inside."""
    response = web.Response(text=dumps(body(code, data, msg)), content_type="application/json")
    response[SIM_CODE] = code  # read by the counters middleware
    return response
