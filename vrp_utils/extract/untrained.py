"""An untrained twin of any supported model: same config and processor, random weights, fixed seed.

Why: a probe that reads correctness off hidden states may only be reading the *input* (which object
is asked, what the image looks like), not anything the model learned. The control is the same probe
on the hidden states of a model of the same architecture that never trained, fed the same inputs
and labelled with the trained model's correctness (:mod:`vrp_utils.analysis.probes`).

:func:`untrained_twin` saves ``from_config(<the model's own config>)`` under the given seed with the
model's processor and generation config, into ``<data>/untrained/<model fingerprint>-seed<k>``, so
``open_or_extract(path, ...)`` extracts it like any saved model. The same model and seed give the
same weights (same bytes); the directory is written once (a temporary directory and a rename).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from vrp_utils import paths


def untrained_dir(model: str | Path, seed: int = 0, root: Path | None = None) -> Path:
    """Where the untrained twin of ``model`` with ``seed`` lives (built or not)."""
    from vrp_utils.models.loading import fingerprint_files, resolve_model_dir

    root = Path(root) if root is not None else paths.DATA_DIR / "untrained"
    return root / f"{fingerprint_files(resolve_model_dir(model))}-seed{int(seed)}"


def untrained_twin(model: str | Path, seed: int = 0, root: Path | None = None) -> Path:
    """Build (once) and return the directory of ``model``'s untrained twin (``seed``: the initialisation)."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from vrp_utils.models.adapters import adapter_for
    from vrp_utils.models.loading import read_model_type, resolve_model_dir

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0; got {seed!r}")
    out = untrained_dir(model, seed, root)
    if (out / "config.json").is_file():
        return out
    model_dir = resolve_model_dir(model)
    read_model_type(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    adapter = adapter_for(config)
    processor = adapter.load_processor(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    twin = adapter.model_class._from_config(config, attn_implementation="sdpa")
    try:
        twin.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    except OSError:
        pass  # no generation_config.json: the library's default
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        twin.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        try:
            tmp.rename(out)
        except OSError:  # built meanwhile by another process: keep theirs
            if not (out / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
