"""Load any supported VLM (local directory, zoo name or cached hub id) with its processor and adapter.

Everything downstream (training, extraction, analysis) takes a :class:`LoadedModel`
and uses ``loaded.adapter`` for the family-specific parts. The fingerprint
identifies the exact weights, so stored features can be traced to the model
that produced them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, PreTrainedModel, ProcessorMixin

from .. import paths
from .adapters import ADAPTERS, FamilyAdapter, adapter_for

#: "org/name" as on the Hugging Face Hub.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model*.bin.index.json")


@dataclass
class LoadedModel:
    """A model ready for inference, with what is needed to feed and interpret it."""

    model: PreTrainedModel
    processor: ProcessorMixin
    adapter: FamilyAdapter
    name: str
    fingerprint: str
    path: Path


def zoo_names(zoo_dir: str | Path | None = None) -> list[str]:
    """Names of the saved models in the zoo (sub-directories holding a config.json)."""
    zoo = Path(zoo_dir) if zoo_dir is not None else paths.ZOO_DIR
    if not zoo.is_dir():
        return []
    return sorted(p.name for p in zoo.iterdir() if (p / "config.json").is_file())


def resolve_model_dir(
    name_or_path: str | Path, *, zoo_dir: str | Path | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Directory holding the model: an existing directory, ``zoo_dir/name``, or a cached hub snapshot."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if candidate.is_dir():
        return candidate
    zoo = Path(zoo_dir) if zoo_dir is not None else paths.ZOO_DIR
    if "/" not in text and "\\" not in text and not text.startswith(("~", ".")):
        if (zoo / text).is_dir():
            return zoo / text
        available = zoo_names(zoo)
        raise ValueError(
            f"Unknown zoo model {text!r} in {zoo}; available: "
            + (", ".join(available) if available else "(none: the released zoo is committed under zoo/; restore it with "
               "`git checkout -- zoo/`, or pass a directory)")
        )
    if _HUB_ID.fullmatch(text):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
        except LocalEntryNotFoundError as err:
            raise FileNotFoundError(
                f"Weights for {text!r} are not available locally: it is not a directory and not in the local "
                f"Hugging Face cache ({cache_dir or 'default cache; see HF_HOME / HF_HUB_CACHE'}), and this machine "
                f"does not download. Provide them by downloading elsewhere (`hf download {text}`) and copying the "
                "cache folder here (HF_HUB_CACHE), or pass a directory saved with save_pretrained (model + processor)."
            ) from err
    raise FileNotFoundError(f"No model directory at {candidate}")


def check_if_released(model_dir: Path) -> None:
    """Refuse a released zoo model whose files differ from the release manifest (before any work).

    A model folder is released when its parent holds the manifest, or is the released zoo (``paths.ZOO_DIR``),
    whose manifest must then exist.
    """
    from .release import MANIFEST_NAME, check_release

    release = model_dir.parent
    if (release / MANIFEST_NAME).is_file() or release.resolve() == Path(paths.ZOO_DIR).resolve():
        check_release(release, models=[model_dir.name])


def fingerprint_files(model_dir: Path) -> str:
    """Short sha256 over config.json and the weight files (names and bytes, in name order)."""
    files = [model_dir / "config.json"]
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in model_dir.glob(pattern) if p.is_file()})
    if not weights:
        raise FileNotFoundError(f"No weight files (*.safetensors, pytorch_model*.bin) in {model_dir}")
    digest = hashlib.sha256()
    for path in files + weights:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def read_model_type(model_dir: Path) -> str:
    """``model_type`` from config.json, checked against the supported families."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"No config.json in {model_dir}")
    try:
        model_type = json.loads(config_file.read_text())["model_type"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{config_file}: cannot read field 'model_type' ({err})") from err
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{config_file}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return model_type


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    zoo_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Load model, processor and adapter from a directory, a zoo name or a cached hub id (never downloads).

    The processor is checked against the config (token ids, vocabulary, image
    geometry) so a mismatched pair fails here rather than producing wrong
    patch boxes later. The model is returned in eval mode with sdpa attention.
    """
    model_dir = resolve_model_dir(name_or_path, zoo_dir=zoo_dir, cache_dir=cache_dir)
    check_if_released(model_dir)
    read_model_type(model_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    adapter = adapter_for(config)
    fingerprint = fingerprint_files(model_dir)
    try:
        processor = adapter.load_processor(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{model_dir}: cannot load the {adapter.processor_class.__name__} ({err})") from err
    adapter.check_processor(processor)
    model = adapter.model_class.from_pretrained(
        model_dir, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    )
    model.to(device).eval()
    name = model_dir.name if Path(str(name_or_path)).expanduser().is_dir() else str(name_or_path)
    return LoadedModel(
        model=model, processor=processor, adapter=adapter, name=name, fingerprint=fingerprint, path=model_dir
    )
