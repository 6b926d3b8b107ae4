"""Zoo perception diagnostic: how fast can a zoo model's vision tower learn which objects an image holds?

**History:** written for issue 3 against the zoo recipe of then; the results in ``benchmarks/README.md``
were measured at commit 2081a79 on generator-version-1 images (harder than today's). The zoo's stage 1
(``vrp_utils.models.zoo.pretrain_vision``) now is this script's ``--loss dense`` with three vision layers.

**Claim tested (issue 3):** the zoo's second wall, besides the language model's lookup (see
``zoo_learnability.py``), is perception: the tiny vision tower learns the benchmark's 18 shapes slowly. This
trains the vision tower + projector of a zoo model alone with the loss of the zoo's stage 1 (``pretrain_vision``:
max over image tokens -> linear head -> which categories are present; colour-permutation augmentation, without
the zoo's left-right flip so that boxes stay put; learning rate 6e-3 by default, the zoo's is 2e-3), and
reports the held-out macro AUROC of that presence head (scikit-learn) against steps and seconds.
``--loss dense`` adds box supervision per image token (the head also predicts, for every image token, the
categories whose training box covers at least a quarter of that token's patch; same patch coverage as the
learnability control's symbolic inputs, found through the family adapter, so it works for Qwen2-VL's
merged tokens too). ``--vision-layers`` / ``--vision-hidden`` change the tower.

    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss presence --steps 1500
    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss dense --steps 1500
    .venv/bin/python benchmarks/zoo_perception.py --model zoo-llava --loss dense --steps 1500 --vision-layers 3

Writes ``benchmarks/results/zoo_perception-<model>-<loss>-L<layers>-W<width>-<steps>.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
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
    """One entry per distinct image: the image, its presence vector, its per-image-token coverage."""

    images: list
    presence: torch.Tensor  # [images, categories]
    coverage: list[torch.Tensor]  # each [image tokens, categories]


def distinct_images(dataset, processor, adapter) -> Images:
    """The split's distinct images with their targets (boxes -> categories present / per image token)."""
    column = {c: i for i, c in enumerate(CATEGORIES)}
    seen: dict[str, int] = {}
    images, presence, coverage = [], [], []
    for name, image, boxes in zip(dataset["image_file"], dataset["image"], dataset["boxes"]):
        if name in seen:
            continue
        seen[name] = len(images)
        image = image.convert("RGB")
        present = torch.zeros(len(CATEGORIES))
        for box in boxes:
            present[column[box["category"]]] = 1.0
        inputs = adapter.build_inputs(processor, [image], ["Is there a cup in the image?"])
        images.append(image)
        presence.append(present)
        coverage.append(zoo.patch_categories(adapter, inputs, 0, image.size, boxes))
    return Images(images, torch.stack(presence), coverage)


def permute_colours(image, generator: np.random.Generator):
    """The zoo's colour augmentation without its left-right flip (a flip would move the boxes)."""
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(np.asarray(image)[:, :, generator.permutation(3)]))


def token_logits(model, processor, head: torch.nn.Module, images: list) -> list[torch.Tensor]:
    """Per image, ``[image tokens, categories]`` logits of the head over the projected image features."""
    features = model.get_image_features(**processor.image_processor(images, return_tensors="pt")).pooler_output
    return [head(f) for f in features]


@torch.no_grad()
def presence_auroc(model, processor, head, held_out: Images, batch_size: int = 90) -> float:
    """Macro AUROC (scikit-learn) of max-over-tokens presence scores on held-out images."""
    model.eval()
    scores = []
    for start in range(0, len(held_out.images), batch_size):
        logits = token_logits(model, processor, head, held_out.images[start : start + batch_size])
        scores += [t.max(dim=0).values for t in logits]
    model.train()
    labels = held_out.presence.numpy()
    scored = [c for c in range(labels.shape[1]) if 0 < labels[:, c].sum() < len(labels)]
    if not scored:
        raise ValueError("no category is both present and absent among the held-out images: AUROC undefined")
    # macro over the categories that are both present and absent somewhere (all 18 on the real benchmark)
    return float(roc_auc_score(labels[:, scored], torch.stack(scores).numpy()[:, scored], average="macro"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo-llava", choices=list(zoo.ZOO))
    parser.add_argument("--loss", default="presence", choices=["presence", "dense"])
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
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, len(CATEGORIES))
    trained = [p for n, p in model.named_parameters() if not n.startswith(("model.language_model", "lm_head"))]
    optimizer = torch.optim.AdamW([*trained, *head.parameters()], lr=args.learning_rate, weight_decay=0.01)
    warmup = 50
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))),
    )
    generator = np.random.default_rng(spec.seed + 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    history, losses = [], []
    started = time.time()
    model.train()
    for step in tqdm(range(args.steps), desc=f"{args.model} {args.loss}", mininterval=5.0):
        batch = generator.choice(len(train.images), size=min(args.batch_size, len(train.images)), replace=False)
        logits = token_logits(model, processor, head, [permute_colours(train.images[i], generator) for i in batch])
        loss = bce(torch.stack([t.max(dim=0).values for t in logits]), train.presence[batch])
        if args.loss == "dense":
            loss = loss + bce(torch.cat(logits), torch.cat([train.coverage[i] for i in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            point = {"step": step + 1, "loss": round(float(np.mean(losses[-50:])), 4),
                     "presence_auroc": round(presence_auroc(model, processor, head, held_out), 4),
                     "seconds": round(time.time() - started, 1)}
            history.append(point)
            tqdm.write(json.dumps(point))
    result = {
        "model": args.model, "loss": args.loss, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "vision_layers": layers, "vision_hidden": width,
        "train_images": len(train.images), "held_out_images": len(held_out.images),
        "threads": args.threads, "machine": platform.machine(), "history": history,
    }
    out = args.out or Path(__file__).parent / "results" / (
        f"zoo_perception-{args.model}-{args.loss}-L{layers}-W{width}-{args.steps}.json")
    write_json_atomic(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
