"""`/__sim/`: steering and reading the simulator over HTTP (tests, benchmarks, `make up`).

Plain JSON in and out (no envelope); a bad control request answers 400 with
`{"error": ...}`. See README.md for the list.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from tools.runninghub_sim.api import ENDPOINTS, SIM
from tools.runninghub_sim.faults import FaultRule

# A 1x1 PNG: what every output and cover URL serves.
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
ENDPOINT_NAMES = {"*", "unknown", *ENDPOINTS.values()}
ACCOUNT_FIELDS = {
    "apiType": ("api_type", str),
    "concurrency": ("concurrency", int),
    "coins": ("coins", int),
    "valid": ("valid", bool),
    "freeUser": ("free_user", bool),
    "busyCode": ("busy_code", int),
    "personalQueueLimit": ("personal_queue_limit", int),
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        value = await request.json()
    except ValueError as exc:
        raise _bad("body is not JSON") from exc
    if not isinstance(value, dict):
        raise _bad("body must be a JSON object")
    return value


def _endpoint(raw: Any) -> str:
    if raw not in ENDPOINT_NAMES:
        raise _bad(f"endpoint must be one of {sorted(ENDPOINT_NAMES)}")
    return str(raw)


def guarded(handler: Handler) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (ValueError, KeyError, TypeError) as exc:
            raise _bad(str(exc)) from exc

    return run


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "region": request.app[SIM].region})


async def counters(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].counters())


async def reset(request: web.Request) -> web.Response:
    body = await _body(request)
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise _bad("seed must be an integer")
    request.app[SIM].reset(seed)
    return web.json_response({"ok": True})


async def get_config(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].config.to_json())


async def put_config(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    sim.config = sim.config.updated(await _body(request))
    return web.json_response(sim.config.to_json())


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIM].faults.to_json())


async def put_faults(request: web.Request) -> web.Response:
    body = await _body(request)
    endpoint = _endpoint(body.get("endpoint", "*"))
    request.app[SIM].faults.set_rule(endpoint, FaultRule.from_json(body))
    return web.json_response(request.app[SIM].faults.to_json())


async def delete_faults(request: web.Request) -> web.Response:
    faults = request.app[SIM].faults
    faults.rules.clear()
    faults.scripts.clear()
    return web.json_response(faults.to_json())


async def script(request: web.Request) -> web.Response:
    body = await _body(request)
    steps = body.get("responses")
    if not isinstance(steps, list):
        raise _bad("responses must be a list")
    request.app[SIM].faults.script(_endpoint(body.get("endpoint")), steps)
    return web.json_response(request.app[SIM].faults.to_json())


async def put_key(request: web.Request) -> web.Response:
    body = await _body(request)
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise _bad("key must be a non-empty string")
    settings: dict[str, Any] = {}
    for name, value in body.items():
        if name == "key":
            continue
        if name not in ACCOUNT_FIELDS:
            raise _bad(f"unknown key setting {name!r}")
        attr, kind = ACCOUNT_FIELDS[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise _bad(f"{name} must be of type {kind.__name__}")
        settings[attr] = value
    account = request.app[SIM].register_key(key, **settings)
    return web.json_response(account.to_json())


async def outcomes(request: web.Request) -> web.Response:
    body = await _body(request)
    entries = body.get("outcomes")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise _bad("outcomes must be a list of objects")
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise _bad("key must be a string")
    request.app[SIM].plan(entries, key)
    return web.json_response({"ok": True})


async def list_tasks(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    now = sim.now()
    return web.json_response({"tasks": [t.to_json(now) for t in sim.tasks.values()]})


async def get_task(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    task = sim.tasks.get(request.match_info["task_id"])
    if task is None:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such task"}), content_type="application/json")
    return web.json_response(task.to_json(sim.now()))


async def finish_task(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await _body(request)
    task_id = request.match_info["task_id"]
    if task_id not in sim.tasks:
        raise web.HTTPNotFound(text=json.dumps({"error": "no such task"}), content_type="application/json")
    task = sim.finish(task_id, body.get("outcome", "SUCCESS"), body.get("failedReason"))
    return web.json_response(task.to_json(sim.now()))


async def webhooks(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    return web.json_response(
        {"deliveries": [d.to_json() for items in sim.webhooks.deliveries.values() for d in items]}
    )


async def replay_webhook(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    task = sim.tasks.get(request.match_info["task_id"])
    if task is None or not task.webhook_url:
        raise web.HTTPNotFound(
            text=json.dumps({"error": "no such task with a webhook"}), content_type="application/json"
        )
    sim.send_webhook(task)
    return web.json_response({"ok": True})


async def file(request: web.Request) -> web.Response:
    return web.Response(body=PNG, content_type="image/png")


def add_routes(app: web.Application) -> None:
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/__sim/health", health),
        ("GET", "/__sim/counters", counters),
        ("POST", "/__sim/reset", reset),
        ("GET", "/__sim/config", get_config),
        ("PUT", "/__sim/config", put_config),
        ("GET", "/__sim/faults", get_faults),
        ("PUT", "/__sim/faults", put_faults),
        ("DELETE", "/__sim/faults", delete_faults),
        ("POST", "/__sim/script", script),
        ("PUT", "/__sim/keys", put_key),
        ("POST", "/__sim/outcomes", outcomes),
        ("GET", "/__sim/tasks", list_tasks),
        ("GET", "/__sim/tasks/{task_id}", get_task),
        ("POST", "/__sim/tasks/{task_id}/finish", finish_task),
        ("GET", "/__sim/webhooks", webhooks),
        ("POST", "/__sim/webhooks/{task_id}/replay", replay_webhook),
        ("GET", "/__sim/files/{kind}/{name}", file),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, guarded(handler))
