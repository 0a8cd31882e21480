"""The route table, built from the `google.api.http` options in a descriptor set.

Path templates follow google/api/http.proto:

    Template = "/" Segments [ Verb ] ;
    Segments = Segment { "/" Segment } ;
    Segment  = "*" | "**" | LITERAL | Variable ;
    Variable = "{" FieldPath [ "=" Segments ] "}" ;
    Verb     = ":" LITERAL ;

Matching mirrors Envoy's path matcher: among the templates that match, literal segments beat
`*`, which beats `**`, comparing segment by segment from the left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import unquote

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, MethodDescriptor

if TYPE_CHECKING:
    from google.protobuf.internal.extension_dict import _ExtensionFieldDescriptor

HTTP_BODY = "google.api.HttpBody"

LITERAL, STAR, DOUBLE_STAR = 2, 1, 0  # also the specificity rank of each segment kind


class TemplateError(ValueError):
    """A path template that does not follow the google.api.http grammar."""


@dataclass(frozen=True)
class Variable:
    field_path: tuple[str, ...]
    start: int  # index of the first template segment it covers
    end: int  # one past the last


@dataclass(frozen=True)
class PathTemplate:
    source: str
    segments: tuple[tuple[int, str], ...]  # (kind, literal text or "")
    variables: tuple[Variable, ...]
    verb: str | None

    @classmethod
    def parse(cls, template: str) -> PathTemplate:
        if not template.startswith("/"):
            raise TemplateError(f"path template {template!r} must start with '/'")
        body, verb = template[1:], None
        # The verb is whatever follows the last ':' outside braces.
        depth, colon = 0, -1
        for i, ch in enumerate(body):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == ":" and depth == 0:
                colon = i
        if colon >= 0:
            body, verb = body[:colon], body[colon + 1 :]
            if not verb or "/" in verb:
                raise TemplateError(f"bad verb in path template {template!r}")
        segments: list[tuple[int, str]] = []
        variables: list[Variable] = []
        for part in _split_outside_braces(body, template):
            if part.startswith("{"):
                if not part.endswith("}"):
                    raise TemplateError(f"unclosed variable in path template {template!r}")
                inner = part[1:-1]
                name, _, sub = inner.partition("=")
                if not name or any(not p.isidentifier() for p in name.split(".")):
                    raise TemplateError(f"bad variable {part!r} in path template {template!r}")
                start = len(segments)
                for sub_part in (sub or "*").split("/"):
                    if "{" in sub_part or "}" in sub_part:
                        raise TemplateError(f"nested variable in path template {template!r}")
                    segments.append(_segment(sub_part, template))
                variables.append(Variable(tuple(name.split(".")), start, len(segments)))
            else:
                segments.append(_segment(part, template))
        return cls(template, tuple(segments), tuple(variables), verb)

    def match(self, parts: list[str]) -> tuple[tuple[int, ...], dict[str, str]] | None:
        """Match raw (still percent-encoded) path segments.

        Returns the specificity key and the variable bindings (dotted field path -> value).
        """
        spans = _match(self.segments, 0, parts, 0)
        if spans is None:
            return None
        bindings: dict[str, str] = {}
        for var in self.variables:
            first, last = spans[var.start][0], spans[var.end - 1][1]
            if var.end - var.start == 1 and self.segments[var.start][0] == STAR:
                value = unquote(parts[first])
            else:  # multi-segment: keep an encoded '/' encoded (reserved expansion)
                value = "/".join(_unquote_keep_slash(p) for p in parts[first:last])
            bindings[".".join(var.field_path)] = value
        key = (*(kind for kind, _ in self.segments), 1 if self.verb else 0)
        return key, bindings


def _split_outside_braces(body: str, template: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise TemplateError(f"unbalanced '}}' in path template {template!r}")
        if ch == "/" and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    if depth != 0:
        raise TemplateError(f"unbalanced '{{' in path template {template!r}")
    return parts


def _segment(text: str, template: str) -> tuple[int, str]:
    if text == "*":
        return STAR, ""
    if text == "**":
        return DOUBLE_STAR, ""
    if not text or any(c in text for c in "{}*:"):
        raise TemplateError(f"bad segment {text!r} in path template {template!r}")
    return LITERAL, text


def _match(
    segments: tuple[tuple[int, str], ...],
    si: int,
    parts: list[str],
    pi: int,
) -> list[tuple[int, int]] | None:
    """Backtracking matcher; returns per-segment (start, end) spans into `parts`."""
    if si == len(segments):
        return [] if pi == len(parts) else None
    kind, literal = segments[si]
    if kind == DOUBLE_STAR:
        remaining = len(segments) - si - 1
        for end in range(len(parts) - remaining, pi - 1, -1):  # greedy
            rest = _match(segments, si + 1, parts, end)
            if rest is not None:
                return [(pi, end), *rest]
        return None
    if pi >= len(parts):
        return None
    if kind == LITERAL and unquote(parts[pi]) != literal:
        return None
    if kind == STAR and parts[pi] == "":
        return None
    rest = _match(segments, si + 1, parts, pi + 1)
    return None if rest is None else [(pi, pi + 1), *rest]


def _unquote_keep_slash(part: str) -> str:
    return "%2F".join(unquote(p) for p in part.replace("%2f", "%2F").split("%2F"))


@dataclass(frozen=True)
class Route:
    http_method: str
    template: PathTemplate
    method: MethodDescriptor
    body: str  # "" (no body), "*" or a top-level request field name
    response_body: str  # "" (the whole reply) or a top-level reply field name

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def raw_body(self) -> bool:
        """The request body is raw bytes (a google.api.HttpBody) rather than JSON."""
        target: Descriptor | None = self.method.input_type
        if target is not None and self.body not in ("", "*"):
            target = target.fields_by_name[self.body].message_type
        return self.body != "" and target is not None and target.full_name == HTTP_BODY


@dataclass
class RouteMatch:
    route: Route
    bindings: dict[str, str]


@dataclass
class RouteTable:
    routes: list[Route] = field(default_factory=list)

    def match(self, http_method: str, raw_path: str) -> RouteMatch | None:
        best: tuple[tuple[int, ...], RouteMatch] | None = None
        for route in self.routes:
            if route.http_method != http_method:
                continue
            path = raw_path
            if route.template.verb is not None:
                suffix = ":" + route.template.verb
                if not path.endswith(suffix):
                    continue
                path = path[: -len(suffix)]
            if not path.startswith("/"):
                continue
            result = route.template.match(path[1:].split("/"))
            if result is None:
                continue
            key, bindings = result
            if best is None or key > best[0]:
                best = (key, RouteMatch(route, bindings))
        return None if best is None else best[1]

    def methods_for(self, raw_path: str) -> set[str]:
        """The HTTP methods some route accepts for this path (for CORS/diagnostics)."""
        return {r.http_method for r in self.routes if self.match(r.http_method, raw_path)}


@dataclass(frozen=True)
class Descriptors:
    pool: descriptor_pool.DescriptorPool
    services: tuple[str, ...]  # full names of every service in the set, in file order


def load_descriptors(path: Path) -> Descriptors:
    """Load a FileDescriptorSet (a buf image works too) into a fresh pool."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(Path(path).read_bytes())
    pool = descriptor_pool.DescriptorPool()
    services: list[str] = []
    for file_proto in fds.file:
        pool.Add(file_proto)
        prefix = f"{file_proto.package}." if file_proto.package else ""
        services.extend(prefix + s.name for s in file_proto.service)
    return Descriptors(pool, tuple(services))


def _http_rule(method: MethodDescriptor) -> http_pb2.HttpRule | None:
    # Re-parse the options against the generated MethodOptions, where the
    # google.api.http extension is registered, whatever pool produced them.
    options = descriptor_pb2.MethodOptions.FromString(method.GetOptions().SerializeToString())
    # googleapis-common-protos types the extension as a plain FieldDescriptor.
    http = cast(
        "_ExtensionFieldDescriptor[descriptor_pb2.MethodOptions, http_pb2.HttpRule]", annotations_pb2.http
    )
    if not options.HasExtension(http):
        return None
    return options.Extensions[http]


def _bindings(rule: http_pb2.HttpRule) -> list[http_pb2.HttpRule]:
    return [rule, *rule.additional_bindings]


def _verb_and_path(rule: http_pb2.HttpRule) -> tuple[str, str]:
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise TemplateError("HttpRule without a pattern")
    if kind == "custom":
        return rule.custom.kind.upper(), rule.custom.path
    return kind.upper(), getattr(rule, kind)


def _check_field(message: Descriptor, name: str, what: str, method: MethodDescriptor) -> None:
    if name not in ("", "*") and name not in message.fields_by_name:
        raise TemplateError(f"{method.full_name}: {what} {name!r} is not a field of {message.name}")


def build_routes(
    pool: descriptor_pool.DescriptorPool,
    services: tuple[str, ...] | list[str],
) -> RouteTable:
    """Every HttpRule binding of every method of `services`."""
    table = RouteTable()
    for service_name in services:
        service = pool.FindServiceByName(service_name)
        for method in service.methods:
            rule = _http_rule(method)
            if rule is None:
                continue
            for binding in _bindings(rule):
                http_method, path = _verb_and_path(binding)
                _check_field(method.input_type, binding.body, "body", method)
                _check_field(method.output_type, binding.response_body, "response_body", method)
                template = PathTemplate.parse(path)
                for var in template.variables:
                    _resolve_path(method.input_type, var.field_path, method)
                table.routes.append(
                    Route(http_method, template, method, binding.body, binding.response_body),
                )
    return table


def _resolve_path(message: Descriptor, path: tuple[str, ...], method: MethodDescriptor) -> None:
    current: Descriptor | None = message
    for name in path:
        fd = current.fields_by_name.get(name) if current is not None else None
        if fd is None:
            raise TemplateError(f"{method.full_name}: path variable {'.'.join(path)!r} unknown")
        current = fd.message_type
