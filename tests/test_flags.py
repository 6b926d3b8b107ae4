"""Weak models flagged wherever their numbers appear (issue 23): the check on a real tiny model card, the caption and
footnote it adds, the pages generated from results, and every chapter calling it (a source test).

The helper is checked on a model card written from a real evaluation of a tiny model on the tiny benchmark; one
chapter (04, about 20 s) runs for real on that model and must show the note under every table; every other
chapter's calls are checked in its source (a full run of each on the tiny build would take minutes).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from vrp_utils import flags, pages, plots
from vrp_utils.paths import REPO_ROOT

SETTINGS = ("random", "popular", "adversarial")
BASELINES = [{"baseline": "always_yes", "setting": s, "accuracy": 0.5} for s in SETTINGS] + [
    {"baseline": "image_stats_per_object", "setting": s, "accuracy": a} for s, a in zip(SETTINGS, (0.647, 0.577, 0.555))]


@pytest.fixture(scope="module")
def carded_tiny_model(tiny_model_dir, tiny_benchmark, tmp_path_factory):
    """A tiny (untrained) model with a ``model_card.json`` whose metrics come from evaluating it on the tiny
    benchmark, as ``make zoo`` writes a card."""
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.models import zoo
    from vrp_utils.models.loading import load_model

    # a Qwen2-VL (36 image tokens: the cheapest chapter run) whose vocabulary also knows counting questions
    model_dir = tmp_path_factory.mktemp("carded") / "tiny-qwen2-vl"
    shutil.copytree(tiny_model_dir("count-qwen2_vl"), model_dir)
    loaded = load_model(model_dir)
    splits = {s: load_benchmark(s, tiny_benchmark) for s in SETTINGS}
    metrics = zoo.evaluate(loaded.model, loaded.processor, loaded.adapter, splits, progress=False)
    (model_dir / "model_card.json").write_text(json.dumps({"name": "tiny-qwen2-vl", "metrics": metrics}))
    return model_dir, metrics


def test_a_tiny_model_below_the_band_is_flagged(carded_tiny_model, tiny_benchmark, tmp_path):
    model_dir, metrics = carded_tiny_model
    assert metrics["random"]["accuracy"] < flags.RANDOM_BAND[0]  # untrained: near chance
    # no baselines.json in this results directory: the baselines are computed from the tiny benchmark
    weak = flags.weak_models([str(model_dir)], results_dir=tmp_path, benchmark_dir=tiny_benchmark)
    assert str(model_dir) in weak
    reasons = weak.reasons[str(model_dir)]
    assert reasons[0] == (f"random accuracy {metrics['random']['accuracy']:.3f}, below the zoo's band (0.70-0.92)")
    assert weak.label(str(model_dir)).endswith(flags.BADGE)
    caption = plots.caption("01_attention", f"zoo-llava, {model_dir}", "adversarial", 24, weak=weak)
    assert caption.endswith(f"\u26a0 weak model: {model_dir} ({reasons[0]})")
    assert "is a weak model" in weak.sentence()


def test_the_released_zoo_is_not_flagged_and_a_card_less_model_is_named_unchecked(tiny_model_dir, tmp_path):
    # the release's own cards against the shortcut baselines of the README (every model above them)
    (tmp_path / "baselines.json").write_text(json.dumps({"build_key": None, "rows": BASELINES}))
    weak = flags.weak_models(["zoo-llava", "zoo-paligemma", "zoo-qwen2-vl", str(tiny_model_dir("zoo-llava"))],
                             results_dir=tmp_path, benchmark_dir=tmp_path / "no-benchmark")
    assert weak.reasons == {} and weak.unchecked == (str(tiny_model_dir("zoo-llava")),)
    assert weak.sentence() == f"Not checked against the zoo's band (no model card): {tiny_model_dir('zoo-llava')}."
    assert plots.caption("x", "zoo-llava", "s", 3, weak=weak) == "x · model: zoo-llava · split: s · n = 3"


def test_weakness_below_a_shortcut_baseline_in_one_setting():
    best = flags.best_baselines(BASELINES)
    # the build: zoo-qwen2-vl at 0.631 on random, under image_stats_per_object's 0.647
    reasons = flags.weakness({"random": 0.631, "popular": 0.70, "adversarial": 0.60}, best)
    assert reasons == ["random accuracy 0.631, below the zoo's band (0.70-0.92)",
                       "random accuracy 0.631, not above the shortcut baseline image_stats_per_object (0.647)"]
    assert flags.weakness({"random": 0.80, "popular": 0.79, "adversarial": 0.55}, best) == [
        "adversarial accuracy 0.550, not above the shortcut baseline image_stats_per_object (0.555)"]
    assert flags.weakness({"random": 0.80, "popular": 0.79, "adversarial": 0.76}, best) == []


def test_the_verdict_page_and_findings_flag_a_weak_model(tmp_path):
    """Chapter 00's published accuracies put zoo-qwen2-vl below the band: the pages badge it and say why."""
    results = tmp_path / "results"
    results.mkdir()
    accuracy = {f"{m}/{s}": a for m, a in (("zoo-llava", 0.82), ("zoo-paligemma", 0.86), ("zoo-qwen2-vl", 0.631))
                for s in SETTINGS}
    baselines = {f"{r['baseline']}/{r['setting']}": r["accuracy"] for r in BASELINES}
    (results / "00_benchmark_and_zoo.json").write_text(json.dumps(
        {"notebook": "00_benchmark_and_zoo", "results": {"zoo_accuracy": accuracy, "baselines": baselines}}))
    rows = [{"model": m, "condition": "top", "fraction": 0.3, "scope": "balanced", "subset": "all", "value": -0.1,
             "ci_low": -0.12, "ci_high": -0.08, "n": 1725} for m in ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")]
    (results / "02_masking.json").write_text(json.dumps({"notebook": "02_masking", "results": {"accuracy_change": rows}}))
    out = tmp_path / "generated"
    pages.write_pages(results, out)
    page = (out / "paper_vs_reproduction.md").read_text()
    row2 = [line for line in page.splitlines() if line.startswith("| 2 |")][-1]
    assert "zoo-qwen2-vl \u26a0: \u221210.0" in row2 and "zoo-llava \u26a0" not in row2
    assert page.count("\u26a0 **zoo-qwen2-vl** is a weak model (random accuracy 0.631, below the zoo's band") >= 2
    assert "| zoo-qwen2-vl \u26a0 | \u221210.0 [\u221212.0, \u22128.0], n = 1,725" in page  # in the folded block
    findings = (out / "findings.md").read_text()
    assert "zoo-qwen2-vl \u26a0 \u221210.0 [\u221212.0, \u22128.0]" in findings and "is a weak model" in findings
    # the same results with every model in the band: no badge anywhere
    accuracy = {k: 0.8 for k in accuracy}
    (results / "00_benchmark_and_zoo.json").write_text(json.dumps(
        {"notebook": "00_benchmark_and_zoo", "results": {"zoo_accuracy": accuracy, "baselines": baselines}}))
    pages.write_pages(results, out)
    assert "\u26a0" not in (out / "paper_vs_reproduction.md").read_text() + (out / "findings.md").read_text()
CHAPTERS = sorted(p.stem for p in (REPO_ROOT / "notebooks").glob("*.md"))


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_chapter_flags_its_weak_models_in_captions_and_tables(name):
    """Each chapter checks its models once (``flags.weak_models``), passes the result to every figure caption and
    every ``tables.show`` (which notes weak models under the table), and puts ``flags.footnote`` in every cell that
    displays a table otherwise (a ``display`` of anything but Markdown)."""
    from vrp_utils import run

    cells = [c.source for c in run.read_notebook(REPO_ROOT / "notebooks" / f"{name}.md").cells if c.cell_type == "code"]
    source = "\n".join(cells)
    assert "flags.weak_models(" in source, f"{name}: never checks its models (flags.weak_models)"
    calls = source.count("plots.caption(") + source.count("tables.show(")
    assert source.count("weak=weak") >= calls, f"{name}: a figure caption or table without weak=weak ({calls} calls)"
    for cell in cells:
        tables = [line for line in cell.splitlines() if re.match(r"\s*display\((?!Markdown\()", line)]
        if tables:
            assert "flags.footnote(weak" in cell, f"{name}: a table without the weak-model footnote: {tables[0].strip()}"


def _counting_file(benchmark, path):
    """Counting questions on the tiny benchmark's eval images, answered from its boxes (as the sample in
    data/README.md), and one in a word the tiny model lacks ("umbrellas"): an error row, to be counted."""
    from collections import Counter

    rows = []
    for line in (benchmark / "boxes.jsonl").read_text().splitlines():
        image = json.loads(line)
        if image["split"] == "eval":
            counts = Counter(o["category"] for o in image["objects"])
            rows += [{"question": f"How many {o}s are there in the image?", "image": image["image"], "answer": counts[o],
                      "task": "counting"} for o in ("banana", "tree", "apple", "lamp")]
    rows.append({"question": "How many umbrellas are there in the image?", "image": rows[0]["image"], "answer": 1,
                 "task": "counting"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, len(rows)


def _chapter_04(model_dir, data_dir, out, *parameters):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VRP_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", "vrp_utils.run", "04_self_consistency", "-p", "models", str(model_dir),
                           "-p", "n_boot", "50", "-p", "cost_inputs", "4", "-p", "k_sweep", "1-4", "-p", "pool", "10",
                           *parameters, "--output-dir", str(out)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_a_chapter_run_on_a_weak_tiny_model_flags_it_under_its_tables(carded_tiny_model, tiny_data_dir, tmp_path):
    """Chapter 04 run for real, with the carded tiny model (below the band), on a question file by parameter (issue
    25): the tiny benchmark's random POPE file and a counting file. The executed page carries the weak-model note
    under its tables, naming the model and why; it reports the counting task with its n and its error row; the
    pool built for the question files is the one the chapter reads (one greedy and one pool store)."""
    import nbformat

    from vrp_utils.extract.engine import dataset_fingerprint
    from vrp_utils.data.questions import question_splits
    from vrp_utils.extract.features import distinct_inputs

    model_dir, metrics = carded_tiny_model
    benchmark = tiny_data_dir / "benchmark"
    counts, n_counting = _counting_file(benchmark, tmp_path / "my_counts.jsonl")
    questions = f"{benchmark / 'pope_random.jsonl'},{counts}"
    done = _chapter_04(model_dir, tiny_data_dir, tmp_path / "run", "-p", "questions", questions,
                       "-p", "image_dir", str(benchmark / "images"))
    assert done.returncode == 0, done.stderr[-2000:]
    executed = nbformat.read(next(tmp_path.rglob("04_self_consistency.ipynb")), as_version=4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    notes = [text for text in shown if "is a weak model" in text]
    tables = [text for text in shown if text.lstrip().startswith("|")]
    assert tables and len(notes) >= len(tables), (len(notes), len(tables))
    assert all(str(model_dir) in text and "below the zoo's band" in text for text in notes)

    results = json.loads((tmp_path / "run" / "04_self_consistency.json").read_text())["results"]
    presence, counting = results["tasks"]
    assert (presence["task"], presence["questions"], presence["error_rows"], presence["n"]) == ("presence", 24, 0, 24)
    assert (counting["task"], counting["questions"], counting["error_rows"]) == ("counting", n_counting, 1)
    assert counting["n"] == counting["distinct"] - 1 == n_counting - 1
    assert counting["errors"].startswith("1 x ValueError: ") and "outside the tokenizer's vocabulary" in counting["errors"]
    assert any(f"| counting | {n_counting} | 1 | {n_counting} | {n_counting - 1} |" in text for text in tables)
    scored = {(a["scope"], a["n"]) for a in results["association"]}
    assert {("task: counting", n_counting - 1), ("task: presence", 24), ("my_counts", n_counting - 1)} <= scored
    assert {p["task"] for p in results["per_input"]} == {"presence", "counting"}
    dataset_fp = dataset_fingerprint(distinct_inputs(question_splits(questions, benchmark / "images"))[0])
    stores = sorted(p.name for p in (tiny_data_dir / "features").glob(f"*__{dataset_fp}-*"))
    assert len(stores) == 2  # greedy + pool, none twice
    (pool_store,) = results["sample_stores"].values()  # the one model's pool store, named as on disk
    assert pool_store in stores

    # A malformed row: the run fails in the setup cell, before any model is opened, naming the file and its line.
    bad = counts.with_name("bad_counts.jsonl")
    bad.write_text(counts.read_text().replace('"answer": 1,', '"answer": "a few",', 1))
    line = next(i for i, text in enumerate(bad.read_text().splitlines(), 1) if "a few" in text)
    failed = _chapter_04(model_dir, tiny_data_dir, tmp_path / "bad", "-p", "questions", str(bad),
                         "-p", "image_dir", str(benchmark / "images"))
    assert failed.returncode == 1
    assert f"{bad}, line {line}: bad answer for a counting question" in failed.stderr, failed.stderr[-2000:]
