"""Tasks: start (idempotent by requestId, rate-limited), poll, cancel; and,
through :class:`~.taskrefresh.TaskRefresher`, the work behind webhooks and the
sweeper.

Polls are answered from the multi-level cache (taskcache.py); an open task whose
state is due is answered at once and refreshed in the background, at most one
upstream call per task and interval across replicas (taskrefresh.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

import grpc

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
from .taskcache import CachedTask
from .taskrefresh import NO_WORD, EndListener, TaskRefresher, TaskTimings
from .taskstore import TaskRow, TaskStore, parse_task_id
from .webhooks import WebhookTokens

log = logging.getLogger(__name__)

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")


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
        self._limiter = limiter
        self._tokens = tokens
        self.timings = timings
        self.refresher = TaskRefresher(store, regions, cache, redis, redis_prefix, timings)

    @property
    def end_listeners(self) -> list[EndListener]:
        """Told of every task that ends (see :data:`~.taskrefresh.EndListener`)."""
        return self.refresher.end_listeners

    async def confirm(self, tid: uuid.UUID, region: str, rh_task_id: str) -> None:
        """A TASK_END callback named this task (:meth:`.TaskRefresher.confirm`)."""
        await self.refresher.confirm(tid, region, rh_task_id)

    async def sweep_forever(self, interval: float) -> None:
        """The sweeper (:meth:`.TaskRefresher.sweep_forever`)."""
        await self.refresher.sweep_forever(interval)

    async def close(self) -> None:
        """Cancels the background work (refreshes, upstream cancels)."""
        await self.refresher.close()

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
                await self.refresher.publish(row, ended)
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
            self.refresher.spawn(self._cancel_upstream(row.region, made.task_id))
        await self.refresher.publish(row, ended=made.status == FAILED)
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
        value = await self._cache.get_or_load(key, lambda: self.refresher.load(tid), self.refresher.ttl)
        if value.owner != who.subject and not who.is_admin:
            raise not_found("no such task")
        if value.due(time.time()):
            self.refresher.refresh_ahead(tid, key, value.status)
        return value.reply

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
                refreshed = await self.refresher.refresh(row, fail_forgotten=False)
                if refreshed.final:
                    return refreshed.to_proto()
        ended_row, ended = await self._store.end(tid, envelope.CANCELLED, None)
        await self.refresher.publish(ended_row, ended)
        assert ended_row is not None
        return ended_row.to_proto()

    async def _cancel_upstream(self, region: str, rh_task_id: str) -> None:
        try:
            await self._regions[region].cancel(rh_task_id)
        except (UpstreamError, BusinessError) as exc:
            log.warning("could not cancel upstream", extra={"region": region, "error": str(exc)})


__all__ = ["QUEUED", "Tasks"]
