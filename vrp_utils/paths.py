"""Where things live. Everything generated goes under ``data/`` or ``results/`` (git-ignored); the released
zoo the book is built from is committed under ``zoo/``."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Generated data and models; override with VRP_DATA_DIR (e.g. to keep several builds apart).
DATA_DIR = Path(os.environ.get("VRP_DATA_DIR", REPO_ROOT / "data"))
BENCHMARK_DIR = DATA_DIR / "benchmark"
#: The released zoo (committed weights with a checksum manifest): what zoo names resolve to.
ZOO_DIR = REPO_ROOT / "zoo"
#: Where ``make zoo`` retrains; never the release (``python -m vrp_utils.models.release publish`` replaces it).
RETRAIN_DIR = DATA_DIR / "zoo-retrain"
STORE_DIR = DATA_DIR / "features"
RESULTS_DIR = REPO_ROOT / "results"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"
