"""Zoo learnability diagnostic: after how many steps does a zoo model's answer stop being chance?

**History:** written to find why the zoo sat at chance (issue 3), against the recipe of then
(one question per sequence, pixels through a trainable tower every step). Its results in
``benchmarks/README.md`` were measured at commit 2081a79 on generator-version-1 images; defaults
taken from the zoo spec (learning rate, batch size, depth) have changed since, so rerun that
commit to reproduce them. The current recipe (``vrp_utils.models.zoo``) adopted what it found.

**Claim tested (issue 3):** besides perception, the *language model's* question-conditioned lookup ("is the
asked object among the image's objects?") is a wall of its own within the zoo's training budget. The control
that separates the two: ``--inputs symbolic`` adds to every image token's embedding the word embedding(s) of
the categories whose box covers that patch (perfect perception, nothing left for the vision tower to learn),
and trains the same model with the same loop and loss as ``vrp_utils.models.zoo.train``. If the symbolic
control also stays at chance, a better vision stage alone cannot fix the zoo; the LM recipe has to change.

Reported per evaluation: training loss, and the teacher-forced accuracy of the yes/no decision (yes vs no
logits) at two places: the answer position (what generation uses) and the asked object's word (where the
zoo's ``object_word_hint`` trains an early answer). Evaluation uses the held-out *random* split.

    .venv/bin/python benchmarks/zoo_learnability.py --model zoo-llava --inputs symbolic --steps 450
    .venv/bin/python benchmarks/zoo_learnability.py --model zoo-llava --inputs symbolic --steps 300 --batch-size 128
    .venv/bin/python benchmarks/zoo_learnability.py --model zoo-llava --inputs symbolic --steps 300 --batch-size 128 \
        --answer-forms first --threads 2
    .venv/bin/python benchmarks/zoo_learnability.py --model zoo-llava --inputs symbolic --steps 300 --every 50 \
        --batch-size 128 --answer-forms first --patch-size 16 --layers 2

Writes ``benchmarks/results/zoo_learnability-<model>-<inputs>-batch<B>[-first-form][-patch<P>][-layers<L>]-<steps>.json``
(``--out``).
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
from tqdm import tqdm

from vrp_utils.data.benchmark import ANSWER_FORMS, CATEGORIES
from vrp_utils.data.pope import load_benchmark, load_train, parse_object
from vrp_utils.models import zoo
from vrp_utils.paths import BENCHMARK_DIR
from vrp_utils.results import write_json_atomic


def symbolic_embeddings(model, processor, adapter, inputs, image_sizes: list[tuple[int, int]],
                        boxes_per_row: list[list[dict]]) -> torch.Tensor:
    """Input embeddings with each image token = its own embedding + the word embeddings of the patch's categories."""
    embedding = model.get_input_embeddings()
    words = torch.tensor([processor.tokenizer.convert_tokens_to_ids(c) for c in CATEGORIES])
    embeds = embedding(inputs["input_ids"])
    for row, boxes in enumerate(boxes_per_row):
        positions = adapter.image_token_positions(inputs["input_ids"][row])
        covered = zoo.patch_categories(adapter, inputs, row, image_sizes[row], boxes)
        if len(positions) != len(covered):
            raise RuntimeError(f"{len(positions)} image tokens but a patch grid of {len(covered)} cells")
        embeds[row, positions] = embeds[row, positions] + covered @ embedding.weight[words]
    return embeds


def forward(model, processor, adapter, rows: dict, answers: list[str], inputs_kind: str, hint: bool):
    images = [image.convert("RGB") for image in rows["image"]]
    inputs = adapter.build_inputs(processor, images, rows["question"], answers=answers)
    if hint:
        zoo.add_object_word_hint(inputs, processor.tokenizer, [[q] for q in rows["question"]])
    if inputs_kind == "symbolic":
        embeds = symbolic_embeddings(model, processor, adapter, inputs, [im.size for im in images], rows["boxes"])
        output = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=inputs["labels"])
    else:
        output = model(**inputs)
    return inputs, output


@torch.no_grad()
def decision_accuracy(model, processor, adapter, dataset, inputs_kind: str, batch_size: int = 64) -> dict[str, float]:
    """Teacher-forced yes/no accuracy at the answer position and at the asked object's word."""
    yes_ids, no_ids = adapter.yes_no_token_ids(processor.tokenizer)
    model.eval()
    correct = {"accuracy_at_answer": 0, "accuracy_at_object_word": 0}
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start : start + batch_size]
        answers = [ANSWER_FORMS[label][0] for label in rows["label"]]
        inputs, output = forward(model, processor, adapter, rows, answers, inputs_kind, hint=False)
        for row, label in enumerate(rows["label"]):
            answer_start = adapter.answer_start(inputs, row)
            word = processor.tokenizer(parse_object(rows["question"][row]), add_special_tokens=False)["input_ids"][-1]
            word_position = int((inputs["input_ids"][row, :answer_start] == word).nonzero().flatten()[-1])
            for key, position in (("accuracy_at_answer", answer_start - 1), ("accuracy_at_object_word", word_position)):
                logits = output.logits[row, position]
                correct[key] += ("yes" if logits[yes_ids].max() > logits[no_ids].max() else "no") == label
    model.train()
    return {key: count / len(dataset) for key, count in correct.items()}


def _geometry_tag(spec, base) -> str:
    """File-name part for a patch size / depth other than the zoo's (empty at the zoo's own)."""
    tag = f"-patch{spec.patch_size}" if spec.patch_size != base.patch_size else ""
    return tag + (f"-layers{spec.layers}" if spec.layers != base.layers else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo-llava", choices=list(zoo.ZOO))
    parser.add_argument("--inputs", default="symbolic", choices=["symbolic", "pixels"])
    parser.add_argument("--steps", type=int, default=450)
    parser.add_argument("--every", type=int, default=150, help="evaluate every N steps")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the zoo spec's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the zoo spec's")
    parser.add_argument("--answer-forms", default="all", choices=["all", "first"],
                        help="train on every answer form (as the zoo does) or only the first ('Yes.' / 'No.')")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="default: the zoo spec's (16 gives LLaVA/PaliGemma 16 image tokens instead of 64)")
    parser.add_argument("--layers", type=int, default=None, help="language-model layers; default: the zoo spec's")
    parser.add_argument("--eval-size", type=int, default=360, help="held-out random-split questions evaluated")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmark", type=Path, default=BENCHMARK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1:
        parser.error("--steps and --every must be positive")
    torch.set_num_threads(args.threads)

    base = zoo.ZOO[args.model]
    spec = dataclasses.replace(base, steps=args.steps, vision_steps=0,
                               learning_rate=args.learning_rate or base.learning_rate,
                               batch_size=args.batch_size or base.batch_size,
                               patch_size=args.patch_size or base.patch_size, layers=args.layers or base.layers)
    train = load_train(args.benchmark)
    held_out = load_benchmark("random", args.benchmark)
    held_out = held_out.select(range(0, len(held_out), max(1, len(held_out) // args.eval_size)))
    model, processor, adapter = zoo.build_untrained(spec)
    zoo.set_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, zoo.warmup_cosine(spec.warmup_steps, spec.steps))
    generator = np.random.default_rng(spec.seed)
    forms = {label: texts if args.answer_forms == "all" else texts[:1] for label, texts in ANSWER_FORMS.items()}
    history, losses = [], []
    started = time.time()
    model.train()
    for step in tqdm(range(spec.steps), desc=f"{args.model} {args.inputs}", mininterval=5.0):
        batch = sorted(generator.choice(len(train), size=min(spec.batch_size, len(train)), replace=False).tolist())
        rows = train[batch]
        answers = [forms[label][int(generator.integers(len(forms[label])))] for label in rows["label"]]
        _, output = forward(model, processor, adapter, rows, answers, args.inputs, spec.object_word_hint)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(output.loss.detach()))
        if (step + 1) % args.every == 0 or step + 1 == spec.steps:
            point = {"step": step + 1, "loss": round(float(np.mean(losses[-50:])), 4),
                     **decision_accuracy(model, processor, adapter, held_out, args.inputs),
                     "seconds": round(time.time() - started, 1)}
            history.append(point)
            tqdm.write(json.dumps(point))
    result = {
        "model": args.model, "inputs": args.inputs, "steps": spec.steps, "batch_size": spec.batch_size,
        "learning_rate": spec.learning_rate, "answer_forms": args.answer_forms, "object_word_hint": spec.object_word_hint,
        "patch_size": spec.patch_size, "layers": spec.layers,
        "eval_questions": len(held_out), "threads": args.threads, "machine": platform.machine(),
        "history": history,
    }
    out = args.out or Path(__file__).parent / "results" / f"zoo_learnability-{args.model}-{args.inputs}-batch{spec.batch_size}{'-first-form' if args.answer_forms == 'first' else ''}{_geometry_tag(spec, base)}-{spec.steps}.json"
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
