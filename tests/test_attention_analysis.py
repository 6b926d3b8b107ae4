"""The attention chapter's computations: pooling, Holm families, parameter checks, end to end on a tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vrp_utils.analysis import attention as att
from vrp_utils.analysis.stats import holm


def _frame(model_seed: int) -> att.ModelMetrics:
    rng = np.random.default_rng(model_seed)
    rows = []
    for setting in ("random", "popular"):
        for i in range(24):
            distinct = i if i < 12 else 100 * (setting == "popular") + i  # 12 inputs shared by both settings
            rows.append({"setting": setting, "distinct_id": distinct, "image_file": f"img{distinct % 8}",
                         "label": "yes" if i < 12 else "no", "correct": bool(rng.random() < 0.6),
                         "entropy@0": rng.normal() + (5 if setting == "popular" else 0)})
    frame = pd.DataFrame(rows)
    shared = frame.groupby("distinct_id")["correct"].transform("first")  # one answer per distinct input
    frame["correct"] = shared
    return att.ModelMetrics(f"m{model_seed}", frame, 1, 0, 0, {})


def test_pooled_frame_z_scores_within_model_and_setting_and_counts_inputs_once():
    models = [_frame(1), _frame(2)]
    pooled = att.pooled_frame(models, ["entropy@0"])
    for mm in models:
        mine = pooled[pooled["model"] == mm.model]
        assert len(mine) == mm.frame["distinct_id"].nunique()
        f = mm.frame
        z = (f["entropy@0"] - f.groupby("setting")["entropy@0"].transform("mean")) / f.groupby("setting")["entropy@0"].transform(
            lambda c: c.std(ddof=0))
        expected = z.groupby(f["distinct_id"]).mean()
        np.testing.assert_allclose(mine.set_index("distinct_id")["entropy@0"].loc[expected.index], expected, atol=1e-12)
    # the setting offset (+5 on popular) is gone after z-scoring
    assert abs(pooled["entropy@0"].mean()) < 0.2


def test_holm_is_applied_within_each_model_scope_and_subset(monkeypatch):
    models = [_frame(1), _frame(2)]
    monkeypatch.setattr(att, "metric_columns", lambda n_layers, metrics=("entropy",): [("entropy", 0)])
    table = att.point_biserial_table(models, ["random", "popular"], n_boot=50)  # Holm needs p-values, not precise ones
    assert set(table["model"]) == {"m1", "m2", "pooled"}
    for _, family in table.groupby(["model", "scope", "subset"]):
        np.testing.assert_allclose(family["p_holm"], holm(family["p_value"].to_numpy(float)), equal_nan=True)
    per_setting = table[(table["model"] == "m1") & (table["scope"] == "random") & (table["subset"] == "all")]
    assert per_setting["n"].iloc[0] == 24 and per_setting["n_groups"].iloc[0] == 8


def test_a_metric_constant_within_each_setting_is_undefined_not_an_error(monkeypatch):
    """Paper-geometry Qwen2-VL on 64 px images has a 2x2 token grid, where C_k is the same on every example."""
    models = [_frame(1)]
    models[0].frame["entropy@0"] = np.where(models[0].frame["setting"] == "popular", 2.0, 1.0)
    monkeypatch.setattr(att, "metric_columns", lambda n_layers, metrics=("entropy",): [("entropy", 0)])
    table = att.point_biserial_table(models, ["random", "popular"], n_boot=20)
    assert table["value"].isna().all() and table["p_holm"].isna().all()
    pooled = table[table["model"] == "pooled"]
    assert len(pooled) == 3 and pooled["undefined"].str.contains("finite on 0 of").all()
    assert table[table["model"] == "m1"]["undefined"].str.contains("constant").all()


def test_bad_parameters_fail_before_any_work(tiny_model_dir):
    model = str(tiny_model_dir("zoo-llava"))
    good = dict(models=model, settings="all", aggregate="step0", head=None, top_mass=0.3, n_boot=10, limit=None)
    assert att.check_parameters(**good) == ([model], ("random", "popular", "adversarial"))
    for change, match in [({"aggregate": "mean"}, "step0, answer, per_row"), ({"head": 4}, r"0\.\.3"),
                          ({"top_mass": 1.0}, r"\(0, 1\)"), ({"n_boot": 0}, ">= 1"), ({"limit": 0}, "limit"),
                          ({"settings": "hard"}, "random, popular, adversarial"), ({"models": "zoo-gpt"}, "Unknown zoo model")]:
        with pytest.raises(ValueError, match=match):
            att.check_parameters(**{**good, **change})


def test_model_metrics_end_to_end(tiny_model_dir, tiny_benchmark, tmp_path):
    from vrp_utils.extract.features import open_features

    features = open_features(str(tiny_model_dir("zoo-paligemma")), "all", limit=6, root=tmp_path,
                             benchmark_dir=tiny_benchmark, progress=False)
    mm = att.model_metrics(features)
    assert len(mm.frame) == len(features.table)
    # one map per distinct input: shared inputs carry identical metrics in every setting
    assert (mm.frame.groupby("distinct_id")["entropy@0"].nunique() == 1).all()
    positives = mm.frame[mm.frame["label"] == "yes"]
    assert positives["inbox_mass@0"].notna().all() and mm.frame.loc[mm.frame["label"] == "no", "inbox_mass@0"].isna().all()
    assert ((positives["inbox_chance@0"] > 0) & (positives["inbox_chance@0"] <= 1)).all()
    assert (mm.frame["entropy_norm@0"] <= 1 + 1e-12).all()
    # Depth comes from the store's shape, never a constant.
    layers = features.store.attention().shape[1]
    assert mm.n_layers == layers >= 2
    entropy = att.entropy_by_layer([mm], ["random"], n_boot=20)
    first_to_last = entropy[(entropy["span"] == "first_to_last") & (entropy["model"] == mm.model)]
    assert set(zip(first_to_last["from_layer"], first_to_last["to_layer"])) == {(0, layers - 1)}
    # (layers - 1) steps x 2 scopes x 2 quantities, and the pooled rows' 2 per step
    assert (entropy["span"] == "consecutive").sum() == (layers - 1) * 6
    peak = att.inbox_peak_layer([mm], n_boot=20)
    assert set(peak["layers"]) == {layers}
    assert peak.loc[peak["quantity"] == "peak_layer", "value"].dropna().between(0, layers - 1).all()


# -- depth: ΔH_s, the in-box peak, "near zero at every layer" ---------------------------------------


def _deep(seed: int, n_layers: int, model: str | None = None) -> att.ModelMetrics:
    """A model's frame with ``n_layers`` layers of entropy and in-box mass (12 images, 2 settings sharing inputs)."""
    rng = np.random.default_rng(seed)
    rows = []
    for setting in ("random", "popular"):
        for i in range(36):
            distinct = i if i < 18 else 100 * (setting == "popular") + i
            rows.append({"setting": setting, "distinct_id": distinct, "image_file": f"img{distinct % 12}",
                         "label": "yes" if i < 18 else "no"})
    frame = pd.DataFrame(rows)
    ids = frame["distinct_id"].unique()
    per_input = pd.DataFrame({"distinct_id": ids, "correct": rng.random(len(ids)) < 0.6})
    for layer in range(n_layers):
        per_input[f"entropy@{layer}"] = 4.0 - 0.5 * layer + rng.normal(0, 0.3, len(ids))
        per_input[f"inbox_mass@{layer}"] = 0.1 + 0.05 * (layer == 1) + rng.normal(0, 0.05, len(ids))
    frame = frame.merge(per_input, on="distinct_id")
    frame.loc[frame["label"] == "no", [f"inbox_mass@{layer}" for layer in range(n_layers)]] = np.nan
    return att.ModelMetrics(model or f"d{seed}", frame, n_layers, 0, 0, {})


def test_entropy_changes_are_paired_differences_of_each_input_for_every_step_and_first_to_last():
    import scipy.stats

    mm = _deep(3, 4)
    table = att.entropy_by_layer([mm], ["random", "popular"], n_boot=50)
    mine = table[table["model"] == "d3"]
    steps = mine[mine["quantity"] == "delta_entropy_mean"]
    # every consecutive step of the store's 4 layers, then 0 -> 3 and the middle layer (1) -> 3; each in every scope
    assert sorted(set(zip(steps["span"], steps["from_layer"], steps["to_layer"]))) == [
        ("consecutive", 0, 1), ("consecutive", 1, 2), ("consecutive", 2, 3), ("first_to_last", 0, 3),
        ("middle_to_last", 1, 3)]
    assert set(steps["scope"]) == {"random", "popular", "distinct"}
    assert (mine.loc[mine["quantity"] == "entropy", "layer"].tolist() == [0, 1, 2, 3])
    distinct = mm.frame.drop_duplicates("distinct_id")
    for span, start, stop in (("consecutive", 1, 2), ("first_to_last", 0, 3), ("middle_to_last", 1, 3)):
        by_hand = [distinct[f"entropy@{stop}"].iloc[i] - distinct[f"entropy@{start}"].iloc[i] for i in range(len(distinct))]
        where = (mine["span"] == span) & (mine["from_layer"] == start) & (mine["scope"] == "distinct")
        mean = mine[where & (mine["quantity"] == "delta_entropy_mean")].iloc[0]
        assert mean["value"] == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-12)
        assert mean["ci_low"] < mean["value"] < mean["ci_high"] and mean["n_groups"] == 12
        rpb = mine[where & (mine["quantity"] == "delta_entropy_rpb")].iloc[0]
        assert rpb["value"] == pytest.approx(scipy.stats.pointbiserialr(distinct["correct"], by_hand).statistic, abs=1e-12)
    pooled = table[table["model"] == "pooled"]
    assert len(pooled) == 2 * 5 and set(pooled["scope"]) == {"pooled"}


def test_pooled_entropy_changes_take_the_common_steps_and_each_models_own_first_to_last():
    shallow, deep = _deep(1, 2, "two"), _deep(2, 4, "four")
    table = att.entropy_by_layer([shallow, deep], ["random"], n_boot=50)
    pooled = table[(table["model"] == "pooled") & (table["quantity"] == "delta_entropy_mean")]
    assert pooled["span"].tolist() == ["consecutive", "first_to_last", "middle_to_last"]
    assert pooled["from_layer"].tolist() == [0, 0, None]  # no one middle layer for models of different depth
    assert pooled["to_layer"].tolist() == [1, None, None]  # nor one last layer
    own = np.concatenate([(m.frame.drop_duplicates("distinct_id")[f"entropy@{m.n_layers - 1}"]
                           - m.frame.drop_duplicates("distinct_id")["entropy@0"]).to_numpy() for m in (shallow, deep)])
    assert pooled.iloc[1]["value"] == pytest.approx(own.mean(), abs=1e-12)


def test_inbox_peak_layer_and_its_interval_equal_explicit_resamples_of_images():
    """The peak and peak-minus-last of each recorded resample, recomputed on its explicitly resampled rows."""
    from vrp_utils.analysis.stats import cluster_bootstrap

    mm = _deep(5, 3)
    n_boot = 200
    table = att.inbox_peak_layer([mm], n_boot=n_boot, seed=4)
    positives = mm.frame[mm.frame["label"] == "yes"].drop_duplicates("distinct_id")
    mass = positives[[f"inbox_mass@{layer}" for layer in range(3)]].to_numpy()
    images = positives["image_file"].to_numpy()
    means = mass.mean(axis=0)
    row = table[(table["outcome"] == "all") & (table["quantity"] == "peak_layer")].iloc[0]
    assert row["value"] == int(np.argmax(means)) and row["layers"] == 3 and row["n"] == len(positives)
    gap = table[(table["outcome"] == "all") & (table["quantity"] == "peak_minus_last")].iloc[0]
    assert gap["value"] == pytest.approx(means.max() - means[-1], abs=1e-12)
    # The same draws (they depend on the images, n_boot and seed only), recorded as per-image counts.
    order = pd.factorize(images)[1]
    drawn = []
    cluster_bootstrap(lambda weights: drawn.append(weights.copy()) or weights.sum(-1), [], np.arange(len(order)),
                      n_boot=n_boot, seed=4)
    counts = np.concatenate(drawn)
    peaks, gaps = [], []
    for c in counts:
        rows = np.concatenate([np.repeat(np.flatnonzero(images == g), int(n)) for g, n in zip(order, c)])
        m = mass[rows].mean(axis=0)
        peaks.append(int(np.argmax(m)))
        gaps.append(m.max() - m[-1])
    assert row["resamples_at_peak"] == sum(p == row["value"] for p in peaks)
    assert (row["ci_low"], row["ci_high"]) == (int(np.floor(np.percentile(peaks, 2.5))), int(np.ceil(np.percentile(peaks, 97.5))))
    assert (gap["ci_low"], gap["ci_high"]) == pytest.approx((np.percentile(gaps, 2.5), np.percentile(gaps, 97.5)), abs=1e-12)
    assert set(table["outcome"]) == {"all", "correct", "wrong"}
    depth = table[(table["outcome"] == "all") & (table["quantity"] == "peak_relative_depth")].iloc[0]
    assert (depth["value"], depth["ci_low"], depth["ci_high"]) == tuple((v + 1) / 3 for v in (row["value"], row["ci_low"], row["ci_high"]))


@pytest.mark.parametrize("n_layers, middle", [(2, 0), (3, 1), (6, 2), (18, 8), (28, 13), (32, 15)])
def test_the_middle_layer_is_the_last_of_the_first_half(n_layers, middle):
    assert att.middle_layer(n_layers) == middle


def test_peak_statistics_pick_the_earliest_of_tied_layers_and_mark_empty_resamples_undefined():
    sums = np.array([[3.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.0]])  # two images: mass at 3 layers, then row counts
    peak, gap = att.peak_statistics(sums, np.array([[1.0, 0.0], [0.0, 0.0]]))
    assert peak[0] == 0 and gap[0] == pytest.approx(3.0 - 2.0)
    assert np.isnan(peak[1]) and np.isnan(gap[1])


def test_every_layer_summary_takes_the_largest_r_pb_and_needs_every_layer_inside_the_margin():
    def rows(model, values, cis, metric="entropy"):
        return [{"model": model, "scope": "random", "subset": "all", "metric": metric, "layer": layer, "value": v,
                 "ci_low": lo, "ci_high": hi, "n": 100, "n_groups": 20} for layer, (v, (lo, hi)) in enumerate(zip(values, cis))]

    table = pd.DataFrame(rows("in", [0.01, -0.05, 0.02], [(-0.05, 0.07), (-0.09, -0.01), (-0.04, 0.08)])
                         + rows("out", [0.01, 0.08, 0.0], [(-0.05, 0.07), (0.02, 0.14), (-0.06, 0.06)])
                         + rows("gap", [0.01, np.nan, 0.0], [(-0.05, 0.07), (np.nan, np.nan), (-0.06, 0.06)])
                         + rows("in", [0.3], [(0.2, 0.4)], metric="gini")
                         + [{**r, "subset": "positive", "value": 0.5} for r in rows("in", [0.5], [(0.4, 0.6)])])
    summary = att.every_layer_summary(table, margin=0.1).set_index("model")
    assert list(summary.index) == ["in", "out", "gap"]  # gini is no primary metric; the positive subset is not read
    assert summary.loc["in", "value"] == -0.05 and summary.loc["in", "layer"] == 1 and summary.loc["in", "all_within_margin"]
    assert summary.loc["in", ["layers", "n_within_margin"]].tolist() == [3, 3]
    assert summary.loc["out", "value"] == 0.08 and summary.loc["out", "all_within_margin"] is False
    assert summary.loc["out", "n_within_margin"] == 2
    assert summary.loc["gap", "all_within_margin"] is None and summary.loc["gap", "n_defined"] == 2
    # the envelope spans every layer's CI, so it lies inside +-0.1 exactly when every layer does
    assert summary.loc["in", "envelope"] == {"value": -0.05, "ci_low": -0.09, "ci_high": 0.08, "n": 100}
    assert summary.loc["out", "envelope"]["ci_high"] == 0.14 and summary.loc["out", "envelope"]["ci_low"] == -0.06
    assert summary.loc["gap", "envelope"]["value"] is None


def test_the_every_layer_margin_is_claim_1s():
    from vrp_utils.pages import load_claims

    claims = {c["id"]: c for c in load_claims()["claims"]}
    assert att.EVERY_LAYER_MARGIN == claims["1"]["margin"] == claims["1b"]["margin"]
    assert f"\u00b1{att.EVERY_LAYER_MARGIN:g}" in att.EVERY_LAYER_RULE


def test_the_depth_caveat_names_only_shallow_models():
    assert att.depth_caveat({"a": 6, "b": 8}) == ""
    every = att.depth_caveat({"a": 2, "b": 2})
    assert every.startswith("The language models") and "a (2), b (2)" in every and "no trend" in every
    some = att.depth_caveat({"a": 2, "b": 6})
    assert some.startswith("Some") and "a (2)" in some and "b (6)" not in some
