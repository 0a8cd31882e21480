"""Alerts: the frontend's reports (ReportPerformanceAlerts) and the admin's
list and resolve.

Client reports are validated whole (a bad one refuses the batch), stored once
per `alertId` (a re-sent id is a duplicate), and grouped by fingerprint
(metric, severity, page) into one open alert that counts its occurrences and
keeps the first and last time seen and the latest report's values. A new
group is announced to the webhook receivers (firing); resolving an alert
announces it resolved. Rule alerts live in the same table (source = the
rule's name) and are resolved the same way.

The list is newest first; its `pageToken` is a keyset cursor (the last seq
shown, bound to the filters), so alerts arriving between pages never shift
or repeat what a client already saw.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
from google.protobuf import json_format

from cosnap.monitoring.v1 import monitoring_pb2
from services.servicekit.errors import FieldViolations, invalid_argument, not_found

from .notify import Receiver, enqueue, fingerprint

CLIENT_ALERTNAME: Final = "ClientPerformanceAlert"
SEVERITIES: Final = ("warning", "error", "critical")
STATES: Final = ("open", "resolved", "all")
ID: Final = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
METRIC: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
MAX_PAGE: Final = 512
MAX_NOTE: Final = 1000
MAX_CONTEXT_BYTES: Final = 8192
MAX_CONTEXT_DEPTH: Final = 5
MAX_VALUE: Final = 1e12
DEFAULT_PAGE_SIZE: Final = 20
MAX_PAGE_SIZE: Final = 100


@dataclass(frozen=True)
class ClientAlert:
    alert_id: str
    session_id: str
    user_id: str
    metric: str
    severity: str
    threshold: float
    actual_value: float
    page: str
    context: str | None  # JSON

    @property
    def labels(self) -> dict[str, str]:
        return {
            "alertname": CLIENT_ALERTNAME,
            "severity": self.severity,
            "metric": self.metric,
            "page": self.page,
        }


def _printable(text: str) -> bool:
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def _depth_and_nul(value: Any, depth: int = 1) -> tuple[int, bool]:
    """(nesting depth, whether any key or string holds a NUL) of decoded JSON."""
    if isinstance(value, dict):
        inner = [_depth_and_nul(v, depth + 1) for v in value.values()]
        nul = any("\x00" in k for k in value) or any(n for _, n in inner)
        return max([depth, *(d for d, _ in inner)]), nul
    if isinstance(value, list):
        inner = [_depth_and_nul(v, depth + 1) for v in value]
        return max([depth, *(d for d, _ in inner)]), any(n for _, n in inner)
    return depth - 1, isinstance(value, str) and "\x00" in value


def validate_client_alerts(
    request: monitoring_pb2.ReportPerformanceAlertsRequest, max_items: int
) -> list[ClientAlert]:
    bad = FieldViolations()
    if not request.alerts:
        bad.add("alerts", "at least one alert")
    if len(request.alerts) > max_items:
        bad.add("alerts", f"at most {max_items} alerts per request")
    bad.raise_if_any("invalid alerts")
    out = []
    for i, a in enumerate(request.alerts):
        where = f"alerts[{i}]"
        if not ID.match(a.alert_id):
            bad.add(f"{where}.alertId", "1 to 128 characters of letters, digits and . _ : -")
        if not ID.match(a.session_id):
            bad.add(f"{where}.sessionId", "1 to 128 characters of letters, digits and . _ : -")
        if a.user_id and not ID.match(a.user_id):
            bad.add(f"{where}.userId", "at most 128 characters of letters, digits and . _ : -")
        if not METRIC.match(a.metric):
            bad.add(f"{where}.metric", "a metric name like LCP or api_latency")
        if a.severity not in SEVERITIES:
            bad.add(f"{where}.severity", "warning, error or critical")
        for name, number in (("threshold", a.threshold), ("actualValue", a.actual_value)):
            if not (math.isfinite(number) and abs(number) <= MAX_VALUE):
                bad.add(f"{where}.{name}", "a finite number of at most 1e12 in size")
        if len(a.page) > MAX_PAGE or not _printable(a.page):
            bad.add(f"{where}.page", f"at most {MAX_PAGE} characters, no control characters")
        context: str | None = None
        if a.HasField("context"):
            decoded = json_format.MessageToDict(a.context)
            context = json.dumps(decoded, separators=(",", ":"))
            depth, nul = _depth_and_nul(decoded)
            if len(context.encode()) > MAX_CONTEXT_BYTES:
                bad.add(f"{where}.context", f"at most {MAX_CONTEXT_BYTES} bytes as JSON")
            elif depth > MAX_CONTEXT_DEPTH:
                bad.add(f"{where}.context", f"at most {MAX_CONTEXT_DEPTH} levels deep")
            elif nul:
                bad.add(f"{where}.context", "no NUL characters")
        out.append(
            ClientAlert(
                a.alert_id,
                a.session_id,
                a.user_id,
                a.metric,
                a.severity,
                a.threshold,
                a.actual_value,
                a.page,
                context,
            )
        )
    bad.raise_if_any("invalid alerts")
    return out


_GROUP_SQL = """
INSERT INTO alerts AS a (alert_id, fingerprint, source, metric, severity, page, labels, summary, session_id,
                         user_id, threshold, actual_value, context, state, occurrences, first_seen_at, last_seen_at)
VALUES ($1, $2, 'client', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, 'open', $13, $14, $14)
ON CONFLICT (fingerprint) WHERE state = 'open' DO UPDATE SET
    occurrences = a.occurrences + excluded.occurrences,
    last_seen_at = excluded.last_seen_at,
    session_id = excluded.session_id, user_id = excluded.user_id, threshold = excluded.threshold,
    actual_value = excluded.actual_value, context = excluded.context
RETURNING alert_id, (xmax = 0) AS created
"""


class AlertBook:
    """Client alerts in, alerts listed and resolved."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        receivers: list[Receiver],
        external_url: str,
        on_notifications: Callable[[], None] = lambda: None,
    ) -> None:
        self._pool = pool
        self._receivers = receivers
        self._external_url = external_url
        self._on_notifications = on_notifications

    async def report(self, alerts: list[ClientAlert], now: datetime) -> tuple[int, int]:
        """Store what is new; (accepted, duplicates)."""
        unique: dict[str, ClientAlert] = {}
        for a in alerts:
            unique.setdefault(a.alert_id, a)
        announced = 0
        async with self._pool.acquire() as conn, conn.transaction():
            new_ids = {
                r["alert_id"]
                for r in await conn.fetch(
                    "INSERT INTO client_alert_keys (alert_id, group_id, received_at) "
                    "SELECT id, '', $2 FROM unnest($1::text[]) AS id ORDER BY id "
                    "ON CONFLICT DO NOTHING RETURNING alert_id",
                    sorted(unique),
                    now,
                )
            }
            groups: dict[str, list[ClientAlert]] = {}
            for a in alerts:
                if a.alert_id in new_ids and unique[a.alert_id] is a:
                    groups.setdefault(fingerprint(a.labels), []).append(a)
            for fp, members in sorted(groups.items()):
                latest = members[-1]
                row = await conn.fetchrow(
                    _GROUP_SQL,
                    f"client-{uuid.uuid4().hex[:24]}",
                    fp,
                    latest.metric,
                    latest.severity,
                    latest.page,
                    json.dumps({"metric": latest.metric, "page": latest.page}),
                    f"{latest.metric} {latest.severity} reported by clients",
                    latest.session_id,
                    latest.user_id,
                    latest.threshold,
                    latest.actual_value,
                    latest.context,
                    len(members),
                    now,
                )
                assert row is not None  # INSERT ... ON CONFLICT DO UPDATE returns its row
                await conn.execute(
                    "UPDATE client_alert_keys SET group_id = $1 WHERE alert_id = ANY($2::text[])",
                    row["alert_id"],
                    [a.alert_id for a in members],
                )
                if row["created"]:
                    await enqueue(
                        conn,
                        self._receivers,
                        self._external_url,
                        "firing",
                        latest.labels,
                        {
                            "summary": f"clients report {latest.metric} {latest.severity}",
                            "description": f"{latest.metric} {latest.actual_value:.4g} against {latest.threshold:.4g} on {latest.page or '(no page)'}",
                        },
                        now,
                    )
                    announced += len(self._receivers)
        if announced:
            self._on_notifications()
        accepted = len(new_ids)
        return accepted, len(alerts) - accepted

    async def list(
        self, request: monitoring_pb2.ListPerformanceAlertsRequest
    ) -> monitoring_pb2.ListPerformanceAlertsResponse:
        bad = FieldViolations()
        state = request.state or "open"
        if state not in STATES:
            bad.add("state", "open, resolved or all")
        if request.severity and request.severity not in SEVERITIES:
            bad.add("severity", "warning, error or critical")
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            bad.add("pageSize", f"1 to {MAX_PAGE_SIZE}")
        bad.raise_if_any("invalid alert query")
        size = request.page_size or DEFAULT_PAGE_SIZE
        scope = f"{state}|{request.severity}"
        after = _read_token(request.page_token, scope) if request.page_token else None
        rows = await self._pool.fetch(
            """
            SELECT * FROM alerts
            WHERE ($1 = 'all' OR state = $1) AND ($2 = '' OR severity = $2) AND ($3::bigint IS NULL OR seq < $3)
            ORDER BY seq DESC LIMIT $4
            """,
            state,
            request.severity,
            after,
            size + 1,
        )
        response = monitoring_pb2.ListPerformanceAlertsResponse()
        for row in rows[:size]:
            response.alerts.append(to_message(row))
        if len(rows) > size:
            response.next_page_token = _make_token(rows[size - 1]["seq"], scope)
        return response

    async def resolve(
        self, request: monitoring_pb2.ResolvePerformanceAlertRequest, now: datetime
    ) -> monitoring_pb2.ResolvePerformanceAlertResponse:
        bad = FieldViolations()
        if not ID.match(request.alert_id):
            bad.add("alertId", "1 to 128 characters of letters, digits and . _ : -")
        if len(request.note) > MAX_NOTE or "\x00" in request.note:
            bad.add("note", f"at most {MAX_NOTE} characters, no NUL")
        bad.raise_if_any("invalid resolve")
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                """
                SELECT * FROM alerts WHERE alert_id = $1
                   OR alert_id = (SELECT group_id FROM client_alert_keys WHERE alert_id = $1)
                FOR UPDATE
                """,
                request.alert_id,
            )
            if row is None:
                raise not_found(f"alert {request.alert_id} not found")
            if row["state"] == "resolved":
                return monitoring_pb2.ResolvePerformanceAlertResponse(alert=to_message(row))
            row = await conn.fetchrow(
                "UPDATE alerts SET state = 'resolved', resolved_at = $2, resolution_note = $3 "
                "WHERE seq = $1 RETURNING *",
                row["seq"],
                now,
                request.note,
            )
            assert row is not None  # locked above
            if row["source"] != "client":
                # The rule starts over: if its condition still holds it goes pending again.
                await conn.execute("DELETE FROM rule_states WHERE alert_id = $1", row["alert_id"])
            labels = {
                "alertname": CLIENT_ALERTNAME if row["source"] == "client" else row["source"],
                "severity": row["severity"],
                **_labels(row),
            }
            await enqueue(
                conn,
                self._receivers,
                self._external_url,
                "resolved",
                labels,
                {"summary": row["summary"], "description": f"resolved by an admin: {request.note}"[:1100]},
                row["first_seen_at"],
                now,
            )
        if self._receivers:
            self._on_notifications()
        return monitoring_pb2.ResolvePerformanceAlertResponse(alert=to_message(row))


def _labels(row: asyncpg.Record) -> dict[str, str]:
    raw = row["labels"]
    return dict(json.loads(raw) if isinstance(raw, str) else raw)


def to_message(row: asyncpg.Record) -> monitoring_pb2.PerformanceAlert:
    alert = monitoring_pb2.PerformanceAlert(
        alert_id=row["alert_id"],
        session_id=row["session_id"],
        user_id=row["user_id"],
        metric=row["metric"],
        severity=row["severity"],
        threshold=row["threshold"],
        actual_value=row["actual_value"],
        page=row["page"],
        state=row["state"],
        source=row["source"],
        resolution_note=row["resolution_note"],
        occurrences=row["occurrences"],
        fingerprint=row["fingerprint"],
        labels=_labels(row),
    )
    if row["context"] is not None:
        json_format.ParseDict(
            json.loads(row["context"]) if isinstance(row["context"], str) else row["context"], alert.context
        )
    alert.created_at.FromDatetime(row["first_seen_at"])
    alert.first_seen_at.FromDatetime(row["first_seen_at"])
    alert.last_seen_at.FromDatetime(row["last_seen_at"])
    if row["resolved_at"] is not None:
        alert.resolved_at.FromDatetime(row["resolved_at"])
    return alert


def _scope_tag(scope: str) -> str:
    return hashlib.sha256(scope.encode()).hexdigest()[:8]


def _make_token(seq: int, scope: str) -> str:
    return base64.urlsafe_b64encode(f"1:{seq}:{_scope_tag(scope)}".encode()).decode().rstrip("=")


def _read_token(token: str, scope: str) -> int:
    try:
        if len(token) > 64:
            raise ValueError
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, seq, tag = text.split(":")
        if version != "1" or tag != _scope_tag(scope) or not seq.isdigit() or len(seq) > 18:
            raise ValueError
        return int(seq)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise invalid_argument(
            [("pageToken", "not a token from this list with these filters")], "invalid page token"
        ) from None
