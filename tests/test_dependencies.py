"""Reproducible installs: requirements.lock pins every dependency inside pyproject.toml's ranges, the venv
under test is the lock, and `tools/deps.py unbounded` (make test-latest) lifts only the upper bounds."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQUIREMENTS = [Requirement(r) for r in PROJECT["dependencies"]
                + [r for extra in PROJECT["optional-dependencies"].values() for r in extra]]


def locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_pins_every_dependency_inside_its_range() -> None:
    pins = locked()
    for req in REQUIREMENTS:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: run make lock"
        version = Version(pins[name])
        assert req.specifier.contains(version, prereleases=True) or (
            name == "torch" and req.specifier.contains(version.public)), (req, pins[name])
        assert any(s.operator in ("<", "<=", "==") for s in req.specifier), f"{req}: no tested upper bound"


@pytest.mark.skipif(os.environ.get("ENGRAM_UNLOCKED") == "1", reason="make test-latest: newer than the lock")
def test_installed_versions_are_the_lock() -> None:
    wrong = {}
    for name, version in locked().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed (locked, found): {wrong}; recreate the venv: make clean setup"


def test_unbounded_lifts_upper_bounds_only() -> None:
    out = subprocess.run([sys.executable, str(REPO / "tools" / "deps.py"), "unbounded",
                          str(REPO / "pyproject.toml")], capture_output=True, text=True, check=True).stdout
    lifted = {canonicalize_name(r.name): r for r in map(Requirement, out.split())}
    assert set(lifted) == {canonicalize_name(r.name) for r in REQUIREMENTS}
    for req in REQUIREMENTS:
        got = lifted[canonicalize_name(req.name)]
        assert got.extras == req.extras
        if req.name == "torch":
            assert got.specifier == req.specifier
            continue
        assert {str(s) for s in got.specifier} == {str(s) for s in req.specifier if s.operator in (">=", ">")}
