"""The alert engine of one replica: every `interval` it tries to lead; the
leader evaluates the rules on its lock connection and runs the notification
sender; the others wait. Errors cost the leadership, never the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from .election import Election
from .evaluator import Evaluator, Pass
from .notify import Sender

log = logging.getLogger(__name__)


class AlertEngine:
    def __init__(
        self, election: Election, evaluator: Evaluator, sender: Sender, interval_seconds: float
    ) -> None:
        self.election = election
        self.evaluator = evaluator
        self.sender = sender
        self.interval = interval_seconds
        self.last_pass: Pass | None = None
        self.task: asyncio.Task[None] | None = None
        self._sender_task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()  # one pass at a time on the leader's connection

    async def step(self) -> Pass | None:
        """One round: the pass made, or None when another replica leads (or this one failed)."""
        async with self._lock:
            return await self._step()

    async def _step(self) -> Pass | None:
        try:
            if not await self.election.try_lead():
                self._stop_sender()
                return None
            assert self.election.conn is not None
            self._start_sender()
            self.last_pass = await self.evaluator.evaluate(self.election.conn)
            return self.last_pass
        except Exception as exc:
            log.error("alert evaluation failed", extra={"error": repr(exc)})
            self.election.lose()
            self._stop_sender()
            return None

    async def run_forever(self) -> None:
        self.task = asyncio.current_task()
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.interval)
        finally:
            self._stop_sender()

    def _start_sender(self) -> None:
        if self._sender_task is None or self._sender_task.done():
            self._sender_task = asyncio.ensure_future(self.sender.run_forever())
            self._sender_task.set_name("monitoring-notifications")

    def _stop_sender(self) -> None:
        if self._sender_task is not None:
            self._sender_task.cancel()
            self._sender_task = None

    async def close(self) -> None:
        """Stop evaluating and sending, and hand the leadership over."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        sender = self._sender_task
        self._stop_sender()
        if sender is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender
        await self.election.resign()
