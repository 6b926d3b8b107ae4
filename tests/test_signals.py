"""Leaderboard signals and the leaderboard's paired comparisons.

- the free rival (chapter 03's fitted control as a signal) on a real tiny store: the probe's folds, and the
  scores of a direct ``cross_validated`` call on ``rival_features``;
- pooled rows leave out a model whose score is constant, and name it, instead of averaging it in as chance;
- each row's AUROC difference from the cell's best free signal is ``stats.auroc_difference`` on the rows
  where both scores are finite (positives for a positives-only signal); the best's own row is 0, no interval.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vrp_utils.analysis import signals, stats
from vrp_utils.analysis.probes import cross_validated, cv_problem, rival_features
from vrp_utils.extract.features import open_features


@pytest.fixture(scope="module")
def small_benchmark_features(tmp_path_factory):
    """The released zoo-llava checkpoint (in git, trained: its answers are right and wrong for reasons, so the
    fitted scores vary) on a 24-image tiny benchmark: enough images for 5 outer and 2 inner grouped folds, and enough
    wrong answers of the 6-layer zoo (about 1 in 7) for a fitted rival to vary."""
    from vrp_utils.data.benchmark import build_benchmark

    root = tmp_path_factory.mktemp("signals-data")
    build_benchmark(root / "benchmark", n_eval_images=24, n_train_images=2, progress=False)
    return open_features("zoo-llava", "random", root=root / "features", benchmark_dir=root / "benchmark",
                         progress=False)


def test_free_rival_has_the_probes_folds_and_equals_a_direct_fit(small_benchmark_features):
    inputs = signals.ModelInputs(small_benchmark_features)
    d = inputs.distinct
    y, groups = d["correct"].to_numpy(bool), d["image_file"].to_numpy()
    assert cv_problem(y, groups) is None and 0 < y.mean() < 1
    rival = signals.REGISTRY["free_rival"]
    assert (rival.cost, rival.group, rival.direction) == ("greedy", "behaviour", 1)
    scores = rival.score(inputs)
    direct = cross_validated(rival_features(d), y, groups, "l1", seed=0)
    np.testing.assert_array_equal(scores, direct.scores)
    states = small_benchmark_features.store.hidden(None, "last_prompt")
    probe = cross_validated(np.asarray(states[d["array_index"].to_numpy(), -1]), y, groups, "l1", seed=0)
    np.testing.assert_array_equal(signals.REGISTRY["probe_oof"].score(inputs), probe.scores)
    np.testing.assert_array_equal(direct.plan.outer, probe.plan.outer)
    for a, b in zip(direct.plan.inner, probe.plan.inner):
        np.testing.assert_array_equal(a, b)
    assert len(np.unique(direct.plan.outer)) == 5 and np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()
    assert len(np.unique(scores)) > 10  # fitted, not a constant: other folds would give other scores


def test_answer_margin_is_the_first_answer_tokens_top_two_gap(small_benchmark_features):
    """Issue 25's task-free margin: the first answer token's top-1 minus top-2 log-probability, as the engine stores it
    (``answer_margin``); on this trained yes/no model it tracks |yes-no margin|, on inputs where the two lead."""
    inputs = signals.ModelInputs(small_benchmark_features)
    d = inputs.distinct
    margin = signals.REGISTRY["answer_margin"]
    assert (margin.cost, margin.direction, margin.subset) == ("greedy", 1, None)
    scores = margin.score(inputs)
    np.testing.assert_array_equal(scores, d["answer_margin"].to_numpy(float))
    assert (scores >= 0).all() and len(np.unique(scores)) > 10
    assert np.corrcoef(scores, np.abs(d["yes_no_margin"].to_numpy(float)))[0, 1] > 0.9


def _frames(seed: int = 0) -> dict[str, pd.DataFrame]:
    """Two models' per-question frames over the same 60 inputs (20 images x 3 questions, 2 settings)."""
    rng = np.random.default_rng(seed)
    frames = {}
    for model in ("m-a", "m-b"):
        n = 60
        correct = rng.random(n) < 0.6
        base = pd.DataFrame({"distinct_id": np.arange(n), "image_file": np.repeat([f"i{k}" for k in range(20)], 3),
                             "label": np.where(np.arange(n) % 2 == 0, "yes", "no"), "correct": correct,
                             "parsed": np.where(rng.random(n) < 0.5, "yes", "no"),
                             "good": correct + rng.normal(0, 0.8, n), "weak": correct * 0.2 + rng.normal(0, 1, n)})
        # m-b's "weak" is constant (like a C_k that a 4x4 grid pins at 0)
        if model == "m-b":
            base["weak"] = 0.0
        frames[model] = pd.concat([base.assign(setting=s) for s in ("random", "popular")], ignore_index=True)
    return frames


def test_constant_scores_are_left_out_of_pooled_rows_and_named():
    frames = _frames()
    frame, excluded = signals.pooled_scores(frames, ["good", "weak"])
    assert excluded == {"good": [], "weak": ["m-b"]}
    assert frame.loc[frame["model"] == "m-b", "weak"].isna().all() and frame.loc[frame["model"] == "m-a", "weak"].notna().all()
    alone = signals.pooled({"m-a": frames["m-a"]}, ["weak"])
    got = signals.evaluate(frame["weak"], frame["correct"], frame["image_file"], n_boot=50, risk_coverage_ci=False)
    want = signals.evaluate(alone["weak"], alone["correct"], alone["image_file"], n_boot=50, risk_coverage_ci=False)
    assert got["n_dropped"] == 60 and got["auroc"] == pytest.approx(want["auroc"])
    # kept in, the constant block of zeros would move the pooled AUROC towards chance
    kept = signals.pooled(frames, ["weak"])
    averaged = signals.evaluate(kept["weak"], kept["correct"], kept["image_file"], n_boot=50, risk_coverage_ci=False)
    assert abs(averaged["auroc"] - 0.5) < abs(got["auroc"] - 0.5)
    # no finite value at all counts as constant too
    frames["m-a"]["weak"] = np.nan
    assert signals.constant_models(frames, "weak") == ["m-a", "m-b"]


def test_differences_from_the_best_free_signal_are_paired_bootstraps_on_the_shared_rows():
    rng = np.random.default_rng(1)
    n = 120
    correct = rng.random(n) < 0.6
    cell = pd.DataFrame({"image_file": np.repeat([f"i{k}" for k in range(40)], 3), "correct": correct,
                         "label": np.where(np.arange(n) % 2 == 0, "yes", "no"),
                         "yes_no_margin_abs": correct + rng.normal(0, 1, n), "answer_logprob": correct + rng.normal(0, 0.5, n),
                         "attention_gini": rng.normal(0, 1, n), "attention_inbox_mass": correct + rng.normal(0, 2, n)})
    cell.loc[:9, "attention_gini"] = np.nan  # rows without a score leave the pair
    chosen = [signals.REGISTRY[name] for name in ("yes_no_margin_abs", "answer_logprob", "attention_gini", "attention_inbox_mass")]
    aurocs = {sig.name: stats.auroc(cell[sig.name].to_numpy(float)[cell[sig.name].notna()], correct[cell[sig.name].notna()],
                                    cell["image_file"][cell[sig.name].notna()], n_boot=10).value for sig in chosen}
    out = signals.differences_from_best_free(cell, chosen, aurocs, n_boot=300, seed=0)
    assert {r["best_free_signal"] for r in out.values()} == {"answer_logprob"}  # the higher free AUROC; inbox mass is not free
    best = out["answer_logprob"]
    assert best["auroc_minus_best_free"] == 0.0 and np.isnan(best["auroc_minus_best_free_ci_low"]) and np.isnan(best["auroc_minus_best_free_p"])
    for name, rows in (("attention_gini", cell.index >= 10), ("attention_inbox_mass", (cell["label"] == "yes").to_numpy()),
                       ("yes_no_margin_abs", np.ones(n, bool))):
        part = cell[rows]
        want = stats.auroc_difference(part[name], part["answer_logprob"], part["correct"], part["image_file"], n_boot=300, seed=0)
        got = out[name]
        assert got["auroc_minus_best_free_n"] == len(part)
        assert (got["auroc_minus_best_free"], got["auroc_minus_best_free_ci_low"], got["auroc_minus_best_free_ci_high"],
                got["auroc_minus_best_free_p"]) == pytest.approx((want.value, want.ci_low, want.ci_high, want.p_value))
    assert out["attention_gini"]["auroc_minus_best_free_ci_high"] < 0  # a noise score lies below, paired
    # no free signal in the cell: nothing is compared
    none = signals.differences_from_best_free(cell, chosen[2:], aurocs, n_boot=50)
    assert all(r["best_free_signal"] is None and np.isnan(r["auroc_minus_best_free"]) for r in none.values())


def test_per_layer_signals_take_their_declared_layer_and_never_read_the_labels(small_benchmark_features):
    """Attention metrics: the mean over every stored layer; logit lens: the first layer; probe: the last (above). Scores
    of the attention and lens signals are the same with the correctness labels shuffled: no layer (or anything else)
    is chosen by looking at test data."""
    from types import SimpleNamespace

    from vrp_utils.analysis.probes import LogitLens

    f = small_benchmark_features
    inputs = signals.ModelInputs(f)
    d = inputs.distinct
    rows = d["array_index"].to_numpy()
    attention = np.asarray(f.store.attention()[rows], dtype=np.float64)  # [n, layers, heads, steps, tokens]
    layers = attention.shape[1]
    counts = d["n_image_tokens"].to_numpy()
    real = np.arange(attention.shape[-1])[None, :] < counts[:, None]
    step0 = np.where(real[:, None, :], attention[:, :, :, 0, :].mean(axis=2), 0.0)  # [n, layers, tokens]
    maps = step0 / step0.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(maps > 0, maps * np.log(maps), 0.0).sum(-1)  # [n, layers]
    raw = signals.REGISTRY["attention_entropy"].raw(inputs)
    np.testing.assert_allclose(raw, entropy.mean(axis=1), atol=1e-10)
    for layer in range(layers):  # not one layer's value (the released zoo's layers differ by nats)
        assert not np.allclose(raw, entropy[:, layer], atol=1e-3)
    lens = LogitLens(str(f.model_dir))
    states = f.store.hidden(None, "last_prompt")
    first = lens.margin(np.asarray(states[rows, 0])) * np.where(d["parsed"].to_numpy() == "yes", 1.0, -1.0)
    np.testing.assert_allclose(signals.REGISTRY["logit_lens_margin"].raw(inputs), first, atol=1e-6)
    shuffled = d.copy()
    shuffled["correct"] = np.random.default_rng(0).permutation(shuffled["correct"].to_numpy())
    blind = signals.ModelInputs(SimpleNamespace(distinct=shuffled, store=f.store, adapter=f.adapter, model_dir=f.model_dir))
    for name in [f"attention_{m}" for m in signals.ATTENTION_METRICS] + ["attention_inbox_mass", "logit_lens_margin"]:
        np.testing.assert_array_equal(signals.REGISTRY[name].raw(blind), signals.REGISTRY[name].raw(inputs))
