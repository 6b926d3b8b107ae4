"""Zoo perception diagnostic: how fast can a zoo model's vision tower learn which objects an image holds?

**Claim tested (issue 3):** the zoo's wall is perception: the tiny vision tower learns the benchmark's 18
shapes slowly, and how it is taught decides how far it gets within its budget. This trains the vision
tower + projector of a zoo model alone, as the zoo's stage 1 does (``vrp_utils.models.zoo.pretrain_vision``:
linear head on every projected image token, colour-permutation augmentation, AdamW with the zoo's
warm-up/cosine schedule), with one of three losses, and reports the held-out macro AUROC (scikit-learn) of
the image-level presence score on the 180 evaluation images against steps and seconds:

* ``presence``: max over image tokens of a sigmoid head -> which categories are in the image (one bit per
  category and image);
* ``dense``: ``presence`` plus independent sigmoids on every token for the categories whose training box covers
  at least a quarter of the token's patch (``zoo.patch_categories``; found through the family adapter, so it
  works for Qwen2-VL's merged tokens too);
* ``softmax`` (the zoo's loss, ``zoo.vision_loss``): every token *classifies* its patch, softmax over the
  categories and a background class (``zoo.patch_labels``: the category covering most of it), plus presence as
  the max over tokens of each category's probability.

``--whiten`` starts the patch embedding at the whitened principal components of training patches, as the zoo
does (``zoo.whiten_patch_embedding``). ``--vision-layers`` / ``--vision-hidden`` change the tower.

    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss dense --steps 1500
    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss softmax --steps 1500
    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss softmax --whiten --steps 1500

Writes ``benchmarks/results/zoo_perception-<model>-<loss>[-whiten]-L<layers>-W<width>-<steps>.json`` (``--out``).
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
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vrp_utils.data.benchmark import CATEGORIES  # noqa: E402
from vrp_utils.data.pope import load_benchmark, load_train  # noqa: E402
from vrp_utils.models import zoo  # noqa: E402
from vrp_utils.paths import BENCHMARK_DIR  # noqa: E402
from vrp_utils.results import write_json_atomic  # noqa: E402


@dataclasses.dataclass
class Images:
    """One entry per distinct image: the image, its presence vector, its per-image-token targets."""

    images: list
    presence: torch.Tensor  # [images, categories]
    coverage: list[torch.Tensor]  # each [image tokens, categories] 0/1 (``zoo.patch_categories``)
    labels: list[torch.Tensor]  # each [image tokens] class, background last (``zoo.patch_labels``)


def distinct_images(dataset, processor, adapter) -> Images:
    """The split's distinct images with their targets (boxes -> categories present / per image token).

    Images, boxes and presence as the zoo's stage 1 reads them (``zoo.TrainingImages.from_dataset``),
    the per-token targets through the family adapter (``zoo.patch_inputs``).
    """
    distinct = zoo.TrainingImages.from_dataset(dataset)
    coverage, labels = [], []
    for inputs, image, boxes in zoo.patch_inputs(processor, adapter, distinct):
        coverage.append(zoo.patch_categories(adapter, inputs, 0, image.size, boxes))
        labels.append(zoo.patch_labels(adapter, inputs, 0, image.size, boxes))
    return Images(distinct.images, torch.from_numpy(distinct.presence), coverage, labels)


def presence_scores(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """``[images, categories]`` presence score: max over tokens of the category's logit (sigmoid losses)
    or of its probability (softmax, where the last class is the background)."""
    if loss == "softmax":
        return logits.softmax(dim=-1)[..., :-1].max(dim=1).values
    return logits.max(dim=1).values


@torch.no_grad()
def presence_auroc(model, processor, head, held_out: Images, loss: str, batch_size: int = 90) -> float:
    """Macro AUROC (scikit-learn) of the presence scores on held-out images."""
    model.eval()
    scores = []
    for start in range(0, len(held_out.images), batch_size):
        logits = zoo.image_token_logits(model, processor, head, held_out.images[start : start + batch_size])
        scores.append(presence_scores(logits, loss))
    model.train()
    labels = held_out.presence.numpy()
    scored = [c for c in range(labels.shape[1]) if 0 < labels[:, c].sum() < len(labels)]
    if not scored:
        raise ValueError("no category is both present and absent among the held-out images: AUROC undefined")
    # macro over the categories that are both present and absent somewhere (all 18 on the real benchmark)
    return float(roc_auc_score(labels[:, scored], torch.cat(scores).numpy()[:, scored], average="macro"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo-llava", choices=list(zoo.ZOO))
    parser.add_argument("--loss", default="presence", choices=["presence", "dense", "softmax"])
    parser.add_argument("--whiten", action="store_true", help="start the patch embedding whitened (as the zoo)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500, help="evaluate every N steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=6e-3)
    parser.add_argument("--vision-layers", type=int, default=None, help="default: the zoo config's")
    parser.add_argument("--vision-hidden", type=int, default=None, help="default: the zoo config's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--benchmark", type=Path, default=BENCHMARK_DIR)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.every < 1 or args.batch_size < 1:
        parser.error("--steps, --every and --batch-size must be positive")
    torch.set_num_threads(args.threads)

    overrides = dict(zoo.ZOO[args.model].config_overrides)
    if args.vision_layers:
        overrides["vision_layers"] = args.vision_layers
    if args.vision_hidden:
        overrides |= {"vision_hidden": args.vision_hidden, "vision_intermediate": 2 * args.vision_hidden}
    spec = dataclasses.replace(zoo.ZOO[args.model], config_overrides=overrides)
    model, processor, adapter = zoo.build_untrained(spec)
    vision = model.config.vision_config
    layers = vision.num_hidden_layers
    width = getattr(vision, "embed_dim", None) or vision.hidden_size  # Qwen2-VL's hidden_size is its merger's output
    train = distinct_images(load_train(args.benchmark), processor, adapter)
    held_out = distinct_images(load_benchmark("random", args.benchmark), processor, adapter)

    zoo.set_seed(spec.seed)
    if args.whiten:
        zoo.whiten_patch_embedding(model, processor.image_processor(train.images[:500], return_tensors="pt")["pixel_values"])
    classes = len(CATEGORIES) + (args.loss == "softmax")  # softmax: a background class
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, classes)
    trained = [p for n, p in model.named_parameters() if zoo._is_vision(n)]
    optimizer = torch.optim.AdamW([*trained, *head.parameters()], lr=args.learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, zoo.warmup_cosine(50, args.steps))
    generator = np.random.default_rng(spec.seed + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    history, losses = [], []
    started = time.time()
    model.train()
    for step in tqdm(range(args.steps), desc=f"{args.model} {args.loss}", mininterval=5.0):
        batch = generator.choice(len(train.images), size=min(args.batch_size, len(train.images)), replace=False)
        logits = zoo.image_token_logits(model, processor, head, [zoo.permute_colours(train.images[i], generator) for i in batch])
        if args.loss == "softmax":
            loss = zoo.vision_loss(logits, torch.stack([train.labels[i] for i in batch]), train.presence[batch])
        else:
            loss = bce(logits.max(dim=1).values, train.presence[batch])
            if args.loss == "dense":
                loss = loss + bce(logits, torch.stack([train.coverage[i] for i in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            point = {"step": step + 1, "loss": round(float(np.mean(losses[-50:])), 4),
                     "presence_auroc": round(presence_auroc(model, processor, head, held_out, args.loss), 4),
                     "seconds": round(time.time() - started, 1)}
            history.append(point)
            tqdm.write(json.dumps(point))
    result = {
        "model": args.model, "loss": args.loss, "whiten": args.whiten, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "vision_layers": layers, "vision_hidden": width,
        "train_images": len(train.images), "held_out_images": len(held_out.images),
        "threads": args.threads, "machine": platform.machine(), "history": history,
    }
    out = args.out or Path(__file__).parent / "results" / (
        f"zoo_perception-{args.model}-{args.loss}{'-whiten' if args.whiten else ''}-L{layers}-W{width}-{args.steps}.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
