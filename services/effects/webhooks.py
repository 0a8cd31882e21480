"""RunningHub's TASK_END callbacks.

The URL handed to RunningHub is `{public base}/api/effects/webhooks/runninghub/
{region}?token={task id}.{HMAC-SHA256(secret, region:task id)}`: unguessable
per task, never the API key, and it tells which of our tasks a callback is about
even when the create's reply was lost (the ambiguous create).

The receiver checks the token and the body's shape, answers at once, and does
the work in the background: `eventData` is parsed a second time, and nothing in
the callback is trusted until RunningHub confirms it (one outputs call). A
callback for a task that has ended changes nothing, so replays are harmless.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable
from urllib.parse import quote

import grpc
from google.api import httpbody_pb2
from prometheus_client import Counter

from services.servicekit.errors import ServiceError, invalid_argument

from . import envelope
from .envelope import EnvelopeError

log = logging.getLogger(__name__)

WEBHOOKS = Counter("effects_webhooks", "RunningHub callbacks received, by result.", ["result"])
MAX_BODY = 1024 * 1024
PATH = "/api/effects/webhooks/runninghub/"

# (our task id, region, RunningHub task id) -> None, run in the background.
Processor = Callable[[uuid.UUID, str, str], Awaitable[None]]


class WebhookTokens:
    def __init__(self, secret: str, public_base_url: str) -> None:
        self._secret = secret.encode()
        self.base = public_base_url.rstrip("/")

    def _mac(self, region: str, task_id: str) -> str:
        digest = hmac.new(self._secret, f"{region}:{task_id}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def token(self, region: str, task_id: uuid.UUID) -> str:
        return f"{task_id}.{self._mac(region, str(task_id))}"

    def url(self, region: str, task_id: uuid.UUID) -> str:
        """The webhook URL for a task, or "" when no public base URL is configured."""
        if not self.base:
            return ""
        return f"{self.base}{PATH}{region}?token={quote(self.token(region, task_id), safe='')}"

    def verify(self, region: str, token: str) -> uuid.UUID | None:
        if len(token) > 200:
            return None
        task_text, _, mac = token.partition(".")
        try:
            task_id = uuid.UUID(task_text)
        except ValueError:
            return None
        if str(task_id) != task_text:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(region, task_text).encode()):
            return None
        return task_id


class WebhookReceiver:
    def __init__(
        self, tokens: WebhookTokens, regions: tuple[str, ...], process: Processor, max_pending: int = 1000
    ):
        self._tokens = tokens
        self._regions = regions
        self._process = process
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()

    async def receive(self, region: str, token: str, payload: httpbody_pb2.HttpBody) -> None:
        if region not in self._regions:
            WEBHOOKS.labels("bad_region").inc()
            raise invalid_argument([("region", "must be cn or global")])
        task_id = self._tokens.verify(region, token)
        if task_id is None:
            WEBHOOKS.labels("bad_token").inc()
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "invalid webhook token")
        if len(payload.data) > MAX_BODY:
            WEBHOOKS.labels("too_large").inc()
            raise invalid_argument([("payload", f"at most {MAX_BODY} bytes")])
        try:
            rh_task_id, _ = envelope.webhook_event(payload.data)  # the second parse checks eventData's shape
        except EnvelopeError as exc:
            WEBHOOKS.labels("malformed").inc()
            raise invalid_argument([("payload", str(exc))]) from None
        if len(self._pending) >= self._max_pending:
            WEBHOOKS.labels("shed").inc()
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "busy: send it again later")
        WEBHOOKS.labels("accepted").inc()
        task = asyncio.create_task(self._run(task_id, region, rh_task_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _run(self, task_id: uuid.UUID, region: str, rh_task_id: str) -> None:
        try:
            await self._process(task_id, region, rh_task_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhook processing failed", extra={"task_id": str(task_id)})

    async def drain(self, timeout: float = 5.0) -> None:
        """Let the callbacks in progress finish (shutdown), then cancel what is left."""
        if self._pending:
            _, left = await asyncio.wait(set(self._pending), timeout=timeout)
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._pending)
