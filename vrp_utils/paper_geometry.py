"""Save a random-weight model with a paper checkpoint's image geometry: ``python -m vrp_utils.paper_geometry``.

Why: the real checkpoints (LLaVA-1.5-7B: 576 image tokens, 32 layers; PaliGemma-3B: 256, 18 layers;
Qwen2-VL-7B: per image, 28 layers) cannot be downloaded here, yet every chapter must run on their token
layout and depth. This saves the exact ``transformers`` class with its real processor class, a tiny width,
the checkpoint's image geometry and its language-model depth (:data:`~vrp_utils.models.families.PAPER_LAYERS`;
``--layers`` overrides it) into a directory that ``load_model`` (and so every notebook's ``models``
parameter) reads::

    .venv/bin/python -m vrp_utils.paper_geometry llava runs/paper-llava
    .venv/bin/python -m vrp_utils.run 01_attention -p models runs/paper-llava -p limit 24

``benchmarks/paper_geometry_check.py`` builds all three and runs every chapter on each.

Its answers are random: it exercises the code path, it says nothing about the paper's models.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

#: Image-placeholder roles a model must never generate (a generated <image> has no image features).
PLACEHOLDER_ROLES = ("image", "video", "vision_start", "vision_end")


def save_paper_geometry_model(family: str, out: Path, seed: int = 0, layers: int | None = None) -> Path:
    """Build and save (model + processor) a random-weight ``family`` model of the paper's geometry.

    ``layers``: the language model's depth; ``None`` is the checkpoint's (:data:`PAPER_LAYERS`).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from vrp_utils.data.benchmark import vocabulary
    from vrp_utils.models.families import build_family, check_model_type, special_token_ids

    model_type = check_model_type(family)
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ValueError(f"layers must be an integer >= 1; got {layers!r}")
    config, processor = build_family(model_type, vocabulary(), geometry="paper", layers=layers)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa")
    roles = special_token_ids(model_type)
    model.generation_config.suppress_tokens = sorted(roles[r] for r in PLACEHOLDER_ROLES if r in roles)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.paper_geometry", description=__doc__.splitlines()[0])
    parser.add_argument("family", help="llava, paligemma or qwen2_vl")
    parser.add_argument("out", type=Path, help="directory to save model + processor into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=None,
                        help="language-model layers (default: the checkpoint's: llava 32, paligemma 18, qwen2_vl 28)")
    args = parser.parse_args(argv)
    try:
        path = save_paper_geometry_model(args.family, args.out, args.seed, args.layers)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from transformers import AutoConfig

    depth = AutoConfig.from_pretrained(path, local_files_only=True).get_text_config().num_hidden_layers
    print(f"saved a random-weight {args.family} model of the paper's geometry ({depth} layers) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
