"""Extraction at scale (vrp_utils/extract/scale.py): two accelerate processes give the one-process store.

Real runs only: ``accelerate launch --multi_gpu --num_processes 2`` on the CPU (two gloo ranks), the tiny
random-weight zoo-llava of ``conftest.py``, and a process killed with SIGKILL half-way through its shard.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vrp_utils.data.pope import load_benchmark
from vrp_utils.extract.engine import ExtractionSettings, extract, run_batch
from vrp_utils.extract.scale import (
    ShardMismatchError, check_shards, load_placed, main, merge_shards, parse_device, parse_dtype, plan, shard_dir,
)
from vrp_utils.extract.store import COMPLETE_FILE, FeatureStore

REPO_ROOT = Path(__file__).resolve().parents[1]
LIMIT, MAX_NEW_TOKENS, BATCH = 8, 3, 2
#: Per dtype: (rtol, atol) of the stored rows against eager attention of the same model in the same dtype.
#: float32: the stored float16 keeps 11 bits (rtol 2**-10 with margin); the float32 capture is ~1e-6 off eager.
#: bfloat16: eager rounds its scores and probabilities to 8 bits, the capture scores in float32 from the same
#: bfloat16 query and key: rows differ by bfloat16's resolution (2**-8; measured <= 8.3e-4). With conftest's q/k
#: sharpening (logits x16) one rounding of a logit moves a row by up to 0.37 (the library's own bfloat16 eager
#: is as far from float32), so the bfloat16 case undoes the sharpening.
DTYPE_TOL = {"float32": (1e-3, 1e-6), "bfloat16": (0.0, 3e-3)}


def _args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model_dir), "--split", "random", "--limit", str(LIMIT), "--max-new-tokens",
            str(MAX_NEW_TOKENS), "--batch-size", str(BATCH), "--chunk-size", "1", "--out", str(out), *extra]


def _free_port() -> int:
    """A port free now: accelerate's default (29500) is shared with any other launch on the machine."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _launch(args: list[str], data_dir: Path, script: Path | None = None, **env_vars: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes 2`` of the extraction CLI (or ``script``), one thread each."""
    env = dict(os.environ, VRP_DATA_DIR=str(data_dir), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **env_vars)
    target = [str(script)] if script else ["-m", "vrp_utils.extract"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(_free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", *target, *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tiny_loaded, tiny_model_dir, tiny_data_dir, tmp_path_factory) -> FeatureStore:
    """The one-process store of the same run (in-process, the engine alone)."""
    dataset = load_benchmark("random", root=tiny_data_dir / "benchmark").select(range(LIMIT))
    settings = ExtractionSettings(max_new_tokens=MAX_NEW_TOKENS, batch_size=BATCH)
    return extract(tiny_loaded("zoo-llava"), dataset, settings, root=tmp_path_factory.mktemp("one"), progress=False)


def _assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    """Same directory name (identity), manifest, and every final file byte for byte (complete.json's sha256)."""
    assert store.path.name == reference.path.name
    assert store.manifest == reference.manifest
    digests = [json.loads((s.path / COMPLETE_FILE).read_text())["sha256"] for s in (store, reference)]
    assert digests[0] == digests[1]
    assert store.table(include_errors=True)["id"].tolist() == reference.expected_ids


KILL_RANK_1 = """
import os, signal, sys, time
from pathlib import Path
from vrp_utils.extract import engine, scale

calls = 0
original = engine.run_batch


def run_batch(*args, **kwargs):
    # Rank 1 is killed (SIGKILL) as it starts its second batch, once rank 0 has finished its whole shard.
    global calls
    calls += 1
    if os.environ["RANK"] == "1" and calls == 2:
        deadline = time.monotonic() + 120
        while not list(Path(os.environ["RANK0_SHARDS"]).glob("*/complete.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


engine.run_batch = run_batch
sys.exit(scale.main(sys.argv[1:]))
"""


def test_killed_two_process_launch_resumes_to_the_one_process_store(reference, tiny_model_dir, tiny_data_dir, tmp_path):
    """Rank 1 is killed half-way; the relaunch resumes its shard, keeps rank 0's, and merges the 1-process store."""
    path = tmp_path / reference.path.name
    rank0 = shard_dir(path, 0, 2)
    script = tmp_path / "kill_rank_1.py"
    script.write_text(KILL_RANK_1)
    args = _args(tiny_model_dir("zoo-llava"), tmp_path, "--keep-shards")
    killed = _launch(args, tiny_data_dir, script, RANK0_SHARDS=str(rank0))
    assert killed.returncode != 0 and not (path / COMPLETE_FILE).exists(), killed.stderr[-3000:]
    (finished,) = rank0.glob("*/complete.json")
    finished_stat = finished.stat()
    (rank1,) = [p for p in shard_dir(path, 1, 2).iterdir() if p.is_dir()]
    partial = FeatureStore.open(rank1, allow_partial=True)
    assert not partial.complete and len(partial.table(include_errors=True)) == BATCH  # its first batch survived

    resumed = _launch(args, tiny_data_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_store(FeatureStore.open(path), reference)
    # Rank 0's finished shard was not redone; rank 1 went on from its committed batch: the one bar (the main
    # process's, for the whole run) starts at 4 + 2 examples or later (rank 1 may commit more before the bar's
    # first draw on a loaded machine), never at 0, and no process drew a bar of its own.
    assert finished.stat().st_mtime_ns == finished_stat.st_mtime_ns and finished.stat().st_ino == finished_stat.st_ino
    counts = [(int(done), int(total)) for done, total in re.findall(r"\(2 processes\):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+)", resumed.stderr)]
    assert counts and counts[0][0] >= LIMIT // 2 + BATCH and {total for _, total in counts} == {LIMIT}, resumed.stderr[-2000:]
    assert "extract zoo-llava: " not in resumed.stderr
    assert "merged 2 shards" in resumed.stderr
    # Both ranks wrote a shard: disjoint, together every example in order.
    shards = [FeatureStore.open(next(p for p in shard_dir(path, rank, 2).iterdir() if p.is_dir())) for rank in (0, 1)]
    ids = [shard.expected_ids for shard in shards]
    assert len(ids[0]) == len(ids[1]) == LIMIT // 2 and not set(ids[0]) & set(ids[1])
    assert ids[0] + ids[1] == reference.expected_ids


def _shards(loaded, dataset, root: Path, settings: list[ExtractionSettings], cuts: list[range]) -> list[FeatureStore]:
    return [extract(loaded, dataset.select(cut), s, root=root / f"s{i}", progress=False)
            for i, (s, cut) in enumerate(zip(settings, cuts))]


def test_merge_refuses_shards_of_other_identities_or_overlapping(tiny_loaded, tiny_model_dir, tiny_benchmark, tmp_path):
    loaded = tiny_loaded("zoo-llava")
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(4))
    good = ExtractionSettings(max_new_tokens=2, batch_size=2)
    run = plan(tiny_model_dir("zoo-llava"), dataset, good, tmp_path, torch.float32)
    from vrp_utils.extract.engine import _store_manifest

    manifest = _store_manifest(loaded, run.dataset_fp, good)
    other = ExtractionSettings(max_new_tokens=3, batch_size=2)
    mixed = _shards(loaded, dataset, tmp_path, [good, other], [range(0, 2), range(2, 4)])
    with pytest.raises(ShardMismatchError, match=r"shard 1 .* has another settings: .*max_new_tokens\": 3"):
        merge_shards(mixed, run.path, manifest, run.ids)
    assert not run.path.exists()  # refused before writing anything

    overlapping = _shards(loaded, dataset, tmp_path / "o", [good, good], [range(0, 3), range(2, 4)])
    with pytest.raises(ShardMismatchError, match="already in an earlier shard"):
        check_shards(overlapping, manifest, run.ids)
    with pytest.raises(ShardMismatchError, match="hold 3 of 4 examples"):
        check_shards(overlapping[:1], manifest, run.ids)
    bf16 = _shards(load_placed(tiny_model_dir("zoo-llava"), "cpu", torch.bfloat16), dataset, tmp_path / "b", [good], [range(2, 4)])
    with pytest.raises(ShardMismatchError, match=r"another model_fingerprint: \"[0-9a-f]+-bfloat16\""):
        check_shards(overlapping[:1] + bf16, manifest, run.ids)

    # The right shards merge into the one-process store, bytes and all.
    right = _shards(loaded, dataset, tmp_path / "r", [good, good], [range(0, 2), range(2, 4)])
    merged = merge_shards(right, run.path, manifest, run.ids)
    _assert_same_store(merged, extract(loaded, dataset, good, root=tmp_path / "one", progress=False))


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--dtype", "float64", "--dtype must be one of float32, bfloat16, float16, got 'float64'"),
    ("--device", "banana", "--device must be cpu, cuda, cuda:N, mps or auto, got 'banana'"),
    ("--device", "cuda:7", "--device cuda:7: "),
])
def test_bad_dtype_or_device_is_refused_by_name(flag, value, message, tiny_model_dir, tmp_path, capsys):
    if value.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    model = tiny_model_dir("zoo-llava")
    capsys.readouterr()  # building the session's tiny model (first use) writes its own progress bar
    assert main(["--model", str(model), flag, value, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="must be one of"):
        parse_dtype("fp16")
    assert parse_device("cpu") == "cpu" and parse_device("auto") == "auto"


def _eager_prefill_rows(loaded, image, question: str) -> np.ndarray:
    """Eager attention (same weights, same dtype) of the last prompt position onto the image tokens."""
    eager = loaded.adapter.model_class.from_pretrained(loaded.path, attn_implementation="eager", dtype=loaded.model.dtype)
    eager.load_state_dict(loaded.model.state_dict())
    inputs = loaded.adapter.model_inputs(loaded.adapter.build_inputs(loaded.processor, [image], [question]))
    with torch.no_grad():
        attentions = torch.stack(eager.eval()(**inputs, output_attentions=True).attentions)[:, 0, :, -1].float()
    return attentions[..., loaded.adapter.image_token_positions(inputs["input_ids"][0])].numpy()


@pytest.mark.parametrize("dtype", sorted(DTYPE_TOL))
@pytest.mark.parametrize("name", ["zoo-llava", "zoo-paligemma", "zoo-qwen2-vl"])
def test_stored_rows_match_eager_in_each_dtype(name, dtype, tiny_model_dir, tiny_benchmark):
    loaded = load_placed(tiny_model_dir(name), "cpu", parse_dtype(dtype))
    assert loaded.model.dtype == parse_dtype(dtype)
    if dtype != "float32":  # undo conftest's q/k sharpening: sharp logits make any 8-bit rounding flip rows
        with torch.no_grad():
            for layer in loaded.model.get_decoder().layers:
                layer.self_attn.q_proj.weight.div_(4.0)
                layer.self_attn.k_proj.weight.div_(4.0)
    dataset = load_benchmark("random", root=tiny_benchmark)
    rows = [dataset[i] for i in (0, 7)]
    images, questions = [r["image"].convert("RGB") for r in rows], [r["question"] for r in rows]
    output = run_batch(loaded, images, questions, ExtractionSettings(max_new_tokens=1, batch_size=2))
    rtol, atol = DTYPE_TOL[dtype]
    for i in range(2):
        stored = output.arrays[i]["attention"][:, :, 0].astype(np.float32)
        expected = _eager_prefill_rows(loaded, images[i], questions[i])
        print(f"{name} {dtype} ex{i}: max |stored - eager| = {np.abs(stored - expected).max():.2e}")
        np.testing.assert_allclose(stored, expected, rtol=rtol, atol=atol, err_msg=f"{name} {dtype} example {i}")


def test_bfloat16_store_has_its_own_identity_and_device_auto_gives_the_same_store(tiny_model_dir, tiny_benchmark, tmp_path):
    """``--dtype`` is part of the identity (``open_or_extract(dtype=...)`` reads it back); ``--device auto``
    (accelerate's ``infer_auto_device_map`` + ``dispatch_model``; everything lands on the CPU here) changes nothing."""
    from vrp_utils.extract.features import open_or_extract
    from vrp_utils.extract.scale import extract_distributed

    model = tiny_model_dir("zoo-llava")
    dataset = load_benchmark("random", root=tiny_benchmark).select(range(2))
    settings = ExtractionSettings(max_new_tokens=2, batch_size=2)
    auto = extract_distributed(model, dataset, settings, root=tmp_path / "auto", device="auto", dtype=torch.bfloat16,
                               progress=False)
    assert auto.manifest["model_fingerprint"].endswith("-bfloat16")
    assert auto.attention().dtype == np.float16 and auto.summary()["n_ok"] == 2
    cpu = extract(load_placed(model, "cpu", torch.bfloat16), dataset, settings, root=tmp_path / "cpu", progress=False)
    _assert_same_store(auto, cpu)
    found = open_or_extract(str(model), dataset, settings, root=tmp_path / "cpu", extract_missing=False, dtype="bfloat16")
    assert found.path == cpu.path
    with pytest.raises(FileNotFoundError, match="no finished feature store"):  # the float32 store is another one
        open_or_extract(str(model), dataset, settings, root=tmp_path / "cpu", extract_missing=False)
