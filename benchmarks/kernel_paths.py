"""How far the book's numbers move when the same released weights run on another CPU kernel path.

Why: `make verify`'s tolerances must cover another machine (another kind of CPU dispatches torch to other
SIMD kernels, which round float32 differently) and nothing more, so that a change of method still fails.
This script measures that spread: give it the `results/` directories of builds that differ only in
`ATEN_CPU_CAPABILITY` (default / avx2 / avx512) or in threads, and it prints, per tolerance rule of
`results/reference/tolerances.yml`, how many quantities it compares, how many differ, the largest
difference and the rule's tolerance, with the quantity behind the largest difference.

    # one build per kernel path, each from nothing but the released zoo (data/features removed between builds)
    .venv/bin/python benchmarks/kernel_paths.py results-native results-default results-avx2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from vrp_utils.verify import TOLERANCES, flatten, load_rules, results_files, rule_for


def leaves(directory: Path) -> dict:
    out = {}
    for stem, path in results_files(directory).items():
        out.update(flatten(json.loads(path.read_text()), stem))
    return out


def spread(base: dict, others: list[dict], rules) -> list[dict]:
    """One row per rule that compares numbers: quantities, how many differ, the largest |difference| and where."""
    rows: dict[str, dict] = {}
    for name, ref in base.items():
        rule = rule_for(name, ref, rules)
        if rule is None or rule.kind not in ("abs", "rel"):
            continue
        row = rows.setdefault(rule.match, {"rule": rule.match, "tolerance": rule.describe(), "quantities": 0,
                                           "differ": 0, "max_abs_diff": 0.0, "at": None, "exceed": 0})
        row["quantities"] += 1
        worst = 0.0
        for other in others:
            new = other.get(name)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (ref, new)):
                if new != ref:
                    row["differ"] += 1
                continue
            if math.isnan(ref) and math.isnan(new):
                continue
            worst = max(worst, abs(new - ref))
        if worst > 0:
            row["differ"] += 1
            bound = rule.tol if rule.kind == "abs" else rule.tol * abs(ref)
            row["exceed"] += worst > bound
            if worst > row["max_abs_diff"]:
                row["max_abs_diff"], row["at"] = worst, name
    return list(rows.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path, help="results/ of the native build")
    parser.add_argument("others", type=Path, nargs="+", help="results/ of builds on other kernel paths")
    parser.add_argument("--tolerances", type=Path, default=TOLERANCES)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    rules = load_rules(args.tolerances)
    base = leaves(args.base)
    others = [leaves(d) for d in args.others]
    missing = [(str(d), sorted(set(base) ^ set(o))[:3]) for d, o in zip(args.others, others) if set(o) != set(base)]
    rows = spread(base, others, rules)
    print(f"{'rule':60} {'tolerance':>10} {'n':>7} {'differ':>7} {'max |diff|':>11} {'over tol':>8}  at")
    for row in rows:
        print(f"{row['rule'][:60]:60} {row['tolerance']:>10} {row['quantities']:>7} {row['differ']:>7} "
              f"{row['max_abs_diff']:>11.3g} {row['exceed']:>8}  {row['at'] or ''}")
    if missing:
        print("quantities present on one side only:", missing)
    if args.json:
        args.json.write_text(json.dumps({"base": str(args.base), "others": [str(d) for d in args.others], "rows": rows,
                                         "one_side_only": missing}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
