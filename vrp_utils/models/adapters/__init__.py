"""Per-family adapters; :func:`adapter_for` picks one from a model config."""

from __future__ import annotations

from transformers import PretrainedConfig

from .base import IGNORE_INDEX, FamilyAdapter
from .llava import LlavaAdapter
from .paligemma import PaliGemmaAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    cls.model_type: cls for cls in (LlavaAdapter, PaliGemmaAdapter, Qwen2VLAdapter)
}


def adapter_for(config: PretrainedConfig) -> FamilyAdapter:
    """The adapter for ``config.model_type``; unknown types get an error listing the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"Unsupported model_type {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](config)


__all__ = [
    "ADAPTERS",
    "IGNORE_INDEX",
    "FamilyAdapter",
    "LlavaAdapter",
    "PaliGemmaAdapter",
    "Qwen2VLAdapter",
    "adapter_for",
]
