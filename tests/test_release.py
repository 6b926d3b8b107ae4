"""The released zoo: every committed file checked against its manifest before use, retrains kept apart and
compared against the zoo's band, publish refusing what is outside it."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import subprocess
import sys

import pytest

from vrp_utils.models import release, zoo
from vrp_utils.paths import REPO_ROOT, ZOO_DIR

BEST = {"random": 0.647, "popular": 0.577, "adversarial": 0.555}


def _card(random: float, popular: float, adversarial: float) -> dict:
    return {"metrics": {"random": {"accuracy": random}, "popular": {"accuracy": popular},
                        "adversarial": {"accuracy": adversarial}}}


@pytest.fixture
def released_copy(tmp_path):
    """A copy of the committed release (weights, processors, cards and manifest)."""
    target = tmp_path / "zoo"
    shutil.copytree(ZOO_DIR, target)
    return target


# ------------------------------------------------------------------------------ the committed release
def test_the_committed_release_matches_its_manifest_and_holds_every_zoo_model():
    manifest = release.check_release(ZOO_DIR)
    assert list(manifest["models"]) == list(zoo.ZOO)
    for name in zoo.ZOO:
        assert f"{name}/model.safetensors" in manifest["files"] and f"{name}/config.json" in manifest["files"]
        provenance = manifest["models"][name]["provenance"]
        assert provenance["cpu_capability"] and provenance["command"] and provenance["versions"]["torch"]
    # the size the README reports is what is on disk
    assert manifest["size_bytes"] == sum((ZOO_DIR / f).stat().st_size for f in manifest["files"])
    # every released file is tracked by git (a release that lived only on one disk would not reach CI)
    tracked = subprocess.run(["git", "ls-files", "zoo"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert {f"zoo/{f}" for f in manifest["files"]} | {"zoo/MANIFEST.json"} <= set(tracked)


@pytest.mark.built
def test_the_committed_release_is_in_the_band():
    """Against the baselines `make book` wrote for this benchmark (recomputing them costs 10 s of the suite)."""
    from vrp_utils.paths import BENCHMARK_DIR, RESULTS_DIR

    baselines = json.loads((RESULTS_DIR / "baselines.json").read_text())
    assert baselines["build_key"] == json.loads((BENCHMARK_DIR / "manifest.json").read_text())["build_key"]
    cards = release.read_cards(ZOO_DIR)
    assert release.band_problems(cards, release.best_baselines(baselines["rows"])) == []


# ------------------------------------------------------------------------------ refusals, by name
def test_a_flipped_byte_in_a_released_weight_file_is_refused_by_name(released_copy):
    weights = released_copy / "zoo-llava" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(release.ReleaseError, match=r"zoo-llava/model\.safetensors: sha256 differs") as error:
        release.check_release(released_copy)
    assert "git checkout -- " in str(error.value)
    # the other models are still usable: a per-model check looks at that model's files only
    release.check_release(released_copy, models=["zoo-paligemma"])
    # and loading refuses before any work, by name or by path
    from vrp_utils.models.loading import load_model

    with pytest.raises(release.ReleaseError, match=r"zoo-llava/model\.safetensors"):
        load_model("zoo-llava", zoo_dir=released_copy)
    with pytest.raises(release.ReleaseError, match=r"zoo-llava/model\.safetensors"):
        load_model(released_copy / "zoo-llava")
    assert load_model("zoo-paligemma", zoo_dir=released_copy).name == "zoo-paligemma"


def test_missing_and_stray_files_and_a_broken_manifest_are_refused_by_name(released_copy):
    (released_copy / "zoo-qwen2-vl" / "tokenizer_config.json").unlink()
    (released_copy / "zoo-paligemma" / "notes.txt").write_text("not released")
    with pytest.raises(release.ReleaseError) as error:
        release.check_release(released_copy)
    message = str(error.value)
    assert "zoo-qwen2-vl/tokenizer_config.json: missing" in message
    assert "zoo-paligemma/notes.txt: not part of the release" in message
    (released_copy / "MANIFEST.json").write_text("{not json")
    with pytest.raises(release.ReleaseError, match="MANIFEST.json is not valid JSON"):
        release.check_release(released_copy)
    (released_copy / "MANIFEST.json").unlink()
    with pytest.raises(release.ReleaseError, match="MANIFEST.json is missing"):
        release.check_release(released_copy)


def test_a_release_from_another_benchmark_is_refused(released_copy, tiny_benchmark):
    with pytest.raises(release.ReleaseError, match="trained and evaluated on benchmark .* the benchmark's code or parameters changed"):
        release.check_release(released_copy, benchmark_dir=tiny_benchmark)


def test_the_check_command_exits_1_naming_the_file(released_copy, tiny_benchmark):
    (released_copy / "zoo-paligemma" / "config.json").write_text("{}")
    done = subprocess.run([sys.executable, "-m", "vrp_utils.models.release", "check", "--release", str(released_copy),
                           "--benchmark", str(tiny_benchmark)], capture_output=True, text=True)
    assert done.returncode == 1 and "zoo-paligemma/config.json: sha256 differs" in done.stderr, done.stderr


# ------------------------------------------------------------------------------ the band
def test_band_problems_on_constructed_cards():
    assert release.band_problems({"a": _card(0.80, 0.78, 0.75)}, BEST) == []
    low = release.band_problems({"a": _card(0.696, 0.648, 0.601)}, BEST)  # a real out-of-band retrain's numbers
    assert low == ["a: random accuracy 0.696 outside 0.70-0.92"]
    assert release.band_problems({"a": _card(0.93, 0.90, 0.85)}, BEST) == ["a: random accuracy 0.930 outside 0.70-0.92"]
    assert release.band_problems({"a": _card(0.80, 0.74, 0.76)}, BEST) == [
        "a: adversarial accuracy 0.760 is not the lowest (random 0.800, popular 0.740)"]
    below = release.band_problems({"a": _card(0.72, 0.577, 0.55)}, BEST)
    assert below == ["a: popular accuracy 0.577 not above the best shortcut baseline (0.577)",
                     "a: adversarial accuracy 0.550 not above the best shortcut baseline (0.555)"]


# ------------------------------------------------------------------------------ retrain, compare, publish
@pytest.fixture(scope="module")
def tiny_retrain(tiny_benchmark, tmp_path_factory):
    """A two-step retrain of all three models on the tiny benchmark (real training code, real cards)."""
    out = tmp_path_factory.mktemp("retrain")
    saved = dict(zoo.ZOO)
    try:
        for name, spec in saved.items():
            zoo.ZOO[name] = dataclasses.replace(spec, steps=2, vision_steps=1, batch_size=2, vision_batch_size=2, warmup_steps=1)
        zoo.build_zoo(out_dir=out, benchmark_dir=tiny_benchmark, progress=False, command="test")
    finally:
        zoo.ZOO.update(saved)
    return out


def _in_band(retrain_dir, tmp_path):
    """The tiny retrain with its cards' accuracies set in the band (publish's mechanics, not training, under test)."""
    target = tmp_path / "in-band"
    shutil.copytree(retrain_dir, target)
    cards = json.loads((target / "zoo.json").read_text())
    for i, card in enumerate(cards["models"].values()):
        card["metrics"] = copy.deepcopy(_card(0.80 + i / 100, 0.78, 0.75)["metrics"])
    (target / "zoo.json").write_text(json.dumps(cards))
    return target


def test_a_retrain_never_writes_into_the_release(tiny_benchmark):
    with pytest.raises(ValueError, match="is the released zoo: retrain elsewhere"):
        zoo.build_zoo(["zoo-llava"], out_dir=ZOO_DIR, benchmark_dir=tiny_benchmark, progress=False)


def test_a_retrain_records_its_provenance(tiny_retrain):
    card = json.loads((tiny_retrain / "zoo-llava" / "model_card.json").read_text())
    provenance = card["provenance"]
    assert provenance["command"] == "test" and provenance["code"] == zoo.code_fingerprint()
    assert provenance["cpu_capability"] in {"DEFAULT", "AVX2", "AVX512"} and provenance["versions"]["torch"].startswith("2.")


def test_publish_refuses_a_retrain_outside_the_band_and_leaves_the_release_alone(tiny_retrain, released_copy):
    before = (released_copy / "MANIFEST.json").read_bytes()
    with pytest.raises(release.ReleaseError, match="not published: outside the zoo's band"):
        release.publish(tiny_retrain, released_copy, best=BEST)
    assert (released_copy / "MANIFEST.json").read_bytes() == before
    release.check_release(released_copy)


def test_publish_replaces_the_release_with_a_checked_one(tiny_retrain, released_copy, tmp_path, tiny_benchmark):
    candidate = _in_band(tiny_retrain, tmp_path)
    manifest = release.publish(candidate, released_copy, best=BEST, command="test publish")
    assert release.check_release(released_copy, benchmark_dir=tiny_benchmark) == manifest
    for name in zoo.ZOO:
        assert (released_copy / name / "model.safetensors").read_bytes() == (candidate / name / "model.safetensors").read_bytes()
        assert manifest["models"][name]["accuracy"]["random"] >= 0.80
    assert not any(p.name.startswith(".zoo.") for p in released_copy.parent.iterdir())  # no staging left behind


def test_compare_prints_both_cards_and_fails_outside_the_band(tiny_retrain, released_copy, tmp_path, tiny_benchmark):
    text, problems = release.compare(tiny_retrain, released_copy, best=BEST)
    assert "| zoo-qwen2-vl | 13 / 13 | random |" in text and problems
    text, problems = release.compare(_in_band(tiny_retrain, tmp_path), released_copy, best=BEST)
    assert problems == []
    done = subprocess.run([sys.executable, "-m", "vrp_utils.models.release", "compare", str(tiny_retrain),
                           "--release", str(released_copy), "--benchmark", str(tiny_benchmark)], capture_output=True, text=True)
    assert done.returncode == 1 and "OUTSIDE the band" in done.stdout, done.stdout + done.stderr


def test_make_book_never_trains():
    """The build reads the release: a dry run of `make book` from nothing names no training command."""
    done = subprocess.run(["make", "-n", "-B", "book", "SKIP_PREREQS=1"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "vrp_utils.models.release check" in done.stdout
    assert "vrp_utils.models.zoo build" not in done.stdout
