"""The injectable clock: a ManualClock moves only when told to and wakes its sleepers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from services.servicekit.clock import SYSTEM_CLOCK, ManualClock


async def test_manual_clock_moves_and_wakes_sleepers_in_order() -> None:
    start = datetime(2026, 12, 2, 17, 0, 0, 123456, tzinfo=UTC)
    clock = ManualClock(start, monotonic=100.0)
    assert (clock.now(), clock.monotonic()) == (start, 100.0)
    assert clock.time() == pytest.approx(start.timestamp())
    woke: list[str] = []

    async def sleeper(name: str, seconds: float) -> None:
        await clock.sleep(seconds)
        woke.append(name)

    tasks = [asyncio.create_task(sleeper(n, s)) for n, s in (("b", 2.0), ("a", 1.0), ("c", 3.0))]
    await asyncio.sleep(0)
    assert clock.sleepers == 3
    await clock.advance_and_settle(0.5)
    assert woke == []
    await clock.advance_and_settle(1.5)
    assert woke == ["a", "b"]
    assert clock.now() == start + timedelta(seconds=2) and clock.monotonic() == 102.0
    tasks[2].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert clock.sleepers == 0
    await clock.sleep(0)  # yields, does not wait
    with pytest.raises(ValueError):
        clock.advance(-1)


async def test_system_clock_is_the_real_one() -> None:
    before = datetime.now(UTC)
    now = SYSTEM_CLOCK.now()
    assert before <= now <= datetime.now(UTC)
    a = SYSTEM_CLOCK.monotonic()
    await SYSTEM_CLOCK.sleep(0)
    assert SYSTEM_CLOCK.monotonic() >= a
