"""The extraction engine end to end, on real tiny random-weight models of every family.

What is checked against an independent reference (the unchanged model, run by the test itself):

- the image positions the engine reads equal ``input_ids == image_token_id`` and the stored grid;
- stored attention rows equal eager attention (``attn_implementation="eager"``, ``output_attentions``)
  from one full forward over prompt + generated tokens, at the query producing each generated token,
  for every layer and head, to float16 precision; NaN after the end token;
- stored hidden states equal ``output_hidden_states`` of a full forward (block outputs; see the
  last-layer note in :mod:`vrp_utils.extract.engine`);
- token log-probabilities, entropy, margin, the yes/no margin and the answer margin equal the full forward's logits;
  the answer equals plain greedy ``generate`` decoded;
- a left-padded batch equals one example at a time; a store built with batch size 4 equals one with 1;
- a run killed with SIGKILL in a subprocess and resumed equals an uninterrupted run;
- a corrupt or missing image becomes a counted error row; settings give distinct stores; the CLI.

Fixtures (tiny benchmark, saved models) are in ``conftest.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vrp_utils.data.pope import load_benchmark, load_pope, parse_answer
from vrp_utils.extract.engine import (
    BatchOutput,
    ExtractionSettings,
    code_version,
    dataset_fingerprint,
    extract,
    run_batch,
    store_settings,
)
from vrp_utils.extract.store import COMPLETE_FILE, FeatureStore, StaleStoreError
from vrp_utils.models.zoo import ZOO

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The tiny models built by ``conftest.py`` (``tiny_loaded(name)``).
ZOO_MODELS = ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")
PAPER_MODELS = ("paper-llava", "paper-paligemma", "paper-qwen2_vl")
#: float16 keeps 11 significant bits (relative error <= 2**-11); the float32 capture itself is ~1e-6 off eager
#: at the first layer, and sdpa's and eager's float32 residual streams drift apart with depth: measured up to
#: 1.2e-3 relative at layer 5 of the 6-layer release (under 1e-3 with 2 layers; the tiny models have 3), so two
#: float16 steps and a half, which holds for a model as deep as the release.
#: Absolute floor 1e-5: a row over ~160 keys holds values near 6e-3, so 1e-5 is a sixth of a percent of one.
ATTENTION_RTOL, ATTENTION_ATOL = 2e-3, 1e-5
#: A row read one position late must differ from the right one by a tenth of the row's largest value.
SHIFT_MARGIN = 0.1
#: float32, two summation orders (cached incremental decoding vs one full forward): measured up to 2e-5
#: on the zoo's configs (their language models start at weight std 0.08, so logits are a few times larger).
FLOAT_TOL = 1e-4
#: Examples of the tiny benchmark's random split used per model (three different images and questions), and
#: the sizes their images are resized to (different aspect ratios: LLaVA crops, PaliGemma squashes, Qwen2-VL
#: gets a different token grid per image, so the batch is ragged).
EXAMPLE_ROWS = (0, 7, 14)
IMAGE_SIZES = ((64, 64), (96, 64), (80, 112))
MAX_NEW_TOKENS = 4
MEASURED: dict[str, float] = {}


def _note(key: str, value: float) -> None:
    MEASURED[key] = max(MEASURED.get(key, 0.0), float(value))


@pytest.fixture(scope="module", autouse=True)
def _print_measured():
    """Print the largest differences measured (visible with ``pytest -s``)."""
    yield
    for key, value in sorted(MEASURED.items()):
        print(f"max |diff| {key}: {value:.3e}")


def _assert_close(actual, expected, rtol: float, atol: float, what: str) -> None:
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    both = np.isfinite(actual) & np.isfinite(expected)
    if both.any():
        _note(what, np.abs(actual[both] - expected[both]).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True, err_msg=what)


# ----------------------------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What the unchanged model gives for one example, computed without the engine."""

    prompt_length: int
    image_positions: torch.Tensor  # from input_ids == image_token_id
    tokens: list[int]  # plain greedy generate (sdpa, no recorder)
    length: int  # answer tokens before the end token
    attention: torch.Tensor  # eager [layers, heads, queries = len(tokens), image tokens]
    attention_shifted: torch.Tensor  # the same rows read one position later (a wrong-position control)
    hidden: torch.Tensor  # raw block outputs [layers, sequence, width] (tie_last_hidden_states=False)
    hidden_tied_last: torch.Tensor  # default hidden_states[-1] [sequence, width]
    logits: torch.Tensor  # [sequence, vocab]


@dataclass
class Case:
    name: str
    loaded: object
    images: list
    questions: list[str]
    settings: ExtractionSettings
    batched: BatchOutput
    singles: list[BatchOutput]
    references: list[Reference]


def _extend(inputs: dict, tokens: list[int]) -> dict:
    """Inputs for one full forward over prompt + generated tokens (generated tokens are text, causal suffix)."""
    new = torch.tensor([tokens], dtype=inputs["input_ids"].dtype)
    full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], new], 1))
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(new)], 1)
    if "token_type_ids" in inputs:  # PaliGemma: prefix 0 (bidirectional), answer 1 (causal)
        full["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(new)], 1)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: generated tokens are text
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(new)], 1)
    return full


def _end_ids(loaded) -> set[int]:
    eos = loaded.adapter.generation_kwargs(loaded.processor, 1)["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def _reference(loaded, eager, image: Image.Image, question: str, max_new_tokens: int) -> Reference:
    model, processor, adapter = loaded.model, loaded.processor, loaded.adapter
    inputs = adapter.model_inputs(adapter.build_inputs(processor, [image], [question]))
    prompt_length = inputs["input_ids"].shape[1]
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    sequences = model.generate(**inputs, **adapter.generation_kwargs(processor, max_new_tokens))
    tokens = sequences[0, prompt_length:].tolist()
    ends = _end_ids(loaded)
    length = next((t for t, tok in enumerate(tokens) if tok in ends), len(tokens))
    full = _extend(inputs, tokens)
    tied = model(**full, output_hidden_states=True)
    text_config = model.get_decoder().config
    previous = getattr(text_config, "tie_last_hidden_states", None)
    text_config.tie_last_hidden_states = False  # ask transformers for the last block's output, not its final norm
    try:
        raw = model(**full, output_hidden_states=True)
    finally:
        text_config.tie_last_hidden_states = previous
    attentions = torch.stack(eager(**full, output_attentions=True).attentions)[:, 0]  # [layers, heads, S, S]
    queries = torch.arange(prompt_length - 1, prompt_length - 1 + len(tokens))
    rows = attentions[:, :, queries]
    return Reference(
        prompt_length=prompt_length,
        image_positions=positions,
        tokens=tokens,
        length=length,
        attention=rows[..., positions],
        attention_shifted=rows[..., positions + 1],
        hidden=torch.stack(raw.hidden_states[1:])[:, 0],
        hidden_tied_last=tied.hidden_states[-1][0],
        logits=tied.logits[0].float(),
    )


def _examples(benchmark: Path) -> tuple[list[Image.Image], list[str], list[str]]:
    dataset = load_benchmark("random", root=benchmark)
    rows = [dataset[i] for i in EXAMPLE_ROWS]
    images = [row["image"].convert("RGB").resize(size) for row, size in zip(rows, IMAGE_SIZES)]
    return images, [row["question"] for row in rows], [row["label"] for row in rows]


def _with_end_token(loaded, images, questions, max_new_tokens: int):
    """The same model with its end token redefined as a word it generates, so some answers end mid-generation.

    Random weights rarely emit the family's end token; redefining it (a real tokenizer change, on a copy) makes
    the engine meet an end token while other examples of the batch still run. Prefer a word first generated
    after step 0 (the answer is then non-empty); else the first word of example 0, if another example starts
    differently (its answer is empty: no token is fed back).
    """
    adapter = loaded.adapter
    processor = copy.deepcopy(loaded.processor)
    tokenizer = processor.tokenizer
    excluded = set(tokenizer.all_special_ids).union(*adapter.yes_no_token_ids(tokenizer))
    generated = []
    for image, question in zip(images, questions):
        inputs = adapter.model_inputs(adapter.build_inputs(processor, [image], [question]))
        with torch.no_grad():
            out = loaded.model.generate(**inputs, **adapter.generation_kwargs(processor, max_new_tokens))
        generated.append(out[0, inputs["input_ids"].shape[1] :].tolist())
    candidates = [
        tokens[step]
        for tokens in generated
        for step in range(1, min(len(tokens), max_new_tokens - 1))
        if tokens[step] not in tokens[:step] and tokens[step] not in excluded
    ]
    if not candidates and generated[0][0] not in excluded and any(t[0] != generated[0][0] for t in generated):
        candidates = [generated[0][0]]
    if not candidates:
        raise AssertionError(f"{loaded.name}: no generated word to use as end token ({generated}); change the seeds")
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(candidates[0])
    assert tokenizer.eos_token_id == candidates[0]
    return dataclasses.replace(loaded, processor=processor)


#: ``+end``: end token redefined (see ``_with_end_token``): zoo-llava's first example ends at step 0 (empty answer),
#: zoo-qwen2-vl's at step 1, the others run on. paper-qwen2_vl emits its real end token at step 1.
CASES = [*ZOO_MODELS, *PAPER_MODELS, "zoo-llava+end", "zoo-qwen2-vl+end"]
_EAGER: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module", params=CASES)
def case(request, tiny_loaded, tiny_benchmark) -> Case:
    name = request.param
    loaded = tiny_loaded(name.removesuffix("+end"))
    images, questions, _ = _examples(tiny_benchmark)
    max_new_tokens = MAX_NEW_TOKENS + 1 if name.endswith("+end") else MAX_NEW_TOKENS
    if name.endswith("+end"):
        loaded = _with_end_token(loaded, images, questions, max_new_tokens)
    settings = ExtractionSettings(max_new_tokens=max_new_tokens, batch_size=len(images))
    if loaded.path not in _EAGER:
        _EAGER.clear()
        _EAGER[loaded.path] = loaded.adapter.model_class.from_pretrained(
            loaded.path, attn_implementation="eager", local_files_only=True
        ).eval()
    eager = _EAGER[loaded.path]
    batched = run_batch(loaded, images, questions, settings)
    singles = [run_batch(loaded, [image], [question], settings) for image, question in zip(images, questions)]
    references = [_reference(loaded, eager, image, question, max_new_tokens) for image, question in zip(images, questions)]
    return Case(name, loaded, images, questions, settings, batched, singles, references)


def _outputs(case: Case):
    """(label, record, arrays, reference) for every example, from the batch and from one-at-a-time runs."""
    for i, ref in enumerate(case.references):
        yield f"{case.name} ex{i} batched", case.batched.records[i], case.batched.arrays[i], ref
        yield f"{case.name} ex{i} alone", case.singles[i].records[0], case.singles[i].arrays[0], ref


# ----------------------------------------------------------------------------------------- model-level tests
def test_image_positions_from_input_ids(case: Case):
    adapter, processor = case.loaded.adapter, case.loaded.processor
    batch = adapter.build_inputs(processor, case.images, case.questions)
    image_token_id = case.loaded.model.config.image_token_id
    assert processor.image_token_id == image_token_id == adapter.image_token_id
    counts = []
    for i, ref in enumerate(case.references):
        in_batch = (batch["input_ids"][i] == image_token_id).nonzero().flatten()
        assert torch.equal(adapter.image_token_positions(batch["input_ids"][i]), in_batch)
        # Left padding shifts the positions, not their spacing.
        assert torch.equal(in_batch - in_batch[0], ref.image_positions - ref.image_positions[0])
        counts.append(len(ref.image_positions))
    for label, record, arrays, ref in _outputs(case):
        n = len(ref.image_positions)
        assert record["grid_rows"] * record["grid_cols"] == n, label
        assert arrays["attention"].shape[-1] == n, label
        # The rows are read at exactly those positions: they match eager there, and not one position later.
        stored = arrays["attention"][:, :, 0].astype(np.float32)
        _assert_close(stored, ref.attention[:, :, 0], ATTENTION_RTOL, ATTENTION_ATOL, f"{case.name} prefill rows vs eager")
        assert np.abs(stored - ref.attention_shifted[:, :, 0].numpy()).max() > SHIFT_MARGIN * stored.max(), label
    spec = ZOO[case.name.split("+")[0]] if case.name.startswith("zoo-") else None  # conftest builds zoo-* from its spec
    side = spec.image_size // spec.patch_size if spec else 0
    expected = {"llava": side * side, "paligemma": side * side}.get(case.loaded.model.config.model_type)
    if case.name.startswith("paper-"):
        expected = {"llava": 576, "paligemma": 256}.get(case.loaded.model.config.model_type)
    if expected is None:  # Qwen2-VL: the grid follows the image size, so the batch is ragged
        assert len(set(counts)) > 1, counts
    else:
        assert counts == [expected] * len(counts)


def test_attention_rows_match_eager_every_step(case: Case):
    n_layers = case.loaded.model.config.get_text_config().num_hidden_layers
    n_heads = case.loaded.model.config.get_text_config().num_attention_heads
    for label, record, arrays, ref in _outputs(case):
        attention = arrays["attention"]
        assert attention.dtype == np.float16
        assert attention.shape == (n_layers, n_heads, case.settings.max_new_tokens, len(ref.image_positions)), label
        steps = min(len(ref.tokens), ref.length + 1)  # answer tokens and the end token, if generated
        _assert_close(
            attention[:, :, :steps].astype(np.float32), ref.attention[:, :, :steps], ATTENTION_RTOL, ATTENTION_ATOL,
            f"{case.name} attention rows (all steps) vs eager",
        )
        assert np.isnan(attention[:, :, steps:]).all(), f"{label}: steps after the end token must be NaN"
        assert not np.isnan(attention[:, :, :steps]).any(), label
    lengths = [ref.length for ref in case.references]
    if case.name.endswith("+end"):  # the end token is met while other examples of the batch run on
        assert min(lengths) < case.settings.max_new_tokens == max(lengths), lengths
    if case.name == "paper-qwen2_vl":  # its real end token, at step 1, for every example
        assert lengths == [1] * len(lengths) and case.batched.arrays[0]["attention"].shape[2] == MAX_NEW_TOKENS


def test_hidden_states_match_output_hidden_states(case: Case):
    decoder = case.loaded.model.get_decoder()
    for label, record, arrays, ref in _outputs(case):
        last_prompt = ref.prompt_length - 1
        _assert_close(arrays["hidden_last_prompt"], ref.hidden[:, last_prompt], FLOAT_TOL, FLOAT_TOL, f"{case.name} hidden_last_prompt")
        # transformers' own hidden_states[-1] is the final-normed output; the store keeps the block output.
        with torch.no_grad():
            normed = decoder.norm(torch.from_numpy(arrays["hidden_last_prompt"][-1]))
        _assert_close(normed, ref.hidden_tied_last[last_prompt], FLOAT_TOL, FLOAT_TOL, f"{case.name} final norm of last layer")
        assert not np.allclose(arrays["hidden_last_prompt"][-1], ref.hidden_tied_last[last_prompt].numpy(), atol=1e-3)
        fed = min(ref.length, len(ref.tokens) - 1)  # the last generated token is never fed back
        assert record["n_answer_hidden"] == fed, label
        if fed:
            expected = ref.hidden[:, ref.prompt_length : ref.prompt_length + fed].mean(1)
            _assert_close(arrays["hidden_answer_mean"], expected, FLOAT_TOL, FLOAT_TOL, f"{case.name} hidden_answer_mean")
        else:
            assert np.isnan(arrays["hidden_answer_mean"]).all(), label


def test_generation_dynamics_match_full_forward(case: Case):
    tokenizer = case.loaded.processor.tokenizer
    yes, no = case.loaded.adapter.yes_no_token_ids(tokenizer)
    for label, record, arrays, ref in _outputs(case):
        steps = min(len(ref.tokens), ref.length + 1)
        log_probs = torch.log_softmax(ref.logits[ref.prompt_length - 1 : ref.prompt_length - 1 + steps], dim=-1)
        allowed = log_probs.clone()
        allowed[:, case.loaded.model.generation_config.suppress_tokens or []] = -torch.inf
        assert torch.equal(allowed.argmax(-1), torch.tensor(ref.tokens[:steps])), f"{label}: greedy tokens"
        chosen = log_probs.gather(1, torch.tensor(ref.tokens[:steps])[:, None]).squeeze(1)
        top2 = log_probs.topk(2, dim=-1).values
        _assert_close(record["token_logprob"], chosen, FLOAT_TOL, FLOAT_TOL, f"{case.name} token_logprob")
        _assert_close(record["token_entropy"], -(log_probs.exp() * log_probs).sum(-1), FLOAT_TOL, FLOAT_TOL, f"{case.name} token_entropy")
        _assert_close(record["token_margin"], top2[:, 0] - top2[:, 1], FLOAT_TOL, FLOAT_TOL, f"{case.name} token_margin")
        margin = torch.logsumexp(log_probs[0, yes], 0) - torch.logsumexp(log_probs[0, no], 0)
        _assert_close(record["yes_no_margin"], margin, FLOAT_TOL, FLOAT_TOL, f"{case.name} yes_no_margin")
        _assert_close(record["answer_margin"], top2[0, 0] - top2[0, 1], FLOAT_TOL, FLOAT_TOL, f"{case.name} answer_margin")
        answer = tokenizer.decode(ref.tokens[: ref.length], skip_special_tokens=True)
        assert record["answer"] == answer, label
        assert record["answer_length"] == ref.length, label
        assert record["parsed"] == parse_answer(answer, rule=case.settings.answer_rule), label


def test_left_padded_batch_equals_one_at_a_time(case: Case):
    float_fields = ("yes_no_margin", "answer_margin", "token_logprob", "token_entropy", "token_margin")
    for i, single in enumerate(case.singles):
        batched, alone = case.batched.records[i], single.records[0]
        assert set(batched) == set(alone)
        for key in batched:
            if key in float_fields:
                _assert_close(batched[key], alone[key], FLOAT_TOL, FLOAT_TOL, f"{case.name} batch vs alone {key}")
            else:
                assert batched[key] == alone[key], f"{case.name} ex{i} {key}"
        for name, array in case.batched.arrays[i].items():
            rtol, atol = (ATTENTION_RTOL, ATTENTION_ATOL) if name == "attention" else (FLOAT_TOL, FLOAT_TOL)
            _assert_close(array, single.arrays[0][name], rtol, atol, f"{case.name} batch vs alone {name}")
    if any(len(r.image_positions) != len(case.references[0].image_positions) for r in case.references):
        assert case.loaded.model.config.model_type == "qwen2_vl"  # the ragged batch was exercised


# ----------------------------------------------------------------------------------------- store-level tests
def _compare_stores(a: FeatureStore, b: FeatureStore, exact: bool) -> None:
    """Same table and arrays; ``exact``: bit for bit, else floats to FLOAT_TOL (attention to float16)."""
    ta, tb = a.table(include_errors=True), b.table(include_errors=True)
    assert list(ta.columns) == list(tb.columns)
    assert ta["id"].tolist() == tb["id"].tolist() == a.expected_ids
    if exact:  # every final file, byte for byte (complete.json records their sha256)
        digests = [json.loads((store.path / COMPLETE_FILE).read_text())["sha256"] for store in (a, b)]
        assert digests[0] == digests[1]
    for column in ta.columns:
        plain = lambda values: [v.tolist() if isinstance(v, np.ndarray) else v for v in values]  # noqa: E731
        left, right = plain(ta[column]), plain(tb[column])
        if exact or column not in ("yes_no_margin", "answer_margin", "token_logprob", "token_entropy", "token_margin"):
            assert left == right, column
        else:
            for x, y in zip(left, right):
                _assert_close(x, y, FLOAT_TOL, FLOAT_TOL, f"store {column}")
    assert a.array_names == b.array_names
    for name in a.array_names:
        x, y = np.asarray(a.array(name)), np.asarray(b.array(name))
        if exact:
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name
        else:
            rtol, atol = (ATTENTION_RTOL, ATTENTION_ATOL) if name == "attention" else (FLOAT_TOL, FLOAT_TOL)
            _assert_close(x, y, rtol, atol, f"store {name}")


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_store_batch_size_4_equals_1(name, tiny_loaded, tiny_benchmark, tmp_path):
    loaded = tiny_loaded(name)
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(8))
    one = extract(loaded, dataset, ExtractionSettings(max_new_tokens=3, batch_size=1), root=tmp_path, progress=False)
    four = extract(loaded, dataset, ExtractionSettings(max_new_tokens=3, batch_size=4), root=tmp_path, progress=False)
    assert one.path != four.path
    assert four.summary() == one.summary() == {
        "n_expected": 8, "n_ok": 8, "n_error": 0, "error_reasons": {}, "complete": True
    }
    _compare_stores(four, one, exact=False)
    table = four.table()
    assert table["id"].tolist() == [f"random:{q}" for q in dataset["question_id"]]
    assert (table["correct"] == (table["parsed"] == table["label"])).all()
    assert table["label"].tolist() == dataset["label"]
    assert (table["grid_rows"] * table["grid_cols"] == table["n_image_tokens"]).all()
    assert (four.image_token_counts() == table["n_image_tokens"]).all()
    text = loaded.model.config.get_text_config()
    layers, heads, width = text.num_hidden_layers, text.num_attention_heads, text.hidden_size
    assert four.attention().shape == (8, layers, heads, 3, int(table["n_image_tokens"].max()))
    assert four.hidden().shape == four.hidden(kind="answer_mean").shape == (8, layers, width)


def _cli(args: list[str], data_dir: Path, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, VRP_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "vrp_utils.extract", *args],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs,
    )


def test_resume_after_sigkill_equals_uninterrupted_run(tiny_loaded, tiny_model_dir, tiny_data_dir, tmp_path):
    name, limit = "zoo-llava", 12
    model_dir = tiny_model_dir(name)
    killed_root, clean_root = tmp_path / "killed", tmp_path / "clean"
    args = ["--model", str(model_dir), "--split", "random", "--limit", str(limit), "--max-new-tokens", "3",
            "--batch-size", "1", "--out", str(killed_root)]
    process = _cli([*args, "--chunk-size", "2"], tiny_data_dir)
    try:
        deadline = time.monotonic() + 240
        while not list(killed_root.glob("*/chunks/c000000.commit.json")):
            assert process.poll() is None, f"extraction exited early: {process.communicate()}"
            assert time.monotonic() < deadline, "no chunk was committed within 240 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    (store_dir,) = killed_root.iterdir()
    assert not (store_dir / COMPLETE_FILE).exists(), "the run finished before it was killed; nothing was resumed"
    partial = FeatureStore.open(store_dir, allow_partial=True)
    assert 0 < len(partial.table(include_errors=True)) < limit

    # Resume (here, in-process) with another chunk size: not part of the store identity, so the same store goes on.
    dataset = load_benchmark("random", root=tiny_data_dir / "benchmark").select(range(limit))
    settings = ExtractionSettings(max_new_tokens=3, batch_size=1)
    resumed = extract(tiny_loaded(name), dataset, settings, root=killed_root, progress=False, chunk_size=5)
    assert resumed.path == store_dir and not (store_dir / "chunks").exists()
    resumed.verify()
    clean = extract(tiny_loaded(name), dataset, settings, root=clean_root, progress=False)
    assert clean.path.name == store_dir.name
    assert clean.manifest == resumed.manifest
    assert len(set(resumed.table()["id"])) == limit and resumed.summary()["n_ok"] == limit
    _compare_stores(resumed, clean, exact=True)


@pytest.mark.parametrize("batch_size", [4, 1])
def test_bad_examples_become_counted_error_rows(batch_size, tiny_loaded, tiny_benchmark, tmp_path):
    """A corrupt image, a missing image and an out-of-vocabulary question: error rows, whatever the batch size."""
    copy_dir = tmp_path / "benchmark"
    shutil.copytree(tiny_benchmark, copy_dir)
    questions = copy_dir / "pope_random.jsonl"
    with questions.open("a") as handle:  # valid POPE row, but "zebra" is not in the tiny models' vocabulary
        handle.write(json.dumps({"question_id": 999, "image": "eval_000003.png", "text": "Is there a zebra in the image?", "label": "no"}) + "\n")
    # Loaded (and checked) while every image is fine; the engine meets the bad files later.
    dataset = load_pope(questions, copy_dir / "images", boxes=copy_dir / "boxes.jsonl", on_error="raise")
    dataset = dataset.select([*range(13), len(dataset) - 1])  # images 0, 1 (6 questions each), 2 (one), zebra (image 3)
    qids, image_files = dataset["question_id"], dataset["image_file"]  # columns: no image decoding
    corrupt, missing = image_files[0], image_files[12]
    (copy_dir / "images" / corrupt).write_bytes(b"this is not a PNG")
    (copy_dir / "images" / missing).unlink()
    store = extract(tiny_loaded("zoo-paligemma"), dataset, ExtractionSettings(max_new_tokens=2, batch_size=batch_size),
                    root=tmp_path / "store", progress=False)
    summary = store.summary()
    assert (summary["n_expected"], summary["n_ok"], summary["n_error"], summary["complete"]) == (14, 6, 8, True)
    assert sum(summary["error_reasons"].values()) == 8
    full = store.table(include_errors=True)
    assert len(full) == 14 and full["id"].tolist() == store.expected_ids
    errors = full[full["error"].notna()]
    assert errors["question_id"].tolist() == [*qids[:6], qids[12], 999]
    assert errors["image_file"].tolist() == [corrupt] * 6 + [missing, "eval_000003.png"]
    reasons = errors["error"].tolist()
    assert all(f"unreadable image {corrupt}: UnidentifiedImageError" in r for r in reasons[:6])
    assert f"unreadable image {missing}: FileNotFoundError" in reasons[6]
    assert "zebra" in reasons[7] and "outside the tokenizer's vocabulary" in reasons[7]
    assert (errors["array_index"] == -1).all()
    ok = store.table()
    assert ok["error"].isna().all() and ok["image_file"].tolist() == image_files[6:12]
    assert store.attention().shape[0] == store.hidden().shape[0] == 6


def test_settings_change_gives_a_new_store_with_full_manifest(tiny_loaded, tiny_benchmark, tmp_path):
    loaded = tiny_loaded("zoo-qwen2-vl")
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(3))
    base = ExtractionSettings(max_new_tokens=2, batch_size=3)
    store = extract(loaded, dataset, base, root=tmp_path, progress=False)
    expected = {
        "model": loaded.name,
        "model_fingerprint": loaded.fingerprint,
        "model_type": "qwen2_vl",
        "dataset_fingerprint": dataset_fingerprint(dataset),
        "settings": store_settings(base),  # a greedy store's identity: no sampling fields
        "code_version": code_version(),
    }
    assert {key: store.manifest[key] for key in expected} == expected
    assert json.loads((store.path / "manifest.json").read_text())["settings"] == store_settings(base)

    other = extract(loaded, dataset, dataclasses.replace(base, max_new_tokens=3), root=tmp_path, progress=False)
    assert other.path != store.path and other.manifest["settings"]["max_new_tokens"] == 3
    no_hidden = extract(loaded, dataset, dataclasses.replace(base, hidden=False), root=tmp_path, progress=False)
    assert no_hidden.path not in (store.path, other.path) and no_hidden.array_names == ["attention"]
    fewer = extract(loaded, dataset.select(range(2)), base, root=tmp_path, progress=False)
    assert fewer.path not in (store.path, other.path, no_hidden.path)
    assert fewer.manifest["dataset_fingerprint"] != expected["dataset_fingerprint"]
    # The same call again returns the finished store without recomputing it.
    table_file = store.path / "table.parquet"
    before = table_file.stat().st_mtime_ns
    again = extract(loaded, dataset, base, root=tmp_path, progress=False)
    assert again.path == store.path and table_file.stat().st_mtime_ns == before
    # A store opened with another identity is refused, never read silently.
    with pytest.raises(StaleStoreError, match="max_new_tokens"):
        FeatureStore.open(store.path, expect={"settings": store_settings(dataclasses.replace(base, max_new_tokens=3))})


def test_cli_extracts_and_rejects_unknown_model(tiny_model_dir, tiny_data_dir, tmp_path):
    model_dir = tiny_model_dir("zoo-paligemma")
    ok = _cli(["--model", str(model_dir), "--split", "random", "--limit", "6", "--max-new-tokens", "2"], tiny_data_dir)
    unknown = _cli(["--model", "no-such-model", "--split", "random", "--limit", "6"], tiny_data_dir)
    out, err = ok.communicate(timeout=240)
    assert ok.returncode == 0, err
    (store_dir,) = (tiny_data_dir / "features").iterdir()  # VRP_DATA_DIR decides the default --out
    assert str(store_dir) in out
    store = FeatureStore.open(store_dir)
    assert store.summary()["n_ok"] == 6 and store.manifest["model"] == "zoo-paligemma"
    table = store.table()
    assert table["setting"].eq("random").all() and len(table) == 6

    out, err = unknown.communicate(timeout=240)
    assert unknown.returncode != 0
    assert "error: Unknown zoo model 'no-such-model'" in err and "Traceback" not in err


def test_a_model_without_capturable_attention_stops_the_run(tiny_model_dir, tiny_benchmark, tmp_path):
    """A systematic capture failure must raise, not turn every example into an error row."""
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.extract.attention import AttentionCaptureError
    from vrp_utils.extract.engine import ExtractionSettings, extract
    from vrp_utils.models.loading import load_model

    loaded = load_model(tiny_model_dir("zoo-llava"))
    loaded.model.get_decoder().config._attn_implementation = "flex_attention"
    with pytest.raises(AttentionCaptureError):
        extract(loaded, load_benchmark("random", tiny_benchmark).select(range(2)),
                ExtractionSettings(max_new_tokens=2, batch_size=2), root=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"answer_rule": "loose"}, "answer_rule must be one of 'pope', 'strict', got 'loose'"),
        ({"answer_rule": "POPE"}, "answer_rule must be one of 'pope', 'strict'"),
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.0}, "batch_size must be an int >= 1, got 2.0"),
        ({"max_new_tokens": "8"}, "max_new_tokens must be an int >= 1, got '8'"),
        ({"max_new_tokens": True}, "max_new_tokens must be an int >= 1, got True"),
        ({"attention": 1}, "attention must be True or False, got 1"),
        ({"hidden": "no"}, "hidden must be True or False, got 'no'"),
    ],
)
def test_invalid_settings_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError) as raised:
        ExtractionSettings(**kwargs)
    assert message in str(raised.value)


def test_answer_rules_are_the_ones_parse_answer_accepts():
    from vrp_utils.extract.engine import answer_rules

    rules = answer_rules()
    assert rules == ("pope", "strict")  # a rule added to parse_answer's signature shows up here
    for rule in rules:
        ExtractionSettings(answer_rule=rule)
        assert parse_answer("Yes.", rule=rule) == "yes"
    with pytest.raises(ValueError, match="rule must be"):
        parse_answer("Yes.", rule="loose")


def test_strict_rule_records_an_unparseable_answer_as_wrong_not_as_an_error_row(tiny_loaded, tiny_benchmark, tmp_path):
    """A random-weight model rarely starts with yes/no: those rows stay, with parsed None and correct False."""
    loaded = tiny_loaded("zoo-llava")
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(6))
    base = ExtractionSettings(max_new_tokens=2, batch_size=3, attention=False, hidden=False)
    strict = extract(loaded, dataset, dataclasses.replace(base, answer_rule="strict"), root=tmp_path, progress=False)
    pope = extract(loaded, dataset, base, root=tmp_path, progress=False)
    assert strict.path != pope.path
    assert strict.summary() == {"n_expected": 6, "n_ok": 6, "n_error": 0, "error_reasons": {}, "complete": True}
    table, pope_table = strict.table(), pope.table()
    assert table["answer"].tolist() == pope_table["answer"].tolist()  # same greedy answers, parsed two ways
    parsed = table["parsed"].tolist()
    assert parsed == [parse_answer(text, rule="strict", on_fail="none") for text in table["answer"]]
    unparsed = [value is None for value in parsed]
    assert any(unparsed), f"every answer starts with yes/no, so the test checks nothing: {table['answer'].tolist()}"
    assert not table.loc[unparsed, "correct"].any()
    assert table["correct"].tolist() == [p is not None and p == label for p, label in zip(parsed, table["label"])]
    assert set(pope_table["parsed"]) <= {"yes", "no"}  # the POPE rule parses every text
