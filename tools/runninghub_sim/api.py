"""RunningHub's HTTP endpoints, as the reference documents them.

Everything is POST with a JSON body carrying `apiKey`, except `GET
/api/webapp/apiCallDemo` (query string), the multipart upload, and
`/uc/openapi/accountStatus` (whose body spells the key `apikey`; `apiKey` is
accepted too, as the published SDK sends it). Every reply is HTTP 200 with the
envelope; unknown paths answer 412. The middleware counts calls and replies and
applies the injected faults.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web

from tools.runninghub_sim import codes
from tools.runninghub_sim.codes import Reply, envelope
from tools.runninghub_sim.faults import Action
from tools.runninghub_sim.simulator import Simulator
from tools.runninghub_sim.tasks import key_id

log = logging.getLogger("runninghub_sim.api")

SIM = web.AppKey("sim", Simulator)

ENDPOINTS = {
    "/task/openapi/ai-app/run": "ai-app/run",
    "/task/openapi/create": "create",
    "/task/openapi/status": "status",
    "/task/openapi/outputs": "outputs",
    "/task/openapi/cancel": "cancel",
    "/task/openapi/upload": "upload",
    "/openapi/v2/media/upload/binary": "upload-v2",
    "/api/webapp/apiCallDemo": "apiCallDemo",
    "/uc/openapi/accountStatus": "accountStatus",
    "/task/openapi/getWebhookDetail": "getWebhookDetail",
    "/task/openapi/retryWebhook": "retryWebhook",
}
UPLOAD_TYPES = {
    "jpg": "image",
    "jpeg": "image",
    "png": "image",
    "webp": "image",
    "zip": "zip",
    "mp3": "audio",
    "wav": "audio",
    "flac": "audio",
    "mp4": "video",
    "avi": "video",
    "mov": "video",
    "mkv": "video",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def endpoint_name(path: str) -> str | None:
    return ENDPOINTS.get(path)


def base_url(request: web.Request) -> str:
    """Where this site is reached: its bound address (clients may send a Host of
    www.runninghub.cn, as the published SDK does), else the request's host."""
    bound = request.app[SIM].base_url
    return bound or f"{request.scheme}://{request.host}"


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        value = await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Reply(codes.PARAMS_INVALID) from exc
    if not isinstance(value, dict):
        raise Reply(codes.PARAMS_INVALID)
    return value


def _abort(request: web.Request) -> None:
    """Reset the connection (RST, not a clean close)."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


async def _strike(request: web.Request, sim: Simulator, name: str, action: Action) -> web.StreamResponse:
    sim.count(f"fault_{action.kind}")
    log.info("fault injected", extra={"endpoint": name, "fault": action.kind, "phase": action.phase})
    if action.kind == "http":
        return web.json_response({"error": "injected", "status": action.value}, status=action.value)
    if action.kind == "code":
        return envelope(action.value, None)
    if action.kind == "hang":
        await asyncio.sleep(sim.config.hang_seconds)
    _abort(request)
    raise asyncio.CancelledError  # nothing more to write: the connection is gone


@web.middleware
async def faults_and_counters(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/__sim/"):
        return await handler(request)
    sim = request.app[SIM]
    name = endpoint_name(request.path) or "unknown"
    sim.calls[name] += 1
    action = sim.faults.decide(name)
    if action.delay:
        await asyncio.sleep(action.delay)
    if action.kind != "ok" and action.phase == "before":
        response = await _strike(request, sim, name, action)
    else:
        try:
            response = await handler(request)
        except Reply as reply:
            response = envelope(reply.code, reply.data, reply.msg)
        if action.kind != "ok":  # phase "after": the work is done, the reply goes astray
            response = await _strike(request, sim, name, action)
    code = response.get(codes.SIM_CODE)
    sim.replies[f"{name}:{code if code is not None else f'http{response.status}'}"] += 1
    log.debug("call", extra={"endpoint": name, "code": code, "http_status": response.status})
    return response


# ---- handlers ----------------------------------------------------------------------------


async def run_webapp(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    return envelope(codes.OK, sim.create(account, "webapp", body, base_url(request)))


async def run_workflow(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    return envelope(codes.OK, sim.create(account, "workflow", body, base_url(request)))


async def status(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    task = sim.lookup(account.key, body.get("taskId"))
    return envelope(codes.OK, task.status(sim.now()))


async def outputs(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    task = sim.lookup(account.key, body.get("taskId"))
    code, data = sim.outputs_reply(task)
    return envelope(code, data)


async def cancel(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    sim.cancel(sim.lookup(account.key, body.get("taskId")))
    return envelope(codes.OK, None)


async def api_call_demo(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    sim.account(request.query.get("apiKey"))
    return envelope(codes.OK, sim.webapp_config(request.query.get("webappId"), base_url(request)))


async def account_status(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apikey", body.get("apiKey")))
    data = {
        "remainCoins": str(sim.remain_coins(account)),
        "currentTaskCounts": str(sim.running_count(account.key)),
        "remainMoney": None,
        "currency": None,
        "apiType": account.api_type,
    }
    return envelope(codes.OK, data)


async def _read_upload(request: web.Request, limit: int) -> tuple[dict[str, str], str, bytes | None]:
    """(text fields, file name, file bytes or None when over the limit)."""
    if not request.content_type.startswith("multipart/"):
        raise Reply(codes.PARAMS_INVALID)
    fields: dict[str, str] = {}
    filename, content = "", b""
    too_big = False
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            continue
        if part.name == "file":
            filename = part.filename or ""
            chunks, size = [], 0
            while chunk := await part.read_chunk(1 << 16):
                size += len(chunk)
                if size > limit:
                    too_big = True
                    continue  # drain, keep nothing
                chunks.append(chunk)
            content = b"".join(chunks)
        elif part.name:
            fields[part.name] = (await part.read(decode=True)).decode("utf-8", "replace")[:1024]
    return fields, filename, None if too_big else content


async def _store_upload(sim: Simulator, filename: str, content: bytes | None) -> tuple[str, int]:
    if content is None:
        raise Reply(codes.FILE_SIZE_EXCEEDED)
    if not filename or not content:
        raise Reply(codes.PARAMS_INVALID)
    ext = filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if ext not in UPLOAD_TYPES:
        raise Reply(codes.PARAMS_INVALID, msg="unsupported file type")
    digest = hashlib.sha256(content).hexdigest()
    name = digest if ext == "zip" else f"api/{digest}.{ext}"
    sim.add_upload(name, len(content))
    return name, len(content)


async def upload(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    fields, filename, content = await _read_upload(request, sim.config.max_upload_bytes)
    account = sim.account(fields.get("apiKey"))
    name, _size = await _store_upload(sim, filename, content)
    log.info("upload", extra={"key_id": key_id(account.key), "file_name": name})
    return envelope(codes.OK, {"fileName": name, "fileType": fields.get("fileType") or "input"})


async def upload_v2(request: web.Request) -> web.Response:
    """The newer upload the published SDK uses: key as a Bearer token."""
    sim = request.app[SIM]
    auth = request.headers.get("Authorization", "")
    sim.account(auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None)
    _fields, filename, content = await _read_upload(request, sim.config.max_upload_bytes)
    name, size = await _store_upload(sim, filename, content)
    ext = name.rsplit(".", 1)[-1]
    data = {
        "type": UPLOAD_TYPES.get(ext, "image"),
        "download_url": f"{base_url(request)}/__sim/files/input/{name.removeprefix('api/')}",
        "fileName": name,
        "size": str(size),
    }
    return envelope(codes.OK, data)


async def webhook_detail(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    task = sim.lookup(account.key, body.get("taskId"))
    deliveries = sim.webhooks.deliveries.get(task.task_id)
    if not deliveries:
        return envelope(codes.OK, None)
    data = deliveries[-1].to_json()
    data["userApiKey"] = "*" * 18
    return envelope(codes.OK, data)


async def retry_webhook(request: web.Request) -> web.Response:
    sim = request.app[SIM]
    body = await json_body(request)
    account = sim.account(body.get("apiKey"))
    delivery = sim.webhooks.find(str(body.get("webhookId", "")))
    if delivery is None or sim.tasks[delivery.task_id].key != account.key:
        raise Reply(codes.PARAMS_INVALID)
    url = body.get("webhookUrl") or delivery.url
    if not isinstance(url, str):
        raise Reply(codes.PARAMS_INVALID)
    sim.webhooks.send(delivery.task_id, url, delivery.event_data)
    return envelope(codes.OK, None)


async def unknown_path(request: web.Request) -> web.Response:
    return envelope(codes.TOKEN_INVALID, None)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/task/openapi/ai-app/run", run_webapp)
    app.router.add_post("/task/openapi/create", run_workflow)
    app.router.add_post("/task/openapi/status", status)
    app.router.add_post("/task/openapi/outputs", outputs)
    app.router.add_post("/task/openapi/cancel", cancel)
    app.router.add_post("/task/openapi/upload", upload)
    app.router.add_post("/openapi/v2/media/upload/binary", upload_v2)
    app.router.add_get("/api/webapp/apiCallDemo", api_call_demo)
    app.router.add_post("/uc/openapi/accountStatus", account_status)
    app.router.add_post("/task/openapi/getWebhookDetail", webhook_detail)
    app.router.add_post("/task/openapi/retryWebhook", retry_webhook)
