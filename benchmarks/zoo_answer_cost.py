"""Cost of one labelled yes/no decision in the zoo's answer stage, against the naive way (issue 3).

Naive: one question per sequence, the image's pixels through the (frozen) vision tower every step.
Zoo (``vrp_utils.models.zoo.train_answers``): image features computed once and passed to the forward as
``mm_encoder_outputs``; several questions per sequence (a multi-turn conversation about one image).
Both do forward + backward + optimizer step of the language model on one CPU thread, with the same
number of labelled decisions per step; the ratio is seconds per decision, measured in one run.

    .venv/bin/python benchmarks/zoo_answer_cost.py --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vrp_utils.data.pope import load_train
from vrp_utils.models import zoo
from vrp_utils.paths import BENCHMARK_DIR
from vrp_utils.results import write_json_atomic


def _seconds_per_decision(step, steps: int) -> float:
    """``step()`` trains once and returns how many yes/no decisions it labelled."""
    step()  # warm-up (allocations, first-call paths)
    decisions = 0
    started = time.perf_counter()
    for _ in range(steps):
        decisions += step()
    return (time.perf_counter() - started) / decisions


def measure(name: str, images: zoo.TrainingImages, steps: int, batch_size: int | None = None) -> dict:
    spec = zoo.ZOO[name]
    if batch_size is not None:
        spec = dataclasses.replace(spec, batch_size=batch_size)
    model, processor, adapter = zoo.build_untrained(spec)
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_name.startswith(("model.language_model", "lm_head")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = np.random.default_rng(0)
    cached = zoo.CachedImageFeatures(model, processor, images.images)

    def update(loss: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def zoo_step() -> int:
        """As ``zoo.train_answers``: conversations about ``batch_size`` images, cached features."""
        batch = generator.choice(len(images.images), size=min(spec.batch_size, len(images.images)), replace=False)
        conversations = [zoo.sample_conversation(generator, images.categories(i), spec.turns, spec.answer_forms)
                         for i in batch]
        inputs = adapter.build_conversations(processor, [images.images[i] for i in batch], conversations)
        inputs.pop("pixel_values")
        update(model(**inputs, mm_encoder_outputs=cached.encoder_outputs(batch)).loss)
        return sum(len(c) for c in conversations)

    def naive_step() -> int:
        """One question per sequence, pixels through the frozen tower, about as many decisions per step."""
        batch = generator.choice(len(images.images), size=spec.batch_size * spec.turns * 2 // 3)
        questions = [zoo.sample_conversation(generator, images.categories(i), 1, spec.answer_forms)[0] for i in batch]
        inputs = adapter.build_inputs(processor, [images.images[i] for i in batch], [q for q, _ in questions],
                                      answers=[a for _, a in questions])
        update(model(**inputs).loss)
        return len(batch)

    naive = _seconds_per_decision(naive_step, steps)
    cheap = _seconds_per_decision(zoo_step, steps)
    return {"model": name, "naive_ms_per_decision": round(naive * 1e3, 3), "zoo_ms_per_decision": round(cheap * 1e3, 3),
            "ratio": round(naive / cheap, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=512, help="training images to draw from")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="conversations per step (default: each model's own; smaller only to smoke-test the script)")
    parser.add_argument("--benchmark", type=Path, default=BENCHMARK_DIR)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "zoo_answer_cost.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    train = load_train(args.benchmark)
    images = zoo.TrainingImages.from_dataset(train.select(range(min(len(train), 6 * args.images))))
    rows = [measure(name, images, args.steps, args.batch_size) for name in zoo.ZOO]
    result = {"steps": args.steps, "batch_size": args.batch_size or "each model's", "threads": 1, "machine": platform.machine(), "rows": rows}
    write_json_atomic(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
