"""JWT at the edge: gateway/envoy.yaml's jwt_authn rules against what the services declare.

The expected rules are derived, not listed: every REST binding in the descriptor set, with
the access level its service declares in services/<name>/app.py (ACCESS). Envoy's rule
matching (first match wins; exact path or RE2 full match on the path without its query;
`:method` header) is simulated on sample paths of every binding, so a new RPC, a new
binding or a changed access level fails here until envoy.yaml covers it.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from pathlib import PurePosixPath
from typing import Any

import jwt
import pytest
import yaml

from gateway.access import Binding, bindings
from gateway.routes import build_routes, load_descriptors
from services.servicekit.auth import Access, issue_token, verify
from tests.gateway.test_envoy_config import (
    DESCRIPTOR_SET,
    ENVOY_YAML,
    http_filters,
    parse_bootstrap,
)
from tests.support import ROOT
from tools.jwks import jwks

JWT = "envoy.filters.http.jwt_authn"
PROVIDER = "cosnap"
SAMPLE_VALUES = ["x1", "2026-W48", "a.b_c-9", "tasks", "abc%3Adef"]


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(ENVOY_YAML.read_text())


def jwt_config(raw: dict[str, Any]) -> Any:
    (config,) = [c for name, c in http_filters(parse_bootstrap(raw)) if name == JWT]
    return config


@pytest.fixture(scope="module")
def expected() -> list[Binding]:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    return bindings(build_routes(descriptors.pool, descriptors.services))


def sample_paths(binding: Binding) -> list[str]:
    template = binding.route.template.source
    out = []
    for value in SAMPLE_VALUES:
        path = re.sub(r"\{[^}]+\}", value, template)
        out += [path, path + "?pageSize=1"]
    return out


def first_rule(config: Any, verb: str, path: str) -> Any | None:
    """Envoy's RequirementRule matching: first match wins; the query is not part of the path."""
    path = path.split("?", 1)[0]
    for rule in config.rules:
        match = rule.match
        kind = match.WhichOneof("path_specifier")
        if kind == "path":
            hit = path == match.path
        elif kind == "prefix":
            hit = path.startswith(match.prefix)
        elif kind == "safe_regex":
            hit = re.fullmatch(match.safe_regex.regex, path) is not None
        else:
            raise AssertionError(f"unsimulated rule match {kind}")
        for header in match.headers:
            assert header.name == ":method", f"unsimulated header match {header.name}"
            hit = hit and header.string_match.exact == verb
        if hit:
            return rule
    return None


def kind_of(requirement: Any) -> str:
    """'token' (a valid token from our provider), 'optional' (missing or failed let through)."""
    which = requirement.WhichOneof("requires_type")
    if which == "provider_name" and requirement.provider_name == PROVIDER:
        return "token"
    if which in {"allow_missing_or_failed"}:
        return "optional"
    return f"unexpected:{which}"


def problems(config: Any, expected: list[Binding]) -> list[str]:
    found = []
    used = set()
    for binding in expected:
        want = "optional" if binding.access is Access.PUBLIC else "token"
        # The REST paths (what jwt_authn sees before the transcoder) and the gRPC path
        # (what a raw gRPC caller sends).
        samples = [(binding.verb, p) for p in sample_paths(binding)] + [("POST", binding.route.grpc_path)]
        for verb, path in samples:
            rule = first_rule(config, verb, path)
            if rule is None:
                found.append(f"{verb} {path} ({binding.access.value}): no rule")
                continue
            used.add(id(rule))
            got = kind_of(rule.requires)
            if got != want:
                found.append(f"{verb} {path} ({binding.access.value}): {got}, want {want}")
    for index, rule in enumerate(config.rules):
        if id(rule) not in used:
            found.append(f"rule {index} ({rule.match}) matches no binding: stale")
    return found


def test_every_binding_has_the_rule_its_access_level_needs(
    raw: dict[str, Any], expected: list[Binding]
) -> None:
    assert {b.access for b in expected} == {Access.PUBLIC, Access.USER, Access.ADMIN, Access.ADMIN_OR_SERVICE}
    assert problems(jwt_config(raw), expected) == []


def test_the_check_catches_an_unprotected_or_locked_path(
    raw: dict[str, Any], expected: list[Binding]
) -> None:
    rest = next(li for li in raw["static_resources"]["listeners"] if li["name"] == "rest")
    filters = rest["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]

    def mutate(change: Any) -> list[str]:
        copied = copy.deepcopy(raw)
        rest = next(li for li in copied["static_resources"]["listeners"] if li["name"] == "rest")
        (jwt_filter,) = [
            f
            for f in rest["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            if f["name"] == JWT
        ]
        change(jwt_filter["typed_config"]["rules"])
        return problems(jwt_config(copied), expected)

    assert any(f["name"] == JWT for f in filters)
    admin = next(b for b in expected if b.access is Access.ADMIN)
    public = next(b for b in expected if b.access is Access.PUBLIC)

    def drop_admin(rules: list[dict[str, Any]]) -> None:
        rules[:] = [r for r in rules if r["match"].get("path") != admin.template]

    def lock_public(rules: list[dict[str, Any]]) -> None:
        rules.insert(0, {"match": {"prefix": "/"}, "requires": {"provider_name": PROVIDER}})

    def relax_all(rules: list[dict[str, Any]]) -> None:
        for rule in rules:
            rule["requires"] = {"allow_missing_or_failed": {}}

    assert any(admin.template in p and "no rule" in p for p in mutate(drop_admin))
    assert any(public.template in p and "token, want optional" in p for p in mutate(lock_public))
    assert any("optional, want token" in p for p in mutate(relax_all))


def test_the_provider_verifies_hs256_with_the_mounted_jwks(raw: dict[str, Any]) -> None:
    config = jwt_config(raw)
    assert list(config.providers) == [PROVIDER]
    provider = config.providers[PROVIDER]
    assert provider.WhichOneof("jwks_source_specifier") == "local_jwks"
    assert provider.forward, "the services verify the token again: keep the header"
    assert provider.require_expiration, "API.md: exp is required"
    assert not provider.from_params and not provider.from_cookies, "only Authorization: Bearer"
    assert config.bypass_cors_preflight
    jwks_file = PurePosixPath(provider.local_jwks.filename)

    # The file comes from the Secret the services take AUTH_JWT_SECRET from.
    edge = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "edge.yaml").read_text())
    (deployment,) = [d for d in edge if d and d["kind"] == "Deployment"]
    spec = deployment["spec"]["template"]["spec"]
    (envoy,) = spec["containers"]
    (mount,) = [m for m in envoy["volumeMounts"] if PurePosixPath(m["mountPath"]) == jwks_file.parent]
    assert mount["readOnly"] is True
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["secretName"] == "cosnap-secrets"
    (item,) = secret["items"]
    assert item["path"] == jwks_file.name
    assert secret["defaultMode"] & 0o007 == 0, "not world-readable"

    # The template's JWKS is the template's secret, in the form Envoy and PyJWT read.
    config_docs = yaml.safe_load_all((ROOT / "deploy" / "k8s" / "base" / "config.yaml").read_text())
    (template,) = [d for d in config_docs if d and d["kind"] == "Secret"]
    data = template["stringData"]
    document = json.loads(data[item["key"]])
    (key,) = document["keys"]
    assert key["kty"] == "oct" and key["alg"] == "HS256"
    padded = key["k"] + "=" * (-len(key["k"]) % 4)
    assert base64.urlsafe_b64decode(padded).decode() == data["AUTH_JWT_SECRET"]
    assert "=" not in key["k"] and "+" not in key["k"] and "/" not in key["k"], "base64url, no padding"
    assert document == jwks(data["AUTH_JWT_SECRET"], kid=key.get("kid"))


def test_a_service_token_verifies_with_the_jwks() -> None:
    """tools.jwks encodes the secret so that a token the services mint and accept verifies
    against the JWK, and a token signed with another secret does not."""
    secret = "rotation-test-secret-0123456789-abcdef"
    token = issue_token(secret, "u-1", role="admin")
    key = jwt.PyJWK(jwks(secret)["keys"][0])
    claims = jwt.decode(token, key.key, algorithms=["HS256"], options={"require": ["exp"]})
    assert claims["sub"] == "u-1"
    assert verify(f"Bearer {token}", secret) is not None
    forged = issue_token("another-secret-0123456789-0123456789", "u-1", role="admin")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(forged, key.key, algorithms=["HS256"])
    expired = jwt.encode({"sub": "u-1", "exp": int(time.time()) - 3600}, secret, algorithm="HS256")
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(expired, key.key, algorithms=["HS256"])
