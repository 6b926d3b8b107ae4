"""The galleries of chapters 01 and 02: the seeded, stratified choice of examples, and drawings whose token
rectangles are the adapters' patch boxes (real tiny models of the three families)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from vrp_utils import plots
from vrp_utils.analysis import gallery, masking
from vrp_utils.analysis.geometry import pixel_mask, token_boxes
from vrp_utils.extract.features import open_features
from vrp_utils.models.zoo import ZOO


def _table(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    return pd.DataFrame({"distinct_id": np.arange(1, n + 1), "correct": rng.random(n) < 0.6,
                         "yes_no_margin": rng.normal(0, 3, n)})


def test_pick_examples_draws_each_stratum_with_a_fixed_seed():
    table = _table()
    table.loc[3, "yes_no_margin"] = np.nan  # no margin: in no stratum
    first = gallery.pick_examples(table, per_stratum=2, seed=7)
    assert first["stratum"].tolist() == [s for s in gallery.STRATA for _ in range(2)]
    assert 4 not in set(first["distinct_id"])
    assert first.equals(gallery.pick_examples(table, per_stratum=2, seed=7))  # same seed, same examples
    others = {tuple(gallery.pick_examples(table, per_stratum=2, seed=s)["distinct_id"]) for s in range(5)}
    assert len(others) > 1  # the seed draws
    # each pick lies in its stratum: right/wrong by correctness, confident at or above the median |margin|
    median = table["yes_no_margin"].abs().median()
    for row in first.itertuples():
        assert row.stratum.startswith("right" if row.correct else "wrong")
        assert row.stratum.endswith("confident" if abs(row.yes_no_margin) >= median else "unsure")
        assert row.confidence == pytest.approx(abs(row.yes_no_margin))
    # a small stratum gives what it has; the input table is not changed
    few = table.assign(correct=[True] * (len(table) - 1) + [False])
    picked = gallery.pick_examples(few, per_stratum=3, seed=0)
    assert (picked["stratum"].str.startswith("wrong")).sum() == 1
    assert "stratum" not in table
    with pytest.raises(ValueError, match="per_stratum"):
        gallery.pick_examples(table, per_stratum=0)


def _drawn_boxes(ax) -> np.ndarray:
    """The token rectangles an axes shows, as (x0, y0, x1, y1) in image pixels (pixel x covers [x, x+1))."""
    rects = sorted((p for p in ax.patches if (p.get_gid() or "").startswith("token:")), key=lambda p: int(p.get_gid()[6:]))
    return np.array([[r.get_x() + 0.5, r.get_y() + 0.5, r.get_x() + 0.5 + r.get_width(), r.get_y() + 0.5 + r.get_height()]
                     for r in rects])


@pytest.mark.parametrize("name", ["zoo-llava", "zoo-paligemma", "zoo-qwen2-vl"])
def test_attention_gallery_draws_the_adapters_token_boxes(name, tiny_model_dir, tiny_loaded, tiny_benchmark, tmp_path):
    features = open_features(str(tiny_model_dir(name)), "random", limit=6, root=tmp_path, benchmark_dir=tiny_benchmark,
                             progress=False)
    examples = gallery.attention_examples(features, gallery.pick_examples(features.distinct, per_stratum=1, seed=0))
    assert examples
    figure = plots.attention_gallery(examples, title="test")
    loaded = tiny_loaded(name)
    try:
        for ax, ex in zip(figure.axes, examples):
            image = ex["image"]
            # the grid the model's own processor makes of this image, and the adapter's patch boxes for it
            grid = loaded.adapter.patch_grid(loaded.adapter.build_inputs(loaded.processor, [image], [ex["question"]]), 0)
            expected = token_boxes(loaded.adapter, image.size, grid)
            drawn = _drawn_boxes(ax)
            assert drawn.shape == expected.shape == (grid[0] * grid[1], 4)
            np.testing.assert_allclose(drawn, expected)
            assert len(ex["weights"]) == len(drawn)
            # every pixel the model sees lies in exactly one drawn token rectangle
            assert pixel_mask(loaded.adapter, image.size, grid, np.arange(len(drawn))).sum() == pytest.approx(
                ((drawn[:, 2] - drawn[:, 0]) * (drawn[:, 3] - drawn[:, 1])).sum())
            objects = [p for p in ax.patches if p.get_gid() == "object"]
            assert len(objects) == len(ex["object_boxes"]) and (len(objects) > 0) == (ex["label"] == "yes")
        if name == "zoo-qwen2-vl":  # merged 2x2 tokens of 8 px patches at the processor's size, drawn on the image
            spec = ZOO[name]
            cell = 2 * spec.patch_size * image.size[0] / spec.image_size
            np.testing.assert_allclose(drawn[:, 2] - drawn[:, 0], cell)
    finally:
        plt.close(figure)


def test_masked_gallery_shows_the_images_the_masking_pass_answered(tiny_model_dir, tiny_benchmark, tmp_path):
    features = open_features(str(tiny_model_dir("zoo-qwen2-vl")), "random", limit=6, root=tmp_path,
                             benchmark_dir=tiny_benchmark, progress=False)
    picked = gallery.pick_examples(features.distinct, per_stratum=1, seed=0)
    plans = {c: masking.plan(features, c, 0.3, None, "mean", seed=1) for c in ("top", "box")}
    answers = {c: masking.masked_pass(features, p, progress=False) for c, p in plans.items()}
    examples = gallery.masked_examples(features, picked, plans, answers)
    assert [ex["distinct_id"] for ex in examples] == picked["distinct_id"].tolist()
    for ex, row in zip(examples, picked.itertuples()):
        image = features.image(row.distinct_id)
        views = {v["condition"]: v for v in ex["views"]}
        assert np.array_equal(np.asarray(views["unmasked"]["image"]), np.asarray(image))
        expected = {"top 30%"} | ({"box"} if row.label == "yes" else set())
        assert set(views) - {"unmasked"} == expected
        for condition, view in views.items():
            if condition == "unmasked":
                continue
            plan = plans[condition.split()[0]]
            mask = pixel_mask(features.adapter, image.size, plan.grids[row.distinct_id], plan.tokens[row.distinct_id])
            changed = (np.asarray(view["image"]) != np.asarray(image)).any(axis=2)
            assert not changed[~mask].any()  # only the planned tokens' pixels differ
            np.testing.assert_array_equal(np.asarray(view["image"]), np.asarray(masking.mask_image(image, mask, "mean")))
            answer = answers[condition.split()[0]].set_index("distinct_id").loc[row.distinct_id]
            assert view["answer"] == str(answer["answer_masked"]).strip()
    with plt.rc_context():
        plots.set_style()
        figure = plots.masked_gallery(examples, title="test")
        try:
            assert plots.smallest_text_px(figure) >= plots.BODY_TEXT_PX
        finally:
            plt.close(figure)
