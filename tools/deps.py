"""Dependency helpers for `make test-latest` (standard library only: runs before any venv exists).

    python3 tools/deps.py unbounded [pyproject.toml]   requirement lines with the upper bounds lifted
    python tools/deps.py compare requirements.lock      installed versions that differ from the lock

The ranges in pyproject.toml stop just past the newest release tested; `unbounded` keeps each lower bound
and drops `<`/`<=` so pip takes the newest releases (torch stays pinned: the CPU wheel). See
docs/dependencies.md.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

KEEP_PINNED = {"torch"}


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unbounded(pyproject: Path) -> list[str]:
    """Every dependency and extra of `pyproject` with its upper bounds removed."""
    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    out = []
    for req in reqs:
        name = _name(req)
        if normalise(name) in KEEP_PINNED:
            out.append(req)
            continue
        rest = req[len(name):]
        extras = rest[:rest.index("]") + 1] if rest.startswith("[") else ""
        specs = [s.strip() for s in rest[len(extras):].split(",") if s.strip()]
        kept = [s for s in specs if not s.startswith(("<", "=="))]
        out.append(name + extras + ",".join(kept))
    return out


def compare(lock: Path) -> list[tuple[str, str, str]]:
    """(package, locked, installed) for every locked package whose installed version differs."""
    diffs = []
    for line in lock.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line):
            name, locked = m.groups()
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                installed = "(not installed)"
            if installed != locked:
                diffs.append((name, locked, installed))
    return diffs


def main(argv: list[str]) -> int:
    if argv[:1] == ["unbounded"]:
        print("\n".join(unbounded(Path(argv[1] if len(argv) > 1 else "pyproject.toml"))))
        return 0
    if argv[:1] == ["compare"] and len(argv) == 2:
        diffs = compare(Path(argv[1]))
        print(f"{'package':28s} {'locked':16s} installed")
        for name, locked, installed in diffs:
            print(f"{name:28s} {locked:16s} {installed}")
        print(f"{len(diffs)} package(s) differ from {argv[1]}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
