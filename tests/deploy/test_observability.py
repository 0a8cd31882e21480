"""The optional monitoring component (deploy/k8s/components/monitoring), offline:
the files are what tools/observability.py generates; the PrometheusRule mirrors
services/monitoring/rules.toml, passes `promtool check rules` and its unit tests
(`promtool test rules`, tests/deploy/promtool/); every dashboard query parses as PromQL
(promtool) and names only metrics the services export; the component renders with kustomize.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import yaml

import services
from tests.support import ROOT
from tools import observability

PROMTOOL = shutil.which("promtool")
COMPONENT = observability.COMPONENT
UNIT_TESTS = ROOT / "tests" / "deploy" / "promtool" / "cosnap-rules.test.yaml"
# Metrics the services export once the work on them lands (checked as exported after that);
# the RunningHub client is part of the effects service.
PENDING_METRICS = {
    "runninghub_requests_total",
    "runninghub_request_seconds_bucket",
    "runninghub_circuit_open",
}
# Not the services': Kubernetes' own (kube-state-metrics), used by the memory alert only.
KUBERNETES_METRICS = {"kube_pod_container_resource_limits"}
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "irate", "histogram_quantile",
    "avg_over_time", "max_over_time", "by", "without", "on", "ignoring", "group_left",
    "group_right", "and", "or", "unless", "bool", "offset", "label_values",
}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (make test installs Debian's prometheus package)")
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def rule_groups() -> dict[str, Any]:
    document = yaml.safe_load((COMPONENT / "prometheus-rules.yaml").read_text())
    assert document["kind"] == "PrometheusRule"
    return {"groups": document["spec"]["groups"]}


def exported_metrics() -> set[str]:
    """Sample names of every metric registered by importing every service module and the edge."""
    for info in pkgutil.walk_packages(services.__path__, "services."):
        if not info.name.endswith(("__main__",)):
            importlib.import_module(info.name)
    importlib.import_module("gateway.docs")
    names: set[str] = set()
    for metric in prometheus_client.REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_count", "_sum"],
            "gauge": [""],
            "summary": ["_count", "_sum", ""],
        }.get(metric.type, [""])
        names |= {metric.name + suffix for suffix in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"[^"]*"', "", expr)  # label values and strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", text))
    return {t for t in tokens if t not in PROMQL_WORDS and not re.fullmatch(r"e\d*|Inf|NaN", t)}


def panel_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((COMPONENT / "dashboards").glob("*.json")):
        board = yaml.safe_load(path.read_text())  # JSON is YAML
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                out.append((path.name, panel["title"], target["expr"]))
    return out


def test_the_component_is_what_the_generator_writes() -> None:
    if not observability.RULES_TOML.is_file():
        pytest.skip("services/monitoring/rules.toml is not in the repository yet: nothing to mirror")
    generated = observability.files()
    generated["kustomization.yaml"] = observability.kustomization(generated)
    on_disk = {str(p.relative_to(COMPONENT)): p.read_text() for p in COMPONENT.rglob("*") if p.is_file()}
    assert on_disk == generated, "stale: run `python -m tools.observability`"


def test_the_rules_mirror_the_monitoring_defaults() -> None:
    if not observability.RULES_TOML.is_file():
        pytest.skip("services/monitoring/rules.toml is not in the repository yet: nothing to mirror")
    defaults = tomllib.loads(observability.RULES_TOML.read_text())["rule"]
    alerts = rule_groups()["groups"][0]["rules"]
    assert [(r["name"], r["severity"]) for r in defaults] == [
        (a["alert"], a["labels"]["severity"]) for a in alerts
    ]
    for rule, alert in zip(defaults, alerts, strict=True):
        threshold = rule.get("above", rule.get("below"))
        assert f"{'<' if 'below' in rule else '>'} {threshold:g}" in alert["expr"], alert["alert"]
        assert f"[{rule['window']}]" in alert["expr"]
        assert (alert["for"], alert["keep_firing_for"]) == (rule["for"], rule["keep_firing_for"])


def test_promtool_checks_and_unit_tests_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rule_groups()))
    checked = promtool("check", "rules", str(rules))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    test_file = tmp_path / "rules.test.yaml"
    test_file.write_text(yaml.safe_dump(tests))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert of the rule file has a unit test that expects it to fire.
    tested = {t["alertname"] for case in tests["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert tested == {r["alert"] for r in rule_groups()["groups"][0]["rules"]}


def test_the_rules_name_only_exported_metrics() -> None:
    exported = exported_metrics()
    for alert in rule_groups()["groups"][0]["rules"]:
        unknown = metric_names(alert["expr"]) - exported - KUBERNETES_METRICS
        assert not unknown, f"{alert['alert']}: {unknown}"


def test_every_panel_query_parses_and_names_exported_metrics(tmp_path: Path) -> None:
    queries = panel_queries()
    boards = {board for board, _, _ in queries}
    assert boards == {"cosnap-red.json", "cosnap-ingest.json", "cosnap-caches.json", "cosnap-runninghub.json"}
    exported = exported_metrics()
    rules = []
    for index, (board, title, expr) in enumerate(queries):
        unknown = metric_names(expr) - exported - PENDING_METRICS
        assert not unknown, f"{board} / {title}: {unknown} are not exported by any service"
        concrete = expr.replace("$__rate_interval", "5m").replace("$grpc_service", ".*")
        assert "$" not in concrete, f"{board} / {title}: unknown variable in {expr}"
        rules.append({"record": f"panel:q{index}", "expr": concrete})
    file = tmp_path / "panels.yaml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = promtool("check", "rules", str(file))
    assert result.returncode == 0, result.stdout + result.stderr
    # The parser has teeth.
    file.write_text(
        yaml.safe_dump({"groups": [{"name": "bad", "rules": [{"record": "x:y", "expr": "sum by (a"}]}]})
    )
    assert promtool("check", "rules", str(file)).returncode != 0
    assert metric_names('sum by (cache) (rate(cache_requests_total{level="l1"}[5m]))') == {
        "cache_requests_total"
    }


def test_the_component_renders_on_top_of_an_overlay(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = ROOT / "deploy" / "k8s"
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # As when the prod overlay itself lists the component.
                "namespace": yaml.safe_load((base / "overlays" / "prod" / "kustomization.yaml").read_text())[
                    "namespace"
                ],
                "resources": [os.path.relpath(base / "overlays" / "prod", overlay)],
                "components": [os.path.relpath(COMPONENT, overlay)],
            }
        )
    )
    result = subprocess.run(
        [kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {("ServiceMonitor", n) for n in observability.BACKENDS} <= kinds
    assert ("PrometheusRule", "cosnap") in kinds
    (board_map,) = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cosnap-dashboards"
    ]
    assert board_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(board_map["data"]) == {p.name for p in (COMPONENT / "dashboards").glob("*.json")}
    # Each ServiceMonitor selects a Service with a port named as its endpoint.
    services_ = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for monitor in (d for d in docs if d["kind"] == "ServiceMonitor"):
        service = services_[monitor["metadata"]["name"]]
        labels = service["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
        ports = {p["name"] for p in service["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
        assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
