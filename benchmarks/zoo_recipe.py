"""Does the zoo's recipe land in the band for every seed and kernel path? (issue 21)

Training is chaotic: the same code and seed give other weights on a CPU whose float kernels round differently.
So a recipe is checked like a change of seed: each model trained with 3 seeds (the release's, +1, +2) on 2
kernel paths (the machine's native one, and torch's portable kernels, ``ATEN_CPU_CAPABILITY=default``), and
every run must be in the band of :func:`vrp_utils.models.release.band_problems`.

    # train all 18 (one thread each, --jobs at a time), then print the table
    .venv/bin/python benchmarks/zoo_recipe.py --out data/zoo-recipe --jobs 2
    # only the table, from retrains already on disk (any folder holding <model>/model_card.json)
    .venv/bin/python benchmarks/zoo_recipe.py --collect data/zoo-recipe
    # the same, plus the runs an earlier table recorded (trained on another machine, their cards gone)
    .venv/bin/python benchmarks/zoo_recipe.py --collect data/zoo-recipe --keep benchmarks/results/zoo_recipe_v2.json \
        --results benchmarks/results/zoo_recipe_v2.json

Writes ``benchmarks/results/zoo_recipe.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
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


def rotary_base(config: dict) -> float:
    """The language model's rotary base, from a saved ``config.json`` (all three families nest it in ``text_config``)."""
    return float(config["text_config"]["rope_parameters"]["rope_theta"])


def base_text(base: float) -> str:
    """A rotary base as the recipe comments write it: ``1e4`` for a power of ten."""
    power = math.log10(base)
    return f"1e{power:.0f}" if power == round(power) else f"{base:g}"


def collect(root: Path) -> list[dict]:
    rows = []
    for card_path in sorted(root.rglob("model_card.json")):
        card = json.loads(card_path.read_text())
        provenance = card.get("provenance") or {}
        rows.append({
            "model": card["name"], "seed": card["spec"]["seed"], "answer_steps": card["spec"]["steps"],
            "rotary_base": rotary_base(json.loads((card_path.parent / "config.json").read_text())),
            "kernel": provenance.get("cpu_capability"), "cpu": provenance.get("cpu"),
            "accuracy": {s: card["metrics"][s]["accuracy"] for s in ("random", "popular", "adversarial")},
            "build_seconds": card["training"]["build_seconds"], "card": card,
        })
    return rows


def short_cpu(cpu: str | None) -> str:
    """The CPU's maker and line, for a table column ("Intel Xeon", "AMD EPYC")."""
    words = [w for w in (cpu or "unknown").replace("(R)", "").replace("(TM)", "").split() if w != "Processor"]
    return " ".join(words[:2])


def table_rows(collected: list[dict], kept: list[dict], best: dict[str, float]) -> list[dict]:
    """The table's runs: each collected card judged by the band, then each kept run (an earlier table's row, its
    verdict as recorded) that no collected card repeats (same model, recipe, seed, kernel path and CPU); in table order.
    A recipe is its answer steps and rotary base (the two it changed by), so a kept run of an earlier recipe stays."""
    rows = []
    for row in collected:
        row = dict(row)
        problems = band_problems({row["model"]: row.pop("card")}, best)
        rows.append(row | {"in_band": not problems, "problems": problems})
    key = lambda r: (r["model"], r["answer_steps"], r["rotary_base"], r["seed"], r["kernel"], r["cpu"])  # noqa: E731
    repeated = {key(r) for r in rows}
    rows += [r for r in kept if key(r) not in repeated]
    return sorted(rows, key=lambda r: (list(ZOO).index(r["model"]), r["rotary_base"], r["answer_steps"], r["seed"],
                                       r["cpu"] or "", r["kernel"] or ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/zoo-recipe"))
    parser.add_argument("--collect", type=Path, help="only read the cards under this folder")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(ZOO), choices=list(ZOO), help="only these zoo models")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"where the table's JSON goes (default {RESULTS.name})")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS), help="only these kernel paths")
    parser.add_argument("--keep", type=Path, help="an earlier results file whose runs stay in the table (with the band "
                        "verdict it recorded), unless a collected card is the same model, seed, kernel path and CPU")
    args = parser.parse_args(argv)
    root = args.collect or args.out
    if not args.collect:
        runs = list(itertools.product(args.models, args.offsets, args.kernels))
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda run: train(args.out, *run), runs))
    best = best_baselines(_baseline_rows())
    kept = json.loads(args.keep.read_text())["runs"] if args.keep else []
    rows = table_rows(collect(root), kept, best)
    print(f"best shortcut baseline: {best}")
    print("| model | rotary base | answer steps | seed | CPU | kernel path | random | popular | adversarial | in band | build (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        a = row["accuracy"]
        verdict = "yes" if row["in_band"] else "NO: " + "; ".join(row.get("problems") or ["outside the band"])
        print(f"| {row['model']} | {base_text(row['rotary_base'])} | {row['answer_steps']} | {row['seed']} | {short_cpu(row['cpu'])} | "
              f"{row['kernel']} | "
              f"{a['random']:.3f} | {a['popular']:.3f} | {a['adversarial']:.3f} | {verdict} | {row['build_seconds']:.0f} |")
    args.results.write_text(json.dumps({"best_baselines": best, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
