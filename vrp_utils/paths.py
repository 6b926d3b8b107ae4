"""Where things live. Everything generated goes under ``data/`` or ``results/`` (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Generated data and models; override with VRP_DATA_DIR (e.g. to keep several builds apart).
DATA_DIR = Path(os.environ.get("VRP_DATA_DIR", REPO_ROOT / "data"))
BENCHMARK_DIR = DATA_DIR / "benchmark"
ZOO_DIR = DATA_DIR / "zoo"
STORE_DIR = DATA_DIR / "features"
RESULTS_DIR = REPO_ROOT / "results"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"
