"""Envelope parsing against every case of the RunningHub reference, the
circuit breaker's states, and the parameters read from apiCallDemo."""

from __future__ import annotations

import json

import pytest

from services.effects import envelope
from services.effects.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, CircuitOpenError
from services.effects.envelope import EnvelopeError
from services.effects.parameters import build_node_info, from_config
from services.servicekit.errors import FieldViolations


def env(code: int, data: object = None, msg: str = "") -> envelope.Envelope:
    return envelope.parse(json.dumps({"code": code, "msg": msg, "data": data}))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"msg": "x"}',
        b'{"code": "abc"}',
        b'{"code": true}',
        b"[" * 200_000,
        b"\xff\xfe",
    ],
)
def test_what_is_not_an_envelope(raw: bytes) -> None:
    with pytest.raises(EnvelopeError):
        envelope.parse(raw)


@pytest.mark.parametrize("value", [1904000000000000001, "1904000000000000001", " 1904000000000000001 "])
def test_task_ids_as_numbers_or_strings(value: object) -> None:
    created = envelope.created(env(0, {"taskId": value, "taskStatus": "QUEUED", "promptTips": "{}"}))
    assert created.task_id == "1904000000000000001" and created.status == "QUEUED"


@pytest.mark.parametrize("value", [True, None, "12a", [], {}, "9" * 40])
def test_task_ids_that_are_not(value: object) -> None:
    with pytest.raises(EnvelopeError):
        envelope.task_id(value)


def test_node_errors_in_prompt_tips_fail_a_created_task() -> None:
    tips = {
        "result": True,
        "error": None,
        "node_errors": {"15": {"class_type": "LoadImage", "errors": [{"message": "Invalid image file"}]}},
    }
    created = envelope.created(
        env(0, {"taskId": "1", "taskStatus": "QUEUED", "promptTips": json.dumps(tips)})
    )
    assert created.status == "FAILED"
    assert created.failure == envelope.Failure("LoadImage", "validation", "Invalid image file")
    ok = envelope.created(
        env(0, {"taskId": "1", "taskStatus": "RUNNING", "promptTips": '{"node_errors": {}}'})
    )
    assert ok.status == "RUNNING" and ok.failure is None


def test_outputs_states() -> None:
    assert envelope.task_state(env(804)).status == "RUNNING"
    assert envelope.task_state(env(813)).status == "QUEUED"
    assert envelope.task_state(env(0, None)).status == "RUNNING"  # code 0, null data: still running
    lag = envelope.task_state(env(0, []))
    assert lag.status == "RUNNING" and lag.lagging  # SUCCESS, outputs not listed yet
    assert envelope.task_state(env(807)).status is None
    assert envelope.task_state(env(423)).status is None
    with pytest.raises(EnvelopeError):
        envelope.task_state(env(301))


def test_outputs_success_with_costs() -> None:
    items = [
        {
            "fileUrl": "https://x/1.png",
            "fileType": "png",
            "taskCostTime": "12",
            "nodeId": "9",
            "consumeCoins": "7",
        },
        {
            "fileUrl": "https://x/2.png",
            "fileType": "png",
            "taskCostTime": "12",
            "nodeId": "10",
            "consumeCoins": "7",
        },
    ]
    state = envelope.task_state(env(0, items))
    assert state.status == "SUCCEEDED" and len(state.outputs) == 2
    assert state.cost_seconds == 12.0 and state.cost_coins == "7"  # task-level values, not summed


def test_failed_reason_as_object_or_string() -> None:
    reason = {
        "node_id": "3",
        "node_name": "KSampler",
        "exception_type": "ValueError",
        "exception_message": "bad",
    }
    state = envelope.task_state(env(805, {"failedReason": reason}))
    assert state.status == "FAILED" and state.failure == envelope.Failure("KSampler", "ValueError", "bad")
    state = envelope.task_state(env(805, {"failedReason": json.dumps(reason)}))
    assert state.failure == envelope.Failure("KSampler", "ValueError", "bad")
    assert envelope.task_state(env(805, None)).failure == envelope.Failure(
        message="the task failed on RunningHub"
    )


def test_hostile_webhook_bodies() -> None:
    for body in (b"[" * 200_000, json.dumps({"taskId": "1", "eventData": "[" * 200_000}).encode()):
        with pytest.raises(EnvelopeError):
            envelope.webhook_event(body)


def test_webhook_event_data_is_parsed_twice() -> None:
    inner = {
        "code": 0,
        "msg": "",
        "data": [{"fileUrl": "u", "fileType": "png", "taskCostTime": 3, "nodeId": "9"}],
    }
    body = json.dumps({"event": "TASK_END", "taskId": 1904000000000000002, "eventData": json.dumps(inner)})
    rh_id, event = envelope.webhook_event(body.encode())
    assert rh_id == "1904000000000000002"
    state = envelope.task_state(event)
    assert state.status == "SUCCEEDED" and state.cost_seconds == 3.0  # a number inside eventData


def test_breaker_opens_fails_fast_probes_once_and_closes() -> None:
    now = [0.0]
    changes: list[str] = []
    breaker = CircuitBreaker(
        "global", failures=3, reset_seconds=10, clock=lambda: now[0], on_change=changes.append
    )
    for _ in range(2):
        breaker.before_call()
        breaker.failure()
    breaker.before_call()
    breaker.success()  # a success resets the count
    for _ in range(3):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == OPEN
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    now[0] = 10.5
    assert breaker.state == HALF_OPEN
    breaker.before_call()  # the probe
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # one probe at a time
    breaker.failure()  # the probe failed: open again for another period
    assert breaker.state == OPEN
    now[0] = 21.0
    breaker.before_call()
    breaker.success()
    assert breaker.state == CLOSED
    breaker.before_call()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


CONFIG = {
    "nodeInfoList": [
        {"nodeId": "1", "fieldName": "image", "fieldType": "IMAGE", "fieldValue": "a.png"},
        {"nodeId": "2", "fieldName": "image", "fieldType": "IMAGE", "fieldValue": "b.png"},
        {
            "nodeId": "3",
            "fieldName": "mode",
            "fieldType": "LIST",
            "fieldValue": "a",
            "fieldData": '[["a", "b"], {}]',
        },
        {"nodeId": "4", "fieldName": "steps", "fieldType": "INT", "fieldValue": "20"},
        {"nodeId": "4", "fieldName": "cfg", "fieldType": "FLOAT", "fieldValue": "7"},
        {
            "nodeId": "5",
            "fieldName": "size",
            "fieldType": "LIST",
            "fieldData": '[{"name": "S", "value": "s"}]',
        },
        {"nodeId": "6", "fieldName": "weird", "fieldType": "LORA"},
        {"fieldName": "no-node"},
        "garbage",
    ]
}


def test_parameters_from_apicalldemo() -> None:
    params = from_config(CONFIG)
    assert [p.key for p in params] == [
        "1:image",
        "2:image",
        "3:mode",
        "4:steps",
        "4:cfg",
        "5:size",
        "6:weird",
    ]
    assert params[2].options == ("a", "b") and params[5].options == ("s",) and params[6].type == "STRING"
    assert from_config({}) == [] and from_config({"nodeInfoList": "x"}) == []


def test_node_info_uses_node_ids_where_names_repeat() -> None:
    params = from_config(CONFIG)
    violations = FieldViolations()
    info = build_node_info(
        params,
        {"1:image": "api/x.png", "2:image": "https://x/y.png"},
        {"mode": "b", "steps": "-3"},
        violations,
    )
    assert not violations, violations.items
    assert info == [
        {"nodeId": "1", "fieldName": "image", "fieldValue": "api/x.png"},
        {"nodeId": "2", "fieldName": "image", "fieldValue": "https://x/y.png"},
        {"nodeId": "3", "fieldName": "mode", "fieldValue": "b"},
        {"nodeId": "4", "fieldName": "steps", "fieldValue": "-3"},
    ]
    violations = FieldViolations()
    build_node_info(params, {"image": "api/x.png"}, {"cfg": "inf", "steps": "1.5"}, violations)
    fields = dict(violations.items)
    assert fields["inputs['image']"].startswith("ambiguous")
    assert "parameters['cfg']" in fields and "parameters['steps']" in fields
    assert "inputs['2:image']" in fields or "inputs['1:image']" in fields
