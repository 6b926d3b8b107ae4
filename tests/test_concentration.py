"""Attention maps and concentration metrics against hand computations and independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vrp_utils.analysis.concentration import (
    attention_maps, ck_dbscan, ck_text, entropy, gini, inbox_mass, map_metrics, tokens_to_mass,
)


def _rows(n=2, layers=2, heads=3, steps=4, tokens=6, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.random((n, layers, heads, steps, tokens)) * 0.1
    return rows.astype(np.float16)


def test_step0_map_is_the_head_mean_of_step0_renormalised_over_real_tokens():
    rows = _rows()
    counts = np.array([6, 4])
    maps = attention_maps(rows, counts, "step0").maps
    for i, k in enumerate(counts):
        for layer in range(2):
            expected = rows[i, layer, :, 0, :k].astype(np.float64).mean(0)
            expected /= expected.sum()
            np.testing.assert_allclose(maps[i, layer, :k], expected, rtol=0, atol=1e-15)
            assert (maps[i, layer, k:] == 0).all()


def test_one_head_and_per_row_variants():
    rows = _rows()
    counts = np.array([6, 6])
    one = attention_maps(rows, counts, "step0", head=2).maps
    expected = rows[1, 0, 2, 0].astype(np.float64) / rows[1, 0, 2, 0].astype(np.float64).sum()
    np.testing.assert_allclose(one[1, 0], expected, atol=1e-15)
    rows[0, 1, 1, 0, :] = 0  # a row whose image mass underflowed: skipped and counted
    per_row = attention_maps(rows, counts, "per_row")
    assert per_row.n_rows_skipped == 1
    kept = rows[0, 1, [0, 2], 0].astype(np.float64)
    expected = (kept / kept.sum(1, keepdims=True)).mean(0)
    np.testing.assert_allclose(per_row.maps[0, 1], expected / expected.sum(), atol=1e-15)


def test_answer_map_averages_only_the_content_steps():
    rows = _rows(steps=4)
    rows[:, :, :, 3] = np.nan  # a step after the end token
    lengths = np.array([2, 1])
    maps = attention_maps(rows, np.array([6, 6]), "answer", answer_lengths=lengths).maps
    for i, length in enumerate(lengths):
        expected = rows[i, 0, :, :length].astype(np.float64).mean((0, 1))
        np.testing.assert_allclose(maps[i, 0], expected / expected.sum(), atol=1e-15)
    empty = attention_maps(rows, np.array([6, 6]), "answer", answer_lengths=np.array([0, 1]))
    assert np.isnan(empty.maps[0]).all() and empty.n_undefined == 1


def test_bad_aggregate_and_head_name_the_choices():
    with pytest.raises(ValueError, match="step0"):
        attention_maps(_rows(), np.array([6, 6]), "mean")
    with pytest.raises(ValueError, match=r"0\.\.2"):
        attention_maps(_rows(), np.array([6, 6]), "step0", head=3)


def test_entropy_and_gini_against_independent_formulas():
    rng = np.random.default_rng(1)
    p = rng.random(16)
    p /= p.sum()
    assert entropy(p) == pytest.approx(-sum(x * math.log(x) for x in p), abs=1e-12)
    pairwise = np.abs(p[:, None] - p[None, :]).sum() / (2 * len(p) ** 2 * p.mean())
    assert gini(p) == pytest.approx(pairwise, abs=1e-12)
    assert gini(np.full(8, 1 / 8)) == pytest.approx(0, abs=1e-15)
    assert gini(np.eye(8)[3]) == pytest.approx(7 / 8)


def test_tokens_to_mass_stops_at_the_threshold_and_breaks_ties_by_index():
    p = np.array([0.1, 0.2, 0.2, 0.5])
    assert tokens_to_mass(p, 0.3).tolist() == [3]
    assert tokens_to_mass(p, 0.6).tolist() == [3, 1]  # tie 0.2/0.2: the lower index first
    assert tokens_to_mass(p, 0.7).tolist() == [3, 1]  # 0.5 + 0.2 reaches 0.7 exactly
    assert tokens_to_mass(p, 0.71).tolist() == [3, 1, 2]


def test_ck_text_counts_4_connected_components_minus_one():
    grid = (4, 4)
    p = np.zeros(16)
    p[[0, 5, 15]] = [0.3, 0.3, 0.3]  # diagonal neighbours 0 and 5 are not 4-connected
    p[[1, 2]] = 0.05
    assert ck_text(p / p.sum(), grid, mass=0.9) == 2
    q = np.zeros(16)
    q[[0, 1, 4]] = 1 / 3  # an L: one component
    assert ck_text(q, grid, mass=0.99) == 0


def test_ck_dbscan_counts_clusters_without_noise():
    grid = (8, 8)  # ceil(6.4) = 7 top tokens
    p = np.full(64, 1e-4)
    for index in (0, 1, 8, 54, 55, 63, 30):  # two blocks of 3 and one isolated token
        p[index] = 1.0
    assert ck_dbscan(p / p.sum(), grid) == 2
    two = np.linspace(1.0, 2.0, 16)  # distinct values: the top ceil(1.6) = 2 tokens < min_samples, no cluster forms
    assert ck_dbscan(two / two.sum(), (4, 4)) == 0
    # a flat map ties every token at the cut: all 16 are kept (as the released 90th percentile keeps them), one cluster
    assert ck_dbscan(np.full(16, 1 / 16), (4, 4)) == 1


def test_scaling_a_map_changes_no_metric_after_renormalisation():
    rows = _rows(n=1, layers=1, tokens=16)
    a = attention_maps(rows, np.array([16])).maps[0, 0]
    b = attention_maps((rows.astype(np.float64) * 3).astype(np.float16), np.array([16])).maps[0, 0]
    ma, mb = map_metrics(a, (4, 4)), map_metrics(b, (4, 4))
    for key in ma:
        assert ma[key] == pytest.approx(mb[key], abs=1e-3)


def test_inbox_mass_and_its_chance_level():
    p = np.array([0.4, 0.1, 0.3, 0.2])
    inside = np.array([True, False, False, True])
    assert inbox_mass(p, inside) == (pytest.approx(0.6), 0.5)
    # mass moved between tokens outside the box does not change in-box mass
    assert inbox_mass(np.array([0.4, 0.3, 0.1, 0.2]), inside)[0] == pytest.approx(0.6)


def test_ck_dbscan_equals_scikit_learn_dbscan_on_random_maps():
    from sklearn.cluster import DBSCAN

    rng = np.random.default_rng(5)
    for trial in range(400):
        grid = [(8, 8), (4, 4), (6, 5), (24, 24)][trial % 4]
        p = rng.random(grid[0] * grid[1]) ** 8  # peaked maps: clustered and scattered top tokens both occur
        p /= p.sum()
        k = math.ceil(0.1 * len(p))
        order = np.lexsort((np.arange(len(p)), -p))[:k]
        coordinates = np.stack(np.divmod(order, grid[1]), axis=1)
        labels = DBSCAN(eps=1.5, min_samples=3).fit(coordinates).labels_ if k else np.array([])
        assert ck_dbscan(p, grid) == len(set(labels.tolist()) - {-1})


# ------------------------------------------------------------------ the per-example table
# (added against surviving mutants of benchmarks/mutation.sh: example_metrics and metrics_table had no test)


class GridAdapter:
    """Geometry only: the image cut into an even rows x cols grid (real adapters are tested in test_geometry)."""

    def patch_boxes(self, image_size, grid):
        (width, height), (rows, cols) = image_size, grid
        return [(c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows)
                for r in range(rows) for c in range(cols)]


def _table():
    import json

    import pandas as pd

    box = json.dumps([{"category": "cup", "bbox": [0, 0, 10, 10]}, {"category": "dog", "bbox": [25, 0, 30, 30]}])
    return pd.DataFrame({
        "id": ["a", "b", "c", "d"],
        "array_index": [2, 0, 1, 1],  # table rows point at other array rows
        "n_image_tokens": [6, 4, 6, 6],
        "answer_length": [1, 2, 2, 1],
        "grid_rows": [2, 2, 3, 3], "grid_cols": [3, 2, 2, 2],
        "label": ["yes", "yes", "yes", "no"],
        "object": ["cup", "cup", "dog", "dog"],
        "boxes": [box] * 4,
        "image_width": [30] * 4, "image_height": [30] * 4,
    })


def test_example_metrics_rows_layers_maps_and_inbox_mass():
    from vrp_utils.analysis.concentration import METRICS, example_metrics

    table = _table()
    attention = _rows(n=3, layers=2, heads=2, steps=3, tokens=6, seed=4)
    metrics, maps = example_metrics(table, attention, GridAdapter())
    assert list(metrics.columns) == ["array_index", "layer", *METRICS, "inbox_mass", "inbox_chance"]
    assert metrics["array_index"].tolist() == [2, 2, 0, 0, 1, 1, 1, 1] and metrics["layer"].tolist() == [0, 1] * 4
    # positive "a": cup box [0,10]x[0,10] on a 2x3 grid of 10x15 cells overlaps cell 0 only
    # positive "c": dog box [25,30]x[0,30] on a 3x2 grid of 15x10 cells overlaps cells 1, 3, 5
    # positive "b" (4 real tokens of 6: padded): a 2x2 grid of 15x15 cells, cell 0 only
    inside = {0: np.array([1, 0, 0, 0, 0, 0], bool), 1: np.array([1, 0, 0, 0], bool),
              2: np.array([0, 1, 0, 1, 0, 1], bool)}
    for i, row in table.iterrows():
        s = row.n_image_tokens
        for layer in range(2):
            expected = attention[row.array_index, layer, :, 0, :s].astype(np.float64).mean(0)
            expected /= expected.sum()
            np.testing.assert_allclose(maps.maps[i, layer, :s], expected, atol=1e-15)
            got = metrics.iloc[2 * i + layer]
            hand = map_metrics(expected, (row.grid_rows, row.grid_cols))
            assert got[list(METRICS)].to_dict() == pytest.approx(hand)
            if i in inside:
                assert got["inbox_mass"] == pytest.approx(expected[inside[i]].sum())
                assert got["inbox_chance"] == pytest.approx(inside[i].mean())
            else:
                assert math.isnan(got["inbox_mass"]) and math.isnan(got["inbox_chance"])


def test_example_metrics_passes_aggregate_head_and_top_mass():
    from vrp_utils.analysis.concentration import example_metrics

    table = _table()
    attention = _rows(n=3, layers=2, heads=2, steps=3, tokens=6, seed=5)
    answer, maps = example_metrics(table, attention, GridAdapter(), aggregate="answer")
    row = table.iloc[2]  # answer_length 2: steps 0 and 1
    expected = attention[row.array_index, 1, :, :2, :6].astype(np.float64).mean((0, 1))
    np.testing.assert_allclose(maps.maps[2, 1], expected / expected.sum(), atol=1e-15)
    _, one_head = example_metrics(table, attention, GridAdapter(), head=1)
    expected = attention[row.array_index, 0, 1, 0, :6].astype(np.float64)
    np.testing.assert_allclose(one_head.maps[2, 0], expected / expected.sum(), atol=1e-15)
    wide, _ = example_metrics(table, attention, GridAdapter(), top_mass=0.9)
    step0, step0_maps = example_metrics(table, attention, GridAdapter())
    assert (wide["ck_text"].to_numpy() >= 0).all()
    for i in range(3):
        grid = (table.grid_rows[i], table.grid_cols[i])
        s = table.n_image_tokens[i]
        assert wide["ck_text"][2 * i] == ck_text(step0_maps.maps[i, 0, :s], grid, 0.9)
        assert step0["ck_text"][2 * i] == ck_text(step0_maps.maps[i, 0, :s], grid, 0.3)


def test_example_metrics_refuses_a_positive_without_a_box_on_the_image():
    from vrp_utils.analysis.concentration import example_metrics

    table = _table()
    table.loc[0, "object"] = "cat"  # no box of that category
    with pytest.raises(ValueError, match=r"positive question 'a' \('cat'\) has no box overlapping any image token"):
        example_metrics(table, _rows(n=3, layers=1, heads=1, steps=1, tokens=6), GridAdapter())


def test_metrics_table_checks_top_mass_and_grid():
    from vrp_utils.analysis.concentration import metrics_table

    maps = attention_maps(_rows(n=2, layers=1, tokens=6), np.array([6, 4]))
    for bad in (0, 1, 1.5):
        with pytest.raises(ValueError, match=r"^top_mass must be in \(0, 1\)"):
            metrics_table(maps, np.array([[2, 3], [2, 2]]), bad)
    table = metrics_table(maps, np.array([[2, 3], [2, 2]]), 0.5)
    assert table["example"].tolist() == [0, 1]
    assert table.iloc[1]["ck_text"] == ck_text(maps.maps[1, 0, :4], (2, 2), 0.5)
    with pytest.raises(ValueError, match=r"^map has 4 tokens but the grid is \(1, 3\)"):
        map_metrics(maps.maps[1, 0, :4], (1, 3))
    nan = map_metrics(np.full(4, np.nan), (2, 2))
    assert all(math.isnan(v) for v in nan.values()) and set(nan) == {"entropy", "entropy_norm", "ck_text", "ck_dbscan", "top10_mass", "gini"}
    with pytest.raises(ValueError, match=r"^map has 4 tokens, box mask 3"):
        inbox_mass(np.full(4, 0.25), np.ones(3, bool))


def test_maps_bookkeeping_and_the_first_head():
    rows = _rows(n=3, layers=2, heads=3, steps=2, tokens=6, seed=8)
    rows[1] = 0  # no image mass at all: undefined
    rows[2, 0] = 0  # undefined on one layer only
    counts = np.array([6, 5, 4])
    maps = attention_maps(rows, counts)
    assert maps.counts is not None and maps.counts.tolist() == [6, 5, 4]
    assert (maps.n_rows_skipped, maps.n_undefined) == (0, 2)
    first = attention_maps(rows, counts, head=0)
    expected = rows[0, 1, 0, 0].astype(np.float64)
    np.testing.assert_allclose(first.maps[0, 1], expected / expected.sum(), atol=1e-15)
    assert attention_maps(rows, counts, "answer", answer_lengths=np.array([1, 2, 2])).n_rows_skipped == 0
    per_row = attention_maps(rows, counts, "per_row")
    assert (per_row.n_rows_skipped, per_row.n_undefined) == (3 * 2 + 3, 2)


def test_undefined_maps_raise_no_numpy_warnings():
    import warnings

    rows = _rows(n=2, layers=1, heads=2, steps=2, tokens=4)
    rows[0] = 0
    rows[1, 0, 0] = 0  # one zero row for per_row
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for aggregate in ("step0", "answer", "per_row"):
            attention_maps(rows, np.array([4, 4]), aggregate, answer_lengths=np.array([0, 1]))


def test_entropy_ignores_zero_tokens_and_ck_text_defaults_to_30_percent():
    assert entropy(np.array([0.5, 0.5, 0.0])) == pytest.approx(math.log(2))
    assert map_metrics(np.array([0.5, 0.0, 0.0, 0.5]), (2, 2))["entropy"] == pytest.approx(math.log(2))
    p = np.array([0.25, 0.05, 0.05, 0.05, 0.05, 0.55])
    assert ck_text(p, (2, 3)) == ck_text(p, (2, 3), 0.3) == 0  # 0.55 alone holds 30%
    assert ck_text(p, (2, 3), 0.7) == 1  # tokens 5 and 0 are not 4-connected
    q = np.array([0.28, 0.14, 0.15, 0.15, 0.28])  # 30% needs both ends of a 1x5 strip; 100% joins them
    assert ck_text(q, (1, 5)) == 1 and ck_text(q, (1, 5), 1.0) == 0
    from vrp_utils.analysis.concentration import metrics_table

    maps = AttentionMapsFor(q)
    assert metrics_table(maps, np.array([[1, 5]]))["ck_text"].tolist() == [1.0]


def AttentionMapsFor(p):  # noqa: N802 - a one-map AttentionMaps
    from vrp_utils.analysis.concentration import AttentionMaps

    return AttentionMaps(p[None, None, :], np.array([len(p)]), 0, 0)


def test_gini_does_not_need_a_normalised_map():
    x = np.array([1.0, 1.0, 1.0, 5.0])
    assert gini(x) == pytest.approx(gini(x / x.sum())) == pytest.approx(
        np.abs(x[:, None] - x[None, :]).sum() / (2 * 16 * x.mean()))
