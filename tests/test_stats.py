"""vrp_utils.analysis.stats against independent references (never the library a function wraps).

Values: hand-written Pearson, Mann-Whitney U, binomial test, hand-written Holm. Replicates: the
vectorized weighted formulas equal scipy / scikit-learn on explicitly resampled row sets. Intervals:
resampling whole images behaves like a cluster bootstrap (duplicated rows add no information).
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import roc_auc_score

from vrp_utils.analysis import stats as S
from vrp_utils.analysis.stats import (
    Estimate,
    auroc,
    cluster_bootstrap,
    grouped_cv_pseudo_r2,
    grouped_folds,
    holm,
    paired_accuracy_change,
    point_biserial,
)

N_BOOT = 300  # light: the tests check formulas and wiring, not Monte Carlo precision


def clustered(seed: int = 0, k: int = 60, ties: bool = False):
    """Score, correctness and image ids; images of different sizes share an image effect."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(2, 12, size=k)
    groups = np.repeat(np.arange(k), sizes)
    score = rng.normal(size=k)[groups] + rng.normal(size=groups.size)
    if ties:
        score = np.round(score, 0)
    correct = (rng.random(groups.size) < 1 / (1 + np.exp(-score))).astype(int)
    return score, correct, groups


def hand_pearson(x: np.ndarray, y: np.ndarray) -> float:
    dx, dy = x - x.mean(), y - y.mean()
    return float((dx * dy).sum() / math.sqrt((dx * dx).sum() * (dy * dy).sum()))


def hand_holm(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def explicit_resample(rng, groups: np.ndarray):
    """Rows of K groups drawn with replacement (duplicates kept) and the per-group draw counts."""
    ids = np.unique(groups)
    drawn = rng.choice(ids, size=ids.size, replace=True)
    rows = np.concatenate([np.flatnonzero(groups == g) for g in drawn])
    counts = np.array([np.sum(drawn == g) for g in ids], dtype=float)
    return rows, counts


def weighted_mean(x, weights):
    return weights @ x / weights.sum(axis=-1)


# ---------------------------------------------------------------------------------------- values


def test_point_biserial_equals_hand_pearson():
    score, correct, groups = clustered(1)
    est = point_biserial(score, correct, groups, n_boot=N_BOOT)
    assert est.value == pytest.approx(hand_pearson(score, correct.astype(float)), abs=1e-9)
    assert (est.n, est.n_groups) == (groups.size, 60)
    assert est.ci_low < est.value < est.ci_high


def test_auroc_equals_mann_whitney_u_with_ties():
    score, correct, groups = clustered(2, ties=True)
    assert np.unique(score).size < score.size / 4  # many ties
    pos, neg = score[correct == 1], score[correct == 0]
    u = scipy.stats.mannwhitneyu(pos, neg).statistic
    est = auroc(score, correct, groups, n_boot=N_BOOT)
    assert est.value == pytest.approx(u / (pos.size * neg.size), abs=1e-9)
    assert est.details["n_correct"] == pos.size and est.details["n_wrong"] == neg.size


def test_p_values_are_z_tests_against_the_null_value():
    score, correct, groups = clustered(3)
    weak = score + 8 * np.random.default_rng(3).normal(size=score.size)  # p far from 0 and 1
    a = auroc(weak, correct, groups, n_boot=N_BOOT)
    r = point_biserial(weak, correct, groups, n_boot=N_BOOT)
    for est, null in ((a, 0.5), (r, 0.0)):
        z = (est.value - null) / est.details["bootstrap_se"]
        assert 1e-4 < est.p_value < 0.9
        assert est.p_value == pytest.approx(2 * scipy.stats.norm.sf(abs(z)), rel=1e-9, abs=0)


def test_paired_accuracy_change_mcnemar_equals_binomial_test():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(50), 6)
    before = (rng.random(groups.size) < 0.7).astype(int)
    flip_down = (before == 1) & (rng.random(groups.size) < 0.2)
    flip_up = (before == 0) & (rng.random(groups.size) < 0.1)
    after = np.where(flip_down, 0, np.where(flip_up, 1, before))
    n10, n01 = int(flip_down.sum()), int(flip_up.sum())
    est = paired_accuracy_change(before.astype(bool), after, groups, n_boot=N_BOOT)
    assert est.value == pytest.approx(after.sum() / after.size - before.sum() / before.size, abs=1e-12)
    assert est.p_value == pytest.approx(scipy.stats.binomtest(n01, n01 + n10, 0.5).pvalue, abs=1e-9)
    assert est.details["n_correct_to_wrong"] == n10 and est.details["n_wrong_to_correct"] == n01
    assert est.details["accuracy_before"] == pytest.approx(before.mean())
    assert est.details["accuracy_after"] == pytest.approx(after.mean())
    assert est.value < 0 and est.ci_low < est.value < est.ci_high
    assert 0 < est.details["p_cluster_bootstrap"] < 1


def test_holm_equals_hand_written_and_keeps_nan_out_of_family():
    p = [0.01, 0.04, 0.03, 0.005, 0.5, 0.2]
    assert holm(p) == pytest.approx(hand_holm(p), abs=1e-12)
    with_missing = [0.01, None, 0.04, math.nan, 0.03]
    out = holm(with_missing)
    assert np.isnan(out[1]) and np.isnan(out[3])
    assert out[[0, 2, 4]] == pytest.approx(hand_holm([0.01, 0.04, 0.03]), abs=1e-12)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_holm_runs_no_full_garbage_collection_and_restores_gc_collect():
    """statsmodels' Holm ends with gc.collect() (~0.3 s in a chapter's process, 30 families in chapter 01)."""
    import gc

    from statsmodels.stats import multitest

    collect = gc.collect
    full = []

    def count(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(info)

    gc.callbacks.append(count)
    try:
        holm([0.01, 0.04, 0.03])
        assert full == []
        multitest.multipletests([0.01, 0.04], method="holm")  # control: the library's own call does collect
        assert len(full) == 1
    finally:
        gc.callbacks.remove(count)
    assert gc.collect is collect


# ------------------------------------------------------------------------- replicates = library


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replicates_equal_library_on_resampled_rows(seed):
    score, correct, groups = clustered(10 + seed, k=30, ties=True)  # ties within and across classes
    codes = np.unique(groups, return_inverse=True)[1]
    moments = S._pearson_moments(score, correct.astype(float))
    auroc_terms = S._auroc_terms(score, correct, codes, 30)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        rows, counts = explicit_resample(rng, groups)
        expected_r = scipy.stats.pearsonr(score[rows], correct[rows]).statistic
        by_group = S._pearson_from_moments(S._group_sums(moments, codes, 30), counts[None])[0]
        by_row = S._pearson_from_moments(moments, counts[codes][None])[0]
        assert by_group == pytest.approx(expected_r, abs=1e-9)
        assert by_row == pytest.approx(expected_r, abs=1e-9)
        a = S._auroc_from_terms(*auroc_terms, counts[None])[0]
        assert a == pytest.approx(roc_auc_score(correct[rows], score[rows]), abs=1e-9)
        sizes = np.bincount(codes).astype(float)
        d = S._ratio_of_sums(S._group_sums(score, codes, 30), sizes, counts[None])[0]
        assert d == pytest.approx(score[rows].mean(), abs=1e-9)


def test_image_level_shortcut_equals_row_level_bootstrap():
    """The statistics bootstrap images over per-image sums; the row-weighted primitive must agree."""
    score, correct, groups = clustered(13, k=40, ties=True)
    y = correct.astype(float)

    def row_pearson(x, y, weights):
        w = weights.sum(axis=-1, keepdims=True)
        dx = x - (weights @ x)[:, None] / w
        dy = y - (weights @ y)[:, None] / w
        return (weights * dx * dy).sum(-1) / np.sqrt((weights * dx**2).sum(-1) * (weights * dy**2).sum(-1))

    beats = (score[correct == 1][:, None] > score[correct == 0][None]) + 0.5 * (
        score[correct == 1][:, None] == score[correct == 0][None])

    def row_auroc(weights):
        wp, wn = weights[:, correct == 1], weights[:, correct == 0]
        return ((wp @ beats) * wn).sum(-1) / (wp.sum(-1) * wn.sum(-1))

    for est, rows in [
        (point_biserial(score, correct, groups, n_boot=N_BOOT, seed=2),
         cluster_bootstrap(row_pearson, [score, y], groups, n_boot=N_BOOT, seed=2)),
        (auroc(score, correct, groups, n_boot=N_BOOT, seed=2),
         cluster_bootstrap(row_auroc, [], groups, n_boot=N_BOOT, seed=2)),
    ]:
        assert (est.ci_low, est.ci_high) == pytest.approx((rows.low, rows.high), abs=1e-9)
        assert est.details["bootstrap_se"] == pytest.approx(rows.standard_error, abs=1e-9)


def test_cluster_bootstrap_weights_are_whole_group_resamples():
    groups = np.array(["b", "a", "b", "c", "c", "c", "a", "d"])
    seen = []

    def record(weights):
        seen.append(weights.copy())
        return weights.sum(axis=-1)

    ci = cluster_bootstrap(record, [], groups, n_boot=50, seed=3)
    w = np.concatenate(seen)
    assert w.shape == (50, groups.size)
    for g in np.unique(groups):  # one count per group, shared by its rows
        cols = w[:, groups == g]
        assert (cols == cols[:, :1]).all()
    per_group = np.stack([w[:, np.flatnonzero(groups == g)[0]] for g in np.unique(groups)], axis=1)
    assert (per_group.sum(axis=1) == 4).all()  # K groups drawn per resample
    sizes = np.array([np.sum(groups == g) for g in np.unique(groups)])
    assert ci.replicates == pytest.approx(per_group @ sizes)  # rows of the resample


# ----------------------------------------------------------------------------------- intervals


def test_cluster_bootstrap_duplicated_groups_add_no_information():
    k, m = 40, 9
    rng = np.random.default_rng(5)
    x = rng.normal(size=k)
    y = (rng.random(k) < 1 / (1 + np.exp(-x))).astype(int)
    xd, yd, gd = np.repeat(x, m), np.repeat(y, m), np.repeat(np.arange(k), m)

    def width(e):
        return e.ci_high - e.ci_low

    cluster = point_biserial(xd, yd, gd, n_boot=2000)
    undeduplicated = point_biserial(x, y, np.arange(k), n_boot=2000)
    rows_as_groups = point_biserial(xd, yd, np.arange(k * m), n_boot=2000)
    assert width(cluster) == pytest.approx(width(undeduplicated), rel=0.1)
    assert 2.4 < width(cluster) / width(rows_as_groups) < 3.6

    mean_cluster = cluster_bootstrap(weighted_mean, [xd], gd, n_boot=2000)
    mean_rows = cluster_bootstrap(weighted_mean, [xd], np.arange(k * m), n_boot=2000)
    ratio = (mean_cluster.high - mean_cluster.low) / (mean_rows.high - mean_rows.low)
    assert 2.4 < ratio < 3.6
    assert 2.4 < mean_cluster.standard_error / mean_rows.standard_error < 3.6


def test_seed_determines_interval():
    score, correct, groups = clustered(6)
    a = point_biserial(score, correct, groups, n_boot=N_BOOT, seed=7)
    b = point_biserial(score, correct, groups, n_boot=N_BOOT, seed=7)
    c = point_biserial(score, correct, groups, n_boot=N_BOOT, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.value == c.value


def test_undefined_resamples_are_dropped_and_counted():
    # Image 0 all correct, image 1 all wrong: a resample of only one of them has one class.
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3])
    correct = np.array([1, 1, 0, 0, 1, 0])
    groups = np.array([0, 0, 1, 1, 2, 2])
    est = auroc(score, correct, groups, n_boot=200, seed=1)
    assert est.value == 1.0 and math.isfinite(est.ci_low)
    assert "undefined resamples dropped" in est.method


# ----------------------------------------------------------------------------- undefined cases


def test_constant_score_is_undefined_with_reason():
    _, correct, groups = clustered(7)
    est = point_biserial(np.full(correct.size, 0.3), correct, groups)
    assert math.isnan(est.value) and math.isnan(est.ci_low) and est.p_value is None
    assert est.details["undefined"] == f"score is constant over all {correct.size} examples"
    assert str(est).startswith("undefined: score is constant")
    assert json.loads(json.dumps(est.as_dict()))["value"] is None


def test_constant_label_is_undefined_for_every_statistic():
    score, correct, groups = clustered(8)
    ones = np.ones_like(correct)
    assert "correct is constant" in point_biserial(score, ones, groups).details["undefined"]
    assert "only one class" in auroc(score, ones, groups).details["undefined"]
    assert "correct is constant" in grouped_cv_pseudo_r2(score, ones, groups).details["undefined"]
    assert math.isnan(auroc(score, 0 * ones, groups).value)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, c, g: point_biserial(s[:-1], c, g), "length mismatch"),
        (lambda s, c, g: auroc(s, c * 2, g), "0/1"),
        (lambda s, c, g: point_biserial(s, np.where(c == 1, 0.5, 0.0), g), "0/1"),
        (lambda s, c, g: point_biserial(np.where(c == 1, np.nan, s), c, g), "non-finite"),
        (lambda s, c, g: auroc(np.where(c == 1, np.inf, s), c, g), "non-finite"),
        (lambda s, c, g: auroc(s, c, np.zeros_like(g)), "at least 2 groups"),
        (lambda s, c, g: point_biserial(s, c, g, n_boot=0), "n_boot"),
        (lambda s, c, g: auroc(s, c, g, confidence=1.0), "confidence"),
        (lambda s, c, g: paired_accuracy_change(c, c[:-1], g), "length mismatch"),
        (lambda s, c, g: paired_accuracy_change(c, c + 1, g), "after must hold only 0/1"),
        (lambda s, c, g: cluster_bootstrap(weighted_mean, [s], g, confidence=0), "confidence"),
        (lambda s, c, g: grouped_cv_pseudo_r2(s, c, g, folds=500), "folds=500 needs"),
        (lambda s, c, g: holm([0.1, 1.5]), r"\[0, 1\]"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(call, message):
    score, correct, groups = clustered(9, k=20)
    with pytest.raises(ValueError, match=message):
        call(score, correct, groups)


# ------------------------------------------------------------------------------------ pseudo-R2


def test_pseudo_r2_near_zero_on_noise_and_high_when_feature_decides():
    rng = np.random.default_rng(11)
    groups = np.repeat(np.arange(150), 4)
    correct = (rng.random(groups.size) < 0.6).astype(int)
    noise = rng.normal(size=(groups.size, 3))
    est = grouped_cv_pseudo_r2(noise, correct, groups, n_boot=N_BOOT)
    assert abs(est.value) < 0.05
    assert est.ci_low < est.value < est.ci_high
    # The null predicts each training fold's base rate on the held-out fold.
    fold = grouped_folds(correct, groups, folds=5, seed=0)
    rate = np.array([correct[fold != f].mean() for f in range(5)])[fold]
    ll_null = np.sum(np.where(correct == 1, np.log(rate), np.log(1 - rate)))
    assert est.details["log_likelihood_null"] == pytest.approx(ll_null, abs=1e-9)

    decisive = rng.normal(size=groups.size)
    est = grouped_cv_pseudo_r2(decisive, (decisive > 0).astype(int), groups, n_boot=N_BOOT)
    assert est.value > 0.3
    assert est.details["log_likelihood_model"] > est.details["log_likelihood_null"]


def test_grouped_folds_cache_returns_the_splitters_folds_and_owned_copies():
    """The cache keys on every input: the same call gives StratifiedGroupKFold's own folds; another label, image,
    fold count or seed gives its own; a caller that writes into the result cannot change the next call's."""
    from sklearn.model_selection import StratifiedGroupKFold

    rng = np.random.default_rng(5)
    groups = np.repeat([f"img{i:03d}" for i in range(60)], 3)
    correct = rng.random(groups.size) < 0.6

    def fresh(y, g, folds, seed):
        fold = np.full(len(y), -1)
        codes = np.unique(g, return_inverse=True)[1]
        for i, (_, test) in enumerate(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros((len(y), 1)), y, codes)):
            fold[test] = i
        return fold

    first = grouped_folds(correct, groups, folds=5, seed=7)
    first[:] = 99
    assert np.array_equal(grouped_folds(correct, groups, folds=5, seed=7), fresh(correct, groups, 5, 7))
    flipped = correct.copy()
    flipped[:30] = ~flipped[:30]
    renamed = np.where(groups == "img000", "img001", groups)
    for y, g, folds, seed in ((flipped, groups, 5, 7), (correct, renamed, 5, 7), (correct, groups, 4, 7), (correct, groups, 5, 8)):
        assert np.array_equal(grouped_folds(y, g, folds=folds, seed=seed), fresh(y, g, folds, seed))


def test_grouped_folds_never_split_an_image():
    _, correct, groups = clustered(12, k=40)
    fold = grouped_folds(correct, groups, folds=5, seed=3)
    assert set(fold) == set(range(5))
    for g in np.unique(groups):
        assert np.unique(fold[groups == g]).size == 1
    assert not np.array_equal(fold, grouped_folds(correct, groups, folds=5, seed=4))


# ------------------------------------------------------------------------------------ Estimate


def test_estimate_prints_and_serializes_with_its_interval():
    est = Estimate(0.1234, 0.0511, 0.1972, "m", 1725, 180, None, {"k": np.int64(3), "x": np.nan})
    assert str(est) == "0.123 [0.051, 0.197] (n=1725, 180 images)"
    d = est.as_dict()
    assert d["details"] == {"k": 3, "x": None}
    assert json.loads(json.dumps(d)) == d
    with pytest.raises(AttributeError):
        est.value = 0.2  # frozen


# ------------------------------------------------------------------- the contract of every statistic
# (added to kill surviving mutants of benchmarks/mutation.sh: defaults, options passed through,
# argument names in messages, the undefined form, serialisation)

STATISTICS = {
    "point_biserial": lambda s, c, g, **kw: point_biserial(s, c, g, **kw),
    "auroc": lambda s, c, g, **kw: auroc(s, c, g, **kw),
    "paired_accuracy_change": lambda s, c, g, **kw: paired_accuracy_change(c, (s > 0).astype(int), g, **kw),
    "mean_estimate": lambda s, c, g, **kw: S.mean_estimate(s, g, **kw),
}


@pytest.mark.parametrize("name", sorted(STATISTICS))
def test_defaults_and_options_reach_the_bootstrap(name):
    score, correct, groups = clustered(21, k=15)
    stat = STATISTICS[name]
    default = stat(score, correct, groups)
    assert "95% CI: cluster bootstrap over images (1000 resamples, percentile, seed 0)" in default.method
    assert (default.n, default.n_groups) == (score.size, 15)
    assert default.details["bootstrap_se"] > 0
    assert stat(score, correct, groups, n_boot=1000, seed=0, confidence=0.95) == default
    options = stat(score, correct, groups, n_boot=60, seed=5, confidence=0.9)
    assert "90% CI: cluster bootstrap over images (60 resamples, percentile, seed 5)" in options.method
    assert (options.ci_low, options.ci_high) != (default.ci_low, default.ci_high)
    # each option is passed on: another seed, another count, another level give other intervals
    other_seed = stat(score, correct, groups, n_boot=60, seed=6, confidence=0.9)
    other_count = stat(score, correct, groups, n_boot=61, seed=5, confidence=0.9)
    wide = stat(score, correct, groups, n_boot=60, seed=5, confidence=0.99)
    narrow = stat(score, correct, groups, n_boot=60, seed=5, confidence=0.5)
    assert (other_seed.ci_low, other_seed.ci_high) != (options.ci_low, options.ci_high)
    assert (other_count.ci_low, other_count.ci_high) != (options.ci_low, options.ci_high)
    assert wide.ci_low < options.ci_low < narrow.ci_low <= narrow.ci_high < options.ci_high < wide.ci_high
    assert options.value == default.value  # options never change the value


@pytest.mark.parametrize("name", sorted(STATISTICS))
def test_bad_options_are_refused_by_every_statistic(name):
    score, correct, groups = clustered(22, k=6)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"^n_boot must be an integer >= 1"):
            STATISTICS[name](score, correct, groups, n_boot=bad)
    for bad in (0.0, 1.0, "0.9"):
        with pytest.raises(ValueError, match=r"^confidence must lie strictly between 0 and 1"):
            STATISTICS[name](score, correct, groups, confidence=bad)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, c, g: point_biserial(s[:, None], c, g), r"^score must be one-dimensional"),
        (lambda s, c, g: auroc(s[:, None], c, g), r"^score must be one-dimensional"),
        (lambda s, c, g: auroc(np.where(c == 1, np.nan, s), c, g), r"^score has \d+ non-finite"),
        (lambda s, c, g: point_biserial(s, c * 3, g), r"^correct must hold only 0/1 \(or bool\) labels; found 3"),
        (lambda s, c, g: auroc(s, c * 3, g), r"^correct must hold only 0/1"),
        (lambda s, c, g: auroc(s, np.array(["a"] * s.size), g), r"^correct must hold only 0/1 \(or bool\) labels; got dtype"),
        (lambda s, c, g: auroc(s, c[:, None], g), r"^correct must be one-dimensional"),
        (lambda s, c, g: point_biserial(s[:-1], c, g), r"^length mismatch: score has 39, correct has 40, groups has 40 rows"),
        (lambda s, c, g: auroc(s[:-1], c, g), r"^length mismatch: score has 39, correct has 40, groups has 40 rows"),
        (lambda s, c, g: auroc(s, c, g[:-1]), r"^length mismatch: score has 40, correct has 40, groups has 39 rows"),
        (lambda s, c, g: paired_accuracy_change(c * 3, c, g), r"^before must hold only 0/1"),
        (lambda s, c, g: paired_accuracy_change(c, c, g[:-1]), r"^length mismatch: before has 40, after has 40, groups has 39"),
        (lambda s, c, g: S.mean_estimate(np.where(c == 1, np.inf, s), g), r"^values has \d+ non-finite"),
        (lambda s, c, g: S.mean_estimate(s, g[:-1]), r"^length mismatch: values has 40, groups has 39 rows"),
        (lambda s, c, g: auroc(s, c, g[:, None]), r"^groups must be one-dimensional"),
        (lambda s, c, g: auroc(s, c, np.array([1, "a"] * (s.size // 2), dtype=object)), r"^groups must be comparable"),
        (lambda s, c, g: auroc(s, c, np.zeros_like(g)), r"^need at least 2 groups \(images\) for a cluster bootstrap; got 1"),
    ],
)
def test_bad_inputs_name_the_argument(call, message):
    score, correct, groups = clustered(23, k=8)
    score, correct, groups = score[:40], correct[:40], groups[:40]
    with pytest.raises(ValueError, match=message):
        call(score, correct, groups)


def test_one_example_of_a_class_is_enough():
    score = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.2])
    groups = np.array([0, 0, 1, 1, 2, 2])
    one_correct = np.array([0, 0, 1, 0, 0, 0])
    assert auroc(score, one_correct, groups, n_boot=20).value == 1.0
    assert auroc(score, 1 - one_correct, groups, n_boot=20).value == 0.0
    assert point_biserial(score, one_correct, groups, n_boot=20).defined
    assert point_biserial(np.r_[score[:5], 0.8], one_correct, groups, n_boot=20).defined


@pytest.mark.parametrize("case", ["constant score", "constant label", "one class", "no wrong"])
def test_undefined_estimates_are_nan_with_sizes_and_reason(case):
    score = np.array([0.1, 0.5, 0.9, 0.3, 0.7])
    groups = np.array([0, 0, 1, 1, 2])
    ones = np.ones(5, dtype=int)
    est = {
        "constant score": lambda: point_biserial(np.full(5, 0.3), np.array([1, 0, 1, 0, 1]), groups),
        "constant label": lambda: point_biserial(score, 0 * ones, groups),
        "one class": lambda: auroc(score, 0 * ones, groups),
        "no wrong": lambda: auroc(score, ones, groups),
    }[case]()
    reason = {
        "constant score": "score is constant over all 5 examples",
        "constant label": "correct is constant (0) over all 5 examples",
        "one class": "only one class: all 5 examples are wrong",
        "no wrong": "only one class: all 5 examples are correct",
    }[case]
    assert math.isnan(est.value) and math.isnan(est.ci_low) and math.isnan(est.ci_high)
    assert (est.n, est.n_groups, est.p_value, est.details) == (5, 3, None, {"undefined": reason})
    assert not est.defined and str(est) == f"undefined: {reason} (n=5, 3 images)"
    assert est.method.startswith(("point-biserial r (scipy.stats.pointbiserialr); 95% CI",
                                  "AUROC (sklearn roc_auc_score, correct = positive); 95% CI"))


def test_details_of_each_statistic():
    score, correct, groups = clustered(24, k=10)
    pb = point_biserial(score, correct, groups, n_boot=50)
    assert set(pb.details) == {"n_correct", "bootstrap_se"} and pb.details["n_correct"] == correct.sum()
    assert pb.method.endswith("p: two-sided z test of r = 0 with the bootstrap SE")
    au = auroc(score, correct, groups, n_boot=50)
    assert au.details == {"n_correct": correct.sum(), "n_wrong": (1 - correct).sum(),
                          "bootstrap_se": au.details["bootstrap_se"]}
    assert au.method.endswith("p: two-sided z test of AUROC = 0.5 with the bootstrap SE")
    pa = paired_accuracy_change(correct, 1 - correct, groups, n_boot=50)
    assert set(pa.details) == {"n_correct_to_wrong", "n_wrong_to_correct", "accuracy_before", "accuracy_after",
                               "p_cluster_bootstrap", "bootstrap_se"}
    assert pa.method.startswith("accuracy change (after - before); 95% CI")
    assert "p: exact McNemar test on the discordant pairs (statsmodels)" in pa.method
    z = pa.value / pa.details["bootstrap_se"]
    assert pa.details["p_cluster_bootstrap"] == pytest.approx(2 * scipy.stats.norm.sf(abs(z)), rel=1e-9)
    me = S.mean_estimate(score, groups, n_boot=50)
    assert me.method.startswith("mean; 95% CI") and set(me.details) == {"bootstrap_se"}
    assert me.details["bootstrap_se"] > 0 and me.p_value is None
    for est in (pb, au, pa, me):
        assert est.ci_low < est.value < est.ci_high


def test_undefined_resamples_raise_no_numpy_warnings():
    """Resamples with one class or a constant score are NaN by design: no divide/invalid warnings."""
    score = np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3, 0.5, 0.5])
    correct = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for stat in STATISTICS.values():
            stat(score, correct, groups, n_boot=200, seed=1)


def test_estimate_serializes_every_field_and_nested_details():
    details = {"k": np.int64(3), "x": np.nan, "flag": np.bool_(True), "nested": {"a": (1, np.float32(0.5))},
               "arr": np.array([1.0, np.inf]), 7: [np.int32(2), None, "s"]}
    est = Estimate(0.5, -np.inf, np.float64(0.75), "m", np.int64(12), 3, np.float64(0.25), details)
    assert Estimate(0.5, 0.125, 0.75, "m", 1, 2).as_dict()["ci_low"] == 0.125
    assert est.as_dict() == {
        "value": 0.5, "ci_low": None, "ci_high": 0.75, "method": "m", "n": 12, "n_groups": 3, "p_value": 0.25,
        "details": {"k": 3, "x": None, "flag": True, "nested": {"a": [1, 0.5]}, "arr": [1.0, None],
                    "7": [2, None, "s"]},
    }
    assert type(est.as_dict()["details"]["flag"]) is bool and type(est.as_dict()["n"]) is int
    assert est.defined and str(est) == "0.500 [-inf, 0.750] (n=12, 3 images)"
    assert Estimate(math.nan, 0, 0, "m", 1, 2).as_dict()["p_value"] is None


def _pseudo_data(seed=25, k=30):
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(k), 4)
    x = rng.normal(size=(groups.size, 2))
    correct = (rng.random(groups.size) < 1 / (1 + np.exp(-2 * x[:, 0]))).astype(int)
    return x, correct, groups


def test_pseudo_r2_defaults_options_and_details():
    x, correct, groups = _pseudo_data()
    est = grouped_cv_pseudo_r2(x, correct, groups)
    assert est.method == (
        "McFadden pseudo-R^2, out of fold (5-fold StratifiedGroupKFold by image, seed 0; StandardScaler + "
        "LogisticRegression); 95% CI: cluster bootstrap over images (1000 resamples, percentile, seed 0) of the "
        "out-of-fold log-likelihoods (no refit)"
    )
    assert (est.n, est.n_groups, est.p_value) == (120, 30, None)
    assert set(est.details) == {"folds", "n_features", "log_likelihood_model", "log_likelihood_null", "bootstrap_se"}
    assert (est.details["folds"], est.details["n_features"]) == (5, 2) and est.details["bootstrap_se"] > 0
    assert est.value == pytest.approx(1 - est.details["log_likelihood_model"] / est.details["log_likelihood_null"])
    assert grouped_cv_pseudo_r2(x, correct, groups, folds=5, seed=0, n_boot=1000, confidence=0.95) == est
    other = grouped_cv_pseudo_r2(x, correct, groups, seed=1, n_boot=60)
    assert other.value != est.value and "seed 1;" in other.method and "(60 resamples, percentile, seed 1)" in other.method
    three = grouped_cv_pseudo_r2(x[:, 0], correct, groups, folds=3, n_boot=60)
    assert three.details["folds"] == 3 and three.details["n_features"] == 1 and "3-fold" in three.method
    base = dict(n_boot=60, seed=2)
    wide = grouped_cv_pseudo_r2(x, correct, groups, confidence=0.99, **base)
    mid = grouped_cv_pseudo_r2(x, correct, groups, confidence=0.9, **base)
    narrow = grouped_cv_pseudo_r2(x, correct, groups, confidence=0.5, **base)
    assert wide.ci_low < mid.ci_low < narrow.ci_low < narrow.ci_high < mid.ci_high < wide.ci_high
    assert grouped_cv_pseudo_r2(x, correct, groups, n_boot=60, seed=3, confidence=0.9).ci_low != mid.ci_low
    assert grouped_cv_pseudo_r2(x, correct, groups, n_boot=61, seed=2, confidence=0.9).ci_low != mid.ci_low


def test_pseudo_r2_does_not_depend_on_feature_scale():
    """The features are standardised in each fold, so rescaling a feature changes nothing."""
    x, correct, groups = _pseudo_data(26)
    est = grouped_cv_pseudo_r2(x, correct, groups, n_boot=50)
    scaled = grouped_cv_pseudo_r2(x * np.array([1000.0, 0.001]) + 5.0, correct, groups, n_boot=50)
    assert scaled.value == pytest.approx(est.value, rel=1e-6)


def test_pseudo_r2_undefined_forms():
    x, correct, groups = _pseudo_data(27, k=6)
    est = grouped_cv_pseudo_r2(x, np.ones_like(correct), groups)
    assert (est.n, est.n_groups, est.details) == (24, 6, {"undefined": "correct is constant (1) over all 24 examples"})
    assert est.method.startswith("McFadden pseudo-R^2, out of fold (5-fold") and math.isnan(est.ci_high)
    # the only wrong answers are in one image: the training folds without it have one class only
    lonely = np.ones_like(correct)
    lonely[groups == 0] = 0
    est = grouped_cv_pseudo_r2(x, lonely, groups, folds=3)
    assert math.isnan(est.value) and (est.n, est.n_groups) == (24, 6)
    assert est.details["folds"] == 3 and re.fullmatch(
        r"training fold without fold \d has one class only", est.details["undefined"])
    assert est.method.startswith("McFadden pseudo-R^2, out of fold (3-fold")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, c, g: grouped_cv_pseudo_r2(x[:, :, None], c, g), r"^features must be \(n_examples,\) or"),
        (lambda x, c, g: grouped_cv_pseudo_r2(np.where(x > 1.5, np.nan, x), c, g), r"^features has \d+ non-finite"),
        (lambda x, c, g: grouped_cv_pseudo_r2(x[:-1], c, g), r"^length mismatch: features has 119, correct has 120, groups has 120"),
        (lambda x, c, g: grouped_cv_pseudo_r2(x, c[:-1], g), r"^length mismatch: features has 120, correct has 119"),
        (lambda x, c, g: grouped_cv_pseudo_r2(x, c, g[:-1]), r"^length mismatch: .*groups has 119 rows"),
        (lambda x, c, g: grouped_cv_pseudo_r2(x, c * 2, g), r"^correct must hold only 0/1"),
        (lambda x, c, g: grouped_folds(c * 2, g), r"^correct must hold only 0/1"),
        (lambda x, c, g: grouped_folds(c[:-1], g), r"^length mismatch: correct has 119, groups has 120 rows"),
        (lambda x, c, g: grouped_folds(c, g, folds=1), r"^folds must be an integer >= 2; got 1"),
        (lambda x, c, g: grouped_folds(c, g, folds=2.0), r"^folds must be an integer >= 2; got 2.0"),
        (lambda x, c, g: grouped_folds(c, g, folds=True), r"^folds must be an integer >= 2; got True"),
        (lambda x, c, g: grouped_folds(c, g, folds=31), r"^folds=31 needs at least 31 groups \(images\); got 30"),
    ],
)
def test_pseudo_r2_and_folds_refuse_bad_inputs(call, message):
    x, correct, groups = _pseudo_data()
    with pytest.raises(ValueError, match=message):
        call(x, correct, groups)


def test_grouped_folds_accept_two_folds_and_one_image_per_fold():
    x, correct, groups = _pseudo_data(28, k=6)
    assert set(grouped_folds(correct, groups, folds=2)) == {0, 1}
    assert set(grouped_folds(correct, groups, folds=6)) == set(range(6))
    assert np.array_equal(grouped_folds(correct, groups, folds=np.int64(3)), grouped_folds(correct, groups, folds=3))


def test_log_likelihood_clips_certain_predictions():
    ll = S._bernoulli_ll(np.array([1, 0, 1, 0]), np.array([0.0, 1.0, 1.0, 0.0]))
    assert ll == pytest.approx([math.log(1e-12), math.log(1e-12), math.log1p(-1e-12), math.log1p(-1e-12)])


def test_z_test_p_is_none_without_a_finite_value_and_positive_se():
    assert S._z_test_p(math.nan, 0.0, 0.1) is None and S._z_test_p(0.3, 0.0, math.inf) is None
    assert S._z_test_p(0.3, 0.0, 0.0) is None and S._z_test_p(0.3, 0.0, -1.0) is None
    assert S._z_test_p(0.5, 0.5, 0.1) == 1.0


def test_no_p_value_from_a_bootstrap_se_of_rounding():
    # Each image: one right and one wrong answer with the same score, so r is 0 in every resample; computed, it is
    # rounding (+-1e-17), and a z test of rounding over rounding once reported p = 1e-9 (paper-geometry check).
    assert S._z_test_p(6.7e-18, 0.0, 1.3e-18) is None and S._z_test_p(0.5 + 1e-16, 0.5, 1e-17) is None
    assert S._z_test_p(0.02, 0.0, 1e-6) == pytest.approx(0.0)  # a small real SE still gives a p-value
    rng = np.random.default_rng(0)
    score = np.repeat(rng.normal(size=12), 2) * np.pi
    correct = np.tile([1, 0], 12)
    groups = np.repeat(np.arange(12), 2)
    estimate = S.point_biserial(score, correct, groups, n_boot=200, seed=0)
    assert abs(estimate.value) < 1e-12 and estimate.p_value is None


def test_scores_may_be_ints_or_bools():
    score, correct, groups = clustered(29, k=12)
    as_int = (score > 0).astype(int)
    for stat in (point_biserial, auroc):
        assert stat(as_int.astype(bool), correct, groups, n_boot=20) == stat(as_int.astype(float), correct, groups, n_boot=20)
        assert stat(list(as_int), correct, groups, n_boot=20) == stat(as_int.astype(float), correct, groups, n_boot=20)
    assert S.mean_estimate(as_int.astype(bool), groups, n_boot=20).value == pytest.approx(as_int.mean())


def test_partially_undefined_replicates_give_the_quantiles_and_sd_of_the_rest():
    # images 0 and 1 hold one class each, 2 and 3 both (with overlapping scores): replicates vary
    score = np.array([0.9, 0.3, 0.1, 0.6, 0.7, 0.5, 0.4, 0.8, 0.2, 0.65])
    correct = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    groups = np.array([0, 0, 1, 1, 2, 2, 3, 3, 3, 2])
    pairs, pos, neg = S._auroc_terms(score, correct, groups, 4)
    for confidence in (0.95, 0.8):
        ci = cluster_bootstrap(S._auroc_from_terms, [pairs, pos, neg], np.arange(4), n_boot=300, seed=2,
                               confidence=confidence)
        assert len(np.unique(ci.replicates[np.isfinite(ci.replicates)])) > 10
        finite = ci.replicates[np.isfinite(ci.replicates)]
        assert 0 < finite.size < 300
        alpha = (1 - confidence) / 2
        assert (ci.low, ci.high) == pytest.approx(tuple(np.quantile(finite, [alpha, 1 - alpha])), abs=1e-12)
        assert ci.standard_error == pytest.approx(np.std(finite, ddof=1), rel=1e-12)
    est = auroc(score, correct, groups, n_boot=300, seed=2)
    undefined = int((~np.isfinite(ci.replicates)).sum())
    assert est.method.startswith("AUROC (sklearn roc_auc_score, correct = positive); 95% CI: cluster bootstrap over "
                                 f"images (300 resamples, percentile, seed 2), {undefined} undefined resamples dropped")


def test_cluster_bootstrap_defaults_all_undefined_and_lengths():
    values = np.array([1.0, 2.0, 3.0, 4.0])
    groups = np.array([0, 0, 1, 1])
    default = cluster_bootstrap(weighted_mean, [values], groups)
    assert default.replicates.shape == (1000,)
    np.testing.assert_array_equal(default.replicates, cluster_bootstrap(weighted_mean, [values], groups, n_boot=1000,
                                                                        seed=0).replicates)
    nothing = cluster_bootstrap(lambda v, weights: np.full(weights.shape[:-1], np.nan), [values], groups, n_boot=20)
    assert math.isnan(nothing.low) and math.isnan(nothing.high) and math.isnan(nothing.standard_error)
    with pytest.raises(ValueError, match=r"^length mismatch: groups has 4, arrays\[0\] has 3 rows"):
        cluster_bootstrap(weighted_mean, [values[:3]], groups)


def test_one_resample_two_examples_and_tiny_scores():
    score, correct, groups = clustered(30, k=10)
    import warnings

    with warnings.catch_warnings():  # scipy's standard error of one replicate warns (ddof=1)
        warnings.simplefilter("ignore", RuntimeWarning)
        assert point_biserial(score, correct, groups, n_boot=1).n == score.size  # n_boot=1 is allowed
    pairs, pos, neg = S._auroc_terms(np.array([0.2, 0.8]), np.array([0, 1]), np.array([0, 1]), 2)
    assert S._auroc_from_terms(pairs, pos, neg, np.array([1.0, 1.0])) == 1.0  # one pair: den = 1
    # r and its interval do not depend on the score's scale (moments are standardised first)
    big, tiny = point_biserial(score, correct, groups, n_boot=50), point_biserial(score * 1e-8, correct, groups, n_boot=50)
    assert (tiny.value, tiny.ci_low, tiny.ci_high) == pytest.approx((big.value, big.ci_low, big.ci_high), rel=1e-6)


def test_small_messages_and_defaults():
    with pytest.raises(ValueError, match=r"found 2, 3, 4, 5, 6$"):  # the first five of six bad labels
        auroc(np.arange(8.0), np.arange(8), np.arange(8))
    with pytest.raises(ValueError, match=r"got 0$"):
        auroc([], [], [])
    _, correct, groups = clustered(31, k=12)
    fold = grouped_folds(correct, groups)
    assert set(fold) == set(range(5)) and np.array_equal(fold, grouped_folds(correct, groups, folds=5, seed=0))


def test_bootstrap_of_several_outputs_equals_each_output_alone():
    """One resampling for statistics computed together (AURC and accuracy at coverage): same CIs as one by one."""
    rng = np.random.default_rng(11)
    groups = rng.integers(0, 30, 240)
    x = rng.normal(size=240)

    def mean(x, weights):
        return (weights * x).sum(-1) / weights.sum(-1)

    def undefined_above(x, weights):  # NaN in some resamples: dropped per output
        value = mean(x, weights)
        return np.where(value > 0.05, np.nan, value)

    both = S.cluster_bootstrap_outputs(lambda x, weights: (mean(x, weights), undefined_above(x, weights)), 2, [x], groups,
                                           n_boot=400, seed=4)
    for ci, alone in zip(both, (mean, undefined_above)):
        single = S.cluster_bootstrap(alone, [x], groups, n_boot=400, seed=4)
        assert (ci.low, ci.high, ci.standard_error) == (single.low, single.high, single.standard_error)
        np.testing.assert_array_equal(ci.replicates, single.replicates)
    assert np.isnan(both[1].replicates).any() and not np.isnan(both[0].replicates).any()
    with pytest.raises(ValueError, match="returned 1 outputs; expected 2"):
        S.cluster_bootstrap_outputs(lambda x, weights: (mean(x, weights),), 2, [x], groups, n_boot=50)
    with pytest.raises(ValueError, match="n_outputs"):
        S.cluster_bootstrap_outputs(lambda x, weights: (), 0, [x], groups, n_boot=50)


# ------------------------------------------------------------- label-balanced and paired differences


def test_balanced_accuracy_change_equals_a_hand_count():
    """4 yes-questions (2 lost), 8 no-questions (1 gained): (-2/4 + 1/8) / 2, not the pooled -1/12."""
    label = np.array(["yes"] * 4 + ["no"] * 8)
    before = np.array([1, 1, 1, 0] + [1, 1, 1, 1, 0, 0, 1, 1])
    after = np.array([0, 0, 1, 0] + [1, 1, 1, 1, 1, 0, 1, 1])
    groups = np.arange(12) // 2
    est = S.balanced_accuracy_change(before, after, label, groups, n_boot=N_BOOT)
    assert est.value == pytest.approx(0.5 * (-2 / 4 + 1 / 8))
    assert (after - before).mean() == pytest.approx(-1 / 12)  # the unbalanced figure a 1:2 mix would print
    d = est.details
    assert (d["n_correct_to_wrong_yes"], d["n_wrong_to_correct_yes"], d["n_correct_to_wrong_no"], d["n_wrong_to_correct_no"]) == (2, 0, 0, 1)
    assert d["p_mcnemar_yes"] == pytest.approx(scipy.stats.binomtest(0, 2, 0.5).pvalue)
    assert d["p_mcnemar_no"] == pytest.approx(1.0)
    assert d["accuracy_before"] == pytest.approx(0.5 * (3 / 4 + 6 / 8))
    assert d["accuracy_after"] == pytest.approx(0.5 * (1 / 4 + 7 / 8))
    assert est.ci_low <= est.value <= est.ci_high


def test_balanced_mean_accepts_01_labels_and_refuses_other_answers():
    values, label = np.array([1.0, 3.0, 10.0]), np.array([1, 1, 0])
    est = S.balanced_mean(values, label, np.array([0, 1, 2]), n_boot=N_BOOT)
    assert est.value == pytest.approx((2.0 + 10.0) / 2)
    with pytest.raises(ValueError, match=r"label must be 'yes' or 'no'; got \['maybe'\]"):
        S.balanced_mean(values, np.array(["yes", "maybe", "no"]), np.array([0, 1, 2]))
    one_label = S.balanced_mean(values, np.array(["no"] * 3), np.array([0, 1, 2]), n_boot=N_BOOT)
    assert not one_label.defined and "only no-questions" in one_label.details["undefined"]


def _exact_bootstrap_sd(statistic, groups) -> float:
    """SD of ``statistic(rows)`` over every ordered resample of the K images (K^K, all equally likely)."""
    import itertools

    ids = np.unique(groups)
    values = [statistic(np.concatenate([np.flatnonzero(groups == g) for g in drawn]))
              for drawn in itertools.product(ids, repeat=ids.size)]
    return float(np.std(values))


def test_auroc_difference_gives_no_p_where_the_scores_order_all_but_a_few_pairs_alike():
    """Two scores that are the same ordering but for a few correct-wrong pairs (as |yes-no margin| and the answer's
    log-probability are): the difference and its CI are reported, the p-value is not; a real difference keeps it."""
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(150), 4)
    correct = (rng.random(600) < 0.8).astype(int)
    a = correct + rng.normal(size=600)
    b = a.copy()
    for w in np.flatnonzero(correct == 0)[:3]:  # three wrong inputs each step past the next correct one: 3 pairs reordered
        above = a[(correct == 1) & (a > a[w])]
        b[w] = above.min() + 1e-9
    close = S.auroc_difference(a, b, correct, groups, n_boot=500, seed=0)
    pairs = close.details["bootstrap_se"] * correct.sum() * (600 - correct.sum())
    assert 0 < pairs < S.MIN_PAIR_SE and abs(close.value) < 1e-4
    assert close.p_value is None and "float rounding" in close.details["p_undefined"]
    assert close.ci_low <= close.value <= close.ci_high
    far = S.auroc_difference(a, 0.3 * correct + rng.normal(size=600), correct, groups, n_boot=500, seed=0)
    assert far.details["bootstrap_se"] * correct.sum() * (600 - correct.sum()) > S.MIN_PAIR_SE
    assert far.p_value is not None and far.p_value < 0.05


def test_paired_differences_match_brute_force_over_every_resample():
    """4 images, each with both classes: all 256 resamples are defined, so the exact bootstrap SD of the
    paired difference is computable by enumeration (explicit rows, scipy / scikit-learn on each)."""
    rng = np.random.default_rng(5)
    groups = np.repeat(np.arange(4), 6)
    correct = np.tile([1, 1, 1, 0, 0, 1], 4)
    a = correct + rng.normal(size=24)
    b = 0.5 * correct + rng.normal(size=24)

    def r_diff(rows):
        return (scipy.stats.pearsonr(a[rows], correct[rows]).statistic - scipy.stats.pearsonr(b[rows], correct[rows]).statistic)

    def auc_diff(rows):
        return roc_auc_score(correct[rows], a[rows]) - roc_auc_score(correct[rows], b[rows])

    for estimate, statistic in ((S.point_biserial_difference(a, b, correct, groups, n_boot=20000, seed=1), r_diff),
                                (S.auroc_difference(a, b, correct, groups, n_boot=20000, seed=1), auc_diff)):
        assert estimate.value == pytest.approx(statistic(np.arange(24)), abs=1e-12)
        exact = _exact_bootstrap_sd(statistic, groups)
        assert estimate.details["bootstrap_se"] == pytest.approx(exact, rel=0.03)
    # Control: an unpaired SE (the two statistics resampled independently) is not what is computed here.
    unpaired = math.hypot(_exact_bootstrap_sd(lambda r: scipy.stats.pearsonr(a[r], correct[r]).statistic, groups),
                          _exact_bootstrap_sd(lambda r: scipy.stats.pearsonr(b[r], correct[r]).statistic, groups))
    paired = S.point_biserial_difference(a, b, correct, groups, n_boot=20000, seed=1).details["bootstrap_se"]
    assert abs(paired - unpaired) / unpaired > 0.05


def test_auroc_difference_bootstrap_rows_equal_auroc_difference_on_one_resampling():
    """Each row's CI is auroc_difference's for that pair (same seed), and all rows share their replicates' draws."""
    rng = np.random.default_rng(8)
    groups = np.repeat(np.arange(30), 5)
    correct = rng.random(150) < 0.6
    scores = np.stack([a * correct + rng.normal(size=150) for a in (0.0, 0.5, 1.0)])
    cis = S.auroc_difference_bootstrap(scores, 2, correct, groups, n_boot=N_BOOT, seed=4)
    for i in range(3):
        pair = S.auroc_difference(scores[i], scores[2], correct, groups, n_boot=N_BOOT, seed=4)
        assert (cis[i].low, cis[i].high, cis[i].standard_error) == (pair.ci_low, pair.ci_high, pair.details["bootstrap_se"])
    assert np.all(cis[2].replicates == 0)
    # one resampling: row 0 minus row 1 per replicate is the replicate of AUROC(row 0) - AUROC(row 1)
    between = S.auroc_difference_bootstrap(scores, 1, correct, groups, n_boot=N_BOOT, seed=4)[0]
    np.testing.assert_allclose(cis[0].replicates - cis[1].replicates, between.replicates, atol=1e-12)
    with pytest.raises(ValueError, match="reference"):
        S.auroc_difference_bootstrap(scores, 3, correct, groups)


def test_balanced_mean_bootstrap_matches_brute_force():
    groups = np.repeat(np.arange(4), 5)
    label = np.tile(["yes", "no", "no", "no", "yes"], 4)
    values = np.random.default_rng(2).normal(size=20) + (label == "yes")
    est = S.balanced_mean(values, label, groups, n_boot=20000, seed=3)

    def balanced(rows):
        yes = label[rows] == "yes"
        return 0.5 * (values[rows][yes].mean() + values[rows][~yes].mean())

    assert est.value == pytest.approx(balanced(np.arange(20)))
    assert est.details["bootstrap_se"] == pytest.approx(_exact_bootstrap_sd(balanced, groups), rel=0.03)


def test_point_biserial_difference_of_a_constant_score_is_undefined():
    score, correct, groups = clustered(3)
    est = S.point_biserial_difference(score, np.ones_like(score), correct, groups, n_boot=N_BOOT)
    assert not est.defined and est.details["undefined"].startswith("score_b is constant")
