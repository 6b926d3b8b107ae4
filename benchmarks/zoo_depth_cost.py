"""What a deeper zoo with finer image grids costs to train on one CPU thread, against today's zoo (issue 24).

Issue 24 asks for language models of at least 6 layers (aim 8) and image grids of at least 12x12 tokens
(Qwen2-VL 6x6 after its 2x2 merge), trained within about an hour on 2 cores. Before any recipe is tuned,
this measures the two training stages' seconds per step for today's specs (2 layers, 64 px: 8x8 tokens,
Qwen2-VL 4x4) and for the deeper, finer variants, in one run on one thread (as ``build_one`` trains). Each
stage is run twice, with ``short`` and ``long`` steps; the per-step time is the difference over the extra
steps, so model construction and the stage's one-off feature caching are left out. The projection
multiplies by today's step counts (a deeper model may need more steps: that is the recipe's question, not
this script's).

    .venv/bin/python benchmarks/zoo_depth_cost.py --short 3 --long 9

``--train NAME:LAYERS:IMAGE_SIZE`` instead trains that one variant in full with today's recipe (into
``data/zoo-depth/``, never the release) and records its wall time and POPE accuracies: does the recipe
still land in the band at that depth and grid?

    .venv/bin/python benchmarks/zoo_depth_cost.py --train zoo-llava:6:96
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

from vrp_utils.data.pope import load_train
from vrp_utils.models import zoo
from vrp_utils.paths import BENCHMARK_DIR
from vrp_utils.results import write_json_atomic

#: (language-model layers, image size in px): today's zoo, then the issue's minimum and aim. With 8 px
#: patches, 96 px gives 12x12 tokens (LLaVA, PaliGemma) and 6x6 after Qwen2-VL's 2x2 merge.
VARIANTS = ((2, 64), (6, 96), (8, 96))


def _stage_seconds(spec: zoo.ZooSpec, images: zoo.TrainingImages, stage: str, steps: int) -> float:
    """Wall time of one stage run for ``steps`` steps on a fresh model (construction excluded)."""
    model, processor, adapter = zoo.build_untrained(spec)
    if stage == "vision":
        started = time.perf_counter()
        zoo.pretrain_vision(model, processor, adapter, dataclasses.replace(spec, vision_steps=steps), images, progress=False)
    else:
        started = time.perf_counter()
        zoo.train_answers(model, processor, adapter, dataclasses.replace(spec, steps=steps, warmup_steps=1), images,
                          progress=False)
    return time.perf_counter() - started


def measure(name: str, layers: int, image_size: int, images: zoo.TrainingImages, short: int, long: int) -> dict:
    base = zoo.ZOO[name]
    spec = dataclasses.replace(base, layers=layers, image_size=image_size)
    row = {"model": name, "layers": layers, "image_size": image_size}
    projected = 0.0
    for stage, full_steps in (("vision", base.vision_steps), ("answers", base.steps)):
        a, b = _stage_seconds(spec, images, stage, short), _stage_seconds(spec, images, stage, long)
        per_step = (b - a) / (long - short)
        row[f"{stage}_seconds_per_step"] = round(per_step, 4)
        row[f"{stage}_setup_seconds"] = round(a - short * per_step, 1)
        projected += full_steps * per_step + (a - short * per_step)
    row["projected_training_seconds"] = round(projected, 1)
    return row


def train_candidate(name: str, layers: int, image_size: int, out_dir: Path) -> dict:
    """Train one deeper variant in full (today's step counts and seed) and report its time and accuracies."""
    spec = dataclasses.replace(zoo.ZOO[name], layers=layers, image_size=image_size)
    started = time.perf_counter()
    card = zoo.build_one(spec, out_dir, BENCHMARK_DIR, zoo.spec_fingerprint(spec, BENCHMARK_DIR), progress=False,
                         command=" ".join(sys.argv))
    return {"model": name, "layers": layers, "image_size": image_size, "seed": spec.seed,
            "wall_seconds": round(time.perf_counter() - started, 1),
            "accuracy": {s: round(m["accuracy"], 3) for s, m in card["metrics"].items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=3)
    parser.add_argument("--long", type=int, default=9)
    parser.add_argument("--models", default=",".join(zoo.ZOO))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_depth_cost.json")
    parser.add_argument("--train", help="NAME:LAYERS:IMAGE_SIZE: train that variant in full instead of timing steps")
    args = parser.parse_args(argv)
    if args.train:
        name, layers, image_size = args.train.split(":")
        row = train_candidate(name, int(layers), int(image_size), Path("data") / "zoo-depth" / f"{layers}x{image_size}")
        out = args.out.with_name(f"zoo_depth_train_{name}_{layers}_{image_size}.json")
        write_json_atomic(out, {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                                "torch": torch.__version__, "threads": 1, **row})
        print(json.dumps(row))
        return 0
    if not 0 < args.short < args.long:
        parser.error("need 0 < --short < --long")
    torch.set_num_threads(1)
    images = zoo.TrainingImages.from_dataset(load_train(BENCHMARK_DIR))
    rows = []
    for name in args.models.split(","):
        for layers, image_size in VARIANTS:
            row = measure(name, layers, image_size, images, args.short, args.long)
            today = next((r for r in rows if r["model"] == name and (r["layers"], r["image_size"]) == VARIANTS[0]), row)
            row["ratio_to_today"] = round(row["projected_training_seconds"] / today["projected_training_seconds"], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    write_json_atomic(args.out, {"command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
                                 "torch": torch.__version__, "threads": 1, "short": args.short, "long": args.long,
                                 "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
