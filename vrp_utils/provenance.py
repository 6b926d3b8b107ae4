"""Where a number or a weight file came from: the machine, its float kernels, the library versions, the commit.

Why its own module: the zoo records it in each model card when it trains and ``make verify`` records it
with the reference, and the lowest floor that both may import is this one.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vrp_utils.paths import REPO_ROOT

#: The packages whose versions can change a number (compared as a note by ``make verify``).
PROVENANCE_PACKAGES = ("torch", "transformers", "numpy", "pandas", "scipy", "scikit-learn", "statsmodels",
                       "pillow", "datasets", "safetensors", "papermill", "jupyter-book")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                return text.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit(root: Path = REPO_ROOT) -> str | None:
    """``HEAD`` of the checkout at ``root``, or None outside git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def cpu_capability() -> str | None:
    """The SIMD kernels torch dispatches to (``DEFAULT``, ``AVX2``, ``AVX512``): they change float32 results' last bits."""
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - provenance must not fail the caller
        return None


def provenance() -> dict[str, Any]:
    """The machine, platform and library versions the numbers come from."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in PROVENANCE_PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {
        "cpu": cpu_model(), "cpu_capability": cpu_capability(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
        "git_commit": git_commit(), "written_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
