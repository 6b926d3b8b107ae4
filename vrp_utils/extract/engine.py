"""One extraction pass per example: answer, correctness, generation dynamics, attention, hidden states.

Why one pass: every VRP analysis must read the *same* examples with the *same* correctness label,
so the answer, the attention onto the image and the hidden states are recorded together, from one
greedy generation, into a feature store on disk (:mod:`vrp_utils.extract.store`). Analyses never
call the model again, except interventions (masking, sampling), which come back through
:func:`run_batch`.

What is recorded, per example (queries are the positions that *produce* answer tokens: the last
prompt position, then each generated token fed back during greedy decoding):

- ``task`` (the row's, :mod:`vrp_utils.data.tasks`; rows without one are ``presence``), ``answer``,
  ``parsed`` (the answer's class under the task's rule: presence by ``settings.answer_rule``, ``None``
  where the strict rule finds no yes/no; counting the count in digits, ``None`` for a non-count),
  ``correct`` (the task's rule; False where ``parsed`` is ``None``); ``yes_no_margin``: log P(yes-variants)
  - log P(no-variants) at the first answer position; ``answer_margin``: top-1 minus top-2 logit there
  (any task: how decided the first answer token is; on a yes/no question whose top two tokens are
  the yes and the no it is ``|yes_no_margin|``); per generated token ``token_logprob``,
  ``token_entropy`` and ``token_margin`` (top-1 minus top-2 log-probability); ``answer_length``.
- ``attention`` ``[layers, heads, steps, image_tokens]`` float16: softmax rows over *all* keys,
  gathered at the image tokens (found from ``input_ids`` by the family adapter), for step ``t`` =
  the query producing generated token ``t``; steps after the end token are NaN.
- ``hidden_last_prompt`` ``[layers, width]``: each decoder block's output at the last prompt
  position (the one whose output is the first answer token); ``hidden_answer_mean``: mean of each
  block's output over the answer tokens fed back while decoding (``n_answer_hidden`` of them: the
  answer tokens before the end token; without an end token the last generated token is never fed
  back, so one fewer). Never mixed across steps. Layer ``l`` is the raw output of decoder block
  ``l``, so it equals ``model(..., output_hidden_states=True).hidden_states[l + 1]`` for every layer
  but the last: transformers overwrites ``hidden_states[-1]`` with the final-normed
  ``last_hidden_state`` (``tie_last_hidden_states``); the store keeps the last block's output before
  the final norm, like every other layer.
- the image's patch grid and the example's boxes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # plain text bars: tqdm.auto would ask notebooks for ipywidgets

from vrp_utils.data.tasks import DEFAULT_TASK, get_task, task_rules
from vrp_utils.extract.attention import AttentionCaptureError, AttentionRecorder
from vrp_utils.extract.store import DEFAULT_CHUNK_SIZE, FeatureStore, store_path
from vrp_utils.paths import STORE_DIR

#: Bump when what a store contains, or how it is computed, changes.
EXTRACTION_VERSION = "1"


class ExtractionSetupError(Exception):
    """The model or adapter cannot be extracted from at all (not one bad example): stop the run.

    Deliberately not a ValueError/RuntimeError, which mark per-example failures that become
    counted error rows.
    """


#: Failures that stop a run instead of being recorded per example.
_SYSTEMATIC = (AttentionCaptureError, ExtractionSetupError)


def answer_rules() -> tuple[str, ...]:
    """The rules :func:`vrp_utils.data.pope.parse_answer` accepts, read from its ``rule`` annotation."""
    import typing

    from vrp_utils.data.pope import parse_answer

    return typing.get_args(typing.get_type_hints(parse_answer)["rule"])


@dataclass(frozen=True)
class ExtractionSettings:
    """What one pass records and how (part of the store's identity).

    ``answer_rule`` is a rule of :func:`vrp_utils.data.pope.parse_answer` (see :func:`answer_rules`) for
    presence questions (other tasks have one rule each, :mod:`vrp_utils.data.tasks`):
    ``"pope"`` (the official rule: every text parses, to yes or no) or ``"strict"`` (the first word
    must be yes or no). Under ``"strict"`` an answer that does not start with yes/no is recorded, not
    dropped: ``parsed`` is ``None`` and ``correct`` is False (a wrong answer), so it stays in the
    table and in every accuracy; it never becomes an error row (error rows are examples the model
    could not be run on). Invalid settings raise ValueError at construction, naming the valid choices.
    """

    max_new_tokens: int = 8
    batch_size: int = 16
    attention: bool = True
    hidden: bool = True
    answer_rule: str = "pope"
    #: Sampling (off at 0): ``samples`` sampled answers per example beside the greedy one, at ``temperature``
    #: and ``top_p`` (the library's other sampling defaults, e.g. top-k 50, as ``generate`` applies them),
    #: seeded by ``seed``; ``resolve_samples`` extra rows where a first token leaves the parse open
    #: (:mod:`vrp_utils.extract.sampling`). Part of a store's identity only when sampling is on.
    samples: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    resolve_samples: int = 8

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("attention", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        rules = answer_rules()
        if self.answer_rule not in rules:
            raise ValueError(f"answer_rule must be one of {', '.join(map(repr, rules))}, got {self.answer_rule!r}")
        self._check_sampling()

    @property
    def sampling(self) -> bool:
        return self.samples > 0

    def _check_sampling(self) -> None:
        for name in ("samples", "resolve_samples", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (samples: 0 = greedy only, K >= 1 = K samples), got {value!r}")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        if not self.sampling:
            return
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling (samples={self.samples}), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if self.attention or self.hidden:
            raise ValueError("a sampling pass records answers only: set attention=False and hidden=False "
                             "(attention and hidden states come from the greedy pass)")


#: The settings fields that only matter when sampling (left out of a greedy store's identity).
SAMPLING_FIELDS = ("samples", "temperature", "top_p", "seed", "resolve_samples")


#: The code that decides what a store holds: the pass, the capture, the family adapters and the task answer
#: rules (which decide ``correct``: a changed rule must never serve stale labels).
FEATURE_CODE = ("extract/engine.py", "extract/attention.py", "extract/store.py", "extract/sampling.py", "models/adapters/*.py",
                "data/pope.py", "data/counts.py", "data/tasks.py")


def code_version(root: Path = Path(__file__).resolve().parent.parent) -> str:
    """Extraction code identity: the version constant plus a hash of the code that computes features."""
    digest = hashlib.sha256(EXTRACTION_VERSION.encode())
    for path in sorted(path for pattern in FEATURE_CODE for path in root.glob(pattern)):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{EXTRACTION_VERSION}-{digest.hexdigest()[:12]}"


def dataset_fingerprint(dataset) -> str:
    """Content hash of a POPE-style dataset: every row's fields and every image file's bytes."""
    plain = dataset.cast_column("image", dataset.features["image"].__class__(decode=False))
    digest = hashlib.sha256()
    seen: dict[str, str] = {}
    for row in plain:
        image = row["image"]
        key = image.get("path") or ""
        if key not in seen:
            if image.get("bytes") is not None or not key:
                seen[key] = hashlib.sha256(image.get("bytes") or b"").hexdigest()
            elif Path(key).is_file():
                seen[key] = hashlib.sha256(Path(key).read_bytes()).hexdigest()
            else:  # extraction records it as an error row; the fingerprint changes once the file appears
                seen[key] = "missing-file"
        fields = {k: v for k, v in row.items() if k != "image"}
        digest.update(json.dumps(fields, sort_keys=True, default=str).encode())
        digest.update(seen[key].encode())
    return digest.hexdigest()[:16]


def example_id(row: dict[str, Any]) -> str:
    return f"{row.get('setting') or 'custom'}:{row['question_id']}"


@dataclass
class BatchOutput:
    """Everything one greedy pass gave for a batch (numpy, per example)."""

    records: list[dict[str, Any]]
    arrays: list[dict[str, np.ndarray]]


def _decoder_layers(model) -> Sequence[torch.nn.Module]:
    layers = getattr(model.get_decoder(), "layers", None)
    if layers is None:
        raise ExtractionSetupError(f"{type(model).__name__}: language model has no `layers`; cannot read hidden states")
    return layers


@torch.no_grad()
def run_batch(loaded, images: list, questions: list[str], settings: ExtractionSettings,
              tasks: list[str] | None = None) -> BatchOutput:
    """Greedy generation on one batch with attention rows and hidden states recorded (no labels needed).

    ``tasks`` (one per question; None: all presence) decide how each answer is parsed. With
    ``settings.samples`` > 0: the greedy answer and the sampled ones, from one prefill per example
    (:mod:`vrp_utils.extract.sampling`), answers and generation dynamics only.
    """
    tasks = list(tasks) if tasks is not None else [DEFAULT_TASK] * len(questions)
    if len(tasks) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(tasks)} tasks")
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    inputs = adapter.build_inputs(processor, images, questions)
    input_ids = inputs["input_ids"]
    batch, prompt_length = input_ids.shape
    key_positions = [adapter.image_token_positions(input_ids[i]) for i in range(batch)]
    grids = [adapter.patch_grid(inputs, i) for i in range(batch)]
    for i, (positions, grid) in enumerate(zip(key_positions, grids)):
        if len(positions) != grid[0] * grid[1]:
            raise ExtractionSetupError(f"example {i}: {len(positions)} image tokens but a {grid} patch grid (adapter bug)")

    if settings.sampling:
        from vrp_utils.extract.sampling import example_key, sample_batch

        sampled = sample_batch(loaded, inputs, settings, [example_key(img, q) for img, q in zip(images, questions)], tasks)
        generated, logits = sampled.greedy_tokens, sampled.greedy_logits
        generation = adapter.generation_kwargs(processor, settings.max_new_tokens)
        return _records(loaded, images, tasks, settings, generated, logits, generation, grids, key_positions, None, [],
                        sampled)

    hidden_steps: list[list[torch.Tensor]] = []
    hooks = []
    if settings.hidden:
        layers = _decoder_layers(model)

        def hook(index: int):
            def record(module, args, output) -> None:
                states = output[0] if isinstance(output, tuple) else output
                if index == 0:
                    hidden_steps.append([])
                hidden_steps[-1].append(states[:, -1, :].float().cpu())

            return record

        hooks = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        generation = adapter.generation_kwargs(processor, settings.max_new_tokens)
        call = dict(**adapter.model_inputs(inputs), **generation, output_logits=True, return_dict_in_generate=True)
        if settings.attention:
            with AttentionRecorder(model, key_positions) as recorder:
                output = model.generate(**call)
            rows = recorder.rows()  # [B, steps, layers, heads, K]
        else:
            output = model.generate(**call)
            rows = None
    finally:
        for handle in hooks:
            handle.remove()

    generated = output.sequences[:, prompt_length:]
    logits = torch.stack(output.logits, dim=1).float()  # [B, steps, V]
    return _records(loaded, images, tasks, settings, generated, logits, generation, grids, key_positions, rows, hidden_steps)


def _records(loaded, images, tasks, settings, generated, logits, generation, grids, key_positions, rows, hidden_steps,
             sampled=None) -> BatchOutput:
    """Per-example records and arrays from the greedy tokens and raw logits (and the samples, if any)."""
    tokenizer = loaded.processor.tokenizer
    adapter = loaded.adapter
    batch = generated.shape[0]
    log_probs = torch.log_softmax(logits, dim=-1)
    yes_ids, no_ids = adapter.yes_no_token_ids(tokenizer)
    eos = generation["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    records, arrays = [], []
    for i in range(batch):
        tokens = generated[i].tolist()
        length = next((t for t, tok in enumerate(tokens) if tok in eos_ids), len(tokens))
        steps = min(len(tokens), length + 1)  # answer tokens plus the end token, if generated
        chosen = torch.tensor(tokens[:steps])
        lp = log_probs[i, :steps]
        top2 = lp.topk(2, dim=-1).values
        text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
        record: dict[str, Any] = {
            "answer": text,
            # None: the rule reads no class (no yes/no under the strict rule; not a count)
            "parsed": get_task(tasks[i]).normalise(text, settings.answer_rule),
            "answer_length": length,
            "yes_no_margin": float(torch.logsumexp(log_probs[i, 0, yes_ids], 0) - torch.logsumexp(log_probs[i, 0, no_ids], 0)),
            "answer_margin": float(top2[0, 0] - top2[0, 1]),
            "token_logprob": lp.gather(1, chosen[:, None]).squeeze(1).tolist(),
            "token_entropy": (-(lp.exp() * lp).sum(-1)).tolist(),
            "token_margin": (top2[:, 0] - top2[:, 1]).tolist(),
            "grid_rows": grids[i][0],
            "grid_cols": grids[i][1],
            "image_width": images[i].size[0],
            "image_height": images[i].size[1],
        }
        example_arrays: dict[str, np.ndarray] = {}
        if rows is not None:
            k = len(key_positions[i])
            attention = torch.full((rows.shape[2], rows.shape[3], settings.max_new_tokens, k), float("nan"))
            kept = min(steps, rows.shape[1])
            attention[:, :, :kept] = rows[i, :kept, :, :, :k].permute(1, 2, 0, 3)
            example_arrays["attention"] = attention.numpy().astype(np.float16)
        if settings.hidden:
            last_prompt = torch.stack(hidden_steps[0], dim=1)[i]  # [layers, width]
            fed = [torch.stack(step, dim=1)[i] for step in hidden_steps[1 : 1 + length]]
            example_arrays["hidden_last_prompt"] = last_prompt.numpy().astype(np.float32)
            mean = torch.stack(fed).mean(0) if fed else torch.full_like(last_prompt, float("nan"))
            example_arrays["hidden_answer_mean"] = mean.numpy().astype(np.float32)
            record["n_answer_hidden"] = len(fed)
        if sampled is not None:
            record.update(_sample_fields(sampled, i, tokenizer, eos_ids, settings, get_task(tasks[i])))
        records.append(record)
        arrays.append(example_arrays)
    return BatchOutput(records, arrays)


def _sample_fields(sampled, i: int, tokenizer, eos_ids: set[int], settings: ExtractionSettings, task) -> dict[str, Any]:
    """The sampled answers of example ``i``, in their classes under its task's rule, and its first-step nucleus."""
    from vrp_utils.extract.sampling import answer_of

    samples = [answer_of(t, tokenizer, eos_ids) for t in sampled.sample_tokens[i]]
    resolve = [answer_of(t, tokenizer, eos_ids) for t in sampled.resolve_tokens[i]]
    return {
        "sample_answers": samples,
        # a class the rule cannot read (strict-rule None, a non-count) is kept as its own class, written "none"
        "sample_parsed": [task.answer_class(a, settings.answer_rule) for a in samples],
        "sample_first_token": [int(t[0]) for t in sampled.sample_tokens[i]],
        # under POPE's rule for presence, whatever answer_rule says: the exact limit's q is POPE's yes-probability
        "resolve_parsed": [task.answer_class(a, "pope") for a in resolve],
        "resolve_first_token": [int(t[0]) for t in sampled.resolve_tokens[i]],
        "nucleus_ids": [int(t) for t in sampled.nucleus_ids[i]],
        "nucleus_probs": [float(p) for p in sampled.nucleus_probs[i]],
        "nucleus_decision": [d or "open" for d in sampled.nucleus_decisions[i]],
    }


@dataclass(frozen=True)
class Intervention:
    """A change to each example's input before the pass (masked image patches), or to the model
    during it (zeroed hidden dimensions).

    ``identity`` (JSON) names it completely and becomes part of the store's identity, so the
    answers under one intervention are never served for another; ``transform(row, image)``
    returns the image the model sees for dataset row ``row`` (None: the image unchanged);
    ``hooks(model)`` returns a context manager that is entered around the whole pass and must
    leave the model as it found it on exit, error or not (None: no hooks).
    """

    identity: dict[str, Any]
    transform: Any = None
    hooks: Any = None


def store_settings(settings: ExtractionSettings, intervention: Intervention | None = None) -> dict[str, Any]:
    """The settings part of a store's identity: the pass's settings, every task's declared answer rule (which
    judged ``correct``), plus the intervention if any."""
    fields = asdict(settings)
    if not settings.sampling:  # a greedy store's identity has no sampling fields
        for name in SAMPLING_FIELDS:
            fields.pop(name)
    fields["task_rules"] = task_rules()
    if intervention is not None:
        fields["intervention"] = intervention.identity
    return fields


def _store_manifest(loaded, dataset_fp: str, settings: ExtractionSettings, intervention: Intervention | None = None) -> dict[str, Any]:
    return {
        "model": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "model_type": loaded.model.config.model_type,
        "dataset_fingerprint": dataset_fp,
        "settings": store_settings(settings, intervention),
        "code_version": code_version(),
    }


def extract(
    loaded,
    dataset,
    settings: ExtractionSettings = ExtractionSettings(),
    root: Path = STORE_DIR,
    progress: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    intervention: Intervention | None = None,
) -> FeatureStore:
    """Run (or resume) one extraction pass of ``loaded`` over ``dataset``; return the finished store.

    ``chunk_size`` only sets how many examples are committed to disk at a time (what a killed run
    loses); it is not part of the store's identity and does not change the final store.
    ``intervention`` changes every input image first, or hooks the model for the whole pass
    (masking and neuron ablation go back through here, never through a loop of their own).
    """
    dataset_fp = dataset_fingerprint(dataset)
    manifest = _store_manifest(loaded, dataset_fp, settings, intervention)
    path = store_path(root, loaded.fingerprint, dataset_fp, manifest["settings"], manifest["code_version"])
    ids = [example_id(row) for row in dataset.select_columns(["question_id", "setting"])]
    if len(set(ids)) != len(ids):
        raise ValueError("dataset has duplicate (setting, question_id) pairs; example ids must be unique")
    if "task" in dataset.column_names:  # an unknown task is the dataset's fault, not one example's: refuse it whole
        for name in sorted(set(dataset.select_columns(["task"])["task"]) - {None}):
            get_task(name)
    if (path / "complete.json").is_file():
        return FeatureStore.open(path, expect=manifest)
    loaded.model.eval()
    writer = FeatureStore.create_or_resume(path, manifest, ids, chunk_size=chunk_size)
    hooked = intervention.hooks(loaded.model) if intervention is not None and intervention.hooks is not None else nullcontext()
    with writer, hooked:
        done = writer.done_ids()
        todo = [i for i, eid in enumerate(ids) if eid not in done]
        bar = tqdm(total=len(ids), initial=len(ids) - len(todo), unit="ex", desc=f"extract {loaded.name}", disable=not progress)
        for start in range(0, len(todo), settings.batch_size):
            indices = todo[start : start + settings.batch_size]
            _extract_indices(loaded, dataset, indices, ids, settings, writer, intervention)
            bar.update(len(indices))
        bar.close()
        return writer.finalize()


def _row_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "question_id": row["question_id"],
        "setting": row.get("setting") or "custom",
        "image_file": row["image_file"],
        "question": row["question"],
        "object": row.get("object"),
        "task": _task(row),
        "label": row["label"],
        "boxes": json.dumps(row.get("boxes") or []),
    }


def _extract_indices(loaded, dataset, indices: list[int], ids: list[str], settings, writer, intervention=None) -> None:
    """Extract a batch; an example that fails alone (bad image, processor error) becomes an error row."""
    rows, images, good = [], [], []
    for index in indices:
        try:
            row = dataset[index]
        except Exception as error:  # a corrupt or missing image fails when datasets decodes it
            fields = _undecoded_row(dataset, index)
            reason = f"unreadable image {fields.get('image_file')}: {type(error).__name__}: {error}"
            writer.add_error(ids[index], reason, _row_record(fields))
            continue
        try:
            image = row["image"].convert("RGB")
        except Exception as error:
            writer.add_error(ids[index], f"unreadable image {row.get('image_file')}: {type(error).__name__}: {error}", _row_record(row))
            continue
        if intervention is not None and intervention.transform is not None:
            image = intervention.transform(row, image)
        rows.append(row)
        images.append(image)
        good.append(index)
    if not good:
        return
    try:
        output = run_batch(loaded, images, [r["question"] for r in rows], settings, [_task(r) for r in rows])
    except _SYSTEMATIC:
        raise  # e.g. the model cannot give faithful attention rows at all: stop, never record around it
    except (ValueError, RuntimeError):
        # Isolate the example that fails; a lone example fails the same way, so it becomes an error row
        # whatever the batch size.
        for index, row, image in zip(good, rows, images):
            try:
                single = run_batch(loaded, [image], [row["question"]], settings, [_task(row)])
            except _SYSTEMATIC:
                raise
            except (ValueError, RuntimeError) as error:
                writer.add_error(ids[index], f"{type(error).__name__}: {error}", _row_record(row))
                continue
            _add(writer, ids[index], row, single.records[0], single.arrays[0], settings)
        return
    for index, row, record, arrays in zip(good, rows, output.records, output.arrays):
        _add(writer, ids[index], row, record, arrays, settings)


def _undecoded_row(dataset, index: int) -> dict[str, Any]:
    """Row ``index`` without decoding its image (for the error row of an example whose image fails)."""
    return dataset.select_columns([c for c in dataset.column_names if c != "image"])[index]


def _task(row: dict[str, Any]) -> str:
    return row.get("task") or DEFAULT_TASK


def _add(writer, eid: str, row: dict[str, Any], record: dict[str, Any], arrays: dict[str, np.ndarray],
         settings: ExtractionSettings) -> None:
    """Write one OK example, judged by its task's rule (:mod:`vrp_utils.data.tasks`)."""
    full = {"id": eid, **_row_record(row), **record}
    full["correct"] = bool(get_task(_task(row)).correct(record["answer"], row["label"], settings.answer_rule))
    writer.add(full, arrays)


def load_split(split: str):
    """One benchmark setting, or all three concatenated (``"all"``)."""
    import datasets

    from vrp_utils.data.benchmark import SETTINGS
    from vrp_utils.data.pope import load_benchmark

    if split == "all":
        return datasets.concatenate_datasets([load_benchmark(s) for s in SETTINGS])
    return load_benchmark(split)
