"""`make up` as a newcomer runs it, through real processes: embedded PostgreSQL and
Redis, three services and the edge, health SERVING, REST answered, CORS for a local
frontend, a crashed service restarted, Ctrl-C stops it all (at start-up too, even
during the first initdb) and leaves nothing behind; a port in use and a service that
dies at start are reported as such."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.servicekit.auth import verify
from tests.support import ROOT, free_port

pytestmark = pytest.mark.timeout(240)
DEV_SECRET = "cosnap-development-secret-change-me!"


class Up:
    """`python tools/up.py` with its output collected line by line."""

    def __init__(self, local: Path, ports: dict[str, int], tmp: Path, **env: str) -> None:
        environment = {
            k: v
            for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "AUTH_JWT_SECRET") and not k.startswith("RUNNINGHUB_")
        }
        environment.update(
            {k: str(v) for k, v in ports.items()}, COSNAP_LOCAL_DIR=str(local), TMPDIR=str(tmp), **env
        )
        self.proc = subprocess.Popen(
            [sys.executable, "tools/up.py"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never came:\n" + "".join(self.lines[-60:]))
            time.sleep(0.1)

    def finish(self, timeout: float = 60) -> int:
        """The exit code (killing it when it does not end in time: a failure)."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("make up did not end:\n" + "".join(self.lines[-60:])) from None
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return code

    def pid_of(self, name: str) -> int:
        """The pid of the latest start of process `name`."""
        pids = [
            int(line.rsplit("(pid ", 1)[1].split(")")[0])
            for line in self.lines
            if f"| {name} started (pid " in line
        ]
        assert pids, f"{name} never started:\n{self.output[-3000:]}"
        return pids[-1]


def ports() -> dict[str, int]:
    names = ["EDGE_PORT", "RUNNINGHUB_SIM_PORT", "RUNNINGHUB_SIM_GLOBAL_PORT"] + [
        f"{s}_{k}_PORT" for s in ("ANALYTICS", "EFFECTS", "MONITORING") for k in ("GRPC", "METRICS")
    ]
    return {name: free_port() for name in names}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def shared_local() -> Iterator[Path]:
    """A data folder outside pytest's private (0700) tmp tree: as root, PostgreSQL
    runs as an unprivileged user, which must reach the folder."""
    folder = Path(tempfile.mkdtemp(prefix="cosnap-up-"))
    folder.chmod(0o755)
    yield folder / "local"
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def scratch() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="cosnap-up-tmp-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http(
    url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_make_up_runs_restarts_and_stops_cleanly(shared_local: Path, scratch: Path) -> None:
    p = ports()
    for attempt in range(2):  # the second start finds the data of the first
        up = Up(shared_local, p, scratch)
        try:
            up.wait_for("Ctrl-C stops everything")
            output = up.output
            assert f"http://127.0.0.1:{p['EDGE_PORT']}" in output
            admin = output.split("admin token", 1)[1].split()[0]
            assert verify(f"Bearer {admin}", DEV_SECRET) is not None
            for name in ("ANALYTICS", "EFFECTS", "MONITORING"):
                assert serving(p[f"{name}_GRPC_PORT"])
            status, _, body = http(f"http://127.0.0.1:{p['EDGE_PORT']}/api/analytics/system/health")
            assert status in (200, 501) and ("status" in json.loads(body) if status == 200 else True)
            # No RunningHub key: effects runs on the simulator, both regions.
            for sim in ("RUNNINGHUB_SIM_PORT", "RUNNINGHUB_SIM_GLOBAL_PORT"):
                assert http(f"http://127.0.0.1:{p[sim]}/__sim/health")[0] == 200
            status, _, body = http(f"http://127.0.0.1:{p['EDGE_PORT']}/api/effects")
            assert status == 200 and json.loads(body)["effects"], body[:300]
            status, _, body = http(f"http://127.0.0.1:{p['ANALYTICS_METRICS_PORT']}/metrics")
            assert b"grpc_server_handling_seconds" in body
            # A frontend dev server on localhost may call the edge (preflight and request).
            status, headers, _ = http(
                f"http://127.0.0.1:{p['EDGE_PORT']}/api/analytics/events",
                "OPTIONS",
                {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
            )
            assert status == 204 and headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
            servers = [up.pid_of("postgres"), up.pid_of("redis")]
            if attempt == 0:
                # A service that crashes is restarted (with backoff), and the log says so.
                os.kill(up.pid_of("analytics"), signal.SIGKILL)
                up.wait_for("analytics exited (exit code -9)")
                up.wait_for("analytics is back")
                assert serving(p["ANALYTICS_GRPC_PORT"])
        finally:
            up.proc.send_signal(signal.SIGINT)
            code = up.finish()
        assert code == 0, up.output[-3000:]
        assert "stopped in" in up.output and "Traceback" not in up.output
        assert not any(alive(pid) for pid in servers)
        assert (shared_local / "pgdata" / "PG_VERSION").exists(), attempt
        assert list(scratch.iterdir()) == [], "a temporary folder was left behind"


def test_a_port_in_use_is_reported_as_that(shared_local: Path, scratch: Path) -> None:
    p = ports()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", p["EDGE_PORT"]))
        holder.listen()
        up = Up(shared_local, p, scratch)
        assert up.finish() == 1
    assert f"port already in use on 127.0.0.1: EDGE_PORT={p['EDGE_PORT']}" in up.output
    assert "admin token" not in up.output and "Traceback" not in up.output
    assert "starting embedded" not in up.output  # checked before anything starts


def test_a_service_that_dies_at_start_is_named_with_its_log(shared_local: Path, scratch: Path) -> None:
    up = Up(shared_local, ports(), scratch, ANALYTICS_FLUSH_MAX_ROWS="lots")
    assert up.finish(120) == 1
    output = up.output
    assert "analytics exited during start-up (exit code 2); its last lines:" in output
    assert "ANALYTICS_FLUSH_MAX_ROWS" in output.split("its last lines:", 1)[1]
    assert "admin token" not in output and "Traceback" not in output
    assert "stopped in" in output


def _state(pid: int) -> str:
    """The process's state letter from /proc (R, S, T stopped, Z ended), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _pending(pid: int, sig: signal.Signals) -> bool:
    """Whether `sig` was sent to the process and waits for it to run again."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    mask = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return bool(mask >> (sig - 1) & 1)


def test_ctrl_c_during_the_first_initdb_stops_at_once(scratch: Path) -> None:
    """initdb is held (SIGSTOP) from when the test sees it start until `make up` has asked it
    to stop (its SIGTERM pending), so Ctrl-C lands in the middle of initdb however fast the
    machine (it takes ~0.5 s; a fixed sleep before Ctrl-C missed it on a fast, quiet run)."""
    for _ in range(3):
        folder = Path(tempfile.mkdtemp(prefix="cosnap-up-fresh-"))
        folder.chmod(0o755)
        try:
            up = Up(folder / "local", ports(), scratch)
            up.wait_for("| initdb started (pid ")
            initdb = up.pid_of("initdb")
            with contextlib.suppress(ProcessLookupError):
                os.kill(initdb, signal.SIGSTOP)
            while (state := _state(initdb)) not in ("T", "Z", ""):
                time.sleep(0.01)
            up.proc.send_signal(signal.SIGINT)
            if state != "T":  # initdb ended before the test held it: try again from scratch
                up.finish(30)
                continue
            deadline = time.monotonic() + 30
            while not _pending(initdb, signal.SIGTERM):
                assert time.monotonic() < deadline, "make up never asked initdb to stop"
                time.sleep(0.01)
            os.kill(initdb, signal.SIGCONT)
            assert up.finish(30) == 0
            assert "Traceback" not in up.output and "stopped in" in up.output
            assert not (folder / "local" / "pgdata").exists(), up.output
            # The interrupted cluster is made again, whole, on the next start.
            up = Up(folder / "local", ports(), scratch)
            up.wait_for("starting embedded PostgreSQL", timeout=120)
            up.proc.send_signal(signal.SIGINT)
            assert up.finish() == 0
            assert (folder / "local" / "pgdata" / "PG_VERSION").exists()
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    pytest.fail("initdb ended before the test could hold it, three times")


def test_make_token_mints_a_token_for_any_user_and_role() -> None:
    result = subprocess.run(
        ["make", "-s", "token", "SUB=alice", "ROLE=admin", "TTL=120"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "AUTH_JWT_SECRET"},
        check=True,
    )
    principal = verify(f"Bearer {result.stdout.strip()}", DEV_SECRET)
    assert principal is not None and (principal.subject, principal.role) == ("alice", "admin")
    refused = subprocess.run(
        [sys.executable, "tools/mint_token.py", "--sub", "bob", "--role", "root"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 2 and "invalid choice" in refused.stderr
