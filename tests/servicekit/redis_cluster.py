"""A small throw-away Redis Cluster for tests: three masters on free ports, no replicas,
no persistence, in a temporary folder (``redis-server --cluster-enabled yes`` and
``redis-cli --cluster create``)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _free_ports(n: int) -> list[int]:
    """n free ports whose +10000 cluster-bus ports are free too."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


async def _command(port: int, *args: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        parts = [f"${len(a)}\r\n{a}\r\n" for a in args]
        writer.write(f"*{len(args)}\r\n{''.join(parts)}".encode())
        await writer.drain()
        header = await asyncio.wait_for(reader.readline(), 2)
        if header.startswith(b"$"):
            size = int(header[1:])
            return (await asyncio.wait_for(reader.readexactly(size + 2), 2))[:-2]
        return header.strip()
    finally:
        writer.close()


class RedisCluster:
    """``url`` is ``redis+cluster://127.0.0.1:<first port>`` (what REDIS_URL takes)."""

    def __init__(self, masters: int = 3) -> None:
        self.ports = _free_ports(masters)
        self.url = f"redis+cluster://127.0.0.1:{self.ports[0]}"
        self._dir = Path(tempfile.mkdtemp(prefix="cosnap-redis-cluster-"))
        self._procs: list[asyncio.subprocess.Process] = []

    async def start(self) -> None:
        for port in self.ports:
            self._procs.append(
                await asyncio.create_subprocess_exec(
                    REDIS_SERVER,
                    *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"),
                    *("--cluster-node-timeout", "2000", "--dir", str(self._dir)),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            await self._wait(lambda p=port: _command(p, "PING"), b"+PONG")
        create = await asyncio.create_subprocess_exec(
            REDIS_CLI,
            "--cluster",
            "create",
            *(f"127.0.0.1:{p}" for p in self.ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await create.communicate()
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.decode(errors='replace')}")
        for port in self.ports:
            await self._wait(lambda p=port: _command(p, "CLUSTER", "INFO"), b"cluster_state:ok")

    async def _wait(self, probe: object, expected: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if expected in await probe():  # type: ignore[operator]
                    return
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis cluster not ready ({expected!r})")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
        self._procs.clear()
        shutil.rmtree(self._dir, ignore_errors=True)
