"""deploy/k8s, checked offline: every overlay is rendered with `kubectl kustomize`, each
object is validated with kubernetes-validate --strict against the oldest and the newest
Kubernetes we target, and what the schemas cannot see is checked here: probes that ask
for names our servers answer, ports that agree with each other and with gateway/envoy.yaml,
HPA/PDB/replicas interplay, the restricted security context, shutdown timing, network
policies and the Secret template.
"""

from __future__ import annotations

import copy
import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from services.servicekit.config import ServiceSettings
from tests.support import ROOT

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed (dev extra)"
)

KUBECTL = shutil.which("kubectl")
DEPLOY = ROOT / "deploy" / "k8s"
OVERLAYS = ["dev", "prod"]
# The oldest Kubernetes we support (PDB unhealthyPodEvictionPolicy is GA in 1.31) and the
# newest schema kubernetes-validate ships.
K8S_VERSIONS = ["1.31.0", kubernetes_validate.latest_version()]
BACKENDS = ["analytics", "effects", "monitoring"]
SECRET = "cosnap-secrets"
PLACEHOLDER = "CHANGE-ME"
ENVOY_YAML = ROOT / "gateway" / "envoy.yaml"
RESTRICTED_CAPS = {"ALL"}


# --- rendering ------------------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: cannot render the kustomizations")
    result = subprocess.run(
        [KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(DEPLOY / "overlays" / request.param)


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(DEPLOY / "base")


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, deployment in of_kind(docs, "Deployment").items():
        yield name, deployment["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec.get("initContainers", []) + spec["containers"]


def env_of(container: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, str]:
    """Literal environment as the process sees it: envFrom ConfigMaps, then env values."""
    out: dict[str, str] = {}
    maps = of_kind(docs, "ConfigMap")
    for source in container.get("envFrom", []):
        out.update(maps[source["configMapRef"]["name"]]["data"])
    for var in container.get("env", []):
        if "value" in var:
            out[var["name"]] = var["value"]
    return out


def server(spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = spec["containers"]
    return container


def named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def matches(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Label selector semantics (matchLabels and the matchExpressions operators we use)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if op == "In" and value not in expr["values"]:
            return False
        if op == "NotIn" and value in expr["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def proto_services() -> dict[str, str]:
    """{short name: full gRPC service name} read from protos/ (cosnap.<name>.v1.<X>Service)."""
    out = {}
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+cosnap\.(\w+)\.v\d+\s*;", text, re.M)
        assert package, proto
        (service,) = re.findall(r"^service\s+(\w+)\s*\{", text, re.M)
        out[package.group(1)] = f"cosnap.{package.group(1)}.v1.{service}"
    return out


def quantity(value: str | int) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def envoy_config() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_YAML.read_text())


def envoy_backends() -> dict[str, tuple[str, int]]:
    """cluster -> (DNS name, port) of Envoy's STRICT_DNS clusters."""
    out = {}
    for cluster in envoy_config()["static_resources"]["clusters"]:
        if cluster.get("type") != "STRICT_DNS":
            continue
        (group,) = cluster["load_assignment"]["endpoints"]
        (endpoint,) = group["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        out[cluster["name"]] = (address["address"], address["port_value"])
    return out


def envoy_listener_port(name: str) -> int:
    (listener,) = [li for li in envoy_config()["static_resources"]["listeners"] if li["name"] == name]
    return listener["address"]["socket_address"]["port_value"]


# --- schema validation ------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_passes_strict_schema_validation(
    overlay: tuple[str, list[dict[str, Any]]], version: str
) -> None:
    name, docs = overlay
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert not errors, f"{name} @ {version}:\n" + "\n".join(errors)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ServiceAccount", "HorizontalPodAutoscaler"} <= kinds
    assert {"PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Namespace"} <= kinds


def test_strict_validation_has_teeth(base: list[dict[str, Any]]) -> None:
    """A misspelt field passes without --strict; with it, it does not."""
    deployment = copy.deepcopy(of_kind(base, "Deployment")["analytics"])
    server(deployment["spec"]["template"]["spec"])["readinessProbe"]["grpc"]["servce"] = "x"
    kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=False)
    with pytest.raises(kubernetes_validate.ValidationError, match="servce"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(of_kind(base, "HorizontalPodAutoscaler")["analytics"])
    wrong_type["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)


# --- what the schemas miss ----------------------------------------------------------------


def test_one_namespace_with_the_restricted_pod_security_standard(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = overlay
    (namespace,) = of_kind(docs, "Namespace").values()
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace["metadata"]["name"], doc["metadata"]["name"]


def test_backends_probe_names_our_servers_answer(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """readiness asks for the full service name (like Envoy), liveness/startup for "liveness";
    the servers answer "", "liveness" and their full name (services/servicekit/server.py)."""
    _, docs = overlay
    full_names = proto_services()
    assert sorted(full_names) == BACKENDS
    specs = dict(pod_specs(docs))
    for name in BACKENDS:
        container = server(specs[name])
        answered = {"", "liveness", full_names[name]}
        grpc_port = named_port(container, "grpc")
        assert env_of(container, docs)["GRPC_PORT"] == str(grpc_port)
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            check = container[probe]["grpc"]
            assert check["service"] in answered, f"{name} {probe} asks for {check['service']!r}"
            assert check["port"] == grpc_port, f"{name} {probe} port"
        assert container["readinessProbe"]["grpc"]["service"] == full_names[name]
        assert container["livenessProbe"]["grpc"]["service"] == "liveness"
        assert container["livenessProbe"].get("successThreshold", 1) == 1  # API server rule
        # Start-up may wait DB_CONNECT_TIMEOUT_SECONDS for PostgreSQL before it listens.
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget > float(env_of(container, docs)["DB_CONNECT_TIMEOUT_SECONDS"])


def test_backends_run_their_own_module_and_migrate_first(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    specs = dict(pod_specs(docs))
    for name in BACKENDS:
        spec = specs[name]
        container = server(spec)
        assert container["command"] == ["python", "-m", f"services.{name}"]
        assert env_of(container, docs)["MIGRATE_ON_START"] == "false"
        (init,) = spec["initContainers"]
        assert init["command"] == ["python", "-m", f"services.{name}", "migrate"]
        assert init["image"] == container["image"]
        refs = {v["name"] for v in init.get("env", []) if "valueFrom" in v}
        assert "DATABASE_URL" in refs


def settings_of(name: str) -> type[ServiceSettings]:
    """The settings model a backend validates its environment with (services/<name>/app.py)."""
    settings: type[ServiceSettings] = importlib.import_module(f"services.{name}.app").SETTINGS
    return settings


def secret_fields(settings: type[ServiceSettings]) -> set[str]:
    return {n.upper() for n, f in settings.model_fields.items() if f.annotation is SecretStr}


def test_environment_names_and_values_are_settings_the_services_read(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    """A misspelt variable is silently ignored by pydantic-settings: catch it here, and
    validate the literal values with each service's own settings model."""
    _, docs = overlay
    for name, spec in pod_specs(docs):
        if name not in BACKENDS:
            continue
        settings = settings_of(name)
        fields = {field.upper() for field in settings.model_fields}
        for container in containers(spec):
            env = env_of(container, docs)
            names = set(env) | {v["name"] for v in container.get("env", [])}
            unknown = {n for n in names if n not in fields and not n.startswith("PYTHON")}
            assert not unknown, f"{name}/{container['name']}: {unknown}"
            values: dict[str, Any] = {k.lower(): v for k, v in env.items() if k in fields}
            values["auth_jwt_secret"] = "x" * 32  # from the Secret
            settings.model_validate(values)


def test_secrets_are_never_literal_values(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """A setting typed SecretStr (API keys, signing keys) comes from the Secret, never
    from a literal value or a ConfigMap."""
    _, docs = overlay
    for name, spec in pod_specs(docs):
        if name not in BACKENDS:
            continue
        secrets = secret_fields(settings_of(name))
        for container in containers(spec):
            literal = set(env_of(container, docs)) & secrets
            assert not literal, f"{name}/{container['name']}: {literal} set literally"


def test_effects_gets_what_it_needs_in_production(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """RunningHub sites and keys, the webhook key and public URL, and analytics' address."""
    _, docs = overlay
    specs = dict(pod_specs(docs))
    container = server(specs["effects"])
    env = env_of(container, docs)
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in container["env"]
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    for key in ("RUNNINGHUB_CN_API_KEY", "RUNNINGHUB_GLOBAL_API_KEY", "EFFECTS_WEBHOOK_SECRET"):
        assert refs[key] == {"name": SECRET, "key": key} | ({"optional": True} if "API_KEY" in key else {})
    # Without it the development default would sign webhook tokens: it must not be optional.
    assert not refs["EFFECTS_WEBHOOK_SECRET"].get("optional", False)
    for region in ("CN", "GLOBAL"):
        assert re.fullmatch(r"https://[^/\s]+", env[f"RUNNINGHUB_{region}_URL"]), region
    # Webhooks: RunningHub calls the edge over HTTPS; empty would mean polling only.
    assert re.fullmatch(r"https://[^/\s]+(/[^\s]*)?", env["EFFECTS_PUBLIC_BASE_URL"])
    # Task ends go to the analytics Service, at its gRPC port.
    host, port = env["ANALYTICS_ADDR"].rsplit(":", 1)
    analytics = of_kind(docs, "Service")[host]
    assert int(port) in [p["port"] for p in analytics["spec"]["ports"] if p["name"] == "grpc"]
    assert int(port) == named_port(server(specs["analytics"]), "grpc")


def test_secret_references(overlay: tuple[str, list[dict[str, Any]]], base: list[dict[str, Any]]) -> None:
    name, docs = overlay
    template = of_kind(base, "Secret")[SECRET]["stringData"]
    for value in template.values():
        assert PLACEHOLDER in value, "template values must be visibly fake"
    assert len(template["AUTH_JWT_SECRET"]) >= 32
    secrets = of_kind(docs, "Secret")
    if name == "prod":
        assert not secrets, "prod must never apply the placeholder Secret"
    else:
        assert secrets[SECRET]["stringData"] == template
    for _, spec in pod_specs(docs):
        for container in containers(spec):
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET
                    assert ref["key"] in template, f"{ref['key']} missing from the template"
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in of_kind(docs, "ConfigMap")


def test_no_replicas_where_an_hpa_owns_the_deployment(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    deployments = of_kind(docs, "Deployment")
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    targets = set()
    for hpa in hpas.values():
        spec = hpa["spec"]
        ref = spec["scaleTargetRef"]
        assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
        assert ref["name"] in deployments
        targets.add(ref["name"])
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]
        (metric,) = spec["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
        behavior = spec["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
        for direction in ("scaleUp", "scaleDown"):
            assert behavior[direction]["selectPolicy"] in {"Max", "Min", "Disabled"}
            assert behavior[direction]["policies"]
            for policy in behavior[direction]["policies"]:
                assert policy["value"] > 0
                assert 0 < policy["periodSeconds"] <= 1800
    assert targets == set(deployments), "every Deployment is autoscaled"
    for name, deployment in deployments.items():
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns replicas"


def test_pdbs(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    deployments = of_kind(docs, "Deployment")
    min_replicas = {
        h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
        for h in of_kind(docs, "HorizontalPodAutoscaler").values()
    }
    covered = set()
    for name, pdb in of_kind(docs, "PodDisruptionBudget").items():
        spec = pdb["spec"]
        assert ("minAvailable" in spec) != ("maxUnavailable" in spec), f"{name}: exactly one of the two"
        assert spec["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        (target,) = [
            d
            for d, dep in deployments.items()
            if matches(spec["selector"], dep["spec"]["template"]["metadata"]["labels"])
        ]
        covered.add(target)
        # A budget the smallest deployment cannot satisfy blocks every node drain.
        if isinstance(spec.get("minAvailable"), int):
            assert spec["minAvailable"] < min_replicas[target], f"{name} would block drains"
        if "maxUnavailable" in spec:
            assert spec["maxUnavailable"] not in (0, "0%")
    assert covered == set(deployments)


def test_restricted_security_context(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for name, spec in pod_specs(docs):
        pod = spec.get("securityContext", {})
        assert spec["automountServiceAccountToken"] is False, name
        assert (
            of_kind(docs, "ServiceAccount")[spec["serviceAccountName"]]["automountServiceAccountToken"]
            is False
        )
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        assert all("hostPath" not in v for v in spec.get("volumes", [])), name
        for container in containers(spec):
            where = f"{name}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert ctx.get("runAsUser", pod.get("runAsUser")) not in (None, 0), where
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx.get("privileged", False) is False, where
            assert set(ctx["capabilities"]["drop"]) == RESTRICTED_CAPS, where
            assert not ctx["capabilities"].get("add"), where
            seccomp = ctx.get("seccompProfile", pod.get("seccompProfile"))
            assert seccomp == {"type": "RuntimeDefault"}, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            # Python needs a writable /tmp (tempfile, multiprocessing) on a read-only root.
            if container["image"].startswith("cosnap/backend") and container["command"][0] == "python":
                mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
                (tmp,) = [v for v in spec["volumes"] if v["name"] == mounts["/tmp"]]
                assert "emptyDir" in tmp, where


def test_resources_requests_and_limits(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for name, spec in pod_specs(docs):
        for container in containers(spec):
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request, limit = resources["requests"][kind], resources["limits"][kind]
                assert 0 < quantity(request) <= quantity(limit), f"{name}/{container['name']} {kind}"


def test_shutdown_fits_in_the_grace_period(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    default = ServiceSettings.model_fields["shutdown_grace_seconds"].default
    specs = dict(pod_specs(docs))
    for name in BACKENDS:
        container = server(specs[name])
        grace = float(env_of(container, docs).get("SHUTDOWN_GRACE_SECONDS", default))
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert specs[name]["terminationGracePeriodSeconds"] > grace + pre_stop, name
    # effects waits up to 45 s for RunningHub: in-flight calls must be allowed to finish.
    effects = float(env_of(server(specs["effects"]), docs)["SHUTDOWN_GRACE_SECONDS"])
    assert effects > 45
    # The edge must outlive its longest route timeout plus its preStop sleep.
    edge = server(specs["edge"])
    longest = max(
        int(r["route"]["timeout"].rstrip("s"))
        for r in _envoy_routes()
        if "route" in r and "timeout" in r["route"]
    )
    assert (
        specs["edge"]["terminationGracePeriodSeconds"]
        > longest + edge["lifecycle"]["preStop"]["sleep"]["seconds"]
    )


def _envoy_routes() -> list[dict[str, Any]]:
    rest = next(li for li in envoy_config()["static_resources"]["listeners"] if li["name"] == "rest")
    hcm = rest["filter_chains"][0]["filters"][0]["typed_config"]
    return [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]


def test_headless_services_for_grpc_backends_match_envoy(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """Envoy's STRICT_DNS clusters resolve these Services; a ClusterIP would pin each HTTP/2
    connection to one pod. Headless clients dial the pod port, so Service port == container port."""
    _, docs = overlay
    services = of_kind(docs, "Service")
    specs = dict(pod_specs(docs))
    deployments = of_kind(docs, "Deployment")
    grpc_services = {
        n: s for n, s in services.items() if any(p["name"] == "grpc" for p in s["spec"]["ports"])
    }
    assert sorted(grpc_services) == BACKENDS
    for name, service in grpc_services.items():
        spec = service["spec"]
        assert spec["clusterIP"] == "None", f"{name} must be headless"
        (port,) = [p for p in spec["ports"] if p["name"] == "grpc"]
        assert port["appProtocol"] == "grpc"
        (target,) = [
            d
            for d, dep in deployments.items()
            if matches({"matchLabels": spec["selector"]}, dep["spec"]["template"]["metadata"]["labels"])
        ]
        container = server(specs[target])
        assert named_port(container, port["targetPort"]) == port["port"]
        metrics = [p for p in spec["ports"] if p["name"] == "metrics"]
        assert metrics and named_port(container, "metrics") == metrics[0]["port"]
    assert envoy_backends() == {n: (n, grpc_services[n]["spec"]["ports"][0]["port"]) for n in BACKENDS}


def test_monitoring_checks_every_other_backend_and_may_notify(
    overlay: tuple[str, list[dict[str, Any]]], base: list[dict[str, Any]]
) -> None:
    """MONITORING_HEALTH_TARGETS names each other backend at its headless Service's gRPC
    port; MONITORING_WEBHOOK_URLS comes from the Secret (URLs carry tokens), optionally."""
    from services.monitoring.health import parse_targets
    from services.monitoring.notify import parse_receivers

    _, docs = overlay
    container = server(dict(pod_specs(docs))["monitoring"])
    services = of_kind(docs, "Service")
    grpc_ports = {
        n: p["port"] for n, s in services.items() for p in s["spec"]["ports"] if p["name"] == "grpc"
    }
    targets = parse_targets(env_of(container, docs)["MONITORING_HEALTH_TARGETS"])
    assert targets == {n: f"{n}:{grpc_ports[n]}" for n in BACKENDS if n != "monitoring"}
    (hooks,) = [v for v in container["env"] if v["name"] == "MONITORING_WEBHOOK_URLS"]
    ref = hooks["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"], ref.get("optional")) == (SECRET, "MONITORING_WEBHOOK_URLS", True)
    template = of_kind(base, "Secret")[SECRET]["stringData"]
    assert parse_receivers(template["MONITORING_WEBHOOK_URLS"])  # the placeholder has the right shape


def test_prometheus_annotations_point_at_the_metrics_port(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for name, deployment in of_kind(docs, "Deployment").items():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        container = server(deployment["spec"]["template"]["spec"])
        assert annotations["prometheus.io/scrape"] == "true"
        port = int(annotations["prometheus.io/port"])
        if name in BACKENDS:
            assert port == named_port(container, "metrics")
            assert env_of(container, docs)["METRICS_PORT"] == str(port)
        else:
            assert port == named_port(container, "ops") == envoy_listener_port("ops")


def test_topology_spread(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for name, deployment in of_kind(docs, "Deployment").items():
        template = deployment["spec"]["template"]
        constraints = template["spec"]["topologySpreadConstraints"]
        keys = {c["topologyKey"] for c in constraints}
        assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys, name
        for constraint in constraints:
            assert matches(constraint["labelSelector"], template["metadata"]["labels"]), name


def test_edge_runs_gateway_envoy_yaml_with_the_descriptor(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    assert (DEPLOY / "base" / "envoy.yaml").read_bytes() == ENVOY_YAML.read_bytes(), (
        "deploy/k8s/base/envoy.yaml differs from gateway/envoy.yaml: "
        "cp gateway/envoy.yaml deploy/k8s/base/envoy.yaml"
    )
    deployment = of_kind(docs, "Deployment")["edge"]
    spec = deployment["spec"]["template"]["spec"]
    envoy = server(spec)
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in envoy["volumeMounts"]}
    # The config: the generated (hash-named) ConfigMap holds gateway/envoy.yaml verbatim.
    config_path = PurePosixPath(envoy["args"][envoy["args"].index("--config-path") + 1])
    (config_volume,) = [n for n, m in mounts.items() if PurePosixPath(m["mountPath"]) == config_path.parent]
    config_map = of_kind(docs, "ConfigMap")[volumes[config_volume]["configMap"]["name"]]
    assert re.fullmatch(r"envoy-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert config_map["data"][config_path.name] == ENVOY_YAML.read_text()
    # The descriptor: written by the initContainer into the volume Envoy reads it from.
    text = ENVOY_YAML.read_text()
    (descriptor,) = set(re.findall(r"proto_descriptor: (\S+)", text))
    descriptor = PurePosixPath(descriptor)
    (volume,) = [n for n, m in mounts.items() if PurePosixPath(m["mountPath"]) == descriptor.parent]
    assert "emptyDir" in volumes[volume] and mounts[volume]["readOnly"] is True
    (init,) = spec["initContainers"]
    (init_mount,) = [m for m in init["volumeMounts"] if m["name"] == volume]
    assert init["command"][0] == "cp"
    assert PurePosixPath(init["command"][-1]) == PurePosixPath(init_mount["mountPath"]) / descriptor.name
    backend_image = server(dict(pod_specs(docs))["analytics"])["image"]
    assert init["image"] == backend_image, "the descriptor must come from the backends' release"
    # Ports and probes agree with the listeners.
    assert named_port(envoy, "http") == envoy_listener_port("rest")
    assert named_port(envoy, "ops") == envoy_listener_port("ops")
    assert envoy["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "ops"}
    service = of_kind(docs, "Service")["edge"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_overlay_specifics(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    hpas = of_kind(docs, "HorizontalPodAutoscaler")
    edge = of_kind(docs, "Service")["edge"]["spec"]
    images = {c["image"] for _, spec in pod_specs(docs) for c in containers(spec)}
    assert not any(i.endswith(":latest") for i in images), images
    if name == "prod":
        assert all(h["spec"]["minReplicas"] >= 2 for h in hpas.values())
        assert edge["type"] == "LoadBalancer" and edge["externalTrafficPolicy"] == "Local"
    else:
        assert edge["type"] == "ClusterIP"
        assert of_kind(docs, "ConfigMap")["cosnap-config"]["data"]["LOG_LEVEL"] == "DEBUG"


# --- network policies -----------------------------------------------------------------------


def allowed(
    docs: list[dict[str, Any]],
    dst: dict[str, Any],
    port: str,
    src_labels: dict[str, str],
    src_namespace: dict[str, str] | None = None,
) -> bool:
    """Is ingress to pod template `dst` on named `port` allowed from a pod with `src_labels`
    (in the same namespace when `src_namespace` is None)?"""
    dst_labels = dst["metadata"]["labels"]
    port_numbers = {p["name"]: p["containerPort"] for c in dst["spec"]["containers"] for p in c["ports"]}
    selected = False
    for policy in of_kind(docs, "NetworkPolicy").values():
        spec = policy["spec"]
        if "Ingress" not in spec["policyTypes"] or not matches(spec["podSelector"], dst_labels):
            continue
        selected = True
        for rule in spec.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(p["port"] in (port, port_numbers.get(port)) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                pod_ok = matches(peer.get("podSelector", {}), src_labels)
                if "namespaceSelector" in peer:
                    ns_ok = src_namespace is not None and matches(peer["namespaceSelector"], src_namespace)
                else:
                    ns_ok = src_namespace is None
                if pod_ok and ns_ok:
                    return True
    return not selected


def test_network_policies(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    templates = {n: d["spec"]["template"] for n, d in of_kind(docs, "Deployment").items()}
    edge = templates["edge"]["metadata"]["labels"]
    prometheus = ({"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "monitoring"})
    stranger = {"app.kubernetes.io/name": "debug-shell"}
    for name in BACKENDS:
        dst = templates[name]
        assert allowed(docs, dst, "grpc", edge), f"edge -> {name}"
        for other in BACKENDS:
            assert allowed(docs, dst, "grpc", templates[other]["metadata"]["labels"]), f"{other} -> {name}"
        assert not allowed(docs, dst, "grpc", stranger), f"anyone -> {name}"
        assert not allowed(docs, dst, "grpc", prometheus[0], prometheus[1])
        assert allowed(docs, dst, "metrics", *prometheus), f"prometheus -> {name} metrics"
        assert not allowed(docs, dst, "metrics", stranger)
    assert allowed(docs, templates["edge"], "http", stranger, {"kubernetes.io/metadata.name": "elsewhere"})
    assert allowed(docs, templates["edge"], "ops", *prometheus)
    assert not allowed(docs, templates["edge"], "ops", stranger)
