"""`make lint`: requirements.lock must agree with pyproject.toml.

Every dependency in pyproject.toml is an exact pin (`name==version`), and the
lock holds that same version. A pin changed without `make lock` (or a lock
edited by hand) fails here, before an install could drift from the lock.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;]+)\s*(?:;.*)?$")
LOCKED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.MULTILINE)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(pyproject: Path) -> tuple[dict[str, str], list[str]]:
    """{name: version} of every dependency, and the ones that are not exact pins."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    pins: dict[str, str] = {}
    loose: list[str] = []
    for requirement in requirements:
        match = PIN.match(requirement.strip())
        if match is None:
            loose.append(requirement)
        else:
            pins[normalize(match.group(1))] = match.group(2)
    return pins, loose


def locked(lock: Path) -> dict[str, str]:
    return {normalize(name): version for name, version in LOCKED.findall(lock.read_text())}


def problems(pyproject: Path, lock: Path) -> list[str]:
    pins, loose = declared(pyproject)
    found = locked(lock)
    out = [f"{r!r} in pyproject.toml is not an exact pin (name==version)" for r in loose]
    for name, version in sorted(pins.items()):
        if found.get(name) != version:
            have = found.get(name, "nothing")
            out.append(f"pyproject.toml pins {name}=={version}, requirements.lock has {have}")
    return out


def main() -> None:
    found = problems(ROOT / "pyproject.toml", ROOT / "requirements.lock")
    for problem in found:
        print(f"check_lock: {problem}", file=sys.stderr)
    if found:
        print("check_lock: run `make lock` after changing a dependency", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
