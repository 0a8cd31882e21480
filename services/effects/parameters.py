"""The parameters of an effect (from its webapp's `apiCallDemo` config) and the
check of a CreateTask's inputs and parameters against them.

A parameter is named by its `fieldName`, or `nodeId:fieldName` where one effect
has two parameters with the same field name; both forms are accepted when they
are unambiguous. File fields (IMAGE, AUDIO, VIDEO) come in `inputs` and every
IMAGE field is required; the others come in `parameters` and default to the
app's own value when left out.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from services.servicekit.errors import FieldViolations

FILE_TYPES = frozenset({"IMAGE", "AUDIO", "VIDEO"})
KNOWN_TYPES = frozenset({"STRING", "LIST", "INT", "FLOAT", "BOOLEAN", "SWITCH", *FILE_TYPES})
MAX_STRING = 4000
MAX_ENTRIES = 64
# What RunningHub's upload returns ("api/<hash>.<ext>"), or an http(s) URL.
FILE_NAME = re.compile(r"^(api/[A-Za-z0-9._-]{1,200}|https?://[\x21-\x7e]{1,2000})$")
INT_RANGE = 2**53  # beyond this JSON clients lose precision anyway


@dataclass(frozen=True)
class Parameter:
    node_id: str
    field_name: str
    type: str
    options: tuple[str, ...]
    default: str
    description: str

    @property
    def key(self) -> str:
        return f"{self.node_id}:{self.field_name}"

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "fieldName": self.field_name,
            "type": self.type,
            "options": list(self.options),
            "default": self.default,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Parameter:
        return cls(
            str(data["nodeId"]),
            str(data["fieldName"]),
            str(data["type"]),
            tuple(str(o) for o in data.get("options", ())),
            str(data.get("default", "")),
            str(data.get("description", "")),
        )


def _clean(value: Any, limit: int = 500) -> str:
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return text.replace("\x00", "")[:limit]


def _options(field_data: Any) -> tuple[str, ...]:
    """A LIST's options from `fieldData`: a JSON string of ComfyUI's combo spec
    `[[options...], {...}]`, or a plain list (of strings or of {name/value})."""
    data = field_data
    if isinstance(data, str):
        if not data.strip():
            return ()
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            return ()
    if isinstance(data, list) and data and isinstance(data[0], list):
        data = data[0]
    if not isinstance(data, list):
        return ()
    out: list[str] = []
    for item in data:
        if isinstance(item, dict):
            item = item.get("value", item.get("name", item.get("index")))
        if isinstance(item, str | int | float) and not isinstance(item, bool):
            out.append(_clean(item, 200))
    return tuple(out)


def from_config(config: dict[str, Any]) -> list[Parameter]:
    """The parameters of a webapp config (`data` of apiCallDemo). Entries
    without a node id or field name are skipped; unknown types become STRING."""
    nodes = config.get("nodeInfoList")
    params: list[Parameter] = []
    if not isinstance(nodes, list):
        return params
    for node in nodes:
        if not isinstance(node, dict) or not node.get("nodeId") or not node.get("fieldName"):
            continue
        kind = _clean(node.get("fieldType"), 20).upper()
        params.append(
            Parameter(
                node_id=_clean(node["nodeId"], 100),
                field_name=_clean(node["fieldName"], 200),
                type=kind if kind in KNOWN_TYPES else "STRING",
                options=_options(node.get("fieldData")) if kind == "LIST" else (),
                default=_clean(node.get("fieldValue"), MAX_STRING),
                description=_clean(node.get("descriptionEn") or node.get("description")),
            )
        )
    return params


def _resolve(params: list[Parameter], name: str) -> Parameter | str:
    """The parameter a request key names, or why it names none."""
    if ":" in name:
        for p in params:
            if p.key == name:
                return p
        return "no such parameter"
    matches = [p for p in params if p.field_name == name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        return f"ambiguous: use one of {', '.join(m.key for m in matches)}"
    return "no such parameter"


def _bad_text(value: str) -> str | None:
    if "\x00" in value:
        return "must not contain NUL"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        return "must not contain lone surrogates"
    return None


def check_value(param: Parameter, value: str) -> str | None:
    """Why `value` does not fit `param`, or None."""
    if param.type == "LIST":
        return None if value in param.options or not param.options else "not one of the options"
    if param.type == "INT":
        if not re.fullmatch(r"-?\d{1,16}", value) or abs(int(value)) > INT_RANGE:
            return "must be an integer"
        return None
    if param.type == "FLOAT":
        try:
            number = float(value)
        except ValueError:
            return "must be a number"
        if not math.isfinite(number) or abs(number) > 1e15 or len(value) > 40:
            return "must be a finite number"
        return None
    if param.type == "BOOLEAN":
        return None if value in ("true", "false") else "must be true or false"
    if param.type == "SWITCH":
        return (
            None
            if re.fullmatch(r"\d{1,4}", value) or value in ("true", "false")
            else "must be a switch value"
        )
    if len(value) > MAX_STRING:
        return f"at most {MAX_STRING} characters"
    return None


def build_node_info(
    params: list[Parameter], inputs: dict[str, str], values: dict[str, str], violations: FieldViolations
) -> list[dict[str, str]]:
    """The `nodeInfoList` of a create, or violations naming every bad entry."""
    chosen: dict[str, tuple[Parameter, str]] = {}
    for group, given, files in (("inputs", inputs, True), ("parameters", values, False)):
        if len(given) > MAX_ENTRIES:
            violations.add(group, f"at most {MAX_ENTRIES} entries")
            continue
        for name, value in sorted(given.items()):
            field = f"{group}[{name!r}]" if len(name) <= 100 else group
            problem = _bad_text(name) or _bad_text(value)
            if problem:
                violations.add(field, problem)
                continue
            found = _resolve(params, name)
            if isinstance(found, str):
                violations.add(field, found)
                continue
            if (found.type in FILE_TYPES) != files:
                where = "inputs" if found.type in FILE_TYPES else "parameters"
                violations.add(field, f"a {found.type} parameter goes in {where}")
                continue
            if found.key in chosen:
                violations.add(field, "given twice")
                continue
            if files:
                problem = None if FILE_NAME.fullmatch(value) else "must be an uploaded file name"
            else:
                problem = check_value(found, value)
            if problem:
                violations.add(field, problem)
                continue
            chosen[found.key] = (found, value)
    for p in params:
        if p.type == "IMAGE" and p.key not in chosen:
            unique = sum(q.field_name == p.field_name for q in params) == 1
            violations.add(f"inputs[{(p.field_name if unique else p.key)!r}]", "required")
    return [
        {"nodeId": p.node_id, "fieldName": p.field_name, "fieldValue": value}
        for p, value in (chosen[k] for k in sorted(chosen))
    ]
