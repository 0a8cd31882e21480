"""The floor under the live stream's per-stream cost: a bare grpc.aio server (no kit, no
interceptor, no database) serving ``StreamPerformanceDashboard`` by sending one given
message, already serialized, to every open stream once a second.

``python -m bench.stream_floor PORT HEX`` (``bench/stream.py`` starts it and measures its CPU
as it does the service's): what is left per stream and message there is grpc.aio's own
sending of one message on one HTTP/2 stream.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from cosnap.analytics.v1 import analytics_pb2

SERVICE = "cosnap.analytics.v1.AnalyticsService"


async def serve(port: int, message: bytes) -> None:
    loop = asyncio.get_running_loop()
    waiters: list[asyncio.Future[None]] = []

    async def tick() -> None:
        nonlocal waiters
        while True:
            await asyncio.sleep(1)
            woken, waiters = waiters, []
            for waiter in woken:
                if not waiter.done():
                    waiter.set_result(None)

    async def stream(request: object, context: object) -> object:
        while True:
            waiter = loop.create_future()
            waiters.append(waiter)
            await waiter
            yield message

    handler = grpc.unary_stream_rpc_method_handler(
        stream,
        request_deserializer=analytics_pb2.StreamPerformanceDashboardRequest.FromString,
        response_serializer=None,
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"StreamPerformanceDashboard": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ticker = asyncio.ensure_future(tick())
    try:
        await server.wait_for_termination()
    finally:
        ticker.cancel()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), bytes.fromhex(sys.argv[2])))
