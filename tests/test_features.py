"""Distinct-input features: membership, one extraction per distinct input, open-or-extract, identity."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vrp_utils.data.pope import load_benchmark
from vrp_utils.extract.engine import code_version
from vrp_utils.extract.features import (
    distinct_inputs, open_features, parse_models, parse_settings,
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


def test_cli_builds_and_reports(tiny_model_dir, tiny_data_dir, tmp_path):
    model = str(tiny_model_dir("zoo-paligemma"))
    env = {"VRP_DATA_DIR": str(tiny_data_dir), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "vrp_utils.extract.features", "--models", model, "--settings", "random",
         "--out", str(tmp_path), "--index", str(tmp_path / "index.json")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "24 setting rows" in done.stdout and (tmp_path / "index.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "vrp_utils.extract.features", "--settings", "hard", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "unknown setting" in bad.stderr
