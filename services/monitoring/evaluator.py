"""Alert rule evaluation: one pass computes every rule's value per label set
over its window, moves each alert through pending → firing → resolved, and
writes the changes, the alerts admins see and the notifications to send in
one transaction.

Semantics (Prometheus' and Alertmanager's):

* A rule is active for a label set when its value crosses the threshold.
  Active alerts are pending until active for `for`, then firing (a `for` of
  0 fires at once). A pending alert whose condition stops is forgotten.
* Hysteresis: a firing alert stays firing while its value stays past
  `clear` (2.5 s for the 3 s latency rule), and once it is back it resolves
  only after `keep_firing_for` without the condition. A value oscillating
  around the threshold therefore fires once and resolves once.
* A label set without enough samples in the window (`min_samples`) is not
  judged: a pending alert is forgotten, a firing one counts as cleared.
* Deduplication: an alert is identified by its fingerprint (alert name,
  severity and labels); the state of each is one row, so repeated passes or
  replicas never make a second alert or notification for it.
* Inhibition: rules sharing a name are one alert at several severities.
  While the critical one fires, the warning one (same labels) is inhibited:
  it is neither opened nor announced; if the critical one resolves while it
  still holds, it is opened and announced then. A warning announced before
  the critical one fired stays open and is announced resolved in due course.
* A firing, not inhibited alert is an open row in `alerts` (source = the
  rule's name) and one firing notification; its resolution closes the row
  and sends one resolved notification. An admin resolving the row forgets
  the state too: if the condition still holds, the rule starts over from
  pending.

The state is stored (`rule_states`), so a new leader carries on where the
old one stopped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final

import asyncpg

from services.servicekit.clock import Clock
from services.servicekit.db import Connection

from . import summary
from .notify import Receiver, enqueue, fingerprint
from .rules import Rule

SEVERITY_RANK: Final = {"critical": 0, "error": 1, "warning": 2}
METRIC: Final = {
    "latency_p95": "api_latency_p95_ms",
    "error_rate": "api_error_rate",
    "memory": "memory_used_ratio",
    "cache_hit_rate": "cache_hit_rate",
}
_EPSILON: Final = timedelta(microseconds=1)


@dataclass
class AlertState:
    fingerprint: str
    rule: str
    alertname: str
    severity: str
    labels: dict[str, str]
    state: str
    active_since: datetime
    firing_since: datetime | None = None
    clear_since: datetime | None = None
    value: float = 0.0
    notified: bool = False
    alert_id: str | None = None
    changed: bool = True

    @property
    def group(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """Alerts that differ only by severity share a group (inhibition)."""
        return self.alertname, tuple(
            sorted((k, v) for k, v in self.labels.items() if k not in ("alertname", "severity"))
        )


@dataclass
class Transition:
    alertname: str
    severity: str
    labels: dict[str, str]
    to: str  # pending, firing, inhibited, resolved, forgotten
    value: float


@dataclass
class Pass:
    at: datetime
    transitions: list[Transition] = field(default_factory=list)
    notifications: int = 0

    def find(self, alertname: str, severity: str, to: str) -> list[Transition]:
        return [t for t in self.transitions if (t.alertname, t.severity, t.to) == (alertname, severity, to)]


def rule_key(rule: Rule) -> str:
    return f"{rule.name}/{rule.severity}"


async def rule_values(
    conn: Connection, rules: list[Rule], now: datetime
) -> dict[str, dict[tuple[str, str], float]]:
    """Per rule key, the value of every judged label set (as a pair of label values)."""
    until = now + _EPSILON
    cache: dict[tuple[str, timedelta], Any] = {}

    async def read(kind: str, window: timedelta) -> Any:
        source = {"latency_p95": "api", "error_rate": "api"}.get(kind, kind)
        key = (source, window)
        if key not in cache:
            since = (now - window).replace(second=0, microsecond=0)
            if source == "api":
                cache[key] = await summary.endpoints(conn, since, until)
            elif source == "memory":
                cache[key] = await summary.memory(conn, since, until)
            else:
                cache[key] = await summary.caches(conn, since, until)
        return cache[key]

    out: dict[str, dict[tuple[str, str], float]] = {}
    for rule in rules:
        values: dict[tuple[str, str], float] = {}
        rows = await read(rule.kind, rule.window)
        if rule.kind in ("latency_p95", "error_rate"):
            for e in rows:
                if e.requests >= max(1, rule.min_samples):
                    values[(e.service, e.endpoint)] = (
                        e.quantile(0.95) if rule.kind == "latency_p95" else e.error_rate
                    )
        elif rule.kind == "memory":
            for service, instance, ratio in rows:
                values[(service, instance)] = ratio
        else:
            for c in rows:
                if c.hits + c.misses >= max(1, rule.min_samples):
                    values[(c.service, c.cache)] = c.hit_rate
        out[rule_key(rule)] = values
    return out


class Evaluator:
    def __init__(
        self,
        rules: list[Rule],
        clock: Clock,
        receivers: list[Receiver],
        external_url: str,
        on_notifications: Callable[[], None] = lambda: None,
    ) -> None:
        self.rules = sorted(rules, key=lambda r: SEVERITY_RANK[r.severity])  # critical first: it inhibits
        self.clock = clock
        self._receivers = receivers
        self._external_url = external_url
        self._on_notifications = on_notifications

    async def evaluate(self, conn: Connection) -> Pass:
        """One pass on `conn` (the leader's connection: if it lost the lock, the pass fails)."""
        now = self.clock.now()
        result = Pass(now)
        values = await rule_values(conn, self.rules, now)
        async with conn.transaction():
            rows = await conn.fetch("SELECT * FROM rule_states FOR UPDATE")
            states = {r["fingerprint"]: _state(r) for r in rows}
            by_key = {rule_key(r): r for r in self.rules}
            # States of rules no longer configured: resolved and forgotten.
            for st in [s for s in states.values() if s.rule not in by_key]:
                await self._resolve(conn, st, now, result)
                del states[st.fingerprint]
            firing_groups: set[Any] = set()
            for rule in self.rules:
                seen: set[str] = set()
                for label_values, value in values[rule_key(rule)].items():
                    labels = {"alertname": rule.name, "severity": rule.severity}
                    labels.update(zip(rule.label_names, label_values, strict=True))
                    fp = fingerprint(labels)
                    seen.add(fp)
                    found = states.get(fp)
                    if found is None:
                        if not rule.crosses(value):
                            continue
                        found = states[fp] = AlertState(
                            fp, rule_key(rule), rule.name, rule.severity, labels, "pending", now
                        )
                        result.transitions.append(
                            Transition(rule.name, rule.severity, labels, "pending", value)
                        )
                    found.value, found.changed = value, True
                    active = rule.still(value) if found.state == "firing" else rule.crosses(value)
                    await self._step(conn, rule, found, active, now, firing_groups, states, result)
                for st in [
                    s for s in states.values() if s.rule == rule_key(rule) and s.fingerprint not in seen
                ]:
                    await self._step(conn, rule, st, False, now, firing_groups, states, result)
            for st in states.values():
                if st.changed:
                    await _save(conn, st)
        if result.notifications:
            self._on_notifications()
        return result

    async def _step(
        self,
        conn: Connection,
        rule: Rule,
        st: AlertState,
        active: bool,
        now: datetime,
        firing_groups: set[Any],
        states: dict[str, AlertState],
        result: Pass,
    ) -> None:
        if st.state == "pending":
            if not active:
                await _forget(conn, st, states)
                result.transitions.append(
                    Transition(st.alertname, st.severity, st.labels, "forgotten", st.value)
                )
                return
            if now - st.active_since < rule.for_:
                return
            st.state, st.firing_since = "firing", now
            result.transitions.append(Transition(st.alertname, st.severity, st.labels, "firing", st.value))
        if active:
            st.clear_since = None
        else:
            st.clear_since = st.clear_since or now
            if now - st.clear_since >= rule.keep_firing_for:
                await self._resolve(conn, st, now, result)
                await _forget(conn, st, states)
                return
        inhibited = st.group in firing_groups
        if rule.severity == "critical":
            firing_groups.add(st.group)
        if st.notified:
            await conn.execute(
                "UPDATE alerts SET actual_value = $2, last_seen_at = $3 WHERE alert_id = $1 AND state = 'open'",
                st.alert_id,
                st.value,
                now,
            )
        elif inhibited:
            if not any(t.to == "inhibited" and t.labels == st.labels for t in result.transitions):
                result.transitions.append(
                    Transition(st.alertname, st.severity, st.labels, "inhibited", st.value)
                )
        else:
            await self._open(conn, rule, st, now, result)

    async def _open(self, conn: Connection, rule: Rule, st: AlertState, now: datetime, result: Pass) -> None:
        assert st.firing_since is not None
        st.alert_id = f"rule-{st.fingerprint}-{int(st.firing_since.timestamp() * 1000)}"
        st.notified = True
        await conn.execute(
            """
            INSERT INTO alerts (alert_id, fingerprint, source, metric, severity, labels, summary, threshold,
                                actual_value, state, first_seen_at, last_seen_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'open', $10, $11)
            ON CONFLICT (fingerprint) WHERE state = 'open'
            DO UPDATE SET actual_value = excluded.actual_value, last_seen_at = excluded.last_seen_at
            """,
            st.alert_id,
            st.fingerprint,
            rule.name,
            METRIC[rule.kind],
            rule.severity,
            json.dumps({k: v for k, v in st.labels.items() if k not in ("alertname", "severity")}),
            rule.summary,
            rule.threshold,
            st.value,
            st.firing_since,
            now,
        )
        await enqueue(
            conn,
            self._receivers,
            self._external_url,
            "firing",
            st.labels,
            self._annotations(rule, st),
            st.firing_since,
        )
        result.notifications += len(self._receivers)
        if not any(t.to == "firing" and t.labels == st.labels for t in result.transitions):
            result.transitions.append(Transition(st.alertname, st.severity, st.labels, "firing", st.value))

    async def _resolve(self, conn: Connection, st: AlertState, now: datetime, result: Pass) -> None:
        result.transitions.append(Transition(st.alertname, st.severity, st.labels, "resolved", st.value))
        if not st.notified:
            return
        await conn.execute(
            "UPDATE alerts SET state = 'resolved', resolved_at = $2, resolution_note = 'condition cleared' "
            "WHERE alert_id = $1 AND state = 'open'",
            st.alert_id,
            now,
        )
        rule = next((r for r in self.rules if rule_key(r) == st.rule), None)
        annotations = self._annotations(rule, st) if rule else {"summary": st.alertname, "description": ""}
        assert st.firing_since is not None
        await enqueue(
            conn,
            self._receivers,
            self._external_url,
            "resolved",
            st.labels,
            annotations,
            st.firing_since,
            now,
        )
        result.notifications += len(self._receivers)

    @staticmethod
    def _annotations(rule: Rule, st: AlertState) -> dict[str, str]:
        where = ", ".join(f"{k}={v}" for k, v in st.labels.items() if k not in ("alertname", "severity"))
        side = "below" if rule.below else "above"
        return {
            "summary": rule.summary or rule.name,
            "description": f"{METRIC[rule.kind]} {st.value:.4g} {side} {rule.threshold:.4g} over {rule.window} ({where})",
        }


def _state(row: asyncpg.Record) -> AlertState:
    labels = row["labels"]
    return AlertState(
        fingerprint=row["fingerprint"],
        rule=row["rule"],
        alertname=row["alertname"],
        severity=row["severity"],
        labels=json.loads(labels) if isinstance(labels, str) else dict(labels),
        state=row["state"],
        active_since=row["active_since"],
        firing_since=row["firing_since"],
        clear_since=row["clear_since"],
        value=row["value"],
        notified=row["notified"],
        alert_id=row["alert_id"],
        changed=False,
    )


async def _save(conn: Connection, st: AlertState) -> None:
    await conn.execute(
        """
        INSERT INTO rule_states (fingerprint, rule, alertname, severity, labels, state, active_since,
                                 firing_since, clear_since, value, notified, alert_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
        ON CONFLICT (fingerprint) DO UPDATE SET
            state = excluded.state, firing_since = excluded.firing_since, clear_since = excluded.clear_since,
            value = excluded.value, notified = excluded.notified, alert_id = excluded.alert_id
        """,
        st.fingerprint,
        st.rule,
        st.alertname,
        st.severity,
        json.dumps(st.labels),
        st.state,
        st.active_since,
        st.firing_since,
        st.clear_since,
        st.value,
        st.notified,
        st.alert_id,
    )


async def _forget(conn: Connection, st: AlertState, states: dict[str, AlertState]) -> None:
    await conn.execute("DELETE FROM rule_states WHERE fingerprint = $1", st.fingerprint)
    st.changed = False
    states.pop(st.fingerprint, None)
