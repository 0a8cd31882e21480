"""What the service learns about open tasks from RunningHub, recorded in the rows
and published to the task cache (taskcache.py): the refresh a due poll starts,
the read behind a cold cache miss, webhook confirmations and the sweeper.

An open task's state is refreshed once per interval (short while queued or
running); the poll that finds it due is answered at once and the refresh runs in
the background (:meth:`TaskRefresher.refresh_ahead`), at most one at a time per
task from this replica, and not again before the interval has passed since the
last one ended (:class:`RefreshMemory`). A refresh (or a cold miss) reads the
row; only the replica that wins a Redis lease on the task (one per refresh
interval) asks RunningHub, so concurrent polls cause at most one upstream call
per task and interval across all replicas. Ended tasks are cached long and never
asked about again: their outputs are stored once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from services.servicekit.cache import MultiLevelCache
from services.servicekit.errors import not_found
from services.servicekit.redis_client import RedisClient

from . import envelope
from .envelope import FAILED, Failure
from .runninghub import BusinessError, Regions, UpstreamError
from .taskcache import HOLD_INTERVALS, CachedTask, cached, refresh_interval
from .taskstore import TaskRow, TaskStore

# The logger these lines had before tasks.py was split, so log routing and searches stay as they were.
log = logging.getLogger("services.effects.tasks")

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


class RefreshMemory:
    """Per task, whether this replica may start a refresh of it now.

    A task is *busy* from :meth:`begin` until :meth:`end` (however slow RunningHub
    is), then *resting* for the `interval` given to :meth:`end`; :meth:`may_start`
    is False while it is busy or resting, so at most one refresh per task runs at a
    time and none starts within an interval of the last one's end.

    Bounded: an entry whose rest is over means the same as no entry, so it is
    dropped. Resting entries are kept in the order their rest began and dropped
    from the oldest while the oldest's rest is over; each entry is added and
    dropped once, so this is amortised O(1) per call. Every entry kept behind an
    unexpired oldest one began resting after it, i.e. within the longest interval
    given to :meth:`end`; so the memory holds at most the refreshes in progress plus
    those that ended within the last such interval (at 1000 open tasks polled
    every 3 s: about 1000 entries, whatever the number of tasks seen over time).

    `clock`: monotonic seconds (tests pass their own).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._busy: set[str] = set()
        # task -> clock time its rest ends, in the order the rests began
        self._resting: OrderedDict[str, float] = OrderedDict()

    def may_start(self, key: str) -> bool:
        now = self._clock()
        self._prune(now)
        return key not in self._busy and self._resting.get(key, now) <= now

    def begin(self, key: str) -> None:
        """A refresh of `key` starts: busy until :meth:`end`."""
        self._resting.pop(key, None)
        self._busy.add(key)

    def end(self, key: str, interval: float) -> None:
        """The refresh of `key` is over: no other starts for `interval` seconds."""
        now = self._clock()
        self._busy.discard(key)
        self._resting.pop(key, None)
        self._resting[key] = now + interval
        self._prune(now)

    def busy(self, key: str) -> bool:
        """A refresh of `key` is in progress."""
        return key in self._busy

    def __len__(self) -> int:
        return len(self._busy) + len(self._resting)

    def _prune(self, now: float) -> None:
        resting = self._resting
        while resting:
            key, until = next(iter(resting.items()))
            if until > now:
                return
            del resting[key]


class TaskRefresher:
    """Records RunningHub's word on open tasks and publishes task states to the cache."""

    def __init__(
        self,
        store: TaskStore,
        regions: Regions,
        cache: MultiLevelCache[CachedTask],
        redis: RedisClient,
        redis_prefix: str,
        timings: TaskTimings,
    ) -> None:
        self._store = store
        self._regions = regions
        self._cache = cache
        self._redis = redis
        self._lease_prefix = f"{redis_prefix}:task-refresh:"
        self.timings = timings
        self.end_listeners: list[EndListener] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.memory = RefreshMemory()
        # Many tasks due together (started together, or a cold replica) are refreshed
        # so many at a time rather than crowding the polls off the event loop. Enough
        # for RunningHub's concurrency (at most 50 running tasks per key) at its latency.
        self._refresh_slots = asyncio.Semaphore(timings.refresh_concurrency)

    # -- cache ---------------------------------------------------------------
    def interval(self, status: str) -> float:
        return refresh_interval(status, self.timings.queued_ttl, self.timings.running_ttl)

    def ttl(self, value: CachedTask) -> float:
        if value.final:
            return self.timings.final_ttl
        return HOLD_INTERVALS * self.interval(value.status)

    def _cached(self, row: TaskRow) -> CachedTask:
        return cached(row, self.interval(row.status))

    async def publish(self, row: TaskRow | None, ended: bool = False) -> None:
        """The row's state into the task cache; `ended`: it just ended (counted,
        and told to the end listeners)."""
        if row is None:
            return
        value = self._cached(row)
        await self._cache.set(row.task_id, value, self.ttl(value))
        if ended:
            TASK_ENDS.labels(row.status).inc()
            for listener in self.end_listeners:
                try:
                    listener(row)
                except Exception:
                    log.exception("task end listener failed")

    # -- polls -----------------------------------------------------------------
    async def load(self, tid: uuid.UUID) -> CachedTask:
        """A cold cache miss: the row, refreshed first if this replica wins the lease."""
        row = await self._store.get(tid)
        if row is None:
            raise not_found("no such task")
        if not row.final and row.rh_task_id and await self.lease(row):
            row = await self.refresh(row)
        return self._cached(row)

    def refresh_ahead(self, tid: uuid.UUID, key: str, status: str) -> None:
        """The state is due: refresh it in the background, at most once per interval
        from this replica (the lease makes it once across replicas)."""
        if not self.memory.may_start(key):
            return
        self.memory.begin(key)
        self.spawn(self._refresh_in_background(tid, key, self.interval(status)))

    async def _refresh_in_background(self, tid: uuid.UUID, key: str, interval: float) -> None:
        try:
            async with self._refresh_slots:
                await self._refresh_due(tid)
        except Exception:
            log.exception("background task refresh failed", extra={"task_id": str(tid)})
        finally:
            self.memory.end(key, interval)

    async def _refresh_due(self, tid: uuid.UUID) -> None:
        row = await self._store.get(tid)
        if row is None:
            return
        if not row.final and row.rh_task_id:
            if not await self.lease(row):
                return  # another replica is asking RunningHub; it publishes what it learns
            row = await self.refresh(row)
        await self.publish(row)

    async def lease(self, row: TaskRow) -> bool:
        """One RunningHub call per task and refresh interval across replicas."""
        ttl = self.interval(row.status)
        try:
            return bool(
                await self._redis.set(
                    self._lease_prefix + row.task_id, b"1", nx=True, px=max(1, int(ttl * 1000))
                )
            )
        except Exception:
            return True  # Redis down: this replica asks (its cache still coalesces its own polls)

    async def refresh(self, row: TaskRow, fail_forgotten: bool = True) -> TaskRow:
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
            await self.publish(ended_row, ended)
            return ended_row or row
        updated, ended = await self._store.apply(uuid.UUID(row.task_id), state)
        if ended:
            await self.publish(updated, ended=True)
        return updated or row

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
            await self.publish(updated, ended=True)
        elif updated is not None:
            await self.publish(updated)

    # -- sweeper ----------------------------------------------------------------
    async def sweep_once(self) -> None:
        for tid in await self._store.unconfirmed(self.timings.reconcile_timeout):
            row, ended = await self._store.end(
                tid, FAILED, Failure(exception_type="no_word", message=NO_WORD)
            )
            if ended and row is not None:
                log.warning("task failed for want of word from RunningHub", extra={"task_id": row.task_id})
            await self.publish(row, ended)
        for tid in await self._store.unchecked(self.timings.recheck_after):
            row = await self._store.get(tid)
            if row is not None and not row.final and await self.lease(row):
                await self.publish(await self.refresh(row))

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
    def spawn(self, coro: Any) -> None:
        """A task of this replica's, cancelled by :meth:`close`."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
