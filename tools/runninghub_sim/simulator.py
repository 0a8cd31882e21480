"""One simulated RunningHub site (cn or global): keys, uploads, tasks, counters.

The HTTP layer (`api.py`, `control.py`) is thin; everything a test may want to
steer or read lives here, so the in-process handle and `/__sim/` share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections import Counter, deque
from typing import Any

from tools.runninghub_sim import codes
from tools.runninghub_sim.codes import Reply, dumps
from tools.runninghub_sim.config import SimConfig
from tools.runninghub_sim.faults import Faults
from tools.runninghub_sim.fixtures import WEBAPPS, Webapp, webapps_for
from tools.runninghub_sim.tasks import (
    FAILED,
    QUEUED,
    RUNNING,
    SUCCESS,
    Account,
    Task,
    TaskIds,
    failure_reason,
    key_id,
)
from tools.runninghub_sim.validation import parse_node_info, prompt_tips
from tools.runninghub_sim.webhooks import Webhooks

log = logging.getLogger("runninghub_sim")

_KEY = re.compile(r"^[A-Za-z0-9_\-]{8,128}$")

# ComfyUI workflows (for /task/openapi/create), shaped like webapps.
WORKFLOWS: dict[str, Webapp] = {
    "1904136902449209346": Webapp(
        "1904136902449209346",
        "text-to-image workflow",
        ("cn", "global"),
        (
            {
                "nodeId": "6",
                "nodeName": "CLIPTextEncode",
                "fieldName": "text",
                "fieldType": "STRING",
                "fieldData": "",
            },
            {"nodeId": "3", "nodeName": "KSampler", "fieldName": "seed", "fieldType": "INT", "fieldData": ""},
            {
                "nodeId": "3",
                "nodeName": "KSampler",
                "fieldName": "steps",
                "fieldType": "INT",
                "fieldData": "",
            },
        ),
        (("9", "png"),),
        coins=6,
    ),
    # Saved but never run on the website: creates answer 810.
    "1990000000000000810": Webapp("1990000000000000810", "never run workflow", ("cn", "global"), (), ()),
}
NEVER_RUN_WORKFLOWS = {"1990000000000000810"}


class Simulator:
    def __init__(self, region: str = "cn", config: SimConfig | None = None) -> None:
        if region not in ("cn", "global"):
            raise ValueError("region must be cn or global")
        self.region = region
        self.base_url = ""  # set once the server is bound
        self.config = config or SimConfig()
        self.webapps = webapps_for(region)
        self.faults = Faults(self.config.seed + 1)
        self.webhooks = Webhooks(lambda: self.config, self.count)
        self._reset_state()

    def _reset_state(self) -> None:
        self.rand = random.Random(self.config.seed)
        self.ids = TaskIds(self.rand.randrange)
        self.accounts: dict[str, Account] = {}
        self.tasks: dict[str, Task] = {}
        self.active: dict[str, list[Task]] = {}
        self.uploads: dict[str, int] = {}  # fileName -> size
        self.plans: dict[str | None, deque[dict[str, Any]]] = {}
        self.calls: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.creates_by_key: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._watchers: set[asyncio.Task[None]] = set()

    # ---- clock, counters ---------------------------------------------------------------

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def count(self, event: str, n: int = 1) -> None:
        self.events[event] += n

    def creates(self, key: str) -> int:
        """Tasks created (paid) for this key."""
        return self.creates_by_key[key_id(key)]

    def counters(self) -> dict[str, Any]:
        return {
            "region": self.region,
            "calls": dict(self.calls),
            "replies": dict(self.replies),
            "createsByKey": dict(self.creates_by_key),
            "tasksCreated": sum(self.creates_by_key.values()),
            "webhooks": {
                k: self.events[k]
                for k in ("webhook_attempts", "webhooks_delivered", "webhooks_failed", "webhooks_refused")
            },
            "events": dict(self.events),
        }

    # ---- keys --------------------------------------------------------------------------

    def register_key(self, key: str, **settings: Any) -> Account:
        account = self.accounts.get(key) or Account(
            key, concurrency=self.config.default_concurrency, coins=self.config.default_coins
        )
        for name, value in settings.items():
            if not hasattr(account, name) or name == "key":
                raise ValueError(f"unknown account setting {name!r}")
            setattr(account, name, value)
        self.accounts[key] = account
        return account

    def account(self, key: Any) -> Account:
        """The valid account behind `key`, or Reply(802)."""
        if not isinstance(key, str) or not key:
            raise Reply(codes.UNAUTHORIZED)
        account = self.accounts.get(key)
        if account is None and self.config.open_keys and _KEY.match(key):
            account = self.register_key(key)
        if account is None or not account.valid:
            raise Reply(codes.UNAUTHORIZED)
        return account

    def remain_coins(self, account: Account) -> int:
        now = self.now()
        spent = sum(t.coins for t in self.tasks.values() if t.key == account.key and t.status(now) == SUCCESS)
        return account.coins - spent

    def running_count(self, key: str) -> int:
        now = self.now()
        live = [t for t in self.active.get(key, []) if t.active(now)]
        self.active[key] = live
        return len(live)

    # ---- uploads -----------------------------------------------------------------------

    def add_upload(self, file_name: str, size: int) -> None:
        self.uploads[file_name] = size

    # ---- tasks -------------------------------------------------------------------------

    def plan(self, entries: list[dict[str, Any]], key: str | None = None) -> None:
        """Outcomes (and timings) for the next tasks created, for `key` or any key."""
        for entry in entries:
            outcome = entry.get("outcome", SUCCESS)
            if outcome not in (SUCCESS, FAILED):
                raise ValueError("outcome must be SUCCESS or FAILED")
            for name in ("queueSeconds", "runSeconds", "outputsLagSeconds"):
                value = entry.get(name, 0)
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{name} must be a non-negative number")
        self.plans.setdefault(key, deque()).extend(entries)

    def _next_plan(self, key: str) -> dict[str, Any]:
        for owner in (key, None):
            queue = self.plans.get(owner)
            if queue:
                return queue.popleft()
        return {}

    def lookup(self, key: str, task_id: Any) -> Task:
        if isinstance(task_id, int) and not isinstance(task_id, bool):
            task_id = str(task_id)
        task = self.tasks.get(task_id) if isinstance(task_id, str) else None
        if task is None or task.key != key:
            raise Reply(codes.APIKEY_TASK_NOT_FOUND)
        return task

    def create(self, account: Account, kind: str, body: dict[str, Any], files_base: str) -> dict[str, Any]:
        """Validate and create a task; the `data` of the reply (raises Reply on refusal)."""
        app = self._app(kind, body)
        overrides = parse_node_info(app, body.get("nodeInfoList"))
        webhook = body.get("webhookUrl")
        if webhook is not None and not isinstance(webhook, str):
            raise Reply(codes.PARAMS_INVALID)
        if body.get("instanceType") not in (None, "", "default", "plus"):
            raise Reply(codes.PARAMS_INVALID)
        if account.free_user:
            raise Reply(codes.UNSUPPORTED_FREE_USER)
        if self.remain_coins(account) < app.coins:
            raise Reply(codes.NOT_ENOUGH_WALLET)
        personal = body.get("usePersonalQueue") in (True, "true") and account.api_type == "EXCLUSIVE"
        running = self.running_count(account.key)
        if personal:
            if running >= account.personal_queue_limit:
                raise Reply(codes.PERSONAL_QUEUE_COUNT_LIMIT)
        elif running >= account.concurrency:
            raise Reply(account.busy_code)

        tips, valid = prompt_tips(app, overrides, set(self.uploads))
        plan = self._next_plan(account.key)
        config, now = self.config, self.now()
        outcome = plan.get("outcome") or (FAILED if self.rand.random() < config.fail_rate else SUCCESS)
        started = now + float(plan.get("queueSeconds", config.queue_seconds))
        ended = started + float(plan.get("runSeconds", config.run_seconds))
        lag = float(plan.get("outputsLagSeconds", config.outputs_lag_seconds))
        reason = None
        if outcome == FAILED:
            reason = plan.get("failedReason") or failure_reason(
                "3", "KSampler", "torch.OutOfMemoryError", "CUDA out of memory. Tried to allocate 2.00 GiB"
            )
        task = Task(
            task_id=self.ids.next(),
            key=account.key,
            app_id=app.webapp_id,
            kind=kind,
            created_at=now,
            started_at=started,
            ended_at=ended,
            outputs_at=ended + lag,
            outcome=outcome,
            coins=app.coins,
            output_nodes=app.outputs,
            files_base=files_base,
            webhook_url=webhook or None,
            prompt_tips=tips,
            values={f"{n}:{f}": v for (n, f), v in overrides.items()},
            failed_reason=reason,
        )
        if not valid:
            task.validation_failed, task.outcome = True, FAILED
            task.started_at = task.ended_at = task.outputs_at = now
            task.failed_reason = failure_reason(
                "", "", "prompt_outputs_failed_validation", "Prompt outputs failed validation"
            )
        self.tasks[task.task_id] = task
        self.creates_by_key[key_id(account.key)] += 1
        if not task.validation_failed:
            self.active.setdefault(account.key, []).append(task)
        if task.webhook_url and (valid or config.webhook_on_validation_failure):
            self._watch(task)
        numeric = self.rand.random() < config.numeric_id_rate
        status = task.status(now)
        log.info(
            "task created",
            extra={
                "task_id": task.task_id,
                "key_id": key_id(account.key),
                "app_id": app.webapp_id,
                "valid": valid,
            },
        )
        return {
            "netWssUrl": None
            if status == QUEUED
            else f"wss://sim.invalid/ws/c_instance?clientId={task.client_id}",
            "taskId": int(task.task_id) if numeric else task.task_id,
            "clientId": task.client_id,
            "taskStatus": status,
            "promptTips": tips,
        }

    def _app(self, kind: str, body: dict[str, Any]) -> Webapp:
        field = "webappId" if kind == "webapp" else "workflowId"
        raw = body.get(field)
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = str(raw)
        if not isinstance(raw, str) or not raw.isdigit():
            raise Reply(codes.PARAMS_INVALID)
        if kind == "webapp":
            app = self.webapps.get(raw)
            if app is None:
                raise Reply(codes.WEBAPP_NOT_EXISTS)
            return app
        if raw in NEVER_RUN_WORKFLOWS:
            raise Reply(codes.WORKFLOW_NOT_SAVED)
        workflow = WORKFLOWS.get(raw)
        if workflow is None or self.region not in workflow.regions:
            raise Reply(codes.WORKFLOW_NOT_EXISTS)
        return workflow

    def webapp_config(self, webapp_id: Any, base_url: str) -> dict[str, Any]:
        if not isinstance(webapp_id, str) or not webapp_id.isdigit():
            raise Reply(codes.PARAMS_INVALID)
        app = self.webapps.get(webapp_id)
        if app is None:
            raise Reply(codes.WEBAPP_NOT_EXISTS)
        return app.config(base_url)

    def outputs_reply(self, task: Task) -> tuple[int, Any]:
        now = self.now()
        status = task.status(now)
        if status == QUEUED:
            return codes.TASK_IS_QUEUED, None
        if status == RUNNING:
            if self.rand.random() < self.config.running_null_rate:
                return codes.OK, None
            return codes.TASK_IS_RUNNING, None
        if status == FAILED:
            return codes.TASK_STATUS_ERROR, {"failedReason": task.failed_reason}
        if now < task.outputs_at:
            return codes.OK, None  # SUCCESS, but the outputs lag behind
        return codes.OK, task.outputs()

    def event_data(self, task: Task) -> str:
        if task.outcome == SUCCESS:
            reply = codes.body(codes.OK, task.outputs(cost_as_number=True))
        else:
            reply = codes.body(codes.TASK_STATUS_ERROR, {"failedReason": task.failed_reason})
        return dumps(reply)

    def cancel(self, task: Task) -> None:
        now = self.now()
        if not task.active(now):
            return
        task.cancelled = True
        task.finish(
            now,
            FAILED,
            0.0,
            failure_reason("", "", "InterruptProcessingException", "Task cancelled by user"),
        )
        log.info("task cancelled", extra={"task_id": task.task_id})

    def finish(self, task_id: str, outcome: str, reason: dict[str, Any] | None = None) -> Task:
        """Control: end a task now with `outcome` (the outputs lag still applies)."""
        task = self.tasks.get(task_id)
        if task is None:
            raise KeyError(task_id)
        if outcome not in (SUCCESS, FAILED):
            raise ValueError("outcome must be SUCCESS or FAILED")
        if task.active(self.now()):
            task.finish(
                self.now(),
                outcome,
                self.config.outputs_lag_seconds,
                reason or failure_reason("3", "KSampler", "RuntimeError", "simulated failure"),
            )
        return task

    # ---- TASK_END ----------------------------------------------------------------------

    def _watch(self, task: Task) -> None:
        watcher = asyncio.create_task(self._await_end(task))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _await_end(self, task: Task) -> None:
        while True:
            task.changed.clear()
            wait = task.done_at() - self.now()
            if wait <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(task.changed.wait(), wait)
        self.send_webhook(task)

    def send_webhook(self, task: Task) -> None:
        if not task.webhook_url:
            return
        copies = 2 if self.rand.random() < self.config.webhook_duplicate_rate else 1
        self.webhooks.send(task.task_id, task.webhook_url, self.event_data(task), copies)

    # ---- lifecycle ---------------------------------------------------------------------

    def reset(self, seed: int | None = None) -> None:
        """Forget tasks, keys, uploads, counters, faults; reseed."""
        if seed is not None:
            self.config = self.config.updated({"seed": seed})
        for watcher in list(self._watchers):
            watcher.cancel()
        self.faults.reset(self.config.seed + 1)
        self.webhooks.deliveries.clear()
        self._reset_state()

    async def close(self) -> None:
        for watcher in list(self._watchers):
            watcher.cancel()
        for watcher in list(self._watchers):
            with contextlib.suppress(BaseException):
                await watcher
        await self.webhooks.close()


def all_webapp_ids() -> list[str]:
    return sorted(WEBAPPS)
