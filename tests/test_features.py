"""Distinct-input features: membership, one extraction per distinct input, open-or-extract, identity."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrp_utils.data.pope import load_benchmark
from vrp_utils.extract.engine import code_version
from vrp_utils.extract.features import (
    check_device_dtype, distinct_inputs, open_features, parse_models, parse_settings,
)

SETTINGS = ("random", "popular", "adversarial")


def test_distinct_inputs_and_membership(tiny_benchmark):
    splits = {s: load_benchmark(s, tiny_benchmark) for s in SETTINGS}
    dataset, membership = distinct_inputs(splits)
    pairs = {s: list(zip(d["image_file"], d["question"])) for s, d in splits.items()}
    expected = list(dict.fromkeys(p for s in SETTINGS for p in pairs[s]))  # first appearance order
    assert list(zip(dataset["image_file"], dataset["question"])) == expected
    assert dataset["question_id"] == list(range(1, len(expected) + 1))
    assert len(membership) == sum(len(d) for d in splits.values())
    # every (setting, row) points at the distinct input with the same image, question and label
    for row in membership.itertuples():
        original = splits[row.setting][row.position]
        twin = dataset[row.distinct_id - 1]
        assert (twin["image_file"], twin["question"], twin["label"]) == (original["image_file"], original["question"], original["label"])
        assert original["question_id"] == row.question_id
    # positives are shared by all three settings in POPE: each appears once
    positives = [p for p, label in zip(pairs["random"], splits["random"]["label"]) if label == "yes"]
    assert all(expected.count(p) == 1 for p in positives)
    assert len(expected) < len(membership)


def test_contradicting_labels_are_refused(tiny_benchmark):
    random = load_benchmark("random", tiny_benchmark)
    flipped = random.map(lambda row: {"label": "no" if row["label"] == "yes" else "yes"})
    with pytest.raises(ValueError, match="labelled"):
        distinct_inputs({"random": random, "flipped": flipped})


def test_bad_settings_and_models_name_the_choices():
    assert parse_settings("all") == SETTINGS
    assert parse_settings("adversarial, random") == ("random", "adversarial")
    with pytest.raises(ValueError, match="random, popular, adversarial"):
        parse_settings("hard")
    assert parse_models(" a, ./b ") == ["a", "./b"]
    with pytest.raises(ValueError, match="no model"):
        parse_models(" , ")


@pytest.mark.parametrize(("name", "expected"), [("zoo-llava", "llava"), ("zoo-paligemma", "paligemma"),
                                              ("zoo-qwen2-vl", "qwen2_vl")])
def test_model_type_reads_the_config_not_the_name(name, expected, tiny_model_dir, tmp_path):
    from vrp_utils.extract.features import model_type

    renamed = tmp_path / "some-model"
    shutil.copytree(tiny_model_dir(name), renamed)
    assert model_type(str(renamed)) == expected
    with pytest.raises(FileNotFoundError, match="No config.json"):
        model_type(str(tmp_path))


def test_open_features_extracts_once_then_reads(tiny_model_dir, tiny_benchmark, tmp_path):
    model = str(tiny_model_dir("zoo-qwen2-vl"))
    first = open_features(model, "all", limit=6, root=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    n_distinct = first.membership["distinct_id"].nunique()
    assert first.store.n_ok + first.store.n_errors == n_distinct
    assert len(first.table) + len(first.errors) == 18
    finished = (first.store.path / "complete.json").stat().st_mtime_ns
    again = open_features(model, "all", limit=6, root=tmp_path, benchmark_dir=tiny_benchmark,
                          extract_missing=False, progress=False)
    assert again.store.path == first.store.path
    assert (again.store.path / "complete.json").stat().st_mtime_ns == finished
    # a setting's rows carry the distinct input's answer and correctness
    table = again.table
    for setting in SETTINGS:
        mine = table[table["setting"] == setting]
        assert len(mine) == 6 - int((again.errors["setting"] == setting).sum())
    shared = table.groupby("distinct_id")["answer"].nunique()
    assert (shared == 1).all()
    distinct = again.distinct
    assert len(distinct) == again.store.n_ok and distinct["array_index"].tolist() == list(range(len(distinct)))
    # another subset of settings is another store
    other = open_features(model, "random", limit=6, root=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    assert other.store.path != first.store.path and other.settings == ("random",)


def test_missing_store_without_extraction_says_how_to_build_it(tiny_model_dir, tiny_benchmark, tmp_path):
    with pytest.raises(FileNotFoundError, match="make features"):
        open_features(str(tiny_model_dir("zoo-llava")), "random", limit=2, root=tmp_path,
                      benchmark_dir=tiny_benchmark, extract_missing=False)


def test_store_identity_covers_the_answer_rule(tmp_path):
    root = Path(__file__).resolve().parents[1] / "vrp_utils"
    copy = tmp_path / "vrp_utils"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_version(copy) == code_version(root)
    pope = copy / "data" / "pope.py"
    pope.write_text(pope.read_text() + "\nNEGATION_WORDS_EXTRA = ('never',)\n")
    assert code_version(copy) != code_version(root)


def test_cli_builds_and_reports(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    model = str(tiny_model_dir("zoo-paligemma"))
    env = {"VRP_DATA_DIR": str(tiny_data_dir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "vrp_utils.extract.features", "--models", model, "--settings", "random",
         "--out", str(tmp_path), "--index", str(tmp_path / "index.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "24 setting rows" in done.stdout and (tmp_path / "index.json").is_file()
    from vrp_utils.extract.features import main

    assert main(["--settings", "hard", "--out", str(tmp_path)]) == 1  # in-process: the CLI's start-up is tested above
    assert "unknown setting" in capsys.readouterr().err


def test_features_build_extracts_the_sample_pool_the_chapter_opens(tiny_model_dir, tiny_benchmark, tmp_path, capsys):
    """`make features --sample-pool` extracts exactly the pool chapter 04 asks for: the chapter then extracts nothing."""
    import json

    from vrp_utils.analysis import consistency
    from vrp_utils.extract import features as F

    model = str(tiny_model_dir("zoo-llava"))
    built = F.build_features([model], ["random"], 1, tmp_path, tiny_benchmark, progress=False,
                             sample_pool={"pool": 3, "temperature": 0.7, "top_p": 0.9, "seed": 0})
    pool = built[0]["sample_pool"]
    assert pool["summary"]["n_ok"] == built[0]["summary"]["n_ok"] and pool["settings"]["pool"] == 3
    features = {"m": open_features(model, "random", root=tmp_path, benchmark_dir=tiny_benchmark, progress=False)}
    assert consistency.missing_pools(features, 3, 0.7, 0.9, 0) == []
    assert consistency.missing_pools(features, 3, 0.8, 0.9, 0) == ["m"]  # another temperature is another pool
    samples = consistency.open_samples(features["m"], 3, 0.7, 0.9, 0, progress=False)
    assert samples.attrs["store"] == Path(pool["store"]).name and samples["sample_parsed"].map(len).eq(3).all()
    with pytest.raises(ValueError):
        F.build_features([model], ["random"], 1, tmp_path, tiny_benchmark, sample_pool={"pool": 3, "temperature": -1.0,
                                                                                         "top_p": 0.9, "seed": 0})
    with pytest.raises(SystemExit):
        F.main(["--models", model, "--settings", "random", "--out", str(tmp_path), "--sample-pool", "-2"])
    assert "--sample-pool must be >= 0" in capsys.readouterr().err
    json.dumps(built)  # the index is JSON


def test_makefile_pool_flags_are_the_self_consistency_chapter_defaults():
    """The pool `make features` builds is the one chapter 04 reads with its default parameters."""
    import re
    import shlex

    from vrp_utils.paths import REPO_ROOT
    from vrp_utils.run import notebook_parameters, read_notebook

    line = next(line for line in (REPO_ROOT / "Makefile").read_text().splitlines() if "vrp_utils.extract.features" in line)
    words = shlex.split(line.strip())
    flags = {words[i]: words[i + 1] for i, w in enumerate(words[:-1]) if re.fullmatch(r"--[a-z-]+", w)}
    defaults = {n: p.default for n, p in notebook_parameters(read_notebook(REPO_ROOT / "notebooks" / "04_self_consistency.md")).items()}
    assert int(flags["--sample-pool"]) == defaults["pool"]
    assert float(flags["--temperature"]) == defaults["temperature"] and float(flags["--top-p"]) == defaults["top_p"]
    assert int(flags["--sample-seed"]) == defaults["seed"]


def test_benchmark_settings_are_read_once_until_their_files_change(tiny_benchmark, tmp_path):
    import shutil

    from vrp_utils.extract.features import benchmark_splits

    root = tmp_path / "bench"
    shutil.copytree(tiny_benchmark, root)
    first = benchmark_splits(["random"], benchmark_dir=root)["random"]
    assert benchmark_splits(["random"], benchmark_dir=root)["random"] is first  # cached: same object
    path = root / "pope_random.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # a rebuilt benchmark: one question fewer
    again = benchmark_splits(["random"], benchmark_dir=root)["random"]
    assert again is not first and len(again) == len(first) - 1


def test_open_features_in_bfloat16_is_another_store_and_the_features_record_it(tiny_model_dir, tiny_benchmark, tmp_path):
    """dtype is part of the store's identity (``<weights>-bfloat16``); device is not; Features carry both."""
    model = str(tiny_model_dir("zoo-qwen2-vl"))
    full = open_features(model, "random", limit=2, root=tmp_path, benchmark_dir=tiny_benchmark, progress=False)
    half = open_features(model, "random", limit=2, root=tmp_path, benchmark_dir=tiny_benchmark, progress=False,
                         device="cpu", dtype="bfloat16")
    assert (full.device, full.dtype) == ("cpu", "float32") and (half.device, half.dtype) == ("cpu", "bfloat16")
    assert half.store.path != full.store.path
    assert half.store.manifest["model_fingerprint"] == full.store.manifest["model_fingerprint"] + "-bfloat16"
    assert half.load().model.dtype == torch.bfloat16
    # read back (not extracted again) with the same dtype, on the device named
    again = open_features(model, "random", limit=2, root=tmp_path, benchmark_dir=tiny_benchmark, extract_missing=False,
                          dtype="bfloat16", device="cpu")
    assert again.store.path == half.store.path


@pytest.mark.parametrize(("keyword", "value", "message"), [
    ("dtype", "float64", "dtype must be one of float32, bfloat16, float16, got 'float64'"),
    ("dtype", "fp16", "dtype must be one of float32, bfloat16, float16, got 'fp16'"),
    ("device", "gpu", "device must be cpu, cuda, cuda:N, mps or auto, got 'gpu'"),
])
def test_a_bad_device_or_dtype_is_refused_by_name_before_any_work(keyword, value, message, tmp_path):
    with pytest.raises(ValueError, match=re.escape(message)):
        open_features("no-such-model", "random", limit=2, root=tmp_path, benchmark_dir=tmp_path / "none", **{keyword: value})
    with pytest.raises(ValueError, match=re.escape(message)):
        check_device_dtype(**{"device": "cpu", "dtype": "float32", keyword: value})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("chapter", ["01_attention", "02_masking", "03_probes", "04_self_consistency", "05_leaderboard"])
def test_every_chapter_checks_device_and_dtype_before_opening_features(chapter):
    """Each chapter runs ``check_device_dtype`` before its first ``open_features`` and passes both on.

    Read from the source, not by running five kernels (about 15 s each): that a failing early check stops a
    chapter before any work is tested once, on a real kernel, in tests/test_probes.py.
    """
    import re

    from vrp_utils.run import notebook_parameters, read_notebook

    path = Path(__file__).resolve().parents[1] / "notebooks" / f"{chapter}.md"
    parameters = notebook_parameters(read_notebook(path))
    assert parameters["device"].default == "cpu" and parameters["dtype"].default == "float32"
    source = path.read_text()
    check = source.find("device, dtype = check_device_dtype(device, dtype)")
    opens = [m.start() for m in re.finditer(r"open_features\(", source) if not source[:m.start()].endswith("import ")]
    calls = [source[i:source.index(")", source.index("open_features(", i) + 14) + 1] for i in opens
             if "def " not in source[max(0, i - 4):i]]
    assert check != -1 and opens and check < min(opens), f"{chapter}: check_device_dtype must run before open_features"
    assert all("device=device" in c and "dtype=dtype" in c for c in calls), calls
