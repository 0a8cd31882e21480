"""The effects benchmark's baseline: a naive GetTask pass-through.

`python -m bench.effects_naive PORT DATABASE_URL SCHEMA RUNNINGHUB_URL API_KEY`: a bare
grpc.aio server whose GetTask reads the task's row and asks RunningHub's outputs
endpoint on every call: no cache, no coalescing, no lease (and no auth, which only
favours it). Runs in its own process, like the real service in the benchmark.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid

import aiohttp
import asyncpg
import grpc

from cosnap.effects.v1 import effects_pb2, effects_pb2_grpc
from services.effects import envelope


class Naive(effects_pb2_grpc.EffectsServiceServicer):
    def __init__(self, pool: asyncpg.Pool, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self._pool = pool
        self._http = http
        self._url = url.rstrip("/") + "/task/openapi/outputs"
        self._key = key

    async def GetTask(
        self, request: effects_pb2.GetTaskRequest, context: grpc.aio.ServicerContext
    ) -> effects_pb2.GetTaskResponse:
        row = await self._pool.fetchrow(
            "SELECT task_id, effect_id, region, status, rh_task_id FROM tasks WHERE task_id = $1",
            uuid.UUID(request.task_id),
        )
        if row is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such task")
        async with self._http.post(
            self._url, json={"apiKey": self._key, "taskId": row["rh_task_id"]}
        ) as reply:
            state = envelope.task_state(envelope.parse(await reply.read()))
        task = effects_pb2.Task(
            task_id=str(row["task_id"]),
            effect_id=row["effect_id"],
            region=row["region"],
            status=state.status or row["status"],
        )
        for out in state.outputs:
            task.outputs.add(url=out.url, file_type=out.file_type, node_id=out.node_id)
        return effects_pb2.GetTaskResponse(task=task)


async def serve(port: int, dsn: str, schema: str, url: str, key: str) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, server_settings={"search_path": schema})
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
    server = grpc.aio.server()
    effects_pb2_grpc.add_EffectsServiceServicer_to_server(Naive(pool, http, url, key), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.stop(1)
    await http.close()
    await pool.close()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]))
