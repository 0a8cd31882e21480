"""Checking a create's `nodeInfoList` against the app, the way RunningHub answers.

Two kinds of refusal, as on the real service:
- the list does not fit the app (an unknown node or field, a malformed entry):
  the create is refused with a business code (803, or 301);
- a value the app's ComfyUI graph rejects (not an option of a LIST, not a number
  for INT/FLOAT, an image never uploaded): code 0, the task is created FAILED and
  `promptTips` carries ComfyUI's validation result with non-empty `node_errors`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tools.runninghub_sim import codes
from tools.runninghub_sim.codes import Reply
from tools.runninghub_sim.fixtures import Webapp

_MEDIA = ("IMAGE", "AUDIO", "VIDEO")


def parse_node_info(app: Webapp, raw: Any) -> dict[tuple[str, str], Any]:
    """The overrides keyed by (nodeId, fieldName); raises Reply(301/803) when they do not fit."""
    if raw is None:
        return {}
    if not isinstance(raw, list):
        raise Reply(codes.PARAMS_INVALID)
    out: dict[tuple[str, str], Any] = {}
    for item in raw:
        if not isinstance(item, dict):
            raise Reply(codes.PARAMS_INVALID)
        node_id, field_name = item.get("nodeId"), item.get("fieldName")
        if isinstance(node_id, int) and not isinstance(node_id, bool):
            node_id = str(node_id)
        if not isinstance(node_id, str) or not isinstance(field_name, str) or "fieldValue" not in item:
            raise Reply(codes.PARAMS_INVALID)
        if app.field(node_id, field_name) is None:
            raise Reply(codes.INVALID_NODE_INFO)
        out[(node_id, field_name)] = item["fieldValue"]
    return out


def _options(node: dict[str, Any]) -> list[str]:
    try:
        spec = json.loads(node["fieldData"])
    except (ValueError, TypeError):
        return []
    if isinstance(spec, list) and spec and isinstance(spec[0], list):
        return [str(o) for o in spec[0]]
    return [str(o) for o in spec] if isinstance(spec, list) else []


def _number(value: Any, integer: bool) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and (not integer or value.is_integer())
    if isinstance(value, str):
        try:
            parsed = int(value) if integer else float(value)
        except ValueError:
            return False
        return not isinstance(parsed, float) or math.isfinite(parsed)
    return False


def _problem(node: dict[str, Any], value: Any, uploaded: set[str]) -> tuple[str, str, str] | None:
    """(type, message, details) of ComfyUI's validation error for this value, or None."""
    kind, name = node["fieldType"], node["fieldName"]
    if kind in _MEDIA:
        if not isinstance(value, str) or not value:
            return ("required_input_missing", "Required input is missing", name)
        if value.startswith(("http://", "https://")) or value in uploaded:
            return None
        return (
            "custom_validation_failed",
            "Custom validation failed for node",
            f"Invalid image file: {value}",
        )
    if kind == "LIST":
        options = _options(node)
        if str(value) not in options:
            return ("value_not_in_list", "Value not in list", f"{name}: '{value}' not in {options}")
        return None
    if kind in ("INT", "SWITCH"):
        if not _number(value, integer=True):
            return (
                "invalid_input_type",
                "Failed to convert an input value to a INT value",
                f"{name}, {value}",
            )
        return None
    if kind == "FLOAT":
        if not _number(value, integer=False):
            return (
                "invalid_input_type",
                "Failed to convert an input value to a FLOAT value",
                f"{name}, {value}",
            )
        return None
    if kind == "BOOLEAN":
        if not (isinstance(value, bool) or str(value).lower() in ("true", "false")):
            return ("invalid_input_type", "Failed to convert an input value to a BOOLEAN value", f"{name}")
        return None
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        return ("invalid_input_type", "Failed to convert an input value to a STRING value", name)
    if isinstance(value, str) and "\x00" in value:
        return ("invalid_input_type", "Invalid character in input", name)
    return None


def prompt_tips(app: Webapp, overrides: dict[tuple[str, str], Any], uploaded: set[str]) -> tuple[str, bool]:
    """(promptTips JSON string, valid?) for these overrides."""
    node_errors: dict[str, Any] = {}
    outputs = [node for node, _ in app.outputs]
    for (node_id, field_name), value in overrides.items():
        node = app.field(node_id, field_name)
        assert node is not None  # parse_node_info checked it
        problem = _problem(node, value, uploaded)
        if problem is None:
            continue
        kind, msg, details = problem
        entry = node_errors.setdefault(
            node_id, {"errors": [], "dependent_outputs": outputs, "class_type": node["nodeName"]}
        )
        entry["errors"].append(
            {
                "type": kind,
                "message": msg,
                "details": details,
                "extra_info": {"input_name": field_name, "received_value": value},
            }
        )
    if not node_errors:
        tips = {"result": True, "error": None, "outputs_to_execute": outputs, "node_errors": {}}
        return json.dumps(tips), True
    tips = {
        "result": False,
        "error": {
            "type": "prompt_outputs_failed_validation",
            "message": "Prompt outputs failed validation",
            "details": "",
            "extra_info": {},
        },
        "outputs_to_execute": [],
        "node_errors": node_errors,
    }
    return json.dumps(tips, ensure_ascii=False), False
