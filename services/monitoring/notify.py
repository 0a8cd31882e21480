"""Notifications: firing and resolved alerts POSTed to webhook receivers in
Alertmanager's webhook format (version 4), through an outbox.

Whoever changes an alert writes its notification into `notifications` (one
row per receiver) in the same transaction, so a notification exists iff the
change committed; evaluation never waits on a receiver. The sender (run by
the leader) claims rows with `FOR UPDATE SKIP LOCKED` and a lease, POSTs them
in order per receiver with a timeout and retries (tenacity, exponential
backoff), and marks them sent; a row that fails every retry is tried again
later, up to `max_rounds`, then marked failed and logged. A sender that dies
mid-delivery leaves its lease to expire and the next leader sends the row:
delivery is at least once, and exactly once unless a process dies between
the receiver's 2xx and the mark.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import aiohttp
import asyncpg
from prometheus_client import Counter
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from .summary import Connection

log = logging.getLogger(__name__)

ZERO_TIME: Final = "0001-01-01T00:00:00Z"
SENT = Counter("monitoring_notifications_total", "Webhook notifications by outcome.", ["outcome"])

_CLAIM_SQL = """
UPDATE notifications SET claimed_until = now() + make_interval(secs => $1), attempts = attempts + 1
WHERE id IN (
    SELECT id FROM notifications
    WHERE sent_at IS NULL AND failed_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
RETURNING id, receiver, url, body, attempts
"""


@dataclass(frozen=True)
class Receiver:
    name: str
    url: str


def parse_receivers(text: str) -> list[Receiver]:
    """`name=https://...,other=http://...` (a bare URL is named `webhook`, `webhook-2`, ...)."""
    out: list[Receiver] = []
    for i, item in enumerate(p.strip() for p in text.split(",") if p.strip()):
        name, sep, url = item.partition("=")
        if not sep or "://" in name:
            name, url = (f"webhook-{i + 1}" if i else "webhook"), item
        if not url.startswith(("http://", "https://")) or any(c.isspace() or c == "\x00" for c in url):
            raise ValueError(f"receiver {name!r}: an http(s) URL")
        out.append(Receiver(name.strip(), url.strip()))
    return out


def fingerprint(labels: Mapping[str, str]) -> str:
    """16 hex digits identifying a label set (like Alertmanager's)."""
    text = "\x00".join(f"{k}\x01{v}" for k, v in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def webhook_body(
    status: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    starts_at: datetime,
    ends_at: datetime | None,
    receiver: str,
    external_url: str,
) -> dict[str, Any]:
    """Alertmanager's webhook payload for one alert (its own group: every label is a group label)."""
    labels = dict(sorted(labels.items()))
    group_key = "{}:{" + ", ".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    return {
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": 0,
        "status": status,
        "receiver": receiver,
        "groupLabels": labels,
        "commonLabels": labels,
        "commonAnnotations": dict(annotations),
        "externalURL": external_url,
        "alerts": [
            {
                "status": status,
                "labels": labels,
                "annotations": dict(annotations),
                "startsAt": rfc3339(starts_at),
                "endsAt": rfc3339(ends_at) if ends_at is not None else ZERO_TIME,
                "generatorURL": external_url,
                "fingerprint": fingerprint(labels),
            }
        ],
    }


async def enqueue(
    conn: Connection,
    receivers: list[Receiver],
    external_url: str,
    status: str,
    labels: Mapping[str, str],
    annotations: Mapping[str, str],
    starts_at: datetime,
    ends_at: datetime | None = None,
) -> None:
    """Write the notification for every receiver (call inside the alert's transaction)."""
    if not receivers:
        return
    fp = fingerprint(labels)
    await conn.executemany(
        "INSERT INTO notifications (receiver, url, fingerprint, status, body) VALUES ($1, $2, $3, $4, $5)",
        [
            (
                r.name,
                r.url,
                fp,
                status,
                json.dumps(
                    webhook_body(status, labels, annotations, starts_at, ends_at, r.name, external_url)
                ),
            )
            for r in receivers
        ],
    )


class ReceiverError(Exception):
    pass


class Sender:
    """Delivers the outbox. `wake()` after committing notifications sends them at once."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout_seconds: float = 5.0,
        attempts: int = 5,
        max_rounds: int = 10,
        backoff_seconds: float = 0.5,
        poll_seconds: float = 2.0,
        batch: int = 50,
    ) -> None:
        self._pool = pool
        self._timeout = timeout_seconds
        self._attempts = attempts
        self._max_rounds = max_rounds
        self._backoff = backoff_seconds
        self._poll = poll_seconds
        self._batch = batch
        self._wake = asyncio.Event()
        # Longer than one row's worst case (every try timing out, plus the waits).
        self._lease = attempts * (timeout_seconds + 8 * backoff_seconds) + 30.0

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self._timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    sent = await self.send_pending(session)
                except Exception as exc:
                    log.error("notification sender failed", extra={"error": repr(exc)})
                    sent = 0
                if sent == 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._poll)
                    except TimeoutError:
                        pass

    async def send_pending(self, session: aiohttp.ClientSession) -> int:
        """Claim a batch and deliver it, receivers in parallel, each in order; the rows handled."""
        rows = await self._pool.fetch(_CLAIM_SQL, self._lease, self._batch)
        if not rows:
            return 0
        by_url: dict[str, list[asyncpg.Record]] = defaultdict(list)
        for row in sorted(rows, key=lambda r: r["id"]):
            by_url[row["url"]].append(row)
        await asyncio.gather(*(self._deliver_in_order(session, items) for items in by_url.values()))
        return len(rows)

    async def _deliver_in_order(self, session: aiohttp.ClientSession, rows: list[asyncpg.Record]) -> None:
        for i, row in enumerate(rows):
            if await self._deliver(session, row):
                continue
            # Keep the order: release the rest of this receiver's batch for later rounds
            # (the rows behind the failed one were not tried: their claim does not count).
            await self._pool.execute(
                "UPDATE notifications SET claimed_until = now() + make_interval(secs => $2),"
                " attempts = attempts - (id <> $3)::int WHERE id = ANY($1)",
                [r["id"] for r in rows[i:]],
                min(300.0, self._backoff * 2 ** min(row["attempts"], 10)),
                row["id"],
            )
            if row["attempts"] >= self._max_rounds:
                await self._pool.execute(
                    "UPDATE notifications SET failed_at = now() WHERE id = $1", row["id"]
                )
                SENT.labels("failed").inc()
                log.error("notification given up", extra={"receiver": row["receiver"], "id": row["id"]})
            return

    async def _deliver(self, session: aiohttp.ClientSession, row: asyncpg.Record) -> bool:
        body = row["body"] if isinstance(row["body"], str) else json.dumps(row["body"])
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type((aiohttp.ClientError, TimeoutError, ReceiverError)),
                stop=stop_after_attempt(self._attempts),
                wait=wait_exponential(multiplier=self._backoff, max=8 * self._backoff),
                reraise=True,
            ):
                with attempt:
                    async with session.post(
                        row["url"], data=body, headers={"Content-Type": "application/json"}
                    ) as reply:
                        if reply.status >= 300:
                            SENT.labels("retried").inc()
                            raise ReceiverError(f"HTTP {reply.status}")
        except (aiohttp.ClientError, TimeoutError, ReceiverError) as exc:
            log.warning(
                "notification not delivered",
                extra={"receiver": row["receiver"], "id": row["id"], "error": type(exc).__name__},
            )
            return False
        await self._pool.execute("UPDATE notifications SET sent_at = now() WHERE id = $1", row["id"])
        SENT.labels("sent").inc()
        return True
