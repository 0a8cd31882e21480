"""`make up` as a newcomer runs it: embedded PostgreSQL and Redis, three
services and the edge, health SERVING, REST answered, Ctrl-C stops it all."""

from __future__ import annotations

import json
import os
import shutil
import signal
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

from tests.support import ROOT, free_port

pytestmark = pytest.mark.timeout(180)


def start_up(local: Path, ports: dict[str, int]) -> tuple[subprocess.Popen[str], list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({k: str(v) for k, v in ports.items()}, COSNAP_LOCAL_DIR=str(local))
    proc = subprocess.Popen(
        [sys.executable, "tools/up.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("Ctrl-C stops everything" in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("make up did not start:\n" + "".join(lines[-60:]))
        time.sleep(0.2)
    return proc, lines


def stop_up(proc: subprocess.Popen[str], lines: list[str]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=60) == 0, "".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
def local_dir() -> Iterator[Path]:
    """A data folder outside pytest's private (0700) tmp tree: as root, pgserver
    runs PostgreSQL as its own unprivileged user, which must reach the folder."""
    folder = Path(tempfile.mkdtemp(prefix="cosnap-up-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_make_up_runs_the_suite_on_embedded_servers(local_dir: Path) -> None:
    ports = {
        "EDGE_PORT": free_port(),
        "ANALYTICS_GRPC_PORT": free_port(),
        "EFFECTS_GRPC_PORT": free_port(),
        "MONITORING_GRPC_PORT": free_port(),
        "ANALYTICS_METRICS_PORT": free_port(),
        "EFFECTS_METRICS_PORT": free_port(),
        "MONITORING_METRICS_PORT": free_port(),
    }
    for attempt in range(2):  # the second start finds the data of the first
        proc, lines = start_up(local_dir / "local", ports)
        try:
            output = "".join(lines)
            assert f"http://127.0.0.1:{ports['EDGE_PORT']}" in output
            assert "admin token" in output and "user token" in output
            for name in ("ANALYTICS", "EFFECTS", "MONITORING"):
                with grpc.insecure_channel(f"127.0.0.1:{ports[name + '_GRPC_PORT']}") as ch:
                    reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
            url = f"http://127.0.0.1:{ports['EDGE_PORT']}/api/analytics/system/health"
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    status, body = r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                status, body = err.code, json.loads(err.read())
            assert status in (200, 501), body
            assert ("status" in body) if status == 200 else body["code"] == 12
            metrics = f"http://127.0.0.1:{ports['ANALYTICS_METRICS_PORT']}/metrics"
            with urllib.request.urlopen(metrics, timeout=10) as r:
                assert b"grpc_server_handling_seconds" in r.read()
        finally:
            stop_up(proc, lines)
        assert (local_dir / "local" / "pgdata" / "PG_VERSION").exists(), attempt
    assert "stopped" in "".join(lines)
