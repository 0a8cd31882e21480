"""Path templates, the route table and the transcoder against a synthetic descriptor set.

The project's protos use only part of google.api.http (no enums in requests, no `**`, no
additional bindings); a small test service built here covers the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2

from gateway.routes import PathTemplate, RouteTable, TemplateError, build_routes, load_descriptors
from gateway.transcode import TranscodeError, Transcoder

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTOR_SET = ROOT / "build" / "descriptor.binpb"
F = descriptor_pb2.FieldDescriptorProto


def _field(name: str, number: int, kind: int, *, repeated: bool = False, type_name: str = "") -> F:
    label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
    field = F(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name
    return field


def _method(
    name: str,
    rule: http_pb2.HttpRule,
    output: str = ".demo.v1.Thing",
) -> descriptor_pb2.MethodDescriptorProto:
    method = descriptor_pb2.MethodDescriptorProto(
        name=name,
        input_type=".demo.v1.Thing",
        output_type=output,
    )
    method.options.Extensions[annotations_pb2.http].CopyFrom(rule)
    return method


def _demo_file() -> descriptor_pb2.FileDescriptorProto:
    demo = descriptor_pb2.FileDescriptorProto(
        name="demo/v1/demo.proto",
        package="demo.v1",
        syntax="proto3",
        dependency=[
            "google/api/annotations.proto",
            "google/api/httpbody.proto",
            "google/protobuf/timestamp.proto",
        ],
    )
    demo.enum_type.add(name="Level").value.extend(
        [
            descriptor_pb2.EnumValueDescriptorProto(name="LEVEL_UNSPECIFIED", number=0),
            descriptor_pb2.EnumValueDescriptorProto(name="LEVEL_LOW", number=1),
            descriptor_pb2.EnumValueDescriptorProto(name="LEVEL_HIGH", number=2),
        ],
    )
    inner = demo.message_type.add(name="Inner")
    inner.field.extend(
        [
            _field("flag", 1, F.TYPE_BOOL),
            _field("ratio", 2, F.TYPE_DOUBLE),
            _field("level", 3, F.TYPE_ENUM, type_name=".demo.v1.Level"),
        ],
    )
    thing = demo.message_type.add(name="Thing")
    entry = thing.nested_type.add(name="LabelsEntry")
    entry.field.extend([_field("key", 1, F.TYPE_STRING), _field("value", 2, F.TYPE_STRING)])
    entry.options.map_entry = True
    thing.field.extend(
        [
            _field("name", 1, F.TYPE_STRING),
            _field("level", 2, F.TYPE_ENUM, type_name=".demo.v1.Level"),
            _field("page_size", 3, F.TYPE_INT32),
            _field("tags", 4, F.TYPE_STRING, repeated=True),
            _field("ids", 5, F.TYPE_INT64, repeated=True),
            _field("inner", 6, F.TYPE_MESSAGE, type_name=".demo.v1.Inner"),
            _field("inners", 7, F.TYPE_MESSAGE, repeated=True, type_name=".demo.v1.Inner"),
            _field(
                "labels",
                8,
                F.TYPE_MESSAGE,
                repeated=True,
                type_name=".demo.v1.Thing.LabelsEntry",
            ),
            _field("since", 9, F.TYPE_MESSAGE, type_name=".google.protobuf.Timestamp"),
            _field("blob", 10, F.TYPE_MESSAGE, type_name=".google.api.HttpBody"),
            _field("count", 11, F.TYPE_INT64),
        ],
    )
    service = demo.service.add(name="DemoService")
    get_thing = http_pb2.HttpRule(get="/v1/{name=shelves/*/books/*}")
    get_thing.additional_bindings.add(get="/v1/things/{name}")
    service.method.extend(
        [
            _method("GetThing", get_thing),
            _method("GetSpecial", http_pb2.HttpRule(get="/v1/things/special")),
            _method("GetFile", http_pb2.HttpRule(get="/v1/files/{name=**}")),
            _method("Wild", http_pb2.HttpRule(get="/v1/wild/*/{inner.level}")),
            _method(
                "Purge",
                http_pb2.HttpRule(
                    custom=http_pb2.CustomHttpPattern(kind="PURGE", path="/v1/things/{name}"),
                ),
            ),
            _method(
                "Update",
                http_pb2.HttpRule(patch="/v1/things/{name}", body="inner", response_body="tags"),
            ),
            _method("Download", http_pb2.HttpRule(get="/v1/blobs/{name}", response_body="blob")),
            _method("Count", http_pb2.HttpRule(get="/v1/count/{name}", response_body="count")),
            _method(
                "Echo",
                http_pb2.HttpRule(put="/v1/echo", body="*"),
                output=".google.api.HttpBody",
            ),
        ],
    )
    return demo


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    fds = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_SET.read_bytes())
    fds.file.append(_demo_file())
    path = tmp_path_factory.mktemp("demo") / "demo.binpb"
    path.write_bytes(fds.SerializeToString())
    return path


@pytest.fixture(scope="module")
def table_and_transcoder(demo_set: Path) -> tuple[RouteTable, Transcoder]:
    descriptors = load_descriptors(demo_set)
    return build_routes(descriptors.pool, ["demo.v1.DemoService"]), Transcoder(descriptors.pool)


@pytest.fixture(scope="module")
def table(table_and_transcoder: tuple[RouteTable, Transcoder]) -> RouteTable:
    return table_and_transcoder[0]


@pytest.fixture(scope="module")
def transcoder(table_and_transcoder: tuple[RouteTable, Transcoder]) -> Transcoder:
    return table_and_transcoder[1]


# -- templates and routing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "rpc", "bindings"),
    [
        ("GET", "/v1/shelves/s1/books/b2", "GetThing", {"name": "shelves/s1/books/b2"}),
        ("GET", "/v1/things/t1", "GetThing", {"name": "t1"}),  # additional binding
        ("GET", "/v1/things/special", "GetSpecial", {}),  # literal beats {name}
        ("GET", "/v1/files/a/b/c.txt", "GetFile", {"name": "a/b/c.txt"}),
        ("GET", "/v1/files/a%2Fb/c", "GetFile", {"name": "a%2Fb/c"}),  # reserved expansion
        ("GET", "/v1/wild/anything/LEVEL_HIGH", "Wild", {"inner.level": "LEVEL_HIGH"}),
        ("PURGE", "/v1/things/t1", "Purge", {"name": "t1"}),
        ("PATCH", "/v1/things/t%201", "Update", {"name": "t 1"}),
    ],
)
def test_route_matching(
    table: RouteTable,
    method: str,
    path: str,
    rpc: str,
    bindings: dict[str, str],
) -> None:
    match = table.match(method, path)
    assert match is not None
    assert match.route.method.name == rpc
    assert match.route.grpc_path == f"/demo.v1.DemoService/{rpc}"
    assert match.bindings == bindings


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/shelves/s1/books"),  # too short
        ("GET", "/v1/shelves/s1/books/b2/extra"),  # too long
        ("POST", "/v1/things/t1"),  # known path, wrong method
        ("GET", "/v1/things/"),  # `*` needs a non-empty segment
        ("GET", "/v2/things/t1"),
    ],
)
def test_route_non_matches(table: RouteTable, method: str, path: str) -> None:
    assert table.match(method, path) is None


def test_template_parse_with_verb_and_nested_variable() -> None:
    template = PathTemplate.parse("/v1/{parent=projects/*}/items/{item.id}:batchGet")
    assert template.verb == "batchGet"
    assert [v.field_path for v in template.variables] == [("parent",), ("item", "id")]
    key_bindings = template.match(["v1", "projects", "p1", "items", "i9"])
    assert key_bindings is not None
    assert key_bindings[1] == {"parent": "projects/p1", "item.id": "i9"}


@pytest.mark.parametrize(
    "bad",
    ["v1/x", "/v1/{name", "/v1/{na me}", "/v1/x:", "/v1/{a={b}}", "/v1//x", "/v1/a*b"],
)
def test_bad_templates_are_rejected(bad: str) -> None:
    with pytest.raises(TemplateError):
        PathTemplate.parse(bad)


def test_project_routes_cover_every_annotated_method() -> None:
    descriptors = load_descriptors(DESCRIPTOR_SET)
    table = build_routes(descriptors.pool, descriptors.services)
    paths = {(r.http_method, r.template.source) for r in table.routes}
    assert len(paths) == 23
    assert ("POST", "/api/analytics/performance/alerts/{alert_id}:resolve") in paths
    assert ("POST", "/api/effects/tasks/{task_id}:cancel") in paths
    # Internal monitoring RPCs have no HTTP binding and are not reachable from the edge.
    assert not any(r.method.name == "RecordApiTimings" for r in table.routes)


# -- requests --------------------------------------------------------------------------------


def _request(
    table: RouteTable,
    transcoder: Transcoder,
    method: str,
    url: str,
    body: bytes = b"",
) -> dict:
    path, _, query = url.partition("?")
    match = table.match(method, path)
    assert match is not None, url
    pairs = [tuple(p.split("=", 1)) for p in query.split("&") if p]
    message = transcoder.build_request(match.route, match.bindings, pairs, body, "application/json")
    return transcoder.to_dict(message)


def test_query_enums_nested_repeated_and_wkt(table: RouteTable, transcoder: Transcoder) -> None:
    url = (
        "/v1/things/t1?level=LEVEL_HIGH&pageSize=7&tags=a&tags=b&ids=1&ids=9007199254740993"
        "&inner.flag=true&inner.ratio=0.5&inner.level=1&since=2024-01-02T03:04:05Z"
    )
    assert _request(table, transcoder, "GET", url) == {
        "name": "t1",
        "level": "LEVEL_HIGH",
        "pageSize": 7,
        "tags": ["a", "b"],
        "ids": ["1", "9007199254740993"],
        "inner": {"flag": True, "ratio": 0.5, "level": "LEVEL_LOW"},  # enum by number too
        "since": "2024-01-02T03:04:05Z",
    }


def test_path_variable_into_nested_enum(table: RouteTable, transcoder: Transcoder) -> None:
    assert _request(table, transcoder, "GET", "/v1/wild/x/LEVEL_LOW") == {
        "inner": {"level": "LEVEL_LOW"},
    }


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("/v1/things/t1?level=LEVEL_HUGE", "level"),
        ("/v1/things/t1?pageSize=1.5", "pageSize"),
        ("/v1/things/t1?inner.flag=maybe", "inner.flag"),
        ("/v1/things/t1?inners.flag=true", "repeated"),  # repeated messages: no query params
        ("/v1/things/t1?inner=x", "message"),
        ("/v1/things/t1?labels=x", "map"),
        ("/v1/things/t1?name=other", "bound by the path"),
        ("/v1/things/t1?nope=1", "nope"),
        ("/v1/wild/x/LEVEL_NONE", "inner.level"),
    ],
)
def test_bad_query_and_path_values(
    table: RouteTable,
    transcoder: Transcoder,
    url: str,
    problem: str,
) -> None:
    with pytest.raises(TranscodeError, match=problem.replace(".", r"\.")):
        _request(table, transcoder, "GET", url)


def test_single_field_body(table: RouteTable, transcoder: Transcoder) -> None:
    body = json.dumps({"flag": True, "level": "LEVEL_HIGH"}).encode()
    assert _request(table, transcoder, "PATCH", "/v1/things/t1?tags=x", body) == {
        "name": "t1",
        "tags": ["x"],
        "inner": {"flag": True, "level": "LEVEL_HIGH"},
    }
    with pytest.raises(TranscodeError, match="bound by the path/body"):
        _request(table, transcoder, "PATCH", "/v1/things/t1?inner.flag=true", body)


# -- responses -------------------------------------------------------------------------------


def _reply(
    table: RouteTable,
    transcoder: Transcoder,
    method: str,
    path: str,
    fields: dict,
) -> tuple[bytes, str]:
    match = table.match(method, path)
    assert match is not None
    message = transcoder.message_class(match.route.method.output_type)()
    for name, value in fields.items():
        target = getattr(message, name)
        if isinstance(value, dict):
            for key, sub in value.items():
                setattr(target, key, sub)
        elif isinstance(value, list):
            target.extend(value)
        else:
            setattr(message, name, value)
    return transcoder.render_response(match.route, message)


def test_http_body_response_field(table: RouteTable, transcoder: Transcoder) -> None:
    blob = {"content_type": "image/png", "data": b"\x89PNG\r\n"}
    assert _reply(table, transcoder, "GET", "/v1/blobs/b", {"blob": blob}) == (
        b"\x89PNG\r\n",
        "image/png",
    )


def test_http_body_whole_response(table: RouteTable, transcoder: Transcoder) -> None:
    match = table.match("PUT", "/v1/echo")
    assert match is not None
    reply = transcoder.message_class(match.route.method.output_type)(
        content_type="text/csv",
        data=b"a,b\n",
    )
    assert transcoder.render_response(match.route, reply) == (b"a,b\n", "text/csv")


def test_scalar_and_repeated_response_body(table: RouteTable, transcoder: Transcoder) -> None:
    assert _reply(
        table,
        transcoder,
        "PATCH",
        "/v1/things/t",
        {"tags": ["x", "y"], "name": "n"},
    ) == (
        b'["x","y"]',
        "application/json",
    )
    assert _reply(table, transcoder, "GET", "/v1/count/c", {"count": 2**60, "name": "n"}) == (
        f'"{2**60}"'.encode(),
        "application/json",
    )
