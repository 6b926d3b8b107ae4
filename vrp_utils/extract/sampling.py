"""Sampled answers with prefix sharing: one prompt encoding per example, K continuations decoded together.

Why: self-consistency (the paper's K = 10 samples at temperature 0.7, top-p 0.9) costs ten times one
answer when each sample re-reads the image and the prompt (``generate(num_return_sequences=K)``
repeats the prompt K times in its batch). Here each example's image and prompt are encoded once
(the prefill); its key/value cache is then copied to every continuation row, which decode together.

How it stays the same distribution as K independent ``generate(do_sample=True, temperature=T,
top_p=p)`` calls: the decoding runs *inside* ``generate`` as its ``custom_generate`` method, so the
inputs, position ids (Qwen2-VL's M-RoPE included), cache and the logits processors (temperature,
the library's default top-k of 50, top-p, the model's suppressed tokens) are exactly the ones
``generate`` builds; only the token choice differs in how the randomness is drawn: each row
samples from ``softmax(processed scores)`` by the inverse CDF of its own uniforms, drawn from a
generator seeded by (seed, example content, role, row), so a sample does not depend on the batch
it ran in or on K (the first 10 samples of a pool of 20 are the pool of 10).

Rows per example, after one prefill:

- ``greedy``: one row, argmax (the processed scores keep the argmax of the raw ones);
- ``sample``: ``settings.samples`` rows, sampled;
- ``resolve``: ``settings.resolve_samples`` rows, only where the first token's nucleus holds tokens
  that do not decide the answer's class under the example's task rule (:mod:`vrp_utils.data.tasks`;
  presence: the POPE parse, :func:`first_token_decision`; counting: a count or none): their first token
  is drawn from those tokens alone (renormalized), the rest sampled. They estimate the class shares
  given a non-deciding first token (P(yes | ...) for presence) for the exact limit
  (``vrp_utils.analysis.consistency``).

The first step's nucleus (every token with non-zero processed probability, its probability and
text) is recorded exactly: it gives each example's class probabilities (presence: q = P(one sample
parses as yes)).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from vrp_utils.data.pope import NEGATION_WORDS, first_token_decision  # noqa: F401 - re-exported (tests, callers)
from vrp_utils.data.tasks import DEFAULT_TASK, get_task

def row_seed(seed: int, key: str, role: str, index: int) -> int:
    """A 63-bit seed for one continuation row, from what identifies it (never from its batch)."""
    digest = hashlib.sha256(f"{seed}|{key}|{role}|{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def example_key(image, question: str) -> str:
    """A key for an input's samples: a hash of its pixels and question (the same input draws the same samples)."""
    digest = hashlib.sha256(question.encode())
    digest.update(repr(image.size).encode())
    digest.update(image.convert("RGB").tobytes())
    return digest.hexdigest()[:24]


def _uniforms(seed: int, key: str, role: str, index: int, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(row_seed(seed, key, role, index))
    return torch.rand(steps, generator=generator, dtype=torch.float64)


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [rows, V] from uniforms ``u`` [rows] in [0, 1) (float64 cumulative sums)."""
    cumulative = probs.double().cumsum(-1)
    target = (u.double() * cumulative[:, -1]).unsqueeze(1)
    chosen = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    return chosen.clamp_(max=probs.shape[-1] - 1)


@dataclass
class SampledBatch:
    """What one prefix-shared decode gave, per example of the batch."""

    #: [B, steps] greedy tokens (pad after the end) and the raw logits of each greedy step [B, steps, V].
    greedy_tokens: torch.Tensor
    greedy_logits: torch.Tensor
    #: per example: K token lists (sample rows), R token lists (resolve rows; empty where not needed)
    sample_tokens: list[list[list[int]]] = field(default_factory=list)
    resolve_tokens: list[list[list[int]]] = field(default_factory=list)
    #: per example: the first step's nucleus: token ids, probabilities, decisions ("yes"/"no"/None)
    nucleus_ids: list[list[int]] = field(default_factory=list)
    nucleus_probs: list[list[float]] = field(default_factory=list)
    nucleus_decisions: list[list[str | None]] = field(default_factory=list)


class _Decisions:
    """First-token decisions per (task, token id) under each task's rule (:mod:`vrp_utils.data.tasks`), cached
    per tokenizer."""

    def __init__(self, tokenizer: Any, eos_ids: set[int]) -> None:
        self.tokenizer, self.eos_ids, self.cache = tokenizer, eos_ids, {}

    def __call__(self, token: int, task: str = DEFAULT_TASK) -> str | None:
        if (task, token) not in self.cache:
            text = self.tokenizer.decode([token], skip_special_tokens=True)
            self.cache[task, token] = get_task(task).first_token(text, token in self.eos_ids)
        return self.cache[task, token]


def _select_rows(model, model_kwargs: dict[str, Any], index: torch.Tensor, batch: int) -> None:
    """Keep rows ``index`` (with repeats) of everything per-row that decoding reads: the cache, masks and positions."""
    model_kwargs["cache"].batch_select_indices(index)
    for key in ("attention_mask", "token_type_ids", "mm_token_type_ids"):
        value = model_kwargs.get(key)
        if isinstance(value, torch.Tensor) and value.shape[0] == batch:
            model_kwargs[key] = value[index]
    positions = model_kwargs.get("position_ids")
    if isinstance(positions, torch.Tensor):
        model_kwargs["position_ids"] = positions[:, index] if positions.ndim == 3 else positions[index]
    inner = getattr(model, "model", None)
    deltas = getattr(inner, "rope_deltas", None)  # Qwen2-VL keeps its M-RoPE offsets per row on the model
    if isinstance(deltas, torch.Tensor) and deltas.shape[0] == batch:
        inner.rope_deltas = deltas[index]


def sample_batch(loaded, inputs, settings, keys: list[str], tasks: list[str] | None = None) -> SampledBatch:
    """Greedy + ``settings.samples`` sampled (+ resolve) continuations per example, from one prefill each.

    ``tasks`` (one per example; None: all presence) decide which first tokens leave the answer's class open,
    so where resolve rows are drawn.
    """
    tasks = tasks if tasks is not None else [DEFAULT_TASK] * len(keys)
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    tokenizer = processor.tokenizer
    generation = adapter.generation_kwargs(processor, settings.max_new_tokens)
    generation.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p))
    eos = generation["eos_token_id"]
    decisions = _Decisions(tokenizer, set(eos if isinstance(eos, list) else [eos]))
    result: dict[str, Any] = {}

    def decode(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
               streamer=None, **model_kwargs):
        batch, vocab = input_ids.shape[0], None
        pad = generation_config._pad_token_tensor
        outputs = model._prefill(input_ids, generation_config, model_kwargs)
        model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
        raw = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        del outputs
        probs = torch.softmax(logits_processor(input_ids, raw.clone()), dim=-1).double()
        vocab = probs.shape[-1]

        # The rows: (example, role, index within role); the resolve rows only where a non-deciding token has mass.
        rows: list[tuple[int, str, int]] = []
        nucleus_ids, nucleus_probs, nucleus_decisions, undecided = [], [], [], []
        for b in range(batch):
            ids = torch.nonzero(probs[b] > 0).flatten().tolist()
            nucleus_ids.append(ids)
            nucleus_probs.append(probs[b, ids].tolist())
            nucleus_decisions.append([decisions(t, tasks[b]) for t in ids])
            undecided.append([t for t, d in zip(ids, nucleus_decisions[-1]) if d is None])
            rows += [(b, "greedy", 0)] + [(b, "sample", j) for j in range(settings.samples)]
            if undecided[-1]:
                rows += [(b, "resolve", j) for j in range(settings.resolve_samples)]
        n_rows, steps = len(rows), settings.max_new_tokens
        u = torch.stack([_uniforms(settings.seed, keys[b], role, j, steps) for b, role, j in rows])  # [rows, steps]
        greedy = torch.tensor([role == "greedy" for _, role, _ in rows])
        greedy_index = torch.nonzero(greedy).flatten()  # example b's greedy row, in example order

        # Rows that share everything generated so far share one cache row (a "prefix"): the prompt's cache is
        # never copied per sample, and a step runs the model once per distinct prefix (zoo answers: 1-3), not
        # once per row. Each row still draws its own token from its prefix's distribution.
        parent = torch.tensor([r[0] for r in rows])  # each row's prefix (cache row); first the examples themselves
        first = probs[parent].clone()
        for row, (b, role, _) in enumerate(rows):
            if role == "resolve":
                keep = torch.zeros(vocab, dtype=torch.bool)
                keep[undecided[b]] = True
                first[row] = torch.where(keep, first[row], torch.zeros_like(first[row]))
        tokens = torch.where(greedy, first.argmax(-1), inverse_cdf(first, u[:, 0]))
        generated = [tokens]
        greedy_logits = [raw]
        alive = torch.ones(n_rows, dtype=torch.bool)
        prefix_ids, prefixes = input_ids, batch
        for step in range(1, steps + 1):
            live = torch.nonzero(alive).flatten()
            unique, inverse = torch.unique(parent[live] * vocab + tokens[live], return_inverse=True)
            source, token = unique // vocab, unique % vocab
            candidate = torch.cat([prefix_ids[source], token[:, None]], dim=-1)
            done = stopping_criteria(candidate, None)
            alive[live[done[inverse]]] = False
            if not bool(alive.any()):
                break
            kept = torch.nonzero(~done).flatten()
            renumber = torch.full((len(unique),), -1, dtype=torch.long)
            renumber[kept] = torch.arange(len(kept))
            parent = parent.clone()
            parent[live] = renumber[inverse]
            _select_rows(model, model_kwargs, source[kept], prefixes)
            prefix_ids, prefixes = candidate[kept], len(kept)
            model_inputs = model.prepare_inputs_for_generation(prefix_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder=False)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
            del outputs
            step_probs = torch.softmax(logits_processor(prefix_ids, logits.clone()), dim=-1)
            live_parent = parent.clamp(min=0)
            greedy_step = torch.zeros(batch, vocab)
            greedy_alive = alive[greedy_index]
            greedy_step[greedy_alive] = logits[live_parent[greedy_index][greedy_alive]]
            greedy_logits.append(greedy_step)
            drawn = torch.where(greedy, step_probs[live_parent].argmax(-1), inverse_cdf(step_probs[live_parent], u[:, step]))
            filler = pad if pad is not None else drawn.new_tensor(sorted(decisions.eos_ids)[0])
            tokens = torch.where(alive, drawn, filler.to(drawn.dtype))
            generated.append(tokens)
        generated = torch.stack(generated, dim=1)
        result.update(rows=rows, generated=generated, greedy_rows=greedy, greedy_logits=torch.stack(greedy_logits, 1),
                      nucleus_ids=nucleus_ids, nucleus_probs=nucleus_probs, nucleus_decisions=nucleus_decisions)
        return generated

    model.generate(**adapter.model_inputs(inputs), **generation, custom_generate=decode)
    rows, generated = result["rows"], result["generated"]
    out = SampledBatch(generated[result["greedy_rows"]], result["greedy_logits"],
                       nucleus_ids=result["nucleus_ids"], nucleus_probs=result["nucleus_probs"],
                       nucleus_decisions=result["nucleus_decisions"])
    batch = len(keys)
    out.sample_tokens = [[] for _ in range(batch)]
    out.resolve_tokens = [[] for _ in range(batch)]
    for (b, role, _), tokens in zip(rows, generated.tolist()):
        if role == "sample":
            out.sample_tokens[b].append(tokens)
        elif role == "resolve":
            out.resolve_tokens[b].append(tokens)
    return out


def answer_of(tokens: list[int], tokenizer, eos_ids: set[int]) -> str:
    """The answer text of one continuation: its tokens before the first end token."""
    length = next((t for t, tok in enumerate(tokens) if tok in eos_ids), len(tokens))
    return tokenizer.decode(tokens[:length], skip_special_tokens=True)


def parsed_counts(parsed: list[str | None]) -> dict[str, int]:
    """Counts per parse class (``None`` kept as its own class, ``"none"``)."""
    counts: dict[str, int] = {}
    for value in parsed:
        counts[value or "none"] = counts.get(value or "none", 0) + 1
    return counts


