"""Claim: ``stats.holm`` adjusts chapter 01's 30 families in milliseconds, where statsmodels' own
``multipletests(method="holm")`` spends ~0.3 s a call on the ``gc.collect()`` it ends with.

A full garbage collection walks every live object, so its cost grows with the process: measured in a process
set up like a chapter's kernel (torch, transformers, matplotlib and seaborn imported, one model's feature store
open). Both variants adjust the same ``--families`` p-value vectors, interleaved over ``--repeats`` rounds in one
run; the adjusted values must be identical (the collection frees nothing they depend on).

Usage (about 30 s)::

    VRP_DATA_DIR=data .venv/bin/python benchmarks/bench_holm.py

Writes ``benchmarks/results/bench_holm.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "bench_holm.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", type=int, default=30, help="p-value families per round (chapter 01: 30)")
    parser.add_argument("--size", type=int, default=16, help="tests per family")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="zoo-llava", help="whose feature store to hold open")
    args = parser.parse_args()

    import matplotlib.pyplot  # noqa: F401  (a chapter kernel's heap)
    import seaborn  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from statsmodels.stats.multitest import multipletests

    from vrp_utils.analysis.stats import holm
    from vrp_utils.extract.features import open_features, parse_settings

    features = open_features(args.model, parse_settings("all"), None, progress=False)  # noqa: F841  (kept alive)
    rng = np.random.default_rng(0)
    families = [rng.random(args.size) for _ in range(args.families)]
    library, ours = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        expected = [multipletests(p, method="holm")[1] for p in families]
        library.append(time.perf_counter() - started)
        started = time.perf_counter()
        got = [holm(p) for p in families]
        ours.append(time.perf_counter() - started)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    ratio = statistics.median(library) / statistics.median(ours)
    result = {
        "claim": "stats.holm gives statsmodels' Holm values without its per-call full garbage collection",
        "ratios": {f"multipletests over stats.holm, {args.families} families": round(ratio, 1)},
        "environment": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "python": platform.python_version(), "torch": torch.__version__,
                        "live_objects": len(gc.get_objects())},
        "settings": {"families": args.families, "size": args.size, "repeats": args.repeats, "model": args.model},
        "multipletests_seconds": library, "holm_seconds": ours,
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.families} families: multipletests {statistics.median(library):.2f} s, "
          f"stats.holm {statistics.median(ours) * 1e3:.1f} ms (median of {args.repeats}), "
          f"{ratio:.0f}x; identical values")


if __name__ == "__main__":
    main()
