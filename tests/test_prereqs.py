"""`make book` and `make test` check their system prerequisites first (.ci/prereqs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vrp_utils.paths import REPO_ROOT

SCRIPT = REPO_ROOT / ".ci" / "prereqs"


def _bin_dir(tmp_path: Path, *commands: str) -> Path:
    """A PATH directory holding only ``commands`` (python3 is this interpreter, a 3.11)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "python3").symlink_to(sys.executable)
    for name in commands:
        found = shutil.which(name)
        if found is None:  # a stand-in is enough: the check only asks whether the command exists
            (folder / name).write_text("#!/bin/sh\nexit 0\n")
            (folder / name).chmod(0o755)
        else:
            (folder / name).symlink_to(found)
    return folder


def _run(command: list[str], path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON_SYS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(command, cwd=REPO_ROOT, env=env | {"PATH": str(path)}, capture_output=True, text=True, timeout=60)


def test_missing_chromium_is_named_with_the_command_that_installs_it(tmp_path):
    path = _bin_dir(tmp_path, "npm")
    done = _run([shutil.which("bash"), str(SCRIPT), "--browser"], path)
    assert done.returncode == 1
    assert "missing prerequisites: chromium" in done.stderr
    assert "apt-get install chromium" in done.stderr
    assert "npm" not in done.stderr.split("install them with")[1]


def test_missing_npm_and_chromium_are_named_together(tmp_path):
    done = _run([shutil.which("bash"), str(SCRIPT), "--browser"], _bin_dir(tmp_path))
    assert done.returncode == 1 and "apt-get install npm chromium" in done.stderr


def test_the_book_alone_does_not_need_chromium(tmp_path):
    done = _run([shutil.which("bash"), str(SCRIPT)], _bin_dir(tmp_path, "npm"))
    assert done.returncode == 0, done.stderr


def test_wrong_python_version_is_named(tmp_path):
    path = _bin_dir(tmp_path, "npm", "chromium")
    fake = path / "python3.10"
    fake.write_text("#!/bin/sh\necho 3.10\n")
    fake.chmod(0o755)
    done = _run([shutil.which("bash"), "-c", f"PYTHON_SYS=python3.10 {shutil.which('bash')} {SCRIPT} --browser"], path)
    assert done.returncode == 1 and "Python 3.11 is required" in done.stderr and "3.10" in done.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_test_stops_before_any_step_naming_chromium(tmp_path):
    """`make test` (here `-n`: nothing would run anyway) refuses at once, before the venv or the data."""
    path = _bin_dir(tmp_path, "npm", "find", "bash")
    started = time.monotonic()
    done = _run([shutil.which("make"), "-n", "test"], path)
    assert time.monotonic() - started < 10
    assert done.returncode != 0
    assert "apt-get install chromium" in done.stderr
    assert "stopped before building anything" in done.stderr
    assert "venv" not in done.stdout  # no step was printed, let alone run
    assert _run([shutil.which("make"), "-n", "book"], path).returncode == 0  # the book needs no browser
