"""Protobuf is the single source of truth: the generated stubs and descriptor
set must be current, and the contracts must pass `buf lint` and `buf format`."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT

BUF = ROOT / "node_modules" / ".bin" / "buf"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generated_code_is_current(tmp_path: Path) -> None:
    """Regenerate from protos/ into a temporary folder: it must equal build/."""
    subprocess.run([sys.executable, "tools/codegen.py", "--out", str(tmp_path)], cwd=ROOT, check=True)
    fresh, current = _tree(tmp_path / "gen"), _tree(ROOT / "build" / "gen")
    assert fresh.keys() == current.keys(), "stale stubs: run `make gen`"
    stale = [name for name in fresh if fresh[name] != current[name]]
    assert not stale, f"stale stubs {stale}: run `make gen`"
    assert filecmp.cmp(tmp_path / "descriptor.binpb", ROOT / "build" / "descriptor.binpb", shallow=False)


@pytest.mark.parametrize("args", [["lint"], ["format", "-d", "--exit-code"]])
def test_buf(args: list[str]) -> None:
    result = subprocess.run([str(BUF), *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_public_path_is_annotated() -> None:
    """Each REST path of the public contract is bound by a google.api.http rule."""
    from google.api import annotations_pb2

    from cosnap.analytics.v1 import analytics_pb2
    from cosnap.effects.v1 import effects_pb2
    from cosnap.monitoring.v1 import monitoring_pb2

    bound = set()
    for module in (analytics_pb2, effects_pb2, monitoring_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb:
                    bound.add(f"{verb.upper()} {getattr(rule, verb)}")
    expected = {
        "POST /api/analytics/events",
        "POST /api/analytics/performance/metrics",
        "POST /api/analytics/funnel",
        "GET /api/analytics/funnel",
        "GET /api/analytics/dashboard/performance",
        "POST /api/analytics/revenue",
        "GET /api/analytics/engagement",
        "GET /api/analytics/engagement/users/{user_id}",
        "GET /api/analytics/revenue/attribution",
        "GET /api/analytics/reports",
        "GET /api/analytics/reports/{week}",
        "GET /api/analytics/dashboard/performance:stream",
        "POST /api/analytics/performance/alerts",
        "GET /api/analytics/performance/alerts",
        "POST /api/analytics/performance/alerts/{alert_id}:resolve",
        "GET /api/analytics/system/health",
        "GET /api/effects",
        "GET /api/effects/{effect_id}",
        "POST /api/effects/uploads",
        "POST /api/effects/{effect_id}/tasks",
        "GET /api/effects/tasks/{task_id}",
        "POST /api/effects/tasks/{task_id}:cancel",
        "POST /api/effects/webhooks/runninghub/{region}",
    }
    assert bound == expected
