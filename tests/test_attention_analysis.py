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
