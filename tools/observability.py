"""Generate the optional monitoring component of the manifests (deploy/k8s/components/monitoring):
ServiceMonitors, a PrometheusRule that mirrors the monitoring service's default alert rules
(services/monitoring/rules.toml) on the metrics the services export, and Grafana dashboards
built with grafana-foundation-sdk, shipped as provisioning ConfigMaps.

    python -m tools.observability     # rewrites the component; tests/deploy/test_observability.py
                                      # fails while the committed files differ from this output
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import DataSourceRef

ROOT = Path(__file__).resolve().parent.parent
COMPONENT = ROOT / "deploy" / "k8s" / "components" / "monitoring"
RULES_TOML = ROOT / "services" / "monitoring" / "rules.toml"
BACKENDS = ("analytics", "effects", "monitoring")
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
# What the monitoring service counts as a server error (services/monitoring/timings.py).
SERVER_ERRORS = "UNKNOWN|INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|DATA_LOSS|UNIMPLEMENTED"
BY_ENDPOINT = "grpc_service, grpc_method"

# --- alert rules ---------------------------------------------------------------------------


def _value_expr(kind: str, window: str) -> tuple[str, str, str]:
    """(value, sample count, labels) PromQL of one rule kind of rules.toml."""
    if kind == "latency_p95":
        value = (
            "1000 * histogram_quantile(0.95, sum by (namespace, grpc_service, grpc_method, le) "
            f"(rate(grpc_server_handling_seconds_bucket[{window}])))"
        )
        count = f"sum by (namespace, {BY_ENDPOINT}) (increase(grpc_server_handling_seconds_count[{window}]))"
        return value, count, f"namespace, {BY_ENDPOINT}"
    if kind == "error_rate":
        value = (
            f'sum by (namespace, {BY_ENDPOINT}) (rate(grpc_server_handled_total{{grpc_code=~"{SERVER_ERRORS}"}}[{window}]))'
            f" / sum by (namespace, {BY_ENDPOINT}) (rate(grpc_server_handled_total[{window}]))"
        )
        count = f"sum by (namespace, {BY_ENDPOINT}) (increase(grpc_server_handled_total[{window}]))"
        return value, count, f"namespace, {BY_ENDPOINT}"
    if kind == "memory":
        # The services export their resident memory (prometheus-client's process collector);
        # the limit comes from kube-state-metrics.
        value = (
            f"avg_over_time(process_resident_memory_bytes[{window}]) / on (namespace, pod) group_left "
            'max by (namespace, pod) (kube_pod_container_resource_limits{resource="memory", container="server"})'
        )
        return value, "", "namespace, pod"
    if kind == "cache_hit_rate":
        lookups = f'sum by (namespace, job, cache) (increase(cache_requests_total{{level="l1"}}[{window}]))'
        value = f'sum by (namespace, job, cache) (increase(cache_requests_total{{result="hit"}}[{window}])) / {lookups}'
        return value, lookups, "namespace, job, cache"
    raise ValueError(f"unknown rule kind {kind!r}")


def prometheus_rules(rules: list[dict[str, Any]]) -> dict[str, Any]:
    alerts = []
    for rule in rules:
        value, count, _ = _value_expr(rule["kind"], rule["window"])
        op, threshold = ("<", rule["below"]) if "below" in rule else (">", rule["above"])
        expr = f"({value}) {op} {threshold:g}"
        if count and rule.get("min_samples", 0) > 0:
            expr += (
                f" and on ({_value_expr(rule['kind'], rule['window'])[2]}) ({count}) >= {rule['min_samples']}"
            )
        alerts.append(
            {
                "alert": rule["name"],
                "expr": expr,
                "for": rule["for"],
                "keep_firing_for": rule["keep_firing_for"],
                "labels": {"severity": rule["severity"]},
                "annotations": {
                    "summary": rule["summary"],
                    "description": f"{rule['kind']} {op} {threshold:g} over {rule['window']} "
                    "(mirrors services/monitoring/rules.toml).",
                },
            }
        )
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "cosnap", "labels": {"app.kubernetes.io/part-of": "cosnap"}},
        "spec": {"groups": [{"name": "cosnap", "rules": alerts}]},
    }


def service_monitors() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "monitoring.coreos.com/v1",
            "kind": "ServiceMonitor",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "cosnap"}},
            "spec": {
                "selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}],
            },
        }
        for name in BACKENDS
    ]


# --- dashboards ----------------------------------------------------------------------------


def _panel(title: str, unit: str, *queries: tuple[str, str]) -> timeseries.Panel:
    panel = timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).span(12).height(8)
    for index, (expr, legend) in enumerate(queries):
        panel = panel.with_target(
            gp.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + index))
        )
    return panel


def _dashboard(uid: str, title: str, description: str) -> gd.Dashboard:
    datasource = gd.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
    return (
        gd.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["cosnap"])
        .refresh("30s")
        .time("now-6h", "now")
        .with_variable(datasource)
    )


def _service_variable(metric: str, label: str) -> gd.QueryVariable:
    return (
        gd.QueryVariable(label)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({metric}, {label})")
        .multi(True)
        .include_all(True)
    )


def dashboards() -> dict[str, Any]:
    rate = "$__rate_interval"
    sel = 'grpc_service=~"$grpc_service"'
    red = (
        _dashboard("cosnap-red", "Cosnap: services (RED)", "Rate, errors, duration per service and endpoint.")
        .with_variable(_service_variable("grpc_server_handled_total", "grpc_service"))
        .with_row(gd.Row("Requests, errors, duration"))
        .with_panel(
            _panel(
                "Requests per second by endpoint",
                "reqps",
                (
                    f"sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{sel}}}[{rate}]))",
                    "{{grpc_method}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Server errors (share of requests) by endpoint",
                "percentunit",
                (
                    f'sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{sel}, grpc_code=~"{SERVER_ERRORS}"}}[{rate}]))'
                    f" / sum by (grpc_service, grpc_method) (rate(grpc_server_handled_total{{{sel}}}[{rate}]))",
                    "{{grpc_method}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Answers by status code",
                "reqps",
                (f"sum by (grpc_code) (rate(grpc_server_handled_total{{{sel}}}[{rate}]))", "{{grpc_code}}"),
            )
        )
        .with_panel(
            _panel(
                "Latency p50 / p95 / p99 by endpoint",
                "s",
                *[
                    (
                        f"histogram_quantile({q}, sum by (grpc_method, le) (rate(grpc_server_handling_seconds_bucket{{{sel}}}[{rate}])))",
                        f"p{int(q * 100)} {{{{grpc_method}}}}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
            )
        )
        .with_panel(
            _panel(
                "In flight and memory",
                "short",
                ("sum by (job) (grpc_server_in_flight)", "in flight {{job}}"),
                ("sum by (job) (process_resident_memory_bytes)", "resident bytes {{job}}"),
            )
        )
    )
    ingest = (
        _dashboard(
            "cosnap-ingest", "Cosnap: ingest", "Analytics ingestion: rows, group-commit flushes, latency."
        )
        .with_panel(
            _panel(
                "Items per second by kind and outcome",
                "short",
                (
                    f"sum by (kind, outcome) (rate(analytics_ingest_rows_total[{rate}]))",
                    "{{kind}} {{outcome}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Flushes per second by result",
                "short",
                (f"sum by (result) (rate(analytics_ingest_flushes_total[{rate}]))", "{{result}}"),
            )
        )
        .with_panel(
            _panel(
                "Flush latency (COPY to COMMIT)",
                "s",
                *[
                    (
                        f"histogram_quantile({q}, sum by (le) (rate(analytics_ingest_flush_seconds_bucket[{rate}])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95, 0.99)
                ],
            )
        )
        .with_panel(
            _panel(
                "Rows per flush (p50 / p95)",
                "short",
                *[
                    (
                        f"histogram_quantile({q}, sum by (le) (rate(analytics_ingest_flush_rows_bucket[{rate}])))",
                        f"p{int(q * 100)}",
                    )
                    for q in (0.5, 0.95)
                ],
            )
        )
    )
    caches = (
        _dashboard(
            "cosnap-caches", "Cosnap: caches", "Multi-level cache: hit rates per cache and level, Redis."
        )
        .with_panel(
            _panel(
                "Hit rate per cache (either level)",
                "percentunit",
                (
                    f'sum by (job, cache) (rate(cache_requests_total{{result="hit"}}[{rate}]))'
                    f' / sum by (job, cache) (rate(cache_requests_total{{level="l1"}}[{rate}]))',
                    "{{job}} {{cache}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Lookups by level and result",
                "reqps",
                (
                    f"sum by (cache, level, result) (rate(cache_requests_total[{rate}]))",
                    "{{cache}} {{level}} {{result}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Loader calls and Redis errors",
                "short",
                (f"sum by (cache, result) (rate(cache_loads_total[{rate}]))", "load {{cache}} {{result}}"),
                (f"sum by (cache) (rate(cache_redis_errors_total[{rate}]))", "redis error {{cache}}"),
            )
        )
        .with_panel(
            _panel(
                "Redis reachable (per cache) and dependencies up",
                "short",
                ("min by (job, cache) (cache_redis_available)", "redis {{job}} {{cache}}"),
                ("min by (job, dependency) (service_dependency_up)", "{{job}} {{dependency}}"),
            )
        )
    )
    runninghub = (
        _dashboard(
            "cosnap-runninghub", "Cosnap: RunningHub", "RunningHub calls by outcome, latency, circuit state."
        )
        .with_panel(
            _panel(
                "Calls per second by region, endpoint and outcome",
                "reqps",
                (
                    f"sum by (region, endpoint, outcome) (rate(runninghub_requests_total[{rate}]))",
                    "{{region}} {{endpoint}} {{outcome}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Call latency p95 by region and endpoint",
                "s",
                (
                    f"histogram_quantile(0.95, sum by (region, endpoint, le) (rate(runninghub_request_seconds_bucket[{rate}])))",
                    "{{region}} {{endpoint}}",
                ),
            )
        )
        .with_panel(
            _panel(
                "Circuit open (1) per region",
                "short",
                ("max by (region) (runninghub_circuit_open)", "{{region}}"),
            )
        )
    )
    return {
        "cosnap-red.json": red.build(),
        "cosnap-ingest.json": ingest.build(),
        "cosnap-caches.json": caches.build(),
        "cosnap-runninghub.json": runninghub.build(),
    }


# --- files ---------------------------------------------------------------------------------

HEADER = "# Generated by `python -m tools.observability`: do not edit by hand.\n"


def files(rules_toml: Path = RULES_TOML) -> dict[str, str]:
    out: dict[str, str] = {}
    rules = tomllib.loads(rules_toml.read_text())["rule"]
    out["prometheus-rules.yaml"] = HEADER + yaml.safe_dump(
        prometheus_rules(rules), sort_keys=False, width=1000
    )
    out["service-monitors.yaml"] = HEADER + yaml.safe_dump_all(service_monitors(), sort_keys=False)
    for name, board in dashboards().items():
        out[f"dashboards/{name}"] = json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
    return out


KUSTOMIZATION = """# Optional: Prometheus Operator objects and Grafana dashboards. Add to an overlay with
#   components: [../../components/monitoring]
# Needs the Prometheus Operator CRDs (ServiceMonitor, PrometheusRule) and, for the memory
# alert, kube-state-metrics; Grafana's dashboard sidecar picks up ConfigMaps labelled
# grafana_dashboard=1. Generated files: `python -m tools.observability`.
apiVersion: kustomize.config.k8s.io/v1alpha1
kind: Component
resources:
  - prometheus-rules.yaml
  - service-monitors.yaml
configMapGenerator:
  - name: cosnap-dashboards
    files:
{files}
    options:
      labels:
        grafana_dashboard: "1"
      disableNameSuffixHash: true
"""


def kustomization(generated: dict[str, str]) -> str:
    boards = sorted(name for name in generated if name.startswith("dashboards/"))
    return KUSTOMIZATION.format(files="\n".join(f"      - {name}" for name in boards))


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rules", type=Path, default=RULES_TOML, help="the rules to mirror")
    generated = files(parser.parse_args().rules)
    generated["kustomization.yaml"] = kustomization(generated)
    for name, text in generated.items():
        path = COMPONENT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(generated)} files under {COMPONENT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
