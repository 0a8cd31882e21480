"""The per-replica memory of recent task refreshes (`RefreshMemory`): one refresh per
task at a time and none within an interval of the last one's end, whatever the
number of callers; and its size stays bounded by the refreshes of the last
interval however many tasks pass through it."""

from __future__ import annotations

import heapq
import random
from collections import deque

from services.effects.taskrefresh import RefreshMemory


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_refresh_per_task_and_interval_across_callers() -> None:
    clock = Clock()
    memory = RefreshMemory(clock)
    started: list[float] = []

    def poll(key: str) -> None:  # what TaskRefresher.refresh_ahead does
        if memory.may_start(key):
            memory.begin(key)
            started.append(clock.now)

    for _ in range(50):  # many callers at once: one refresh
        poll("t")
    assert started == [1000.0] and memory.busy("t")
    clock.now += 60.0  # however slow RunningHub is, no second one while it runs
    for _ in range(50):
        poll("t")
    assert len(started) == 1
    memory.end("t", 3.0)
    assert not memory.busy("t")
    clock.now += 2.999  # within the interval since it ended: none
    for _ in range(50):
        poll("t")
    assert len(started) == 1
    clock.now += 0.001  # the interval is over: exactly one more
    for _ in range(50):
        poll("t")
    assert started == [1000.0, 1063.0]
    # Another task is independent.
    poll("u")
    assert len(started) == 3


def test_an_entry_is_kept_as_long_as_it_matters() -> None:
    """Pruning never forgets a task before its interval is over, even behind or
    ahead of entries with other intervals."""
    clock = Clock()
    memory = RefreshMemory(clock)
    for key, interval in (("long", 5.0), ("short", 1.0), ("mid", 3.0)):
        memory.begin(key)
        memory.end(key, interval)
    clock.now += 1.0
    assert memory.may_start("short")
    assert not memory.may_start("long") and not memory.may_start("mid")
    clock.now += 2.0
    assert memory.may_start("mid") and not memory.may_start("long")
    clock.now += 2.0
    assert memory.may_start("long")
    assert len(memory) == 0


def test_memory_stays_bounded_over_many_tasks() -> None:
    """100,000 distinct tasks, 500 refreshes a second with intervals of 2 or 3 s,
    some of them slow: the memory never holds more than the refreshes in progress
    plus those that ended within the longest interval (3 s), where the old
    implementation grew to 10,000 entries before pruning."""
    clock = Clock()
    memory = RefreshMemory(clock)
    rng = random.Random(7)
    rate, longest = 500, 3.0
    in_progress: list[tuple[float, str, float]] = []  # (ends at, key, interval)
    ended_at: deque[float] = deque()  # when refreshes ended, within the longest interval
    peak = 0
    for i in range(100_000):
        clock.now += 1 / rate
        while in_progress and in_progress[0][0] <= clock.now:
            _, ended, interval = heapq.heappop(in_progress)
            memory.end(ended, interval)
            ended_at.append(clock.now)
        while ended_at and ended_at[0] < clock.now - longest - 1e-9:
            ended_at.popleft()
        key = f"task-{i}"
        assert memory.may_start(key)
        memory.begin(key)
        duration = 5.0 if rng.random() < 0.01 else 0.05  # 1 % wait on a slow RunningHub
        heapq.heappush(in_progress, (clock.now + duration, key, rng.choice((2.0, longest))))
        bound = len(in_progress) + len(ended_at)
        assert len(memory) <= bound, (i, len(memory), bound)
        assert bound < rate * (longest + 0.5)  # about the last interval's refreshes
        peak = max(peak, len(memory))
    assert peak < 10_000 / 4
    # Once the refreshes have ended and the longest interval has passed, nothing is left.
    clock.now += 10.0
    for _, key, interval in in_progress:
        memory.end(key, interval)
    clock.now += longest
    memory.may_start("any")
    assert len(memory) == 0
