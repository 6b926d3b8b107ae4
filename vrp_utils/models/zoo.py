"""The model zoo: tiny LLaVA, PaliGemma and Qwen2-VL models trained here on the embedded benchmark.

Why: the paper's 7B checkpoints cannot be downloaded on the machines that build this book, and a
book that only runs on GPUs is not reproducible by its readers. So the book's figures come from
three tiny models of the *exact* ``transformers`` classes, each with its real processor, trained
by this module on the CPU to imperfect accuracy, so that there are errors to predict.

The book reads the *released* zoo, committed under ``zoo/`` with a checksum manifest
(:mod:`vrp_utils.models.release`): training is chaotic across CPU kinds, so a build that trained would
give another zoo on another machine. ``make zoo`` (``python -m vrp_utils.models.zoo build``) retrains
every model whose inputs changed (benchmark manifest, training spec, the code of this package's model
modules, comments and docstrings aside) into ``data/zoo-retrain/<name>/`` (``save_pretrained`` model +
processor, ``model_card.json`` with the training provenance, ``README.md``) and ``zoo.json``; the release
changes only by ``python -m vrp_utils.models.release publish``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto would ask notebooks for ipywidgets

from vrp_utils.data.benchmark import SETTINGS
from vrp_utils.models.release import benchmark_fingerprint
from vrp_utils.paths import BENCHMARK_DIR, RETRAIN_DIR, ZOO_DIR
from vrp_utils.results import write_json_atomic


@dataclass(frozen=True)
class ZooSpec:
    """Everything that decides a zoo model's weights (its fingerprint is the hash of this + inputs).

    Training follows the recipe of real VLMs, scaled down: the vision tower learns to see first
    (stage 1), then it is frozen and the language model learns to answer (stage 2).
    """

    name: str
    model_type: str
    seed: int
    #: Stage 1: vision tower + projector alone, a linear head on every image token classifies its
    #: patch (the category covering most of it, or background, from the training boxes) and, max-pooled,
    #: says which categories are in the image.
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_learning_rate: float = 6e-3
    #: Stage 2: the language model answers multi-turn conversations about each training image,
    #: ``turns`` questions drawn per conversation; ``batch_size`` conversations per step.
    steps: int = 600
    batch_size: int = 32
    turns: int = 6
    learning_rate: float = 3e-3
    warmup_steps: int = 60
    #: The model's answer texts, (yes, no): one form per model (the zoo uses a short and a long one).
    answer_forms: tuple[str, str] = ("Yes.", "No.")
    #: Also train the asked object's word position to predict the answer (one extra labelled token
    #: per question; generation is unaffected): a one-hop path (word -> matching image tokens)
    #: before the answer position learns to read it.
    object_word_hint: bool = True
    #: Label every prompt position from the object word up to the answer with the answer's first token, not
    #: the object word's alone: each position then learns to pass the decision one token on, a path that forms
    #: by local steps, where the single hint left the answer position to find the object word by itself, which
    #: happened or not by chance of seed and CPU kernel path (measured: zoo-llava seed 12 0.573 -> 0.815,
    #: zoo-qwen2-vl seed 13 on the portable kernels 0.647 -> 0.787; benchmarks/README.md, 3 seeds x 2 paths).
    hint_to_answer: bool = True
    #: Compute the answer stage's logits only where a labelled token is predicted (:func:`answer_loss`):
    #: the same loss up to float rounding, cheaper where the vocabulary is large (PaliGemma's 1,152
    #: location/segmentation tokens). Off where it buys nothing, since rounding changes the weights.
    logits_at_labels_only: bool = False
    weight_decay: float = 0.01
    #: Start each language-model block's residual-branch outputs (attention ``o_proj``, MLP ``down_proj``)
    #: at 1/sqrt(2 * layers) of the init std, as GPT-2 does: a deep stack then starts near the identity,
    #: so the first blocks' question-to-image lookup is not drowned by the later blocks' random outputs.
    branch_init_scale: bool = False
    hidden: int = 128
    #: Zoo v2 (issue 24): 6 language-model layers, so that "where reliability lives" has a depth to search,
    #: and 96 px at patch 8, 12x12 image tokens (Qwen2-VL 6x6 after its 2x2 merge). Measured: 8 layers
    #: would cost 1.2-2x per answer step (benchmarks/README.md, "zoo_depth_cost.py"), over the hour's budget.
    layers: int = 6
    heads: int = 4
    image_size: int = 96
    patch_size: int = 8
    #: To :func:`vrp_utils.models.families.zoo_config`. The language model starts at weight std 0.08
    #: (about 1/sqrt(width)) instead of the library's 0.02: measured on LLaVA (same stage 1, 600
    #: answer steps), POPE random accuracy 0.821 vs 0.691; at 0.02 the attention logits of this narrow
    #: model start near zero and the question-to-image lookup stays on its plateau for hundreds of steps.
    config_overrides: dict[str, Any] = field(default_factory=lambda: {"vision_layers": 3, "initializer_range": 0.08})


ZOO: dict[str, ZooSpec] = {
    spec.name: spec
    for spec in (
        # LLaVA's 144 image tokens sit on one rotary axis between the prompt and the question: at 6 layers
        # with the 2-layer zoo's rotary base 1e3 its answer stage stayed on the loss-0.55 plateau (0.683 /
        # 0.691 / 0.582); at base 1e5 the question reaches the far image tokens, and 900 answer steps give
        # a margin (seed 12 0.859 / 0.873 / 0.826; seed 13 on the portable kernels 0.839 / 0.825 / 0.792;
        # benchmarks/README.md, "zoo_depth_recipe.py")
        ZooSpec("zoo-llava", "llava", seed=11, steps=900,
                config_overrides={"vision_layers": 3, "initializer_range": 0.08, "rope_theta": 1e5}),
        # the long form exercises multi-token answers and POPE's comma rule; its longer sequences cost
        # about 25% more per answer step, so fewer steps (it still learns: 0.817 random at 600); with its
        # 1,189-token vocabulary, logits at the labels only made its answer stage 8% faster in the build
        # (433 -> 398 s, the others' 0-3% in the same pair of builds)
        ZooSpec("zoo-paligemma", "paligemma", seed=12, steps=500,
                answer_forms=("Yes, there is.", "No, there is not."), logits_at_labels_only=True),
        # Qwen2-VL's tower (2x2 merger) costs about 1.6x LLaVA's per step, so fewer vision steps; its
        # answer position learns to read the object word later than the others' (measured: teacher-forced
        # 0.69 at 600 steps, 0.74 at 800, with the object word at 0.81), so more answer steps. Rotary base
        # 1e4: at zoo v2's 6 layers and 36 merged tokens, base 1e3 left seed 14's answer stage on the loss-0.55
        # plateau until step ~550 (0.629 / 0.363 / 0.476, out of the band; 1,200 steps: 0.585 / 0.475 / 0.462);
        # at 1e4 the same seed left it by step ~250 (0.853 / 0.845 / 0.837), at 1e5 by ~300 (0.808 / 0.779 /
        # 0.763; benchmarks/README.md, "zoo_depth_recipe.py"). The 2-layer zoo, on a 4x4 merged grid, had
        # chosen 1e3 over 1e4.
        ZooSpec("zoo-qwen2-vl", "qwen2_vl", seed=13, vision_steps=1000, steps=800,
                config_overrides={"vision_layers": 3, "initializer_range": 0.08, "rope_theta": 1e4}),
    )
}


def code_fingerprint(root: Path = Path(__file__).resolve().parent) -> str:
    """Hash of the code of the modules under ``root`` (model construction and training), without
    comments and docstrings: editing prose does not retrain the zoo, editing code does."""
    import ast

    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                    and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(ast.dump(tree).encode())  # no line numbers, no comments
    return digest.hexdigest()[:16]


def spec_fingerprint(spec: ZooSpec, benchmark_dir: Path = BENCHMARK_DIR) -> str:
    """What the trained weights depend on: spec, benchmark, code, torch/transformers versions."""
    import transformers

    payload = json.dumps(
        {
            "spec": asdict(spec),
            "benchmark": benchmark_fingerprint(benchmark_dir),
            "code": code_fingerprint(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (every zoo run and diagnostic starts here)."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(warmup_steps: int, steps: int):
    """Linear warm-up, then cosine decay to 10% of the rate (a ``LambdaLR`` factor)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class TrainingImages:
    """The training split in memory, one entry per distinct image: the image and its boxes."""

    images: list[Any]
    boxes: list[list[dict]]
    #: ``[images, categories]`` multi-hot: which categories appear in each image
    presence: np.ndarray

    @classmethod
    def from_dataset(cls, dataset) -> TrainingImages:
        from vrp_utils.data.benchmark import CATEGORIES

        column = {c: i for i, c in enumerate(CATEGORIES)}
        first: dict[str, int] = {}
        for row, name in enumerate(dataset["image_file"]):
            first.setdefault(name, row)
        if not first:
            raise ValueError("the training split has no images")
        distinct = dataset.select(list(first.values()))  # decode each image once, not once per question
        images, boxes, presence = [], [], []
        for image, image_boxes in zip(distinct["image"], distinct["boxes"]):
            present = np.zeros(len(CATEGORIES), dtype=np.float32)
            for box in image_boxes:
                present[column[box["category"]]] = 1.0
            images.append(image.convert("RGB"))
            boxes.append(list(image_boxes))
            presence.append(present)
        return cls(images, boxes, np.stack(presence))

    def categories(self, index: int) -> list[str]:
        """The categories present in image ``index`` (sorted)."""
        return sorted({box["category"] for box in self.boxes[index]})


def patch_coverage(adapter, inputs, row: int, image_size: tuple[int, int], boxes: list[dict]) -> torch.Tensor:
    """``[image tokens, categories]``: the fraction of each token's patch (or of the box, if smaller) each category covers.

    The patch of each image token comes from the family adapter, so Qwen2-VL's merged tokens are right too.
    """
    from vrp_utils.data.benchmark import CATEGORIES

    grid = adapter.patch_grid(inputs, row)
    cells = torch.tensor(adapter.patch_boxes(image_size, grid), dtype=torch.float32)
    cell_area = (cells[:, 2] - cells[:, 0]) * (cells[:, 3] - cells[:, 1])
    column = {c: i for i, c in enumerate(CATEGORIES)}
    coverage = torch.zeros(len(cells), len(CATEGORIES))
    for box in boxes:
        x0, y0, x1, y1 = (float(v) for v in box["bbox"])
        width = (torch.clamp(cells[:, 2], max=x1) - torch.clamp(cells[:, 0], min=x0)).clamp(min=0)
        height = (torch.clamp(cells[:, 3], max=y1) - torch.clamp(cells[:, 1], min=y0)).clamp(min=0)
        fraction = width * height / torch.clamp(cell_area, max=(x1 - x0) * (y1 - y0))
        c = column[box["category"]]
        coverage[:, c] = torch.maximum(coverage[:, c], fraction)
    return coverage


def patch_categories(adapter, inputs, row: int, image_size: tuple[int, int], boxes: list[dict],
                     min_cover: float = 0.25) -> torch.Tensor:
    """``[image tokens, categories]`` 0/1: category c covers at least ``min_cover`` of the token's patch (or of its box)."""
    return (patch_coverage(adapter, inputs, row, image_size, boxes) >= min_cover).float()


def patch_labels(adapter, inputs, row: int, image_size: tuple[int, int], boxes: list[dict],
                 min_cover: float = 0.25) -> torch.Tensor:
    """``[image tokens]`` class of each token's patch: the category covering most of it (at least
    ``min_cover``), else ``len(CATEGORIES)``, the background class."""
    from vrp_utils.data.benchmark import CATEGORIES

    coverage = patch_coverage(adapter, inputs, row, image_size, boxes)
    most, category = coverage.max(dim=1)
    return torch.where(most >= min_cover, category, torch.full_like(category, len(CATEGORIES)))


def build_untrained(spec: ZooSpec):
    """A freshly initialised model, its processor and adapter, from the zoo spec (seeded)."""
    from vrp_utils.data.benchmark import vocabulary
    from vrp_utils.models.adapters import adapter_for
    from vrp_utils.models.families import build_family

    config, processor = build_family(
        spec.model_type,
        vocabulary(),
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        hidden=spec.hidden,
        layers=spec.layers,
        heads=spec.heads,
        **spec.config_overrides,
    )
    from transformers import AutoModelForImageTextToText

    set_seed(spec.seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    if spec.branch_init_scale:
        scale_residual_branches(model, spec.layers)
    return model, processor, adapter_for(model.config)


@torch.no_grad()
def scale_residual_branches(model, layers: int) -> None:
    """Multiply every language-model block's ``o_proj`` and ``down_proj`` weights by 1/sqrt(2 * layers)."""
    scaled = [m for n, m in model.named_modules()
              if n.startswith("model.language_model.layers.") and n.endswith(("self_attn.o_proj", "mlp.down_proj"))]
    if len(scaled) != 2 * layers:
        raise ValueError(f"expected {2 * layers} residual-branch projections, found {len(scaled)}")
    for module in scaled:
        module.weight.mul_(1 / math.sqrt(2 * layers))


def permute_colours(image: Any, generator: np.random.Generator) -> np.ndarray:
    """Presence- and box-preserving augmentation: permute the colour channels.

    Object colours are drawn independently of category, so a channel permutation is another
    plausible scene with the same objects; without it the small vision tower memorises the
    training images' colours within a few hundred steps. Takes a PIL image or an ``(H, W, 3)``
    array and returns an array (image processors take arrays, and skipping the PIL round trip
    makes stage 1's preprocessing about 40% cheaper).
    """
    return np.ascontiguousarray(np.asarray(image)[:, :, generator.permutation(3)])


def _is_vision(name: str) -> bool:
    return not name.startswith(("model.language_model", "lm_head"))


def patch_inputs(processor, adapter, images: TrainingImages) -> Iterator[tuple[Any, Any, list[dict]]]:
    """``(inputs, image, boxes)`` for every training image, ``inputs`` for the patch functions at row 0.

    An image's patch grid depends only on its size, so the processor runs once per distinct size.
    """
    from vrp_utils.data.benchmark import CATEGORIES, question_text

    inputs_of_size: dict[tuple[int, int], Any] = {}
    for image, boxes in zip(images.images, images.boxes):
        if image.size not in inputs_of_size:
            inputs_of_size[image.size] = adapter.build_inputs(processor, [image], [question_text(CATEGORIES[0])])
        yield inputs_of_size[image.size], image, boxes


def _token_labels(processor, adapter, images: TrainingImages) -> torch.Tensor:
    """``[images, image tokens]`` class of every training image token's patch (:func:`patch_labels`)."""
    return torch.stack([patch_labels(adapter, inputs, 0, image.size, boxes)
                        for inputs, image, boxes in patch_inputs(processor, adapter, images)])


def image_token_logits(model, processor, head: torch.nn.Module, images: list, **image_kwargs: Any) -> torch.Tensor:
    """``[images, image tokens, classes]`` logits of a linear head over the projected image features.

    ``image_kwargs`` go to the image processor (e.g. ``do_resize=False``, see :func:`resize_is_identity`).
    """
    features = model.get_image_features(**processor.image_processor(images, return_tensors="pt", **image_kwargs)).pooler_output
    return head(torch.stack(list(features)))


def resize_is_identity(processor, images: list) -> bool:
    """Whether the image processor's resize leaves every one of ``images`` as it is.

    True when all images have one size and processing the first with and without resizing gives
    the same tensors (PIL returns a copy when asked for an image's own size, so one image of a size
    decides for all of that size). Stage 1 then skips resizing, about a third of its preprocessing.
    """
    sizes = {np.asarray(image).shape for image in images}
    if len(sizes) != 1:
        return False
    resized = processor.image_processor(images[:1], return_tensors="pt")
    kept = processor.image_processor(images[:1], return_tensors="pt", do_resize=False)
    return resized.keys() == kept.keys() and all(
        resized[k].shape == kept[k].shape and torch.equal(resized[k], kept[k]) for k in resized
    )


@torch.no_grad()
def whiten_patch_embedding(model, pixel_values: torch.Tensor, gain: float = 0.5) -> None:
    """Start the vision tower's patch embedding at the whitened principal components of ``pixel_values``' patches.

    A data-dependent start for the only convolution of all three towers: stage 1 then reaches a higher
    held-out presence AUROC at every step (``benchmarks/zoo_perception.py --whiten``; numbers in
    ``benchmarks/README.md``).
    Works on what the convolution sees: image tensors (CLIP, SigLIP) or Qwen2-VL's flattened patches.
    """
    convolutions = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    if len(convolutions) != 1:
        raise ValueError(f"expected one patch-embedding convolution, found {len(convolutions)}")
    conv = convolutions[0]
    size = conv.weight[0].numel()
    if isinstance(conv, torch.nn.Conv2d) and pixel_values.dim() == 4:
        patches = torch.nn.functional.unfold(pixel_values, conv.kernel_size, stride=conv.stride)
        patches = patches.transpose(1, 2).reshape(-1, size)
    else:
        patches = pixel_values.reshape(-1, size)
    if conv.out_channels > min(patches.shape):
        raise ValueError(f"{conv.out_channels} components asked of {tuple(patches.shape)} patches")
    centred = patches - patches.mean(dim=0)
    _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    spread = singular[: conv.out_channels] / math.sqrt(len(patches))
    conv.weight.copy_((gain * components[: conv.out_channels] / spread[:, None]).reshape(conv.weight.shape))


def vision_loss(logits: torch.Tensor, labels: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Stage 1's loss: softmax cross-entropy of every image token's class (``labels``, background last)
    plus binary cross-entropy of the image-level presence (per category, the max over tokens of its probability).

    ``logits`` ``[images, image tokens, categories + 1]``, ``labels`` ``[images, image tokens]``,
    ``presence`` ``[images, categories]`` 0/1.
    """
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
    in_image = logits.softmax(dim=-1)[..., :-1].max(dim=1).values.clamp(1e-6, 1 - 1e-6)
    return per_token + torch.nn.functional.binary_cross_entropy(in_image, presence)


def pretrain_vision(model, processor, adapter, spec: ZooSpec, images: TrainingImages, progress: bool = True) -> dict[str, Any]:
    """Stage 1: teach the image features (vision tower + projector) where which objects are.

    A linear head on every projected image token classifies its patch (softmax over the categories
    and background, from the training boxes), and the max over tokens of each category's probability
    is trained to say whether the image holds it; colour-permuted images; the patch embedding starts
    whitened; the head is thrown away afterwards. Cheap: no language model in the loop. The softmax
    per token learns the shapes much faster than independent sigmoids per category
    (``benchmarks/zoo_perception.py``, ``--loss softmax`` vs ``--loss dense``; numbers in ``benchmarks/README.md``).
    """
    from vrp_utils.data.benchmark import CATEGORIES

    if spec.vision_steps <= 0:
        return {"vision_steps": 0}
    set_seed(spec.seed)
    categories = len(CATEGORIES)
    whiten_patch_embedding(model, processor.image_processor(images.images[:500], return_tensors="pt")["pixel_values"])
    head = torch.nn.Linear(model.config.get_text_config().hidden_size, categories + 1)
    trained = [p for n, p in model.named_parameters() if _is_vision(n)]
    optimizer = torch.optim.AdamW([*trained, *head.parameters()], lr=spec.vision_learning_rate, weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(50, spec.vision_steps))
    labels = _token_labels(processor, adapter, images)
    arrays = [np.asarray(image) for image in images.images]
    image_kwargs = {"do_resize": False} if resize_is_identity(processor, arrays) else {}
    presence = torch.from_numpy(images.presence)
    generator = np.random.default_rng(spec.seed + 1)
    losses = []
    started = time.time()
    model.train()
    for _ in tqdm(range(spec.vision_steps), desc=f"vision {spec.name}", disable=not progress, mininterval=2.0):
        batch = generator.choice(len(images.images), size=min(spec.vision_batch_size, len(images.images)), replace=False)
        logits = image_token_logits(model, processor, head, [permute_colours(arrays[i], generator) for i in batch], **image_kwargs)
        loss = vision_loss(logits, labels[batch], presence[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    return {"vision_steps": spec.vision_steps, "vision_seconds": round(time.time() - started, 1),
            "vision_final_loss": round(float(np.mean(losses[-50:])), 4)}


def sample_conversation(generator: np.random.Generator, present: list[str], turns: int,
                        answer_forms: tuple[str, str]) -> list[tuple[str, str]]:
    """Up to ``turns`` POPE questions about one image, each answer yes or no by its own coin.

    Why fresh questions and not the training split's six per image: those are three yes and three
    no, so in a conversation the earlier answers would give the later ones away (measured: a model
    trained so learns to count, not to look). Here each turn is an independent coin; a yes turn
    asks a present category, a no turn a random absent one, none asked twice. When the image has
    no unasked present category left for a yes turn, the conversation ends there.
    """
    from vrp_utils.data.benchmark import CATEGORIES, question_text

    present_left = [present[i] for i in generator.permutation(len(present))]
    absent = [c for c in CATEGORIES if c not in set(present)]
    absent_left = [absent[i] for i in generator.permutation(len(absent))]
    conversation: list[tuple[str, str]] = []
    for _ in range(turns):
        says_yes = generator.random() < 0.5
        pool = present_left if says_yes else absent_left
        if not pool:
            break
        conversation.append((question_text(pool.pop()), answer_forms[0] if says_yes else answer_forms[1]))
    if not conversation:  # the first coin asked for a yes the image cannot give (no objects)
        conversation.append((question_text(absent_left.pop()), answer_forms[1]))
    return conversation


def add_object_word_hint(inputs, tokenizer, conversations: list[list[str]], span: bool = False) -> None:
    """Label the position of each asked object's word with its answer's first token (see ZooSpec); with ``span``,
    every position from there up to the answer.

    ``conversations[row]`` lists the row's questions in order; each question's object word is looked
    up after the previous answer, and its answer is the next labelled token.
    """
    from vrp_utils.data.pope import parse_object
    from vrp_utils.models.adapters.base import IGNORE_INDEX

    labels = inputs["labels"]
    word_ids: dict[str, int] = {}
    for row, questions in enumerate(conversations):
        ids = inputs["input_ids"][row].tolist()
        labelled = (labels[row] != IGNORE_INDEX).tolist()
        cursor = 0
        for question in questions:
            word = parse_object(question)
            if word not in word_ids:
                word_ids[word] = tokenizer(word, add_special_tokens=False)["input_ids"][-1]
            try:
                position = ids.index(word_ids[word], cursor)
            except ValueError:
                raise ValueError(f"object word of {question!r} not found in row {row}") from None
            start = next((i for i in range(position + 1, len(ids)) if labelled[i]), None)
            if start is None:
                raise ValueError(f"question {question!r} in row {row} has no labelled answer after it")
            if span:
                labels[row, position + 1 : start] = labels[row, start]
            else:
                labels[row, position + 1] = labels[row, start]
            cursor = start


def answer_loss(model, inputs, **forward_kwargs: Any) -> torch.Tensor:
    """The causal-LM loss of ``inputs["labels"]``, with logits only at the columns that predict a labelled token.

    Equals ``model(**inputs).loss`` (mean over labelled tokens) up to float rounding, without the
    ``[batch, sequence, vocabulary]`` logits of every image and prompt position: the library's own
    ``logits_to_keep`` with the columns any row needs.
    """
    from vrp_utils.models.adapters.base import IGNORE_INDEX

    targets = inputs["labels"][:, 1:]
    columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().flatten()
    if columns.numel() == 0:
        raise ValueError("answer_loss: no labelled token in the batch")
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=columns, **forward_kwargs).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets[:, columns].flatten(),
                                             ignore_index=IGNORE_INDEX)


class CachedImageFeatures:
    """The projected image features of a fixed list of images, computed once (the vision tower is frozen).

    ``encoder_outputs(indices)`` is what the model's forward takes as ``mm_encoder_outputs`` (the
    library's own argument for precomputed encoder outputs) in place of ``pixel_values``; it has the
    layout the family's ``get_image_features`` returns (a list of per-image tensors, or one tensor).
    """

    @torch.no_grad()
    def __init__(self, model, processor, images: list, chunk: int = 256) -> None:
        was_training = model.training
        model.eval()
        self.features: list[torch.Tensor] = []
        self.stacked = False
        for start in range(0, len(images), chunk):
            pixels = processor.image_processor(images[start : start + chunk], return_tensors="pt")
            output = model.get_image_features(**pixels).pooler_output
            self.stacked = torch.is_tensor(output)
            self.features += [f.clone() for f in output]
        model.train(was_training)

    def encoder_outputs(self, indices) -> dict[str, Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        chosen = [self.features[int(i)] for i in indices]
        return {"image": BaseModelOutputWithPooling(pooler_output=torch.stack(chosen) if self.stacked else chosen)}


def train_answers(model, processor, adapter, spec: ZooSpec, images: TrainingImages, progress: bool = True) -> dict[str, Any]:
    """Stage 2: the language model learns to answer; the vision tower and projector stay frozen.

    As in LLaVA-1.5's instruction tuning. Frozen vision also means every training image's
    features are computed once and handed to the forward (``mm_encoder_outputs``, the library's own
    argument for precomputed encoder outputs), so a step costs only the language model. Each
    training sequence is a multi-turn conversation about one image (turn one is exactly the
    single-question prompt evaluation uses), so one pass over the image tokens trains several
    yes/no decisions. Loss on the answer tokens only (plus the object-word hint).
    """
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not _is_vision(name))
    started = time.time()
    cached = CachedImageFeatures(model, processor, images.images)
    set_seed(spec.seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=spec.learning_rate, weight_decay=spec.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(spec.warmup_steps, spec.steps))
    generator = np.random.default_rng(spec.seed)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(spec.steps), desc=f"train {spec.name}", disable=not progress, mininterval=2.0)
    for step in bar:
        batch = generator.choice(len(images.images), size=min(spec.batch_size, len(images.images)), replace=False)
        conversations = [sample_conversation(generator, images.categories(i), spec.turns, spec.answer_forms) for i in batch]
        inputs = adapter.build_conversations(processor, [images.images[i] for i in batch], conversations)
        if spec.object_word_hint:
            add_object_word_hint(inputs, processor.tokenizer, [[q for q, _ in c] for c in conversations], spec.hint_to_answer)
        inputs.pop("pixel_values")
        features = cached.encoder_outputs(batch)
        if spec.logits_at_labels_only:
            loss = answer_loss(model, inputs, mm_encoder_outputs=features)
        else:
            loss = model(**inputs, mm_encoder_outputs=features).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.3f}")
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return {
        "steps": spec.steps,
        "train_seconds": round(time.time() - started, 1),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "loss_curve": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
    }


def train(spec: ZooSpec, images: TrainingImages, progress: bool = True) -> tuple[Any, Any, Any, dict[str, Any]]:
    """Train one zoo model: stage 1 image features, stage 2 answers."""
    model, processor, adapter = build_untrained(spec)
    vision_log = pretrain_vision(model, processor, adapter, spec, images, progress=progress)
    answer_log = train_answers(model, processor, adapter, spec, images, progress=progress)
    model.eval()
    return model, processor, adapter, vision_log | answer_log


@torch.no_grad()
def answer(model, processor, adapter, images: list, questions: list[str], max_new_tokens: int = 6) -> list[str]:
    """Greedy answers (decoded text of the new tokens) for a batch."""
    inputs = adapter.build_inputs(processor, images, questions)
    output = model.generate(**adapter.model_inputs(inputs), **adapter.generation_kwargs(processor, max_new_tokens))
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate(model, processor, adapter, splits: dict[str, Any], batch_size: int = 64, progress: bool = True,
             desc: str = "eval") -> dict[str, dict[str, Any]]:
    """POPE metrics of greedy answers, per split.

    POPE's settings share their images and their positive questions, so each distinct
    (image, question) pair is answered once and its answer scored in every split that asks it.
    """
    from vrp_utils.data.pope import parse_answer, pope_metrics

    keys = {name: list(zip(split["image_file"], split["question"])) for name, split in splits.items()}
    where: dict[tuple[str, str], tuple[str, int]] = {}
    for name, pairs in keys.items():
        for row, pair in enumerate(pairs):
            where.setdefault(pair, (name, row))
    pairs = list(where)
    answers: dict[tuple[str, str], str] = {}
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress, mininterval=2.0):
        chunk = pairs[start : start + batch_size]
        images = [splits[where[p][0]][where[p][1]]["image"].convert("RGB") for p in chunk]
        texts = answer(model, processor, adapter, images, [question for _, question in chunk])
        answers.update({p: parse_answer(t) for p, t in zip(chunk, texts)})
    return {name: pope_metrics(list(splits[name]["label"]), [answers[p] for p in pairs_of])
            for name, pairs_of in keys.items()}


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def build_one(spec: ZooSpec, out_dir: Path, benchmark_dir: Path, fingerprint: str, progress: bool = True,
              command: str = "vrp_utils.models.zoo.build_zoo()") -> dict[str, Any]:
    """Train, evaluate and save one zoo model (on one CPU thread, so that its bytes do not depend on the machine's
    core count; they do depend on its float kernels, which the card's provenance records)."""
    import os

    from vrp_utils.data.pope import load_benchmark, load_train
    from vrp_utils.provenance import provenance

    torch.set_num_threads(1)
    name = spec.name
    started = time.time()
    train_set = TrainingImages.from_dataset(load_train(benchmark_dir))
    model, processor, adapter, log = train(spec, train_set, progress=progress)
    splits = {setting: load_benchmark(setting, benchmark_dir) for setting in SETTINGS}
    metrics = evaluate(model, processor, adapter, splits, progress=progress, desc=f"eval {name}")
    card = {
        "name": name,
        "fingerprint": fingerprint,
        "model_type": spec.model_type,
        "architecture": type(model).__name__,
        "processor": type(processor).__name__,
        "parameters": count_parameters(model),
        "spec": asdict(spec),
        "training": log | {"images": len(train_set.images), "benchmark": benchmark_fingerprint(benchmark_dir),
                           "build_seconds": round(time.time() - started, 1)},
        "metrics": metrics,
        "host": {"machine": platform.machine(), "python": platform.python_version(), "threads": torch.get_num_threads()},
        # what a retrain on another machine needs to know to explain a difference: training is chaotic, and the
        # CPU's kernel path (ATEN_CPU_CAPABILITY) alone gives other weights from the same code and seed
        "provenance": provenance() | {"command": command, "code": code_fingerprint(),
                                      "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")},
    }
    card = json.loads(json.dumps(card))  # as it reads back from disk (tuples become lists)
    import shutil

    tmp = out_dir / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    write_json_atomic(tmp / "model_card.json", card)
    (tmp / "README.md").write_text(_card_markdown(card))
    target = out_dir / name
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    print(f"{name}: built in {card['training']['build_seconds']:.0f} s; accuracy "
          + ", ".join(f"{s} {m['accuracy']:.3f}" for s, m in metrics.items()), flush=True)
    return card


def build_zoo(
    names: list[str] | None = None,
    out_dir: Path = RETRAIN_DIR,
    benchmark_dir: Path = BENCHMARK_DIR,
    force: bool = False,
    progress: bool = True,
    jobs: int = 1,
    seed_offset: int = 0,
    command: str = "vrp_utils.models.zoo.build_zoo()",
) -> dict[str, Any]:
    """Train (or keep, when the fingerprint matches) each zoo model; write cards and ``zoo.json``.

    Every model trains on one CPU thread, so its weights do not depend on the machine's core count;
    ``jobs`` > 1 trains that many models side by side in worker processes (same weights, tested).
    ``seed_offset`` is added to every model's seed: the recipe's robustness check trains offsets 0, 1, 2.
    Never writes into the released zoo (``zoo/``): a retrain replaces it only through
    ``python -m vrp_utils.models.release publish`` after its band check.
    """
    if Path(out_dir).resolve() == ZOO_DIR.resolve():
        raise ValueError(f"{ZOO_DIR} is the released zoo: retrain elsewhere (default {RETRAIN_DIR}) and publish the retrain "
                         "with `python -m vrp_utils.models.release publish DIR`")
    names = names or list(ZOO)
    unknown = sorted(set(names) - set(ZOO))
    if unknown:
        raise ValueError(f"unknown zoo model(s) {unknown}; the zoo has: {', '.join(ZOO)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cards: dict[str, Any] = {}
    todo: dict[str, str] = {}
    specs = {name: dataclasses.replace(ZOO[name], seed=ZOO[name].seed + seed_offset) for name in names}
    for name in names:
        fingerprint = spec_fingerprint(specs[name], benchmark_dir)
        card_path = out_dir / name / "model_card.json"
        if not force and card_path.is_file():
            card = json.loads(card_path.read_text())
            if card.get("fingerprint") == fingerprint:
                print(f"{name}: up to date (fingerprint {fingerprint})")
                cards[name] = card
                continue
        todo[name] = fingerprint
    if jobs == 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        try:
            for name, fingerprint in todo.items():
                cards[name] = build_one(specs[name], out_dir, benchmark_dir, fingerprint, progress, command)
        finally:
            torch.set_num_threads(threads)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn: a fresh interpreter per worker (forking a process that already ran torch can deadlock)
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {name: pool.submit(build_one, specs[name], out_dir, benchmark_dir, fingerprint, progress, command)
                       for name, fingerprint in todo.items()}
            for name, future in futures.items():
                cards[name] = future.result()
    cards = {name: cards[name] for name in names}
    write_json_atomic(out_dir / "zoo.json", {"models": cards})
    return cards


def _card_markdown(card: dict[str, Any]) -> str:
    lines = [
        f"# {card['name']}",
        "",
        f"A tiny `{card['architecture']}` ({card['parameters']:,} parameters) with its real `{card['processor']}`,",
        "trained from scratch by `python -m vrp_utils.models.zoo build` on the embedded POPE-style benchmark.",
        "It is a stand-in for the paper's 7B checkpoint of the same family, not a useful VLM.",
        "",
        f"- seed {card['spec']['seed']}; stage 1 (vision): {card['training']['vision_steps']} steps of batch "
        f"{card['spec']['vision_batch_size']}, {card['training'].get('vision_seconds', 0)} s; stage 2 (answers): "
        f"{card['training']['steps']} steps of {card['spec']['batch_size']} conversations, {card['training']['train_seconds']} s; "
        f"{card['host']['threads']} CPU threads",
        f"- training data: benchmark manifest {card['training']['benchmark']}, {card['training']['images']} training images",
        "",
        "| setting | accuracy | precision | recall | F1 | yes-ratio |",
        "|---|---|---|---|---|---|",
    ]
    for setting, m in card["metrics"].items():
        lines.append(f"| {setting} | {m['accuracy']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['yes_ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def zoo_table(cards: dict[str, Any]) -> str:
    """Markdown table of the zoo (README and book)."""
    lines = [
        "| model | class | parameters | training: vision + answer steps | training time (1 CPU thread) | setting | accuracy | F1 | yes-ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, card in cards.items():
        training = card["training"]
        for i, setting in enumerate(SETTINGS):
            m = card["metrics"][setting]
            if i == 0:
                steps = f"{training.get('vision_steps', 0)} + {training['steps']}"
                seconds = training.get("vision_seconds", 0) + training["train_seconds"]
                head = f"| {name} | {card['architecture']} | {card['parameters']:,} | {steps} | {seconds / 60:.1f} min |"
            else:
                head = "| | | | | |"
            lines.append(f"{head} {setting} | {m['accuracy']:.3f} | {m['f1']:.3f} | {m['yes_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.models.zoo", description="Train the tiny model zoo.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="retrain the zoo (into data/zoo-retrain; never into the release, zoo/)")
    build.add_argument("names", nargs="*", help=f"subset of: {', '.join(ZOO)}")
    build.add_argument("--force", action="store_true", help="retrain even if up to date")
    build.add_argument("--out", type=Path, default=RETRAIN_DIR, help=f"where to write (default {RETRAIN_DIR})")
    build.add_argument("--jobs", type=int, default=1, help="models trained at once, one thread each (default 1)")
    build.add_argument("--seed-offset", type=int, default=0, help="added to every model's seed (default 0: the release's seeds)")
    sub.add_parser("table", help="print the released zoo's table (markdown)")
    args = parser.parse_args(argv)
    if args.command == "build":
        try:
            build_zoo(args.names or None, out_dir=args.out, force=args.force, jobs=args.jobs, seed_offset=args.seed_offset,
                      command=shlex.join(["python", "-m", "vrp_utils.models.zoo", *sys.argv[1:]]))
        except (ValueError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    else:
        cards = json.loads((ZOO_DIR / "zoo.json").read_text())["models"]
        print(zoo_table(cards))
    return 0


if __name__ == "__main__":
    sys.exit(main())
