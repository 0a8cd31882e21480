"""Tasks: start (idempotent by requestId, rate-limited), poll, cancel, and the
work behind webhooks and the sweeper.

Polls are answered from the multi-level cache (taskcache.py). An open task's
state is refreshed once per interval (short while queued or running); the poll
that finds it due is answered at once and the refresh runs in the background.
A refresh (or a cold miss) reads the row; only the replica that wins a Redis
lease on the task (one per refresh interval) asks RunningHub, so concurrent
polls cause at most one upstream call per task and interval across all
replicas. Ended tasks are cached long and never asked about again: their
outputs are stored once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import Counter

from cosnap.effects.v1 import effects_pb2
from services.servicekit.auth import Principal
from services.servicekit.cache import MultiLevelCache
from services.servicekit.errors import FieldViolations, ServiceError, not_found, unavailable
from services.servicekit.redis_client import RedisClient

from . import envelope
from .catalog import Catalog
from .envelope import FAILED, QUEUED, Failure
from .parameters import build_node_info
from .ratelimit import RateLimiter
from .refusals import rate_limited, refused
from .runninghub import BusinessError, Regions, UpstreamError
from .taskcache import HOLD_INTERVALS, CachedTask, cached, refresh_interval
from .taskstore import TaskRow, TaskStore, parse_task_id
from .webhooks import WebhookTokens

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
TASK_ENDS = Counter("effects_task_ends", "Tasks that ended, by status.", ["status"])
UPSTREAM_REFRESHES = Counter(
    "effects_task_refreshes", "RunningHub outputs calls made for polls, by result.", ["result"]
)
NO_WORD = (
    "RunningHub never confirmed the task (no reply to the create and no callback in time); start it again"
)
FORGOTTEN = "RunningHub no longer knows the task; start it again"
# A task ended: (row) -> None; called without awaiting anything slow (analytics reporter).
EndListener = Callable[[TaskRow], None]


@dataclass(frozen=True)
class TaskTimings:
    queued_ttl: float = 2.0
    running_ttl: float = 3.0
    final_ttl: float = 3600.0
    reconcile_timeout: float = 1800.0
    recheck_after: float = 60.0
    settle_timeout: float = 50.0
    refresh_concurrency: int = 16  # background refreshes at once, per replica


class Tasks:
    def __init__(
        self,
        store: TaskStore,
        catalog: Catalog,
        regions: Regions,
        cache: MultiLevelCache[CachedTask],
        redis: RedisClient,
        redis_prefix: str,
        limiter: RateLimiter,
        tokens: WebhookTokens,
        timings: TaskTimings,
    ) -> None:
        self._store = store
        self._catalog = catalog
        self._regions = regions
        self._cache = cache
        self._redis = redis
        self._lease_prefix = f"{redis_prefix}:task-refresh:"
        self._limiter = limiter
        self._tokens = tokens
        self.timings = timings
        self.end_listeners: list[EndListener] = []
        self._background: set[asyncio.Task[Any]] = set()
        # task id -> monotonic time before which this replica does not try to refresh it again
        self._refresh_tried: dict[str, float] = {}
        # Many tasks due together (started together, or a cold replica) are refreshed
        # so many at a time rather than crowding the polls off the event loop. Enough
        # for RunningHub's concurrency (at most 50 running tasks per key) at its latency.
        self._refresh_slots = asyncio.Semaphore(timings.refresh_concurrency)

    # -- cache ---------------------------------------------------------------
    def _interval(self, status: str) -> float:
        return refresh_interval(status, self.timings.queued_ttl, self.timings.running_ttl)

    def _ttl(self, value: CachedTask) -> float:
        if value.final:
            return self.timings.final_ttl
        return HOLD_INTERVALS * self._interval(value.status)

    def _cached(self, row: TaskRow) -> CachedTask:
        return cached(row, self._interval(row.status))

    async def _publish(self, row: TaskRow | None, ended: bool = False) -> None:
        if row is None:
            return
        value = self._cached(row)
        await self._cache.set(row.task_id, value, self._ttl(value))
        if ended:
            TASK_ENDS.labels(row.status).inc()
            for listener in self.end_listeners:
                try:
                    listener(row)
                except Exception:
                    log.exception("task end listener failed")

    # -- CreateTask ------------------------------------------------------------
    async def create(self, request: effects_pb2.CreateTaskRequest, who: Principal) -> effects_pb2.Task:
        violations = FieldViolations()
        if not REQUEST_ID.match(request.request_id):
            violations.add("requestId", "required: 1 to 128 printable ASCII characters")
        if not request.effect_id or len(request.effect_id) > 64 or "\x00" in request.effect_id:
            violations.add("effectId", "required, at most 64 characters")
        if request.region not in ("", "cn", "global"):
            violations.add("region", "must be cn or global")
        if request.instance_type not in ("", "default", "plus"):
            violations.add("instanceType", "must be default or plus")
        violations.raise_if_any("invalid task")
        effect = await self._catalog.effect(request.effect_id)
        if request.region and request.region != effect.region:
            violations.add("region", f"this effect runs in {effect.region}")
            violations.raise_if_any("invalid task")

        existing = await self._store.by_request(who.subject, request.request_id)
        if existing is not None:
            return (await self._settled(existing, request)).to_proto()

        params = await self._catalog.parameters(effect.region, effect.webapp_id)
        node_info = build_node_info(params, dict(request.inputs), dict(request.parameters), violations)
        violations.raise_if_any("invalid task")

        wait = await self._limiter.acquire(who.subject)
        if wait is not None:
            raise rate_limited(self._limiter.limit, self._limiter.window_ms, wait)

        client = self._regions[effect.region]
        task_id = uuid.uuid4()
        inserted = await self._store.insert(
            task_id,
            who.subject,
            request.request_id,
            effect.effect_id,
            effect.region,
            effect.webapp_id,
            request.instance_type or "default",
            node_info,
        )
        if not inserted:  # a concurrent duplicate inserted first: its outcome is ours
            row = await self._store.by_request(who.subject, request.request_id)
            if row is None:
                raise unavailable("the first request with this requestId failed; send it again")
            return (await self._settled(row, request)).to_proto()

        webhook = self._tokens.url(effect.region, task_id)
        try:
            made = await client.create(
                effect.webapp_id, node_info, webhook, request.instance_type or "default"
            )
        except UpstreamError as exc:
            if not exc.ambiguous:
                await self._store.delete_pending(task_id)
                raise unavailable(str(exc)) from None
            log.warning(
                "create outcome unknown: reconciling through the webhook",
                extra={"task_id": str(task_id), "region": effect.region, "error": str(exc)},
            )
            row = await self._store.mark_ambiguous(task_id)
            if not webhook:  # nothing can announce the task: fail it now rather than wait
                row, ended = await self._store.end(task_id, FAILED, Failure(message=NO_WORD))
                await self._publish(row, ended)
            assert row is not None
            return row.to_proto()
        except BusinessError as exc:
            await self._store.delete_pending(task_id)
            if exc.code == 803:  # the app changed: read its config again next time
                await self._catalog.forget(effect.region, effect.webapp_id)
            raise refused(exc.code, exc.message) from None
        except BaseException:
            # Cancelled or crashed mid-create: the create may have been sent.
            await asyncio.shield(self._store.mark_ambiguous(task_id))
            raise
        row = await self._store.created(task_id, made.task_id, made.status, made.failure)
        if row.status == envelope.CANCELLED:  # cancelled while the create was in flight
            self._spawn(self._cancel_upstream(row.region, made.task_id))
        await self._publish(row, ended=made.status == FAILED)
        return row.to_proto()

    async def _settled(self, row: TaskRow, request: effects_pb2.CreateTaskRequest) -> TaskRow:
        """The row of an earlier request with this requestId, once its create has answered."""
        if row.effect_id != request.effect_id:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, "requestId already used for another effect")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timings.settle_timeout
        current: TaskRow | None = row
        while current is not None and current.create_state == "pending" and loop.time() < deadline:
            await asyncio.sleep(0.05)
            current = await self._store.get(uuid.UUID(row.task_id))
        if current is None:
            raise unavailable("the first request with this requestId failed; send it again")
        return current

    # -- GetTask ----------------------------------------------------------------
    async def get(self, task_id: str, who: Principal) -> effects_pb2.GetTaskResponse:
        tid = parse_task_id(task_id)
        if tid is None:
            raise not_found("no such task")
        key = str(tid)
        value = await self._cache.get_or_load(key, lambda: self._load(tid), self._ttl)
        if value.owner != who.subject and not who.is_admin:
            raise not_found("no such task")
        if value.due(time.time()):
            self._refresh_ahead(tid, key, value.status)
        return value.reply

    async def _load(self, tid: uuid.UUID) -> CachedTask:
        row = await self._store.get(tid)
        if row is None:
            raise not_found("no such task")
        if not row.final and row.rh_task_id and await self._lease(row):
            row = await self._refresh(row)
        return self._cached(row)

    def _refresh_ahead(self, tid: uuid.UUID, key: str, status: str) -> None:
        """The state is due: refresh it in the background, at most once per interval
        from this replica (the lease makes it once across replicas)."""
        now = time.monotonic()
        if self._refresh_tried.get(key, 0.0) > now:
            return
        if len(self._refresh_tried) >= 10_000:
            self._refresh_tried = {k: t for k, t in self._refresh_tried.items() if t > now}
        self._refresh_tried[key] = math.inf  # until this refresh is over, however slow RunningHub is
        self._spawn(self._refresh_in_background(tid, key, self._interval(status)))

    async def _refresh_in_background(self, tid: uuid.UUID, key: str, interval: float) -> None:
        try:
            async with self._refresh_slots:
                await self._refresh_due(tid)
        except Exception:
            log.exception("background task refresh failed", extra={"task_id": str(tid)})
        finally:
            self._refresh_tried[key] = time.monotonic() + interval

    async def _refresh_due(self, tid: uuid.UUID) -> None:
        row = await self._store.get(tid)
        if row is None:
            return
        if not row.final and row.rh_task_id:
            if not await self._lease(row):
                return  # another replica is asking RunningHub; it publishes what it learns
            row = await self._refresh(row)
        await self._publish(row)

    async def _lease(self, row: TaskRow) -> bool:
        """One RunningHub call per task and refresh interval across replicas."""
        ttl = self._interval(row.status)
        try:
            return bool(
                await self._redis.set(
                    self._lease_prefix + row.task_id, b"1", nx=True, px=max(1, int(ttl * 1000))
                )
            )
        except Exception:
            return True  # Redis down: this replica asks (its cache still coalesces its own polls)

    async def _refresh(self, row: TaskRow, fail_forgotten: bool = True) -> TaskRow:
        """RunningHub's word on an open task, recorded. A task RunningHub does not know
        (807) is failed once it is older than the reconcile timeout (unless
        `fail_forgotten` is False: a cancel ends it as cancelled instead)."""
        assert row.rh_task_id is not None
        try:
            state = await self._regions[row.region].outputs(row.rh_task_id)
        except (UpstreamError, BusinessError) as exc:
            UPSTREAM_REFRESHES.labels("error").inc()
            log.info(
                "task refresh failed; last known state served",
                extra={"task_id": row.task_id, "error": str(exc)},
            )
            return row
        UPSTREAM_REFRESHES.labels("ok").inc()
        if state.status is None:  # 807 / 423: RunningHub does not know the task
            if (
                not fail_forgotten
                or time.time() - row.created_at.timestamp() < self.timings.reconcile_timeout
            ):
                log.warning("RunningHub does not know the task", extra={"task_id": row.task_id})
                return row
            log.warning("RunningHub no longer knows the task: failed", extra={"task_id": row.task_id})
            forgotten = Failure(exception_type="unknown_task", message=FORGOTTEN)
            ended_row, ended = await self._store.end(uuid.UUID(row.task_id), FAILED, forgotten)
            await self._publish(ended_row, ended)
            return ended_row or row
        updated, ended = await self._store.apply(uuid.UUID(row.task_id), state)
        if ended:
            await self._publish(updated, ended=True)
        return updated or row

    # -- CancelTask ---------------------------------------------------------------
    async def cancel(self, task_id: str, who: Principal) -> effects_pb2.Task:
        tid = parse_task_id(task_id)
        row = await self._store.get(tid) if tid is not None else None
        if tid is None or row is None or (row.owner != who.subject and not who.is_admin):
            raise not_found("no such task")
        if row.status == envelope.CANCELLED:
            return row.to_proto()
        if row.final:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, f"the task has already ended ({row.status})"
            )
        if row.rh_task_id is not None:
            # Recorded first: a refresh or callback racing this cancel then records the
            # interruption RunningHub reports as CANCELLED rather than FAILED.
            await self._store.request_cancel(tid, True)
            try:
                known = await self._regions[row.region].cancel(row.rh_task_id)
            except UpstreamError as exc:
                await self._store.request_cancel(tid, False)
                raise unavailable(str(exc)) from None
            except BusinessError as exc:
                await self._store.request_cancel(tid, False)
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION, f"RunningHub refused: {exc.message}"
                ) from None
            if not known:  # RunningHub no longer knows it: it may have ended meanwhile
                await self._store.request_cancel(tid, False)
                refreshed = await self._refresh(row, fail_forgotten=False)
                if refreshed.final:
                    return refreshed.to_proto()
        ended_row, ended = await self._store.end(tid, envelope.CANCELLED, None)
        await self._publish(ended_row, ended)
        assert ended_row is not None
        return ended_row.to_proto()

    async def _cancel_upstream(self, region: str, rh_task_id: str) -> None:
        try:
            await self._regions[region].cancel(rh_task_id)
        except (UpstreamError, BusinessError) as exc:
            log.warning("could not cancel upstream", extra={"region": region, "error": str(exc)})

    # -- webhooks ---------------------------------------------------------------
    async def confirm(self, tid: uuid.UUID, region: str, rh_task_id: str) -> None:
        """A TASK_END callback named this task: believe RunningHub, not the callback."""
        row = await self._store.get(tid)
        if row is None or row.region != region:
            return
        if row.rh_task_id is not None and row.rh_task_id != rh_task_id:
            log.warning("webhook names another RunningHub task; ignored", extra={"task_id": row.task_id})
            return
        if row.final and row.rh_task_id is not None:
            return  # replay or duplicate
        client = self._regions[region]
        state = None
        adopted = row.rh_task_id is not None
        for delay in (0.0, 0.5, 1.0, 2.0, 4.0, 8.0):  # outputs may lag behind the callback
            await asyncio.sleep(delay)
            try:
                state = await client.outputs(rh_task_id)
            except (UpstreamError, BusinessError) as exc:
                log.info(
                    "webhook confirmation failed, retrying", extra={"task_id": row.task_id, "error": str(exc)}
                )
                continue
            if state.status is None:
                log.warning(
                    "webhook for a task RunningHub does not know; ignored", extra={"task_id": row.task_id}
                )
                return
            if not adopted:  # RunningHub knows the task: it is ours (the token said so)
                if not await self._store.adopt(tid, rh_task_id):
                    return
                adopted = True
            if state.status in envelope.FINAL_STATES:
                break
        if state is None or state.status is None:
            return
        updated, ended = await self._store.apply(tid, state)
        if ended:
            await self._publish(updated, ended=True)
        elif updated is not None:
            await self._publish(updated)

    # -- sweeper ----------------------------------------------------------------
    async def sweep_once(self) -> None:
        for tid in await self._store.unconfirmed(self.timings.reconcile_timeout):
            row, ended = await self._store.end(
                tid, FAILED, Failure(exception_type="no_word", message=NO_WORD)
            )
            if ended and row is not None:
                log.warning("task failed for want of word from RunningHub", extra={"task_id": row.task_id})
            await self._publish(row, ended)
        for tid in await self._store.unchecked(self.timings.recheck_after):
            row = await self._store.get(tid)
            if row is not None and not row.final and await self._lease(row):
                await self._publish(await self._refresh(row))

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task sweep failed")

    # -- background -------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


__all__ = ["QUEUED", "TaskTimings", "Tasks"]
