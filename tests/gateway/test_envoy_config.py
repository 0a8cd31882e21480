"""gateway/envoy.yaml, checked offline as strictly as possible without an Envoy binary.

1. Schema: the YAML is parsed into `envoy.config.bootstrap.v3.Bootstrap` with the
   generated xds-protos modules (every `@type` imported first), rejecting unknown
   fields, bad enum names and wrong JSON types at any depth.
2. Envoy's own constraints: the PGV `validate.rules` annotations in the descriptors
   (required fields, `gt: 0`, `min_len`, defined enums...) are walked here, because
   protobuf does not enforce them; deprecated fields are refused too.
3. Meaning: the filter chain order, the transcoder against the descriptor set built
   from protos/, and the routes simulated path by path: every public method reaches
   its own cluster, internal RPCs do not, every REST path has a route for CORS.
"""

from __future__ import annotations

import copy
import importlib
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, json_format, message, message_factory
from google.protobuf.any_pb2 import Any as AnyProto

from gateway.access import declared_access
from gateway.config import DEFAULT_BACKENDS
from services.servicekit.auth import Access
from tests.support import ROOT

bootstrap_pb2 = pytest.importorskip(
    "envoy.config.bootstrap.v3.bootstrap_pb2", reason="xds-protos is not installed (dev extra)"
)
validate_pb2 = importlib.import_module("validate.validate_pb2")

ENVOY_YAML = ROOT / "gateway" / "envoy.yaml"
DESCRIPTOR_SET = ROOT / "build" / "descriptor.binpb"
TYPE_PREFIX = "type.googleapis.com/"

HCM = "envoy.filters.network.http_connection_manager"
CORS = "envoy.filters.http.cors"
RATELIMIT = "envoy.filters.http.local_ratelimit"
JWT = "envoy.filters.http.jwt_authn"
TRANSCODER = "envoy.filters.http.grpc_json_transcoder"
ROUTER = "envoy.filters.http.router"
# The route-level (typed_per_filter_config) type each HTTP filter accepts.
PER_ROUTE_TYPES = {
    CORS: "envoy.extensions.filters.http.cors.v3.CorsPolicy",
    RATELIMIT: "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
    TRANSCODER: "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
}
PUBLIC_BODY_LIMIT = 1 << 20
UPLOAD_BODY_LIMIT = 30 << 20


# --- loading -------------------------------------------------------------------------------


def _type_urls(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "@type" in node:
            yield node["@type"]
        for value in node.values():
            yield from _type_urls(value)
    elif isinstance(node, list):
        for value in node:
            yield from _type_urls(value)


def import_types(config: dict[str, Any]) -> None:
    """Import the `_pb2` modules that define every `@type`, so `Any` can resolve them."""
    pool = descriptor_pool.Default()
    for url in set(_type_urls(config)):
        assert url.startswith(TYPE_PREFIX), url
        full_name = url.removeprefix(TYPE_PREFIX)
        package = full_name.rpartition(".")[0]
        folder = Path(importlib.import_module(package).__path__[0])
        for module in sorted(folder.glob("*_pb2.py")):
            importlib.import_module(f"{package}.{module.stem}")
        pool.FindMessageTypeByName(full_name)  # KeyError names the unknown type


def parse_bootstrap(config: dict[str, Any]) -> Any:
    import_types(config)
    return json_format.ParseDict(config, bootstrap_pb2.Bootstrap(), ignore_unknown_fields=False)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_YAML.read_text())


@pytest.fixture(scope="module")
def bootstrap(raw: dict[str, Any]) -> Any:
    return parse_bootstrap(raw)


def unpack(any_msg: AnyProto) -> message.Message:
    desc = descriptor_pool.Default().FindMessageTypeByName(any_msg.TypeName())
    out = message_factory.GetMessageClass(desc)()
    assert any_msg.Unpack(out)
    return out


# --- Envoy's PGV rules ---------------------------------------------------------------------

WRAPPERS = {
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
}
HEADER_NAME = re.compile(r"^:?[0-9a-zA-Z!#$%&'*+\-.^_|~`]+$")
HEADER_VALUE = re.compile(r"^[^\x00\n\r]*$")


def _numeric(value: Any, rules: message.Message, path: str, errors: list[str]) -> None:
    def has(name: str) -> bool:
        return rules.HasField(name) if rules.DESCRIPTOR.fields_by_name[name].has_presence else False

    if has("const") and value != rules.const:
        errors.append(f"{path}: {value} != const {rules.const}")
    if has("gt") and not value > rules.gt:
        errors.append(f"{path}: {value} must be > {rules.gt}")
    if has("gte") and not value >= rules.gte:
        errors.append(f"{path}: {value} must be >= {rules.gte}")
    if has("lt") and not value < rules.lt:
        errors.append(f"{path}: {value} must be < {rules.lt}")
    if has("lte") and not value <= rules.lte:
        errors.append(f"{path}: {value} must be <= {rules.lte}")
    if len(rules.__getattribute__("in")) and value not in rules.__getattribute__("in"):
        errors.append(f"{path}: {value} not in {list(rules.__getattribute__('in'))}")
    if value in rules.not_in:
        errors.append(f"{path}: {value} is excluded")


def _string(value: str, rules: message.Message, path: str, errors: list[str]) -> None:
    if rules.ignore_empty and not value:
        return
    if rules.HasField("min_len") and len(value) < rules.min_len:
        errors.append(f"{path}: {value!r} shorter than {rules.min_len}")
    if rules.HasField("max_len") and len(value) > rules.max_len:
        errors.append(f"{path}: {value!r} longer than {rules.max_len}")
    if rules.HasField("len") and len(value) != rules.len:
        errors.append(f"{path}: {value!r} is not {rules.len} long")
    if rules.HasField("min_bytes") and len(value.encode()) < rules.min_bytes:
        errors.append(f"{path}: {value!r} shorter than {rules.min_bytes} bytes")
    if rules.HasField("max_bytes") and len(value.encode()) > rules.max_bytes:
        errors.append(f"{path}: {value!r} longer than {rules.max_bytes} bytes")
    if rules.HasField("prefix") and not value.startswith(rules.prefix):
        errors.append(f"{path}: {value!r} lacks prefix {rules.prefix!r}")
    if rules.HasField("suffix") and not value.endswith(rules.suffix):
        errors.append(f"{path}: {value!r} lacks suffix {rules.suffix!r}")
    if rules.HasField("contains") and rules.contains not in value:
        errors.append(f"{path}: {value!r} lacks {rules.contains!r}")
    if rules.HasField("pattern") and not re.search(rules.pattern, value):
        errors.append(f"{path}: {value!r} does not match {rules.pattern!r}")
    allowed = rules.__getattribute__("in")
    if len(allowed) and value not in allowed:
        errors.append(f"{path}: {value!r} not in {list(allowed)}")
    if value in rules.not_in:
        errors.append(f"{path}: {value!r} is excluded")
    if rules.WhichOneof("well_known") == "well_known_regex" and value:
        regex = HEADER_NAME if rules.well_known_regex == validate_pb2.HTTP_HEADER_NAME else HEADER_VALUE
        if not regex.match(value):
            errors.append(f"{path}: {value!r} is not a valid HTTP header name/value")


def _duration(value: message.Message, rules: message.Message, path: str, errors: list[str]) -> None:
    got = value.ToTimedelta()
    for name, check in (
        ("gt", lambda b: got > b),
        ("gte", lambda b: got >= b),
        ("lt", lambda b: got < b),
        ("lte", lambda b: got <= b),
        ("const", lambda b: got == b),
    ):
        if rules.HasField(name) and not check(getattr(rules, name).ToTimedelta()):
            errors.append(f"{path}: {got} violates {name} {getattr(rules, name).ToTimedelta()}")


def _check_value(
    value: Any, field: descriptor.FieldDescriptor, rules: Any, path: str, errors: list[str]
) -> None:
    """One singular value (or one element of a repeated field) against its rules."""
    kind = rules.WhichOneof("type") if rules is not None else None
    if field.type == field.TYPE_MESSAGE:
        name = field.message_type.full_name
        if kind == "duration":
            _duration(value, rules.duration, path, errors)
        elif kind == "any":
            allowed = rules.any.__getattribute__("in")
            if len(allowed) and value.type_url not in allowed:
                errors.append(f"{path}: {value.type_url} not in {list(allowed)}")
        elif kind and name in WRAPPERS:
            checker = _string if kind == "string" else _numeric
            checker(value.value, getattr(rules, kind), path, errors)
        if not (kind == "message" and rules.message.skip):
            walk(value, path, errors)
    elif field.type == field.TYPE_ENUM:
        defined = field.enum_type.values_by_number
        if kind == "enum" and rules.enum.defined_only and value not in defined:
            errors.append(f"{path}: {value} is not a defined {field.enum_type.full_name}")
        if value in defined and defined[value].GetOptions().deprecated:
            errors.append(f"{path}: enum value {defined[value].name} is deprecated")
    elif kind == "string":
        _string(value, rules.string, path, errors)
    elif kind in {"bytes", "bool", None}:
        return
    else:
        _numeric(value, getattr(rules, kind), path, errors)


def walk(msg: message.Message, path: str, errors: list[str]) -> None:
    """Enforce Envoy's `validate.rules` on `msg` and everything below it (Any included)."""
    if isinstance(msg, AnyProto):
        if msg.type_url:
            walk(unpack(msg), f"{path}<{msg.TypeName()}>", errors)
        return
    desc = msg.DESCRIPTOR
    if desc.GetOptions().Extensions[validate_pb2.disabled]:
        return
    for oneof in desc.oneofs:
        if oneof.GetOptions().Extensions[validate_pb2.required] and msg.WhichOneof(oneof.name) is None:
            errors.append(f"{path}: one of {oneof.name} is required")
    for field in desc.fields:
        where = f"{path}.{field.name}"
        options = field.GetOptions()
        rules = options.Extensions[validate_pb2.rules] if options.HasExtension(validate_pb2.rules) else None
        oneof = field.containing_oneof
        if oneof is not None and msg.WhichOneof(oneof.name) != field.name:
            continue  # PGV checks only the member that is set
        value = getattr(msg, field.name)
        if field.is_repeated:
            present = len(value) > 0
        elif field.has_presence:
            present = msg.HasField(field.name)
        else:
            present = value != field.default_value
        if present and options.deprecated:
            errors.append(f"{where}: deprecated field is set")
        if field.is_repeated:
            kind = rules.WhichOneof("type") if rules is not None else None
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                if kind == "map" and not (rules.map.ignore_empty and not value):
                    if rules.map.min_pairs and len(value) < rules.map.min_pairs:
                        errors.append(f"{where}: needs at least {rules.map.min_pairs} entries")
                value_field = field.message_type.fields_by_name["value"]
                item_rules = rules.map.values if kind == "map" else None
                for key in value:
                    _check_value(value[key], value_field, item_rules, f"{where}[{key}]", errors)
                continue
            item_rules = None
            if kind == "repeated" and not (rules.repeated.ignore_empty and not value):
                if rules.repeated.min_items and len(value) < rules.repeated.min_items:
                    errors.append(f"{where}: needs at least {rules.repeated.min_items} items")
                if rules.repeated.HasField("max_items") and len(value) > rules.repeated.max_items:
                    errors.append(f"{where}: at most {rules.repeated.max_items} items")
                item_rules = rules.repeated.items if rules.repeated.HasField("items") else None
            for i, item in enumerate(value):
                _check_value(item, field, item_rules, f"{where}[{i}]", errors)
            continue
        if field.type == field.TYPE_MESSAGE:
            kind = rules.WhichOneof("type") if rules is not None else None
            required = (
                (kind == "message" and rules.message.required)
                or (kind == "duration" and rules.duration.required)
                or (kind == "any" and rules.any.required)
            )
            if not present:
                if required:
                    errors.append(f"{where}: required")
                continue
        elif not present and oneof is None and rules is None:
            continue
        _check_value(value, field, rules, where, errors)


def violations(bootstrap: Any) -> list[str]:
    errors: list[str] = []
    walk(bootstrap, "bootstrap", errors)
    return errors


# --- helpers over the parsed config --------------------------------------------------------


def listener(bootstrap: Any, name: str) -> Any:
    return next(item for item in bootstrap.static_resources.listeners if item.name == name)


def hcm(bootstrap: Any, name: str = "rest") -> Any:
    filters = listener(bootstrap, name).filter_chains[0].filters
    assert [f.name for f in filters] == [HCM]
    return unpack(filters[0].typed_config)


def http_filters(bootstrap: Any) -> list[tuple[str, message.Message]]:
    return [(f.name, unpack(f.typed_config)) for f in hcm(bootstrap).http_filters]


def clusters(bootstrap: Any) -> dict[str, Any]:
    return {c.name: c for c in bootstrap.static_resources.clusters}


def routes(bootstrap: Any) -> list[Any]:
    (vhost,) = hcm(bootstrap).route_config.virtual_hosts
    return list(vhost.routes)


def match(routes_: list[Any], path: str) -> Any | None:
    """Envoy's first-match semantics for the match kinds this config uses."""
    for route in routes_:
        m = route.match
        kind = m.WhichOneof("path_specifier")
        if kind == "path" and path == m.path:
            return route
        if kind == "prefix" and path.startswith(m.prefix):
            return route
        if kind == "path_separated_prefix" and (
            path == m.path_separated_prefix or path.startswith(m.path_separated_prefix + "/")
        ):
            return route
        assert kind in {"path", "prefix", "path_separated_prefix"}, f"unsimulated match {kind}"
    return None


def load_contract() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """{service: {method: [(VERB, path template), ...]}} from the descriptor set Envoy loads."""
    assert DESCRIPTOR_SET.is_file(), f"{DESCRIPTOR_SET} is missing: run `make gen`"
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    contract: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for file in fds.file:
        if not file.name.startswith("cosnap/"):
            continue
        for service in file.service:
            methods = contract.setdefault(f"{file.package}.{service.name}", {})
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                bindings = []
                for r in [rule, *rule.additional_bindings]:
                    verb = r.WhichOneof("pattern")
                    if verb and verb != "custom":
                        bindings.append((verb.upper(), getattr(r, verb)))
                methods[method.name] = bindings
    return contract


def services_in_protos() -> set[str]:
    """Service names straight from the .proto sources, independent of the build."""
    found = set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.M)
        assert package, proto
        found |= {f"{package.group(1)}.{name}" for name in re.findall(r"^service\s+(\w+)\s*\{", text, re.M)}
    return found


def sample_path(template: str) -> str:
    """/api/effects/{effect_id}/tasks -> /api/effects/x1/tasks (also {name=**} forms)."""
    return re.sub(r"\{[^}]+\}", "x1", template)


@pytest.fixture(scope="module")
def contract() -> dict[str, dict[str, list[tuple[str, str]]]]:
    return load_contract()


def cluster_for_service(bootstrap: Any) -> dict[str, str]:
    """gRPC service name -> the cluster whose health check asks for it."""
    out = {}
    for cluster in bootstrap.static_resources.clusters:
        for check in cluster.health_checks:
            out[check.grpc_health_check.service_name] = cluster.name
    return out


# --- 1 and 2: schema and Envoy's rules -----------------------------------------------------


def test_parses_into_bootstrap_with_every_type_known(raw: dict[str, Any], bootstrap: Any) -> None:
    assert len(bootstrap.static_resources.listeners) == 2
    urls = set(_type_urls(raw))
    assert f"{TYPE_PREFIX}envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder" in urls
    # Each filter's typed_config is the config type of that filter, not just any message.
    expected = {
        CORS: "envoy.extensions.filters.http.cors.v3.Cors",
        RATELIMIT: "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        TRANSCODER: "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        ROUTER: "envoy.extensions.filters.http.router.v3.Router",
        JWT: "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "envoy.filters.http.compressor": "envoy.extensions.filters.http.compressor.v3.Compressor",
    }
    for name, config in http_filters(bootstrap):
        assert config.DESCRIPTOR.full_name == expected[name], name


def test_satisfies_envoys_validation_rules(bootstrap: Any) -> None:
    assert violations(bootstrap) == []


def test_the_checks_have_teeth(raw: dict[str, Any]) -> None:
    """Typos, bad enums, wrong types, broken required fields and deprecated fields are caught."""
    typo = copy.deepcopy(raw)
    typo["static_resources"]["clusters"][0]["conect_timeout"] = "1s"
    with pytest.raises(json_format.ParseError, match="conect_timeout"):
        parse_bootstrap(typo)

    nested_typo = copy.deepcopy(raw)
    transcoder = next(
        f for f in _rest_filters(nested_typo) if f["name"] == TRANSCODER
    )  # inside an Any, three levels down
    transcoder["typed_config"]["request_validation_options"]["reject_unknown_methods"] = True
    with pytest.raises(json_format.ParseError, match="reject_unknown_methods"):
        parse_bootstrap(nested_typo)

    bad_enum = copy.deepcopy(raw)
    bad_enum["static_resources"]["clusters"][0]["lb_policy"] = "ROUND_ROBBIN"
    with pytest.raises(json_format.ParseError):
        parse_bootstrap(bad_enum)

    broken = copy.deepcopy(raw)
    cluster = broken["static_resources"]["clusters"][0]
    cluster["connect_timeout"] = "0s"  # gt: 0
    del cluster["health_checks"][0]["timeout"]  # message.required
    cluster["name"] = ""  # min_len: 1
    cluster["dns_refresh_rate"] = "5s"  # deprecated in favour of the DNS cluster extension
    found = "\n".join(violations(parse_bootstrap(broken)))
    assert "clusters[0].connect_timeout" in found
    assert "health_checks[0].timeout: required" in found
    assert "clusters[0].name" in found
    assert "dns_refresh_rate: deprecated" in found


def _rest_filters(raw: dict[str, Any]) -> list[dict[str, Any]]:
    rest = next(item for item in raw["static_resources"]["listeners"] if item["name"] == "rest")
    return rest["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]


# --- 3: meaning ----------------------------------------------------------------------------


def test_filter_chain_order(bootstrap: Any) -> None:
    names = [name for name, _ in http_filters(bootstrap)]
    assert names[0] == CORS, "CORS first: preflights are answered before anything else"
    assert names[-1] == ROUTER
    assert names.index(CORS) < names.index(RATELIMIT) < names.index(TRANSCODER) < names.index(ROUTER)
    # JWT sees the REST path (before the transcoder rewrites it), after the rate limit.
    assert names.index(RATELIMIT) < names.index(JWT) < names.index(TRANSCODER)
    assert names.count(TRANSCODER) == 1


def test_local_rate_limit_is_enforced(bootstrap: Any) -> None:
    (config,) = [c for name, c in http_filters(bootstrap) if name == RATELIMIT]
    for fraction in (config.filter_enabled.default_value, config.filter_enforced.default_value):
        assert fraction.numerator == 100
        assert fraction.denominator == fraction.HUNDRED
    bucket = config.token_bucket
    assert bucket.max_tokens >= bucket.tokens_per_fill.value > 0
    assert bucket.fill_interval.ToTimedelta() > timedelta(0)


def test_transcoder_serves_exactly_the_services_in_protos(bootstrap: Any, contract: dict) -> None:
    (config,) = [c for name, c in http_filters(bootstrap) if name == TRANSCODER]
    assert set(contract) == services_in_protos()
    assert sorted(config.services) == sorted(contract)
    assert config.proto_descriptor == "/etc/envoy/descriptor.binpb"
    assert config.convert_grpc_status
    options = config.request_validation_options
    assert options.reject_unknown_method
    assert options.reject_unknown_query_parameters
    assert options.reject_binding_body_field_collisions
    assert config.max_request_body_size.value == PUBLIC_BODY_LIMIT
    assert config.HasField("print_options")
    assert not config.match_incoming_request_route, "routes below match the transcoded path"
    assert not config.auto_mapping, "auto_mapping would publish RPCs that have no HTTP rule"


def test_convert_grpc_status_has_its_types(contract: dict) -> None:
    """convert_grpc_status renders google.rpc.Status: it must be in the descriptor set."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    files = {f.name for f in fds.file}
    assert {"google/rpc/status.proto", "google/rpc/error_details.proto"} <= files


def test_per_route_configs_have_the_right_types(bootstrap: Any) -> None:
    filter_names = {name for name, _ in http_filters(bootstrap)}
    (vhost,) = hcm(bootstrap).route_config.virtual_hosts
    scopes = [("vhost", vhost.typed_per_filter_config)] + [
        (r.name or str(r.match), r.typed_per_filter_config) for r in vhost.routes
    ]
    seen = 0
    for scope, per_filter in scopes:
        for name, config in per_filter.items():
            assert name in filter_names, f"{scope}: no filter named {name}"
            assert config.TypeName() == PER_ROUTE_TYPES[name], f"{scope}: {name} got {config.TypeName()}"
            seen += 1
    assert seen >= 2
    cors = unpack(vhost.typed_per_filter_config[CORS])
    assert [m.exact for m in cors.allow_origin_string_match if m.exact]
    assert "*" not in [m.exact for m in cors.allow_origin_string_match]
    assert "authorization" in cors.allow_headers
    assert "x-request-id" in cors.expose_headers


def test_upload_route_only_raises_the_body_limit(bootstrap: Any, contract: dict) -> None:
    (upload,) = [
        verb_path
        for verb_path in contract["cosnap.effects.v1.EffectsService"]["UploadInput"]
        if verb_path[0] == "POST"
    ]
    route = match(routes(bootstrap), upload[1])
    assert route is not None and route.route.cluster == "effects"
    override = unpack(route.typed_per_filter_config[TRANSCODER])
    (base,) = [c for name, c in http_filters(bootstrap) if name == TRANSCODER]
    assert override.max_request_body_size.value == UPLOAD_BODY_LIMIT
    override.max_request_body_size.value = base.max_request_body_size.value
    assert override == base, "the upload override differs from the filter in more than the limit"


def test_every_public_method_reaches_its_cluster(bootstrap: Any, contract: dict) -> None:
    table = routes(bootstrap)
    owner = cluster_for_service(bootstrap)
    for service, methods in contract.items():
        for method, bindings in methods.items():
            if not bindings:
                continue
            route = match(table, f"/{service}/{method}")
            assert route is not None and route.WhichOneof("action") == "route", f"{service}/{method}"
            assert route.route.cluster == owner[service]
            for verb, template in bindings:
                # Before transcoding, CORS and the rate limit need a route *with a route action*
                # for the REST path (Envoy's CORS filter skips requests without one).
                rest = match(table, sample_path(template))
                assert rest is not None, f"{verb} {template}: no route, so no CORS"
                assert rest.WhichOneof("action") == "route", f"{verb} {template}"
                assert rest.route.cluster == owner[service], f"{verb} {template}"


def test_internal_rpcs_are_not_reachable(bootstrap: Any, contract: dict) -> None:
    internal = {
        (service, method) for service, methods in contract.items() for method, b in methods.items() if not b
    }
    declared = {
        (service, method)
        for service, methods in declared_access().items()
        for method, level in methods.items()
        if level is Access.INTERNAL
    }
    assert declared and declared == internal, "INTERNAL exactly where there is no HTTP rule"
    table = routes(bootstrap)
    for service, method in internal:
        for path in (f"/{service}/{method}", f"/{service}/{method.lower()}", f"/{service}/{method}/"):
            route = match(table, path)
            reached = route is not None and route.WhichOneof("action") == "route"
            assert not reached, f"{path} is routed to {route.route.cluster}"
            if route is not None:
                assert route.direct_response.status == 404
    # And nothing else on the monitoring prefix, e.g. a future RPC, gets through by default.
    route = match(table, "/cosnap.monitoring.v1.MonitoringService/SomeFutureRpc")
    assert route is not None and route.direct_response.status == 404


def test_paths_are_normalised_before_matching(bootstrap: Any) -> None:
    manager = hcm(bootstrap)
    assert manager.normalize_path.value
    assert manager.merge_slashes
    assert manager.path_with_escaped_slashes_action == manager.REJECT_REQUEST


def test_backend_clusters(bootstrap: Any, contract: dict) -> None:
    owner = cluster_for_service(bootstrap)
    assert set(owner) == set(contract)
    used = {r.route.cluster for r in routes(bootstrap) if r.WhichOneof("action") == "route"}
    for service, name in owner.items():
        cluster = clusters(bootstrap)[name]
        assert cluster.type == cluster.STRICT_DNS, "headless Service: one endpoint per pod"
        assert cluster.lb_policy == cluster.ROUND_ROBIN
        options = cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        assert unpack(options).explicit_http_config.HasField("http2_protocol_options"), (
            "gRPC and gRPC health checks need HTTP/2"
        )
        (check,) = cluster.health_checks
        assert check.grpc_health_check.service_name == service
        assert check.timeout.ToTimedelta() < check.interval.ToTimedelta()
        (endpoint,) = [e for group in cluster.load_assignment.endpoints for e in group.lb_endpoints]
        address = endpoint.endpoint.address.socket_address
        assert (
            f"{address.address}:{address.port_value}" == f"{name}:{DEFAULT_BACKENDS[service].split(':')[1]}"
        )
        assert name in used
    assert used <= set(clusters(bootstrap))


def test_admin_is_local_and_only_ready_and_metrics_are_exposed(bootstrap: Any) -> None:
    admin = bootstrap.admin.address.socket_address
    assert admin.address == "127.0.0.1"
    ops = hcm(bootstrap, "ops")
    (vhost,) = ops.route_config.virtual_hosts
    assert {r.match.path for r in vhost.routes} == {"/ready", "/stats/prometheus"}
    target = clusters(bootstrap)[vhost.routes[0].route.cluster]
    (endpoint,) = [e for group in target.load_assignment.endpoints for e in group.lb_endpoints]
    address = endpoint.endpoint.address.socket_address
    assert (address.address, address.port_value) == (admin.address, admin.port_value)
    assert {r.route.cluster for r in vhost.routes} == {target.name}


def test_live_stream_routes(bootstrap: Any) -> None:
    """The live dashboard: SSE when the client accepts text/event-stream, else NDJSON; no
    deadline but an idle timeout, before and after transcoding."""
    table = routes(bootstrap)
    path = "/api/analytics/dashboard/performance:stream"
    stream_routes = [r for r in table if r.match.path == path]
    assert len(stream_routes) == 2
    sse, ndjson = stream_routes
    (header,) = sse.match.headers
    assert (header.name, header.string_match.contains) == ("accept", "text/event-stream")
    assert not ndjson.match.headers
    (base,) = [c for name, c in http_filters(bootstrap) if name == TRANSCODER]
    for route, option in ((sse, "stream_sse_style_delimited"), (ndjson, "stream_newline_delimited")):
        assert route.route.cluster == "analytics"
        assert route.route.timeout.ToTimedelta() == timedelta(0)
        assert route.route.idle_timeout.ToTimedelta() > timedelta(0)
        override = unpack(route.typed_per_filter_config[TRANSCODER])
        assert getattr(override.print_options, option) is True
        setattr(override.print_options, option, False)
        assert override == base, f"the {option} override differs from the filter in more than that"
    grpc_route = match(table, "/cosnap.analytics.v1.AnalyticsService/StreamPerformanceDashboard")
    assert grpc_route is not None and grpc_route.route.timeout.ToTimedelta() == timedelta(0)
