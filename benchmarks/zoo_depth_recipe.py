"""Which answer-stage recipe lands a deeper zoo model in the band? (issue 24: zoo v2)

Today's recipe at 6 layers and 96 px (12x12 tokens) plateaus near loss 0.55 for ~300 answer steps before the
question-to-image lookup forms, and ends below the band (zoo-llava seed 11: POPE random 0.683; see
``zoo_depth_cost.py --train``). The vision stage does not depend on the language model's depth, so this script
trains stage 1 once per (model, image size, seed) into ``data/zoo-depth/stage1-*.pt`` and then runs only the answer
stage per variant: its loss every 50 steps (where the plateau breaks is the signal) and the POPE accuracy of the
result. One thread per run, as ``build_one`` trains.

    .venv/bin/python benchmarks/zoo_depth_recipe.py zoo-llava --layers 6 --image-size 96 --steps 600 --branch-scale
    .venv/bin/python benchmarks/zoo_depth_recipe.py zoo-llava --layers 6 --image-size 96 --steps 600

Writes ``benchmarks/results/zoo_depth_recipe-<model>-<variant>.json``.
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

from vrp_utils.data.benchmark import SETTINGS
from vrp_utils.data.pope import load_benchmark, load_train
from vrp_utils.models import zoo
from vrp_utils.paths import BENCHMARK_DIR, DATA_DIR
from vrp_utils.results import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(zoo.ZOO))
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--steps", type=int, default=None, help="answer steps (default: the spec's)")
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--branch-scale", action="store_true", help="residual-branch outputs start at 1/sqrt(2L) of the init std")
    parser.add_argument("--rope-theta", type=float, default=None, help="the language model's rotary base")
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    base = zoo.ZOO[args.model]
    spec = dataclasses.replace(base, layers=args.layers, image_size=args.image_size, seed=base.seed + args.seed_offset)
    changes = {k: v for k, v in {"steps": args.steps, "learning_rate": args.learning_rate,
                                  "warmup_steps": args.warmup}.items() if v is not None}
    if args.branch_scale:
        changes["branch_init_scale"] = True
    if args.rope_theta is not None:
        changes["config_overrides"] = {**spec.config_overrides, "rope_theta": args.rope_theta}
    spec = dataclasses.replace(spec, **changes)
    images = zoo.TrainingImages.from_dataset(load_train(BENCHMARK_DIR))
    model, processor, adapter = zoo.build_untrained(spec)
    cache = DATA_DIR / "zoo-depth" / f"stage1-{args.model}-{args.image_size}px-seed{spec.seed}.pt"
    started = time.time()
    if cache.is_file():
        state = torch.load(cache)
        missing = model.load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"unexpected keys in {cache}: {missing.unexpected_keys[:3]}")
        vision_log = {"vision_cached": str(cache)}
    else:
        vision_log = zoo.pretrain_vision(model, processor, adapter, spec, images)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().clone() for n, p in model.named_parameters() if zoo._is_vision(n)}, cache)
    answer_log = zoo.train_answers(model, processor, adapter, spec, images)
    model.eval()
    splits = {setting: load_benchmark(setting, BENCHMARK_DIR) for setting in SETTINGS}
    metrics = zoo.evaluate(model, processor, adapter, splits, desc=f"eval {args.model}")
    variant = f"L{args.layers}-{args.image_size}px-s{spec.steps}-lr{spec.learning_rate:g}" + ("-branch" if args.branch_scale else "") \
        + (f"-rope{args.rope_theta:g}" if args.rope_theta is not None else "") \
        + f"-seed{spec.seed}" + (f"-{args.tag}" if args.tag else "")
    record = {
        "command": "benchmarks/zoo_depth_recipe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model, "variant": variant, "spec": json.loads(json.dumps(dataclasses.asdict(spec))),
        "training": vision_log | answer_log, "wall_seconds": round(time.time() - started, 1),
        "accuracy": {s: round(m["accuracy"], 3) for s, m in metrics.items()},
        "yes_ratio": {s: round(m["yes_ratio"], 3) for s, m in metrics.items()},
        "machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    write_json_atomic(RESULTS / f"zoo_depth_recipe-{args.model}-{variant}.json", record)
    print(json.dumps({k: record[k] for k in ("variant", "accuracy", "wall_seconds")}), flush=True)
    print("loss curve:", answer_log["loss_curve"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
