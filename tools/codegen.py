"""Generate the Python stubs and the descriptor set from protos/.

One step, run by `make gen`: third-party protos are copied from the installed
googleapis-common-protos package into build/third_party (never committed),
`buf build` writes build/descriptor.binpb (used by the local edge and Envoy),
and grpc_tools.protoc generates Python from that same descriptor set into
build/gen. `tests/test_contracts.py` regenerates into a temporary folder and
fails when build/gen differs, so stubs never drift from protos/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import google.api
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
THIRD_PARTY = ROOT / "build" / "third_party"
# The image build brings its own buf binary (`BUF=...`); a checkout uses the npm one.
BUF = Path(os.environ.get("BUF") or ROOT / "node_modules" / ".bin" / "buf")
GOOGLEAPIS_FILES = [
    "google/api/annotations.proto",
    "google/api/http.proto",
    "google/api/httpbody.proto",
    "google/api/field_behavior.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "google/rpc/code.proto",
]


def copy_third_party() -> None:
    site = Path(google.api.__path__[0]).parent.parent
    for rel in GOOGLEAPIS_FILES:
        dest = THIRD_PARTY / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / rel, dest)


def project_protos() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def build_descriptor_set(out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # The workspace builds both modules, so google.rpc.Status and its details
    # are in the set even though no project file imports them: the edge needs
    # them to render errors, as Envoy does with convert_grpc_status.
    subprocess.run([str(BUF), "build", "-o", str(out)], cwd=ROOT, check=True)


def generate_python(descriptor_set: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    args = [
        "grpc_tools.protoc",
        f"--descriptor_set_in={descriptor_set}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *project_protos(),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "build")
    args = parser.parse_args()
    copy_third_party()
    descriptor = args.out / "descriptor.binpb"
    build_descriptor_set(descriptor)
    generate_python(descriptor, args.out / "gen")
    print(f"generated {args.out / 'gen'} and {descriptor}", file=sys.stderr)


if __name__ == "__main__":
    main()
