"""One source of truth for pins: requirements.txt; environment.yml must list the same pins."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"requirements.txt line is not an exact pin (name==version): {line!r}"
        pins[_canonical(match[1])] = match[2]
    return pins


def environment_pins() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip_section:
        if line.startswith("-e"):
            continue
        match = PIN.match(line.strip())
        assert match, f"environment.yml pip entry is not an exact pin: {line!r}"
        pins[_canonical(match[1])] = match[2]
    return pins


def test_environment_yml_matches_requirements():
    assert environment_pins() == requirement_pins()


def test_critical_pins():
    pins = requirement_pins()
    assert pins["torch"] == "2.13.0", "torch must stay pinned to the CPU wheel 2.13.0"
    assert pins["jupyter-book"].startswith("1."), "jupyter-book 2.x ignores _config.yml/_toc.yml"


@pytest.mark.parametrize("name", sorted(requirement_pins()))
def test_installed_versions_match_pins(name):
    installed = version(name).split("+")[0]  # torch reports 2.13.0+cpu
    assert installed == requirement_pins()[name]
