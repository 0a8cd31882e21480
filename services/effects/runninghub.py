"""The RunningHub client: one per region, pooled keep-alive connections (aiohttp).

Each call goes through the region's circuit breaker and is counted in Prometheus
by endpoint and outcome. Reads, uploads and cancels are retried with exponential
backoff and jitter (tenacity) after a transient failure. A create is never sent
twice after a failure that may have created a task (a timeout, a connection lost
after sending, a 5xx, code 500 or an unknown code): it raises `UpstreamError`
with `ambiguous=True` and the caller reconciles through the webhook. Only the
back-pressure codes (415, 421, 804) and failures to connect are retried on create.

The API key never leaves this module: it is not in any exception message, log
line or metric label, and what RunningHub says back is scrubbed of it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from prometheus_client import Counter, Gauge, Histogram
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from . import envelope
from .breaker import HALF_OPEN, OPEN, CircuitBreaker, CircuitOpenError
from .envelope import Created, Envelope, EnvelopeError, TaskState

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUESTS = Counter(
    "runninghub_requests",
    "RunningHub calls by region, endpoint and outcome.",
    ["region", "endpoint", "outcome"],
)
SECONDS = Histogram(
    "runninghub_request_seconds",
    "RunningHub call duration by region and endpoint.",
    ["region", "endpoint"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 45),
)
CIRCUIT = Gauge("runninghub_circuit_open", "1 while a region's circuit is open or half-open.", ["region"])

ENDPOINTS = {
    "run": "/task/openapi/ai-app/run",
    "outputs": "/task/openapi/outputs",
    "cancel": "/task/openapi/cancel",
    "upload": "/task/openapi/upload",
    "webapp_config": "/api/webapp/apiCallDemo",
    "account_status": "/uc/openapi/accountStatus",
}


class UpstreamError(Exception):
    """RunningHub could not be reached or answered with a server error.

    `ambiguous`: the request may have been processed (a create may exist)."""

    def __init__(self, message: str, *, ambiguous: bool, outcome: str) -> None:
        super().__init__(message)
        self.ambiguous = ambiguous
        self.outcome = outcome


class BusinessError(Exception):
    """RunningHub answered with a business code other than success."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"RunningHub code {code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ClientOptions:
    timeout_seconds: float = 45.0
    retry_attempts: int = 3
    retry_max_wait_seconds: float = 2.0
    # Back-pressure codes on create: (documented delay in seconds) x busy_delay_scale.
    busy_delay_scale: float = 1.0
    busy_max_wait_seconds: float = 60.0
    max_connections: int = 100
    breaker_failures: int = 5
    breaker_reset_seconds: float = 30.0


BUSY_DELAYS = {415: 30.0, 421: 20.0, 804: 10.0}


def _outcome_of_code(code: int) -> str:
    return f"code_{code}" if code in envelope.KNOWN_CODES else "code_other"


class RunningHubClient:
    def __init__(self, region: str, base_url: str, api_key: str, options: ClientOptions) -> None:
        self.region = region
        self.base_url = base_url.rstrip("/")
        self.__key = api_key
        self.options = options
        self.breaker = CircuitBreaker(
            region,
            failures=options.breaker_failures,
            reset_seconds=options.breaker_reset_seconds,
            on_change=lambda state: CIRCUIT.labels(region).set(0 if state == "closed" else 1),
        )
        CIRCUIT.labels(region).set(0)
        self._session: aiohttp.ClientSession | None = None
        self.last_ok_at = 0.0
        self.last_error = ""

    @property
    def configured(self) -> bool:
        return bool(self.__key)

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.options.max_connections, keepalive_timeout=30, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.options.timeout_seconds),
                raise_for_status=False,
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def scrub(self, text: str) -> str:
        return text.replace(self.__key, "***") if self.__key else text

    # -- one attempt ---------------------------------------------------------
    async def _call(
        self,
        endpoint: str,
        *,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
        form: aiohttp.FormData | None = None,
    ) -> Envelope:
        """One request; raises UpstreamError or returns the envelope (any code)."""
        if not self.__key:
            REQUESTS.labels(self.region, endpoint, "unconfigured").inc()
            raise UpstreamError(
                f"RunningHub {self.region} has no API key configured", ambiguous=False, outcome="unconfigured"
            )
        try:
            self.breaker.before_call()
        except CircuitOpenError as exc:
            REQUESTS.labels(self.region, endpoint, "circuit_open").inc()
            raise UpstreamError(str(exc), ambiguous=False, outcome="circuit_open") from None
        await self.start()
        assert self._session is not None
        url = self.base_url + ENDPOINTS[endpoint]
        started = time.perf_counter()
        outcome = "ok"
        healthy: bool | None = None
        try:
            if endpoint == "webapp_config":
                request = self._session.get(url, params={**(query or {}), "apiKey": self.__key})
            elif form is not None:
                form.add_field("apiKey", self.__key)
                request = self._session.post(url, data=form)
            elif endpoint == "account_status":
                request = self._session.post(url, json={**(body or {}), "apikey": self.__key})
            else:
                request = self._session.post(url, json={**(body or {}), "apiKey": self.__key})
            async with request as response:
                raw = await response.read()
                if response.status >= 500:
                    outcome, healthy = "http_5xx", False
                    raise UpstreamError(
                        f"RunningHub {self.region} answered HTTP {response.status}",
                        ambiguous=True,
                        outcome=outcome,
                    )
                if response.status != 200:
                    outcome, healthy = "http_other", True
                    raise UpstreamError(
                        f"RunningHub {self.region} answered HTTP {response.status}",
                        ambiguous=False,
                        outcome=outcome,
                    )
            try:
                env = envelope.parse(raw)
            except EnvelopeError:
                outcome, healthy = "bad_envelope", False
                raise UpstreamError(
                    f"RunningHub {self.region} sent a reply that is not an envelope",
                    ambiguous=True,
                    outcome=outcome,
                ) from None
            outcome = "ok" if env.code == envelope.OK else _outcome_of_code(env.code)
            healthy = env.code != envelope.SERVER_ERROR
            return Envelope(env.code, self.scrub(env.msg), env.data)
        except UpstreamError:
            raise
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
            outcome, healthy = "connect_error", False
            raise UpstreamError(
                f"cannot connect to RunningHub {self.region}", ambiguous=False, outcome=outcome
            ) from None
        except TimeoutError:  # total timeout, socket read timeout (aiohttp's are TimeoutErrors)
            outcome, healthy = "timeout", False
            raise UpstreamError(
                f"RunningHub {self.region} did not answer within {self.options.timeout_seconds:g} s",
                ambiguous=True,
                outcome=outcome,
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            outcome, healthy = "disconnected", False
            raise UpstreamError(
                f"connection to RunningHub {self.region} lost ({type(exc).__name__})",
                ambiguous=True,
                outcome=outcome,
            ) from None
        finally:
            SECONDS.labels(self.region, endpoint).observe(time.perf_counter() - started)
            REQUESTS.labels(self.region, endpoint, outcome).inc()
            if healthy is True:
                self.breaker.success()
                self.last_ok_at = time.time()
            elif healthy is False:
                self.breaker.failure()
                self.last_error = outcome
            else:
                self.breaker.release()

    async def _retrying(
        self, attempt: Callable[[], Awaitable[T]], transient_codes: tuple[int, ...] = ()
    ) -> T:
        """`attempt` retried after transient failures (never after circuit_open)."""

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, UpstreamError):
                return exc.outcome not in ("circuit_open", "unconfigured", "http_other")
            return isinstance(exc, BusinessError) and exc.code in (envelope.SERVER_ERROR, *transient_codes)

        retrying = AsyncRetrying(
            retry=retry_if_exception(transient),
            stop=stop_after_attempt(max(1, self.options.retry_attempts)),
            wait=wait_exponential_jitter(multiplier=0.1, max=self.options.retry_max_wait_seconds, jitter=0.2),
            reraise=True,
        )
        async for state in retrying:
            with state:
                return await attempt()
        raise AssertionError("unreachable")

    # -- endpoints -----------------------------------------------------------
    async def create(
        self, webapp_id: str, node_info: list[dict[str, str]], webhook_url: str, instance_type: str
    ) -> Created:
        """Start an AI app. Back-pressure codes and connect failures are retried;
        anything that may have created a task raises UpstreamError(ambiguous=True);
        a refusal raises BusinessError."""
        body: dict[str, Any] = {"webappId": webapp_id, "nodeInfoList": node_info}
        if webhook_url:
            body["webhookUrl"] = webhook_url
        if instance_type and instance_type != "default":
            body["instanceType"] = instance_type
        waited = 0.0
        connect_failures = 0
        while True:
            try:
                env = await self._call("run", body=body)
            except UpstreamError as exc:
                if exc.ambiguous or exc.outcome != "connect_error":
                    raise
                connect_failures += 1
                if connect_failures >= max(1, self.options.retry_attempts):
                    raise
                await asyncio.sleep(min(self.options.retry_max_wait_seconds, 0.1 * 2**connect_failures))
                continue
            if env.code == envelope.OK:
                try:
                    return envelope.created(env)
                except EnvelopeError:
                    raise UpstreamError(
                        f"RunningHub {self.region} accepted a task without an id",
                        ambiguous=True,
                        outcome="bad_envelope",
                    ) from None
            if env.code in BUSY_DELAYS:
                delay = BUSY_DELAYS[env.code] * self.options.busy_delay_scale
                delay *= 1 + random.uniform(0, 0.25)
                if waited + delay > self.options.busy_max_wait_seconds:
                    raise BusinessError(env.code, envelope.BACK_PRESSURE[env.code])
                waited += delay
                log.info(
                    "runninghub busy, retrying create",
                    extra={"region": self.region, "code": env.code, "delay_s": round(delay, 2)},
                )
                await asyncio.sleep(delay)
                continue
            if env.code in envelope.CREATE_REFUSED:
                raise BusinessError(env.code, envelope.CREATE_REFUSED[env.code])
            # code 500 or a code the reference does not list: a task may exist.
            raise UpstreamError(
                f"RunningHub {self.region} answered code {env.code} to a create",
                ambiguous=True,
                outcome=_outcome_of_code(env.code),
            )

    async def outputs(self, task_id: str) -> TaskState:
        async def attempt() -> TaskState:
            env = await self._call("outputs", body={"taskId": task_id})
            if env.code == envelope.SERVER_ERROR:
                raise BusinessError(env.code, "server error")
            try:
                return envelope.task_state(env)
            except EnvelopeError:
                raise BusinessError(env.code, env.msg[:200] or "unexpected code") from None

        return await self._retrying(attempt)

    async def cancel(self, task_id: str) -> bool:
        """True when RunningHub cancelled it, False when it does not know the task."""

        async def attempt() -> bool:
            env = await self._call("cancel", body={"taskId": task_id})
            if env.code == envelope.OK:
                return True
            if env.code in envelope.TASK_NOT_FOUND:
                return False
            raise BusinessError(env.code, env.msg[:200] or "cancel refused")

        return await self._retrying(attempt)

    async def upload(self, data: bytes, filename: str, content_type: str) -> str:
        async def attempt() -> str:
            form = aiohttp.FormData()
            form.add_field("file", data, filename=filename, content_type=content_type)
            form.add_field("fileType", "image")
            env = await self._call("upload", form=form)
            if env.code != envelope.OK:
                message = envelope.CREATE_REFUSED.get(env.code) or env.msg[:200] or "upload refused"
                raise BusinessError(env.code, message)
            name = env.data.get("fileName") if isinstance(env.data, dict) else None
            if not isinstance(name, str) or not name:
                raise UpstreamError(
                    "RunningHub upload reply without fileName", ambiguous=True, outcome="bad_envelope"
                )
            return name

        return await self._retrying(attempt, transient_codes=(envelope.UPLOAD_FAILED,))

    async def webapp_config(self, webapp_id: str) -> dict[str, Any]:
        async def attempt() -> dict[str, Any]:
            env = await self._call("webapp_config", query={"webappId": webapp_id})
            if env.code != envelope.OK:
                raise BusinessError(env.code, envelope.CREATE_REFUSED.get(env.code) or env.msg[:200])
            if not isinstance(env.data, dict):
                raise UpstreamError(
                    "RunningHub webapp config without data", ambiguous=False, outcome="bad_envelope"
                )
            return env.data

        return await self._retrying(attempt)

    async def account_status(self) -> dict[str, Any]:
        env = await self._call("account_status")
        if env.code != envelope.OK:
            raise BusinessError(env.code, envelope.CREATE_REFUSED.get(env.code) or env.msg[:200])
        return env.data if isinstance(env.data, dict) else {}

    @property
    def circuit(self) -> str:
        state = self.breaker.state
        return {OPEN: "open", HALF_OPEN: "half-open"}.get(state, "closed")


class Regions:
    """The clients of every region, by name."""

    def __init__(self, clients: dict[str, RunningHubClient]) -> None:
        self.clients = clients

    def __getitem__(self, region: str) -> RunningHubClient:
        return self.clients[region]

    def __contains__(self, region: object) -> bool:
        return region in self.clients

    async def close(self) -> None:
        for client in self.clients.values():
            await client.close()
