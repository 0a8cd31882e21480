"""TASK_END webhooks: POSTed to the URL given at create when a task ends, with retries.

The body is `{"event": "TASK_END", "taskId": "...", "eventData": "<the outputs
reply as a JSON string>"}`; inside `eventData`, `taskCostTime` is a number. A
delivery counts as received on any 2xx within the timeout; otherwise it is
retried `webhook_retries` times with doubling delays. Only loopback URLs are
called unless the config allows others (the simulator never reaches the network).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from tools.runninghub_sim.codes import dumps
from tools.runninghub_sim.config import SimConfig

log = logging.getLogger("runninghub_sim.webhooks")


@dataclass
class Delivery:
    webhook_id: str
    task_id: str
    url: str
    event_data: str
    attempts: int = 0
    status: str = "PENDING"  # PENDING, RETRYING, SUCCESS, FAILED
    last_response: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.webhook_id,
            "taskId": self.task_id,
            "webhookUrl": self.url,
            "eventData": self.event_data,
            "callbackStatus": self.status,
            "callbackResponse": self.last_response,
            "retryCount": max(0, self.attempts - 1),
            "createTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.created)),
            "updateTime": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.updated)),
        }


def loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Webhooks:
    def __init__(self, config: Callable[[], SimConfig], count: Callable[[str], None]) -> None:
        self._config = config
        self._count = count
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliveries: dict[str, list[Delivery]] = {}  # by task id
        self._ids = 1_904_444_422_778_503_169

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
        return self._session

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def send(self, task_id: str, url: str, event_data: str, copies: int = 1) -> Delivery:
        self._ids += 1
        delivery = Delivery(str(self._ids), task_id, url, event_data)
        self.deliveries.setdefault(task_id, []).append(delivery)
        for _ in range(copies):
            self.spawn(self._deliver(delivery))
        return delivery

    async def _deliver(self, delivery: Delivery) -> None:
        config = self._config()
        payload = dumps({"event": "TASK_END", "taskId": delivery.task_id, "eventData": delivery.event_data})
        delay = config.webhook_retry_delay_seconds
        for attempt in range(config.webhook_retries + 1):
            if attempt:
                delivery.status = "RETRYING"
                await asyncio.sleep(delay)
                delay *= 2
            delivery.attempts += 1
            delivery.updated = time.time()
            self._count("webhook_attempts")
            if not (config.allow_external_webhooks or loopback(delivery.url)):
                delivery.status, delivery.last_response = "FAILED", "refused: not a loopback URL"
                self._count("webhooks_refused")
                log.warning("webhook refused", extra={"task_id": delivery.task_id, "reason": "not loopback"})
                return
            try:
                async with self._client().post(
                    delivery.url,
                    data=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=config.webhook_timeout_seconds),
                ) as reply:
                    text = (await reply.text())[:200]
                    delivery.last_response = f"{reply.status} {text}"
                    if 200 <= reply.status < 300:
                        delivery.status = "SUCCESS"
                        self._count("webhooks_delivered")
                        log.info(
                            "webhook delivered",
                            extra={
                                "task_id": delivery.task_id,
                                "attempt": attempt + 1,
                                "http_status": reply.status,
                            },
                        )
                        return
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                delivery.last_response = f"I/O error on POST request: {type(exc).__name__}"
            log.info(
                "webhook attempt failed",
                extra={
                    "task_id": delivery.task_id,
                    "attempt": attempt + 1,
                    "response": delivery.last_response,
                },
            )
        delivery.status = "FAILED"
        self._count("webhooks_failed")

    def find(self, webhook_id: str) -> Delivery | None:
        for items in self.deliveries.values():
            for delivery in items:
                if delivery.webhook_id == webhook_id:
                    return delivery
        return None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._session is not None:
            await self._session.close()
