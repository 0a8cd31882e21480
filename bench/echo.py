"""A bare grpc.aio server answering RecordEvents at once (the ingest benchmark's baseline).

`python -m bench.echo PORT`: no interceptor, no validation, no database; it answers
`accepted = len(events)`. Runs in its own process, like the real service in the benchmark.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Sequence

import grpc

from cosnap.analytics.v1 import analytics_pb2, analytics_pb2_grpc


class Echo(analytics_pb2_grpc.AnalyticsServiceServicer):
    async def RecordEvents(
        self, request: analytics_pb2.RecordEventsRequest, context: grpc.aio.ServicerContext
    ) -> analytics_pb2.RecordEventsResponse:
        return analytics_pb2.RecordEventsResponse(accepted=len(request.events))


async def serve(port: int, interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> None:
    """The echo on 127.0.0.1:`port` behind `interceptors`, until SIGTERM or SIGINT;
    prints "ready" once it listens."""
    server = grpc.aio.server(interceptors=list(interceptors))
    analytics_pb2_grpc.add_AnalyticsServiceServicer_to_server(Echo(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
