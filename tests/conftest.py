"""Shared fixtures: a tiny POPE-style benchmark and tiny saved random-weight models of every family.

Why: extraction tests must run the real ``transformers`` classes with their real processors, loaded the
way the book loads them (``load_model(path)`` from a ``save_pretrained`` directory), yet stay cheap on a
CPU. Everything is built once per test session into a temporary data directory laid out like ``data/``
(``<data_dir>/benchmark``), so a subprocess can point ``VRP_DATA_DIR`` at it.

Models (seeded, deterministic):

- ``zoo-llava``, ``zoo-paligemma``, ``zoo-qwen2-vl``: ``build_untrained`` of ``ZOO[name]`` at
  :data:`TINY_ZOO_LAYERS` language-model layers (zoo geometry otherwise: the benchmark's 64 px images resized
  to 96 px, 144 / 144 / 36 image tokens, hidden 128, 4 heads). The release's 6 layers are what the built tests
  read; at 6 here the suite cost 356 CPU-seconds against 292 at 3 (`make test`'s budget is 3 minutes on 2 cores).
- ``paper-llava``, ``paper-paligemma``, ``paper-qwen2_vl``: ``build_family(..., geometry="paper")``
  (the real checkpoints' image geometry: 576 / 256 / per-image image tokens; hidden 32, 1 layer, not the
  checkpoints' depth, which ``test_loading.py`` extracts once).
- ``count-llava``, ``count-paligemma``, ``count-qwen2_vl``: the zoo geometry, 2 layers, with a vocabulary that
  also holds :data:`COUNT_WORDS` (counting questions and their answers, which the zoo's vocabulary lacks).

Every model's language-model query and key projections are scaled by :data:`ATTENTION_SHARPNESS`:
at the random initialisation (std 0.02) attention rows are almost uniform, so a row read at the wrong
position, step or head would still look right; scaled, rows are peaked and such mistakes show.
Each saved ``generation_config`` suppresses the image placeholder tokens (:data:`PLACEHOLDER_ROLES`), as a
trained model never emits them: random weights would, and a generated ``<image>`` makes the reference full
forward over prompt + answer fail (more image tokens than image features).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ZOO_MODELS = ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")
PAPER_MODELS = ("paper-llava", "paper-paligemma", "paper-qwen2_vl")
COUNT_MODELS = ("count-llava", "count-paligemma", "count-qwen2_vl")
ALL_MODELS = ZOO_MODELS + PAPER_MODELS + COUNT_MODELS
#: Words a counting question and its answers need beyond the benchmark's (digits and number words 0-5).
COUNT_WORDS = ("how", "many", "are", "apples", "bananas", "trees", "lamps", "zero", "one", "two", "three", "four",
               "five", "0", "1", "2", "3", "4", "5")
#: Factor on the LM's q/k projection weights (attention logits scale by its square).
ATTENTION_SHARPNESS = 4.0
#: Language-model layers of the tiny zoo-geometry models (the release has 6: the built tests read it; per-layer code
#: is tested on constructed stores of up to 6 layers). Three layers keep a first, a middle and a last one.
TINY_ZOO_LAYERS = 3
PAPER_SEED = 21
#: Special-token roles a model must not generate (image placeholders and their markers).
PLACEHOLDER_ROLES = ("image", "video", "vision_start", "vision_end")


def _sharpen(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            layer.self_attn.q_proj.weight.mul_(ATTENTION_SHARPNESS)
            layer.self_attn.k_proj.weight.mul_(ATTENTION_SHARPNESS)


def build_tiny_model(name: str, directory: Path) -> Path:
    """Build the named tiny random-weight model and save it (model + processor) under ``directory / name``."""
    from transformers import AutoModelForImageTextToText

    from vrp_utils.data.benchmark import vocabulary
    from vrp_utils.models import zoo
    from vrp_utils.models.families import build_family, special_token_ids

    if name in zoo.ZOO:
        model, processor, _ = zoo.build_untrained(dataclasses.replace(zoo.ZOO[name], layers=TINY_ZOO_LAYERS))
    elif name.startswith("paper-"):
        config, processor = build_family(name.removeprefix("paper-"), vocabulary(), geometry="paper", layers=1)
        torch.manual_seed(PAPER_SEED)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    elif name.startswith("count-"):
        config, processor = build_family(name.removeprefix("count-"), [*vocabulary(), *COUNT_WORDS], layers=2)
        torch.manual_seed(PAPER_SEED)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    else:
        raise ValueError(f"unknown tiny model {name!r}; known: {', '.join(ALL_MODELS)}")
    _sharpen(model)
    roles = special_token_ids(model.config.model_type)
    model.generation_config.suppress_tokens = sorted(roles[r] for r in PLACEHOLDER_ROLES if r in roles)
    out = directory / name
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """A data directory (as ``VRP_DATA_DIR``) holding a tiny benchmark: 4 eval images (24 questions per split)."""
    from vrp_utils.data.benchmark import build_benchmark

    root = tmp_path_factory.mktemp("vrp-data")
    build_benchmark(root / "benchmark", n_eval_images=4, n_train_images=2, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_benchmark(tiny_data_dir: Path) -> Path:
    return tiny_data_dir / "benchmark"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_model_dir(name) -> saved model directory``, built on first use and reused for the session."""
    root = tmp_path_factory.mktemp("tiny-models")
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, root)
        return built[name]

    return get


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """``tiny_loaded(name) -> LoadedModel`` through ``load_model(path)``, cached; do not modify what it returns."""
    from vrp_utils.models.loading import load_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_model(tiny_model_dir(name))
        return cache[name]

    return get


@pytest.fixture
def benchmark_script() -> Callable[[str], object]:
    """``benchmark_script("zoo_perception")`` -> that module of ``benchmarks/``, imported from its file."""
    import importlib.util
    import sys

    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
        return module

    return load
