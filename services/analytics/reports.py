"""Weekly performance reports: made every Monday for the previous ISO week, and on demand.

Exactly once across replicas
----------------------------
* **Leader**: every replica runs :meth:`WeeklyReports.run_forever`; only the one
  holding a PostgreSQL session-level advisory lock (on a connection of its own,
  kept while it lives: :class:`Leader`) acts. When it dies its connection goes
  and another replica takes the lock on its next check.
* **One row per week**: a report starts by claiming its week, an
  ``INSERT ... ON CONFLICT DO NOTHING`` on ``weekly_reports`` (primary key
  ``week``). Only the claimant generates it, so even two leaders (a partition
  between PostgreSQL and a replica) or an on-demand request racing the schedule
  make one report. A claim left ``generating`` for :data:`STALE_CLAIM` (its
  replica died mid-way) may be taken over.

Schedule: from ``ANALYTICS_REPORT_DELAY_MINUTES`` after Monday 00:00 UTC the
leader makes the report of the week that just ended, if it has no row yet, and
e-mails it to ``ANALYTICS_REPORT_RECIPIENTS``. A failed send is recorded
(``send_error``) and retried by the leader every :data:`RESEND_AFTER` for a
day. On demand (``GET /api/analytics/reports/{week}``): a week that has ended
and has no report is made then (not e-mailed); a week being made by another
replica is waited for. Charts are drawn in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from datetime import datetime, timedelta

import asyncpg
import grpc
from google.api import httpbody_pb2

from cosnap.analytics.v1 import analytics_pb2
from cosnap.monitoring.v1 import monitoring_pb2_grpc
from services.analytics import report_mail
from services.analytics.preagg import Preflight
from services.analytics.report_data import gather
from services.analytics.report_render import render
from services.analytics.weeks import Week, last_complete_week, parse_week
from services.servicekit.clock import Clock, SystemClock
from services.servicekit.errors import ServiceError, invalid_argument, not_found

log = logging.getLogger(__name__)

STALE_CLAIM = timedelta(minutes=10)
RESEND_AFTER = timedelta(minutes=10)
RESEND_FOR = timedelta(days=1)
FORMATS = {"html": "text/html; charset=utf-8", "pdf": "application/pdf"}
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

_CLAIM_SQL = """
INSERT INTO weekly_reports AS r (week, week_start, trigger, status, claimed_at)
VALUES ($1, $2, $3, 'generating', $4)
ON CONFLICT (week) DO UPDATE SET claimed_at = excluded.claimed_at, trigger = excluded.trigger
    WHERE r.status = 'generating' AND r.claimed_at < $4 - $5::interval
RETURNING week
"""


class Leader:
    """Holds a session-level advisory lock on a dedicated connection while it can."""

    def __init__(self, dsn: str, schema: str, name: str) -> None:
        self._dsn = dsn
        self._key = int.from_bytes(
            hashlib.sha256(f"{name}:{schema}".encode()).digest()[:8], "big", signed=True
        )
        self._conn: asyncpg.Connection | None = None

    async def acquire(self) -> bool:
        """True while this replica is the leader (tries to become it when not)."""
        try:
            if self._conn is not None and not self._conn.is_closed():
                await self._conn.fetchval("SELECT 1", timeout=5)
                return True
            self._conn = None
            conn = await asyncpg.connect(self._dsn, timeout=5)
            if await conn.fetchval("SELECT pg_try_advisory_lock($1)", self._key):
                self._conn = conn
                return True
            await conn.close()
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.warning("leader check failed", extra={"error": repr(exc)})
            if self._conn is not None:
                self._conn.terminate()
                self._conn = None
        return False

    @property
    def is_leader(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()  # closing the session releases the lock
            self._conn = None


class WeeklyReports:
    def __init__(
        self,
        pool: asyncpg.Pool,
        leader: Leader,
        monitoring: monitoring_pb2_grpc.MonitoringServiceAsyncStub | None,
        smtp: report_mail.SmtpSettings,
        *,
        retention_days: int,
        delay: timedelta = timedelta(minutes=30),
        check_interval: float = 60.0,
        refresh: Preflight | None = None,
        clock: Clock | None = None,
        wait_for_other: float = 60.0,
    ) -> None:
        self._pool = pool
        self.leader = leader
        self._monitoring = monitoring
        self.smtp = smtp
        self._retention = timedelta(days=retention_days)
        self._delay = delay
        self._check_interval = check_interval
        self._refresh = refresh
        self.clock = clock or SystemClock()
        self._wait_for_other = wait_for_other
        self.generated: list[str] = []  # weeks this replica made (for tests)
        self.sent: list[str] = []

    # -- schedule ---------------------------------------------------------------------

    async def run_forever(self) -> None:
        try:
            while True:
                await self.clock.sleep(self._check_interval)
                try:
                    await self.tick()
                except Exception as exc:
                    log.error("weekly report check failed", extra={"error": repr(exc)})
        finally:
            await self.leader.release()

    async def tick(self) -> str | None:
        """One check: as the leader, make the last week's report when due; retry unsent mail.
        Returns the week made, if any."""
        if not await self.leader.acquire():
            return None
        now = self.clock.now()
        week = last_complete_week(now)
        made = None
        if now >= week.end + self._delay and await self._claim(week, "scheduled", now):
            await self._generate(week, now)
            made = week.label
        await self._send_pending(now)
        return made

    async def _claim(self, week: Week, trigger: str, now: datetime) -> bool:
        async with self._pool.acquire() as conn:
            return (
                await conn.fetchval(_CLAIM_SQL, week.label, week.start, trigger, now, STALE_CLAIM)
            ) is not None

    async def _generate(self, week: Week, now: datetime) -> None:
        try:
            if self._refresh is not None:
                await self._refresh()
            data = await gather(self._pool, week, now, self._monitoring)
            loop = asyncio.get_running_loop()
            rendered = await loop.run_in_executor(None, render, data)
        except Exception:
            # Free the claim at once so that a retry (or another replica) can make it.
            async with self._pool.acquire() as conn:
                await conn.execute(
                    "DELETE FROM weekly_reports WHERE week = $1 AND status = 'generating'", week.label
                )
            raise
        async with self._pool.acquire() as conn:
            await conn.execute(
                """UPDATE weekly_reports SET status = 'ready', generated_at = $2, summary = $3, html = $4,
                       pdf = $5, png = $6
                   WHERE week = $1""",
                week.label,
                now,
                "\n".join(rendered.summary),
                rendered.html,
                rendered.pdf,
                rendered.mail_png,
            )
        self.generated.append(week.label)
        log.info("weekly report made", extra={"week": week.label})

    async def _send_pending(self, now: datetime) -> None:
        if not self.smtp.enabled:
            return
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT week, summary, pdf, png FROM weekly_reports
                   WHERE trigger = 'scheduled' AND status = 'ready' AND sent_at IS NULL
                     AND generated_at > $1 AND (send_attempted_at IS NULL OR send_attempted_at < $2)
                   ORDER BY week""",
                now - RESEND_FOR,
                now - RESEND_AFTER,
            )
        for row in rows:
            await self._send(row["week"], row["summary"].split("\n"), row["pdf"], row["png"], now)

    async def _send(self, week: str, summary: list[str], pdf: bytes, png: bytes, now: datetime) -> None:
        message = report_mail.build_message(self.smtp, week, summary, pdf, png)
        error: str | None = None
        try:
            await report_mail.send(self.smtp, message)
        except Exception as exc:
            error = repr(exc)[:500]
            log.error("weekly report not sent", extra={"week": week, "error": error})
        async with self._pool.acquire() as conn:
            if error is None:
                await conn.execute(
                    "UPDATE weekly_reports SET sent_to = $2, sent_at = $3, send_error = NULL,"
                    " send_attempted_at = $3 WHERE week = $1",
                    week,
                    list(self.smtp.recipients),
                    now,
                )
                self.sent.append(week)
            else:
                await conn.execute(
                    "UPDATE weekly_reports SET send_error = $2, send_attempted_at = $3 WHERE week = $1",
                    week,
                    error,
                    now,
                )

    # -- RPCs -------------------------------------------------------------------------

    async def get(
        self, request: analytics_pb2.GetWeeklyReportRequest
    ) -> analytics_pb2.GetWeeklyReportResponse:
        week = parse_week(request.week)
        fmt = request.format or "html"
        if fmt not in FORMATS:
            raise invalid_argument(
                [("format", f"must be html or pdf; got {request.format[:20]!r}")], "invalid format"
            )
        row = await self._ready(week)
        body = row["html"].encode("utf-8") if fmt == "html" else bytes(row["pdf"])
        return analytics_pb2.GetWeeklyReportResponse(
            body=httpbody_pb2.HttpBody(content_type=FORMATS[fmt], data=body)
        )

    async def _ready(self, week: Week) -> asyncpg.Record:
        """The stored report of `week`, made now when it has none; waits for another replica's."""
        deadline = self.clock.monotonic() + self._wait_for_other
        while True:
            async with self._pool.acquire() as conn:
                row = await conn.fetchrow(
                    "SELECT status, html, pdf FROM weekly_reports WHERE week = $1", week.label
                )
            if row is not None and row["status"] == "ready":
                return row
            now = self.clock.now()
            if row is None:
                if now < week.end:
                    raise ServiceError(
                        grpc.StatusCode.FAILED_PRECONDITION, f"week {week.label} is not over yet"
                    )
                if week.end < now - self._retention:
                    raise not_found(f"no report for {week.label}, and its data is past the retention")
                if await self._claim(week, "on_demand", now):
                    await self._generate(week, now)
                    continue
            if self.clock.monotonic() > deadline:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"report {week.label} is being made; retry")
            await asyncio.sleep(0.5)

    async def list(
        self, request: analytics_pb2.ListWeeklyReportsRequest
    ) -> analytics_pb2.ListWeeklyReportsResponse:
        size = request.page_size or DEFAULT_PAGE_SIZE
        if not 1 <= size <= MAX_PAGE_SIZE:
            raise invalid_argument([("pageSize", f"must be 1..{MAX_PAGE_SIZE}")], "invalid page size")
        after = _decode_token(request.page_token)
        async with self._pool.acquire() as conn:
            rows = await conn.fetch(
                """SELECT week, week_start, generated_at, trigger, sent_to, sent_at, summary
                   FROM weekly_reports WHERE status = 'ready' AND ($1::timestamptz IS NULL OR week_start < $1)
                   ORDER BY week_start DESC LIMIT $2""",
                after.start if after else None,
                size + 1,
            )
        response = analytics_pb2.ListWeeklyReportsResponse()
        for row in rows[:size]:
            info = response.reports.add(
                week=row["week"], trigger=row["trigger"], sent_to=list(row["sent_to"]), summary=row["summary"]
            )
            info.week_start.FromDatetime(row["week_start"])
            info.generated_at.FromDatetime(row["generated_at"])
            if row["sent_at"] is not None:
                info.sent_at.FromDatetime(row["sent_at"])
        if len(rows) > size:
            response.next_page_token = base64.urlsafe_b64encode(rows[size - 1]["week"].encode()).decode()
        return response


def _decode_token(token: str) -> Week | None:
    if not token:
        return None
    try:
        return parse_week(base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii"), "pageToken")
    except (ValueError, UnicodeError, binascii.Error):
        raise invalid_argument([("pageToken", "is not a token of this list")], "invalid page token") from None
