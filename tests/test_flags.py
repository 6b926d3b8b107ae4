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

    model_dir = tmp_path_factory.mktemp("carded") / "tiny-qwen2-vl"
    shutil.copytree(tiny_model_dir("zoo-qwen2-vl"), model_dir)
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


def test_a_chapter_run_on_a_weak_tiny_model_flags_it_under_its_tables(carded_tiny_model, tiny_data_dir, tmp_path):
    """Chapter 04 run for real on the tiny benchmark with the carded tiny model (below the band): the executed page
    carries the weak-model note under its tables, naming the model and why."""
    import os
    import subprocess
    import sys

    import nbformat

    model_dir, metrics = carded_tiny_model
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "VRP_DATA_DIR": str(tiny_data_dir)}
    done = subprocess.run([sys.executable, "-m", "vrp_utils.run", "04_self_consistency", "-p", "models", str(model_dir),
                           "-p", "n_boot", "50", "-p", "cost_inputs", "4", "-p", "k_sweep", "1-4", "-p", "pool", "10",
                           "--output-dir", str(tmp_path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    executed = nbformat.read(next(tmp_path.rglob("04_self_consistency.ipynb")), as_version=4)
    shown = [o.get("data", {}).get("text/markdown", "") for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    notes = [text for text in shown if "is a weak model" in text]
    tables = [text for text in shown if text.lstrip().startswith("|")]
    assert tables and len(notes) >= len(tables), (len(notes), len(tables))
    assert all(str(model_dir) in text and "below the zoo's band" in text for text in notes)
