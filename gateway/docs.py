"""The local edge's own pages: the generated OpenAPI document, a Swagger UI page for it
(from the swagger-ui-dist package pinned in package.json, served from node_modules: no
CDN), and Prometheus metrics of the edge itself (requests, latency, status per route)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from google.protobuf.descriptor_pool import DescriptorPool
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from gateway.routes import RouteTable

OPENAPI_PATH = "/api/openapi.json"
DOCS_PATH = "/api/docs"
METRICS_PATH = "/metrics"
ASSETS = Path(__file__).resolve().parent.parent / "node_modules" / "swagger-ui-dist"

_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>Cosnap API</title>
  <link rel="stylesheet" href="{docs}/assets/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{docs}/assets/swagger-ui-bundle.js"></script>
  <script src="{docs}/init.js"></script>
</body>
</html>
"""
_INIT = """window.ui = SwaggerUIBundle({{
  url: "{spec}",
  dom_id: "#swagger-ui",
  deepLinking: true,
  docExpansion: "list",
  tryItOutEnabled: true,
  persistAuthorization: true
}});
"""

# Latency buckets: the ingest calls answer in milliseconds, RunningHub calls in tens of seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EdgeMetrics:
    """`edge_requests_total` and `edge_request_duration_seconds` by route (the path
    template, never the raw path: bounded label values), method and status."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edge_requests",
            "HTTP requests answered by the local edge.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edge_request_duration_seconds",
            "Time from the request to the answer, by route.",
            ["route", "method"],
            buckets=BUCKETS,
            registry=self.registry,
        )

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route, method).observe(seconds)

    async def handler(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


def route_label(routes: RouteTable, method: str, raw_path: str) -> str:
    """The template of the route that serves the request, or one of a few fixed labels."""
    if raw_path in (OPENAPI_PATH, DOCS_PATH, METRICS_PATH, "/healthz") or raw_path.startswith(
        DOCS_PATH + "/"
    ):
        return DOCS_PATH if raw_path.startswith(DOCS_PATH) else raw_path
    found = routes.match(method, raw_path)
    return found.route.template.source if found else "unmatched"


METRICS = web.AppKey("edge_metrics", EdgeMetrics)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup(app: web.Application, pool: DescriptorPool, routes: RouteTable) -> EdgeMetrics:
    """Add the pages and /metrics (call before the edge's catch-all route is added) and the
    middleware that counts every request."""
    page = _PAGE.format(docs=DOCS_PATH).encode()
    init = _INIT.format(spec=OPENAPI_PATH).encode()
    document: list[bytes] = []
    lock = asyncio.Lock()

    def build() -> bytes:
        # Imported here: reading every service's access levels imports the services, which
        # the edge does not need to start.
        from gateway.openapi import build_document

        return json.dumps(build_document(pool, routes), separators=(",", ":")).encode()

    async def openapi(request: web.Request) -> web.Response:
        async with lock:
            if not document:
                document.append(await asyncio.to_thread(build))
        return web.Response(body=document[0], content_type="application/json")

    async def docs(request: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html")

    async def init_js(request: web.Request) -> web.Response:
        return web.Response(body=init, content_type="text/javascript")

    metrics = EdgeMetrics()
    app[METRICS] = metrics

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            label = route_label(routes, request.method, request.rel_url.raw_path)
            metrics.observe(label, request.method, status, time.perf_counter() - started)

    # Outermost, so it sees the status the edge's own middleware settled on.
    app.middlewares.insert(0, observe)
    app.router.add_get(OPENAPI_PATH, openapi)
    app.router.add_get(DOCS_PATH, docs)
    app.router.add_get(f"{DOCS_PATH}/init.js", init_js)
    if ASSETS.is_dir():
        app.router.add_static(f"{DOCS_PATH}/assets", ASSETS)
    app.router.add_get(METRICS_PATH, metrics.handler)
    return metrics
