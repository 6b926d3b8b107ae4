"""Where and in what precision a model runs: ``--device`` and ``--dtype`` checked, the model placed, the store's
model identity tagged with the dtype.

Why a module of its own: the one-process reader (:mod:`vrp_utils.extract.features`) and the several-process
runner (:mod:`vrp_utils.extract.scale`) both need these, and the runner's CLI needs the reader, so they live
below both (no import circle).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import torch

#: ``--dtype`` names -> torch dtypes.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """``"float32"``, ``"bfloat16"`` or ``"float16"`` -> the torch dtype; anything else is refused by name.

    ``option`` is what the caller calls it in the message (``--dtype`` on the CLI, ``dtype`` in a notebook).
    """
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{option} must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str, option: str = "--device") -> str:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto`` (spread over all GPUs), checked against this machine.

    ``option`` is what the caller calls it in the message (``--device`` on the CLI, ``device`` in a notebook).
    """
    choices = f"{option} must be cpu, cuda, cuda:N, mps or auto, got {name!r}"
    if not isinstance(name, str):
        raise ValueError(choices)
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"{choices} ({error})") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name}: no CUDA device is visible here (torch.cuda.is_available() is False); "
                             f"use {option} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {name}: MPS is not available here; use {option} cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(choices)
    return str(device)


def dtype_fingerprint(weights_fingerprint: str, dtype: torch.dtype) -> str:
    """The model part of a store's identity: the weights' fingerprint, tagged with the dtype unless float32."""
    if dtype == torch.float32:
        return weights_fingerprint
    name = next(key for key, value in DTYPES.items() if value == dtype)
    return f"{weights_fingerprint}-{name}"


class _PlacedAdapter:
    """A family adapter whose model inputs go to the model's first device, floating tensors in its dtype.

    Why: the adapters build CPU float32 tensors (what the zoo needs); a bfloat16 vision tower or a GPU model
    needs its inputs there. Everything else is the wrapped adapter's.
    """

    def __init__(self, base: Any, device: torch.device, dtype: torch.dtype) -> None:
        self._base, self._device, self._dtype = base, device, dtype

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)

    def model_inputs(self, inputs: Any) -> dict[str, torch.Tensor]:
        placed = {}
        for key, value in self._base.model_inputs(inputs).items():
            if isinstance(value, torch.Tensor):
                value = value.to(self._device, self._dtype) if value.is_floating_point() else value.to(self._device)
            placed[key] = value
        return placed


def _logits_to_host(model: torch.nn.Module) -> None:
    """Make ``model.generate`` return its sequences and logits on the CPU (the engine's bookkeeping runs there).

    Only installed for a model that is not on the CPU; the engine indexes the logits with CPU token tensors.
    """
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if getattr(output, "logits", None) is not None:
            output.logits = tuple(step.cpu() for step in output.logits)
        if getattr(output, "sequences", None) is not None:
            output.sequences = output.sequences.cpu()
        return output

    model.generate = generate


def _dispatch_auto(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``device_map="auto"``: split the model over every visible GPU (then CPU memory) with accelerate."""
    from accelerate import dispatch_model, infer_auto_device_map
    from transformers import PreTrainedModel

    keep_whole = sorted({name for module in model.modules() if isinstance(module, PreTrainedModel)
                         for name in (getattr(module, "_no_split_modules", None) or [])})
    device_map = infer_auto_device_map(model, no_split_module_classes=keep_whole, dtype=dtype)
    return dispatch_model(model, device_map=device_map, skip_keys=getattr(model, "_skip_keys_device_placement", None))


def load_placed(model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """:func:`~vrp_utils.models.loading.load_model` on ``device`` in ``dtype``, ready for the engine.

    ``device="auto"`` loads on the CPU first, then dispatches over the GPUs (needs the model once in CPU memory).
    The returned model's fingerprint carries the dtype (:func:`dtype_fingerprint`).
    """
    from vrp_utils.models.loading import load_model

    loaded = load_model(model, "cpu" if device == "auto" else device, dtype)
    if device == "auto":
        loaded = dataclasses.replace(loaded, model=_dispatch_auto(loaded.model, dtype))
    first = loaded.model.get_input_embeddings().weight.device
    if first.type != "cpu" or device == "auto":
        _logits_to_host(loaded.model)
    return dataclasses.replace(loaded, adapter=_PlacedAdapter(loaded.adapter, first, dtype),
                               fingerprint=dtype_fingerprint(loaded.fingerprint, dtype))
