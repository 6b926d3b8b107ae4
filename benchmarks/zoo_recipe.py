"""Does the zoo's recipe land in the band for every seed and kernel path? (issue 21)

Training is chaotic: the same code and seed give other weights on a CPU whose float kernels round differently.
So a recipe is checked like a change of seed: each model trained with 3 seeds (the release's, +1, +2) on 2
kernel paths (the machine's native one, and torch's portable kernels, ``ATEN_CPU_CAPABILITY=default``), and
every run must be in the band of :func:`vrp_utils.models.release.band_problems`.

    # train all 18 (one thread each, --jobs at a time), then print the table
    .venv/bin/python benchmarks/zoo_recipe.py --out data/zoo-recipe --jobs 2
    # only the table, from retrains already on disk (any folder holding <model>/model_card.json)
    .venv/bin/python benchmarks/zoo_recipe.py --collect data/zoo-recipe

Writes ``benchmarks/results/zoo_recipe.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vrp_utils.models.release import band_problems, best_baselines, _baseline_rows
from vrp_utils.models.zoo import ZOO

RESULTS = Path(__file__).resolve().parent / "results" / "zoo_recipe.json"
KERNELS = {"native": {}, "default": {"ATEN_CPU_CAPABILITY": "default"}}


def train(out: Path, name: str, offset: int, kernel: str) -> None:
    target = out / f"{kernel}-offset{offset}"
    env = {**os.environ, **KERNELS[kernel]}
    subprocess.run([sys.executable, "-m", "vrp_utils.models.zoo", "build", name, "--seed-offset", str(offset),
                    "--out", str(target)], env=env, check=True, stdout=subprocess.DEVNULL)


def collect(root: Path) -> list[dict]:
    rows = []
    for card_path in sorted(root.rglob("model_card.json")):
        card = json.loads(card_path.read_text())
        provenance = card.get("provenance") or {}
        rows.append({
            "model": card["name"], "seed": card["spec"]["seed"], "answer_steps": card["spec"]["steps"],
            "kernel": provenance.get("cpu_capability"), "cpu": provenance.get("cpu"),
            "accuracy": {s: card["metrics"][s]["accuracy"] for s in ("random", "popular", "adversarial")},
            "build_seconds": card["training"]["build_seconds"], "card": card,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/zoo-recipe"))
    parser.add_argument("--collect", type=Path, help="only read the cards under this folder")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO), help="only these zoo models")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where the table's JSON goes (default {RESULTS.name})")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS), help="only these kernel paths")
    args = parser.parse_args(argv)
    root = args.collect or args.out
    if not args.collect:
        runs = list(itertools.product(args.models, args.offsets, args.kernels))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: train(args.out, *run), runs))
    rows = collect(root)
    best = best_baselines(_baseline_rows())
    print(f"best shortcut baseline: {best}")
    print("| model | seed | answer steps | kernel path | random | popular | adversarial | in band | build (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (list(ZOO).index(r["model"]), r["answer_steps"], r["seed"], r["kernel"] or "")):
        problems = band_problems({row["model"]: row["card"]}, best)
        a = row["accuracy"]
        print(f"| {row['model']} | {row['seed']} | {row['answer_steps']} | {row['kernel']} | {a['random']:.3f} | "
              f"{a['popular']:.3f} | {a['adversarial']:.3f} | {'yes' if not problems else 'NO: ' + '; '.join(problems)} | "
              f"{row['build_seconds']:.0f} |")
        row["in_band"] = not problems
        row.pop("card")
    args.results.write_text(json.dumps({"best_baselines": best, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
