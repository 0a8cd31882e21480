"""Alert rules: loaded from a TOML file (the defaults are `rules.toml` beside
this module) and checked whole at start-up; a bad file stops the service
naming the rule and the key."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

DEFAULT_RULES: Final = Path(__file__).parent / "rules.toml"
KINDS: Final = {
    "latency_p95": ("service", "endpoint"),
    "error_rate": ("service", "endpoint"),
    "memory": ("service", "instance"),
    "cache_hit_rate": ("service", "cache"),
}
SEVERITIES: Final = ("warning", "error", "critical")
_KEYS: Final = {
    "name",
    "kind",
    "severity",
    "above",
    "below",
    "clear",
    "window",
    "for",
    "keep_firing_for",
    "min_samples",
    "summary",
}
_DURATION: Final = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NAME: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,62}$")


class RulesError(ValueError):
    pass


def parse_duration(text: Any, where: str) -> timedelta:
    match = _DURATION.match(text) if isinstance(text, str) else None
    if match is None:
        raise RulesError(f"{where}: a duration like 30s, 5m or 1h")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    severity: str
    threshold: float
    below: bool  # active when the value is below the threshold (else above)
    clear: float
    window: timedelta
    for_: timedelta
    keep_firing_for: timedelta
    min_samples: int
    summary: str

    @property
    def label_names(self) -> tuple[str, ...]:
        return KINDS[self.kind]

    def crosses(self, value: float) -> bool:
        """The condition that starts an alert."""
        return value < self.threshold if self.below else value > self.threshold

    def still(self, value: float) -> bool:
        """The condition that keeps a firing alert firing (hysteresis)."""
        return value < self.clear if self.below else value > self.clear


def _number(raw: dict[str, Any], key: str, where: str) -> float:
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RulesError(f"{where}.{key}: a number")
    return float(value)


def parse_rule(raw: dict[str, Any], where: str) -> Rule:
    unknown = set(raw) - _KEYS
    if unknown:
        raise RulesError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("name", "kind", "severity", "window", "for"):
        if key not in raw:
            raise RulesError(f"{where}.{key}: required")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise RulesError(f"{where}.name: letters, digits and _")
    if raw["kind"] not in KINDS:
        raise RulesError(f"{where}.kind: one of {sorted(KINDS)}")
    if raw["severity"] not in SEVERITIES:
        raise RulesError(f"{where}.severity: one of {list(SEVERITIES)}")
    if ("above" in raw) == ("below" in raw):
        raise RulesError(f"{where}: exactly one of above and below")
    below = "below" in raw
    threshold = _number(raw, "below" if below else "above", where)
    clear = _number(raw, "clear", where) if "clear" in raw else threshold
    if (below and clear < threshold) or (not below and clear > threshold):
        raise RulesError(f"{where}.clear: on the healthy side of the threshold")
    window = parse_duration(raw["window"], f"{where}.window")
    if window < timedelta(minutes=1):
        raise RulesError(f"{where}.window: at least 1m (the rollups are per minute)")
    min_samples = raw.get("min_samples", 0)
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 0:
        raise RulesError(f"{where}.min_samples: an integer, 0 or more")
    summary = raw.get("summary", "")
    if not isinstance(summary, str) or len(summary) > 500:
        raise RulesError(f"{where}.summary: text of at most 500 characters")
    return Rule(
        name=name,
        kind=raw["kind"],
        severity=raw["severity"],
        threshold=threshold,
        below=below,
        clear=clear,
        window=window,
        for_=parse_duration(raw["for"], f"{where}.for"),
        keep_firing_for=parse_duration(raw.get("keep_firing_for", "0s"), f"{where}.keep_firing_for"),
        min_samples=min_samples,
        summary=summary,
    )


def load_rules(path: Path = DEFAULT_RULES) -> list[Rule]:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RulesError(f"{path}: {exc}") from None
    raws = data.get("rule", [])
    if set(data) - {"rule"} or not isinstance(raws, list):
        raise RulesError(f"{path}: only [[rule]] tables")
    rules = [parse_rule(raw, f"rule[{i}]") for i, raw in enumerate(raws)]
    seen: set[tuple[str, str]] = set()
    kinds: dict[str, str] = {}
    for rule in rules:
        if (rule.name, rule.severity) in seen:
            raise RulesError(f"rule {rule.name}: severity {rule.severity} given twice")
        if kinds.setdefault(rule.name, rule.kind) != rule.kind:
            raise RulesError(f"rule {rule.name}: one kind for all its severities")
        seen.add((rule.name, rule.severity))
    return rules
