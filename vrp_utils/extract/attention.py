"""Capture language-model attention rows onto image tokens without eager attention.

Why: the paper needs, for every LM layer and head, the attention of the query positions that produce the
answer (the last prompt position at prefill, then each generated token) onto every image token. Eager attention
over the whole sequence costs ``layers x heads x N^2`` memory, and with ``sdpa`` ``output_attentions=True``
silently returns nothing. :class:`AttentionRecorder` instead switches only the language model to a capturing
function registered with :class:`transformers.AttentionInterface`: the layer output is computed by the library's
own forward (``sdpa``, or ``eager`` for models that only support it, e.g. Gemma-2 with logit softcapping), so
outputs are unchanged, and the softmax row of the *last* query position of each call is computed from the same
``query``/``key``/mask the library receives (GQA, scaling, softcapping, padding, PaliGemma's bidirectional
prefix, sliding windows and Qwen2-VL's M-RoPE are therefore all already applied). Memory is
``O(layers x heads x N)`` per example.

Usage::

    with AttentionRecorder(model, image_token_positions) as recorder:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rows = recorder.rows()  # [batch, steps, layers, heads, image tokens], float32
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

__all__ = [
    "AttentionCaptureError",
    "AttentionRecorder",
    "CAPTURE_IMPLEMENTATIONS",
    "pad_key_positions",
]


class AttentionCaptureError(RuntimeError):
    """The requested attention rows cannot be captured faithfully (never filled in with made-up values)."""


#: Base implementation -> name of the capturing implementation registered for it. Each name gets the mask
#: function of its base, so the capturing layers receive exactly the mask the base would have received.
CAPTURE_IMPLEMENTATIONS: dict[str, str] = {"sdpa": "vrp_rows_sdpa", "eager": "vrp_rows_eager"}

# id(attention module) -> the recorder currently capturing it.
_ACTIVE: dict[int, AttentionRecorder] = {}


def _module_eager_forward(module: nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The modeling file's own ``eager_attention_forward`` (what ``attn_implementation="eager"`` would run)."""
    forward = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if forward is None:
        raise AttentionCaptureError(
            f"{type(module).__module__} defines no `eager_attention_forward`; cannot run {type(module).__name__} eagerly."
        )
    return forward


def _capturing_forward(base: str) -> Callable[..., tuple[torch.Tensor, None]]:
    def forward(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        recorder = _ACTIVE.get(id(module))
        if recorder is None:
            raise AttentionCaptureError(
                f"{type(module).__name__} (layer_idx={getattr(module, 'layer_idx', None)}) runs the capturing attention "
                f"'{CAPTURE_IMPLEMENTATIONS[base]}' outside an active AttentionRecorder; its config was left switched."
            )
        if base == "sdpa":
            output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        else:
            output, _ = _module_eager_forward(module)(module, query, key, value, attention_mask, **kwargs)
        recorder._record(module, query, key, attention_mask, base=base, **kwargs)
        # The weights are not returned: the eager base would hand back its full [B, H, q, kv] matrix.
        return output, None

    forward.__name__ = f"vrp_rows_{base}_attention_forward"
    forward.__doc__ = f"Layer output from the library's {base} forward, plus the last query row's softmax."
    return forward


for _base, _name in CAPTURE_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _capturing_forward(_base))
    AttentionMaskInterface.register(_name, sdpa_mask if _base == "sdpa" else eager_mask)


def pad_key_positions(
    key_positions: Sequence[torch.Tensor | Sequence[int]],
) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Stack per-example key positions of different lengths into ``(positions [B, K], valid [B, K])``.

    Why: Qwen2-VL's number of image tokens depends on the image size, so a batch has ragged image positions.
    Padded slots hold position 0 and ``valid=False``; their recorded rows are NaN, never a made-up value.
    """
    rows = [torch.as_tensor(p, dtype=torch.long).reshape(-1) for p in key_positions]
    if not rows:
        raise ValueError("key_positions is empty: need one 1-D tensor of positions per example.")
    width = max(len(r) for r in rows)
    if width == 0:
        raise ValueError("every example has zero key positions; nothing to capture.")
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        positions[i, : len(r)] = r
        valid[i, : len(r)] = True
    return positions, valid


def _attention_modules(language_model: nn.Module) -> list[nn.Module]:
    """The self-attention module of each decoder layer, in layer order."""
    layers = getattr(language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise AttentionCaptureError(
            f"{type(language_model).__name__} has no `layers[i].self_attn` decoder stack; cannot locate its attention."
        )
    return [layer.self_attn for layer in layers]


class AttentionRecorder:
    """Context manager recording, per forward call and per LM layer, the last query row's attention onto given keys.

    Why: the answer-producing positions' attention onto image tokens is the paper's main signal, and it must be
    read from the unchanged model (sdpa outputs) at ``O(layers x heads x N)`` memory.

    Args:
        model: a transformers model whose language model (``model.get_decoder()``) routes attention through
            ``AttentionInterface`` and whose current implementation is ``"sdpa"`` or ``"eager"``.
        key_positions: per-example key positions in the model's input sequence (with padding, as fed):
            a ``LongTensor [B, K]`` (then ``key_mask [B, K]`` may mark the valid slots) or a list of 1-D
            tensors/lists of different lengths. Never fixed offsets: image tokens move between examples.
        key_mask: optional ``BoolTensor [B, K]`` of valid slots when ``key_positions`` is a padded tensor.

    Each call of the language model (prefill, then each decode step of ``generate`` with a KV cache) is one
    step; the captured query is the last position of that call. Rows are float32 softmax probabilities over
    *all* keys, gathered at ``key_positions`` (so they do not sum to one over the image tokens).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        key_positions: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
        key_mask: torch.Tensor | None = None,
    ) -> None:
        if isinstance(key_positions, torch.Tensor):
            if key_positions.ndim != 2 or key_positions.dtype not in (torch.int32, torch.int64):
                raise ValueError(
                    f"key_positions must be an integer tensor [batch, keys]; got dtype {key_positions.dtype}, "
                    f"shape {tuple(key_positions.shape)}."
                )
            positions = key_positions.long().cpu()
            if key_mask is None:
                valid = torch.ones_like(positions, dtype=torch.bool)
            else:
                if key_mask.shape != key_positions.shape:
                    raise ValueError(
                        f"key_mask shape {tuple(key_mask.shape)} != key_positions shape {tuple(key_positions.shape)}."
                    )
                valid = key_mask.bool().cpu()
        else:
            if key_mask is not None:
                raise ValueError("key_mask is only for a padded key_positions tensor; a list needs no mask.")
            positions, valid = pad_key_positions(key_positions)
        if positions.shape[1] == 0 or not valid.any(dim=1).all():
            empty = (~valid.any(dim=1)).nonzero().flatten().tolist() if positions.shape[1] else "all"
            raise ValueError(f"examples {empty} have no key positions to capture.")
        if (positions[valid] < 0).any():
            raise ValueError("key_positions must be non-negative indices into the input sequence.")
        positions = positions.masked_fill(~valid, 0)

        self.model = model
        self.key_positions: torch.LongTensor = positions
        self.key_mask: torch.BoolTensor = valid
        self.language_model: nn.Module = model.get_decoder()
        self.attention_modules = _attention_modules(self.language_model)
        self._layer_of = {id(m): i for i, m in enumerate(self.attention_modules)}
        self._steps: list[torch.Tensor] = []
        self._current: dict[int, torch.Tensor] | None = None
        self._kv_length: dict[int, int] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._original: str | None = None
        self._active = False

    # ----------------------------------------------------------------------------------------------- context
    def __enter__(self) -> AttentionRecorder:
        if self._active or self._steps:
            raise AttentionCaptureError("an AttentionRecorder records one sequence once; create a new one.")
        if self.model.training:
            raise AttentionCaptureError("the model is in training mode (dropout); call model.eval() before recording.")
        config = self.language_model.config
        original = config._attn_implementation
        if original not in CAPTURE_IMPLEMENTATIONS:
            raise AttentionCaptureError(
                f"the language model runs attn_implementation={original!r}; capture supports only "
                f"{sorted(CAPTURE_IMPLEMENTATIONS)} (their masks and kernels are reproduced exactly)."
            )
        if any(id(m) in _ACTIVE for m in self.attention_modules):
            raise AttentionCaptureError("another AttentionRecorder is already active on this model.")
        for module in self.attention_modules:
            if getattr(module, "config", None) is not config:  # some attention classes (XGLM's) keep no config
                raise AttentionCaptureError(
                    f"{type(module).__name__} (layer {self._layer_of[id(module)]}) does not share the language "
                    "model's config, so switching the language model's attention would not reach it."
                )

        self._original = original
        target = CAPTURE_IMPLEMENTATIONS[original]
        self.language_model.set_attn_implementation(target)
        if config._attn_implementation != target:
            self.language_model.set_attn_implementation(original)
            raise AttentionCaptureError(
                f"{type(self.language_model).__name__} refused attn_implementation={target!r} (it does not dispatch "
                "through AttentionInterface); rows cannot be captured without eager attention."
            )
        for module in self.attention_modules:
            _ACTIVE[id(module)] = self
        self._hooks = [
            self.language_model.register_forward_pre_hook(self._start_step),
            self.language_model.register_forward_hook(self._end_step),
        ]
        self._active = True
        return self

    def __exit__(self, *exc_info: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module in self.attention_modules:
            _ACTIVE.pop(id(module), None)
        self.language_model.set_attn_implementation(self._original)
        self._current = None
        self._active = False
        if self.language_model.config._attn_implementation != self._original:
            raise AttentionCaptureError(
                f"could not restore attn_implementation={self._original!r} "
                f"(still {self.language_model.config._attn_implementation!r})."
            )

    # ------------------------------------------------------------------------------------------------- steps
    def _start_step(self, module: nn.Module, args: tuple) -> None:
        self._current = {}

    def _end_step(self, module: nn.Module, args: tuple, output: object) -> None:
        current, self._current = self._current, None
        missing = [i for i in range(len(self.attention_modules)) if i not in (current or {})]
        if missing:
            raise AttentionCaptureError(
                f"language-model layers {missing} never called the capturing attention function during step "
                f"{len(self._steps)}; their rows cannot be captured (does this model route attention through "
                "AttentionInterface?)."
            )
        self._steps.append(torch.stack([current[i] for i in range(len(self.attention_modules))], dim=1))

    def _record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        base: str,
        scaling: float | None = None,
        is_causal: bool | None = None,
        softcap: float | None = None,
        **kwargs: Any,
    ) -> None:
        layer = self._layer_of.get(id(module))
        if layer is None or self._current is None:
            raise AttentionCaptureError(
                f"capturing attention called by {type(module).__name__} outside the recorded language model's "
                "forward (e.g. a vision tower switched by mistake)."
            )
        if layer in self._current:
            raise AttentionCaptureError(f"layer {layer} attention ran twice in one language-model call.")
        for unsupported in ("position_bias", "s_aux"):
            if kwargs.get(unsupported) is not None:
                raise AttentionCaptureError(
                    f"{type(module).__name__} passes `{unsupported}`, which the row capture does not reproduce."
                )
        batch, heads, q_length, head_dim = query.shape
        kv_length = key.shape[2]
        if batch != self.key_positions.shape[0]:
            raise AttentionCaptureError(
                f"the model runs a batch of {batch} but key_positions has {self.key_positions.shape[0]} rows "
                "(beam search and num_return_sequences>1 change the batch; use greedy decoding)."
            )
        previous = self._kv_length.get(layer)
        if previous is not None and kv_length != previous + q_length:
            raise AttentionCaptureError(
                f"layer {layer}: the keys grew from {previous} to {kv_length} positions for {q_length} new queries; "
                "key indices no longer equal sequence positions (a sliding-window/static cache, generation with "
                "use_cache=False, or a second sequence in one recorder: use a new recorder per batch)."
            )
        self._kv_length[layer] = kv_length
        if int(self.key_positions.max()) >= kv_length:
            raise AttentionCaptureError(
                f"key position {int(self.key_positions.max())} is beyond the {kv_length} keys of layer {layer}."
            )

        # Scores of the last query against every key, per kv group (no repeat_kv copy): [B, H, kv].
        groups = heads // key.shape[1]
        last_query = query[:, :, -1, :].float().reshape(batch, key.shape[1], groups, head_dim)
        scores = torch.matmul(last_query, key.float().transpose(2, 3)).reshape(batch, heads, kv_length)
        scores = scores * (head_dim**-0.5 if scaling is None else scaling)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap

        own_key_masked = None
        if attention_mask is not None:
            mask_row = attention_mask[:, :, -1, :kv_length]
            if mask_row.dtype == torch.bool:
                scores = scores.masked_fill(~mask_row, float("-inf"))
                own_key_masked = ~mask_row[:, :, -1]
            else:
                scores = scores + mask_row.float()
                own_key_masked = mask_row[:, :, -1] <= torch.finfo(mask_row.dtype).min / 2
        elif base == "sdpa":
            # Mirror sdpa_attention_forward: without a mask it uses is_causal (upper-left aligned, keys beyond
            # the query length cropped), else full attention.
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            if q_length > 1 and causal:
                scores[:, :, q_length:] = float("-inf")
        if own_key_masked is not None and own_key_masked.any():
            bad = own_key_masked.any(dim=1).nonzero().flatten().tolist()
            raise AttentionCaptureError(
                f"layer {layer}: the last position of examples {bad} is padding (right padding?); the captured "
                "query must be a real token, so pad on the left."
            )
        probs = torch.softmax(scores, dim=-1)
        if not torch.isfinite(probs).all():
            raise AttentionCaptureError(f"layer {layer}: the last query row is fully masked for some example.")

        index = self.key_positions.to(probs.device)[:, None, :].expand(batch, heads, -1)
        rows = probs.gather(2, index)
        rows = rows.masked_fill(~self.key_mask.to(probs.device)[:, None, :], float("nan"))
        self._current[layer] = rows.detach()

    # ---------------------------------------------------------------------------------------------- results
    @property
    def num_steps(self) -> int:
        """Forward calls recorded so far (prefill = step 0, then one per decoded token fed back)."""
        return len(self._steps)

    def rows(self) -> torch.Tensor:
        """Recorded rows ``[batch, steps, layers, heads, keys]`` (float32, CPU); NaN where ``key_mask`` is False."""
        if not self._steps:
            raise AttentionCaptureError("no language-model forward call was recorded inside the recorder's context.")
        return torch.stack(self._steps, dim=1).cpu()
