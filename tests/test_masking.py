"""Masking: token choice, pixel filling, parameter checks, and masked answers through the engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vrp_utils.analysis import masking
from vrp_utils.analysis.geometry import pixel_mask
from vrp_utils.extract.engine import ExtractionSettings, run_batch
from vrp_utils.extract.features import open_features


def test_select_tokens_by_condition():
    p = np.array([0.05, 0.4, 0.05, 0.2, 0.1, 0.2])
    rng = np.random.default_rng(0)
    assert masking.select_tokens(p, "top", 0.5, rng).tolist() == [1, 3, 5]  # ties 0.2/0.2 both in
    assert masking.select_tokens(p, "top", 0.3, rng).tolist() == [1, 3]  # round(1.8) = 2; the tie goes to the lower index
    assert masking.select_tokens(p, "bottom", 0.3, rng).tolist() == [0, 2]
    drawn = masking.select_tokens(p, "random", 0.5, np.random.default_rng(7))
    assert len(drawn) == 3 and len(set(drawn.tolist())) == 3
    assert drawn.tolist() == masking.select_tokens(p, "random", 0.5, np.random.default_rng(7)).tolist()
    inside = np.array([False, True, True, False, False, False])
    assert masking.select_tokens(p, "box", 0.3, rng, inside).tolist() == [1, 2]
    with pytest.raises(ValueError, match="top, random, bottom, box"):
        masking.select_tokens(p, "centre", 0.3, rng)


def test_mask_image_fills_with_the_image_mean_or_a_grey_level():
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:, :2] = [200, 100, 0]
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    out = np.asarray(masking.mask_image(Image.fromarray(pixels), mask, "mean"))
    assert out[0, 0].tolist() == [100, 50, 0]
    assert (out[1:] == pixels[1:]).all() and (out[0, 1:] == pixels[0, 1:]).all()
    assert np.asarray(masking.mask_image(Image.fromarray(pixels), mask, 7))[0, 0].tolist() == [7, 7, 7]


@pytest.mark.parametrize("bad, match", [
    (dict(conditions=["centre"], fractions=[0.3], layer=None), "top, random, bottom, box"),
    (dict(conditions=["top"], fractions=[0.0], layer=None), r"\(0, 1\)"),
    (dict(conditions=["top"], fractions=[1.2], layer=None), r"\(0, 1\)"),
    (dict(conditions=["top"], fractions=[0.3], layer=2, n_layers=2), r"0\.\.1"),
])
def test_bad_parameters_name_the_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        masking.check_parameters(**bad)


def test_parse_fill():
    assert masking.parse_fill("mean") == "mean" and masking.parse_fill("128") == 128
    for bad in ("grey", "256", -1):
        with pytest.raises(ValueError, match="grey level"):
            masking.parse_fill(bad)


@pytest.mark.parametrize("name", ["zoo-llava", "zoo-qwen2-vl"])
def test_masked_pass_answers_the_masked_images(name, tiny_model_dir, tiny_loaded, tiny_benchmark, tmp_path):
    features = open_features(str(tiny_model_dir(name)), "random", limit=4, root=tmp_path, benchmark_dir=tiny_benchmark,
                             progress=False)
    plan = masking.plan(features, "top", 0.5, None, 0, seed=1)
    masked = masking.masked_pass(features, plan, progress=False).set_index("distinct_id")
    loaded = tiny_loaded(name)
    distinct = features.distinct
    for row in distinct.itertuples():
        image = features.image(row.distinct_id)
        grid = (int(row.grid_rows), int(row.grid_cols))
        assert len(plan.tokens[row.distinct_id]) == round(0.5 * grid[0] * grid[1])
        expected = masking.mask_image(image, pixel_mask(features.adapter, image.size, grid, plan.tokens[row.distinct_id]), 0)
        direct = run_batch(loaded, [expected], [row.question], ExtractionSettings(attention=False, hidden=False))
        assert masked.loc[row.distinct_id, "answer_masked"] == direct.records[0]["answer"]
    # another plan is another store; the same plan is read back, not recomputed
    again = masking.masked_pass(features, plan, progress=False)
    assert again["answer_masked"].tolist() == masked["answer_masked"].tolist()
    other = masking.plan(features, "bottom", 0.5, None, 0, seed=1)
    assert other.identity("x") != plan.identity("x")
    box = masking.plan(features, "box", 0.3, None, "mean", seed=1)
    assert set(box.tokens) == set(distinct.loc[distinct["label"] == "yes", "distinct_id"])


def test_a_bfloat16_chapters_masked_pass_is_bfloat16(tiny_model_dir, tiny_benchmark, tmp_path):
    """A masked pass derived from bfloat16 features runs in bfloat16: its store's model fingerprint says so."""
    from vrp_utils.extract.store import FeatureStore

    features = open_features(str(tiny_model_dir("zoo-qwen2-vl")), "random", limit=2, root=tmp_path,
                             benchmark_dir=tiny_benchmark, progress=False, dtype="bfloat16")
    before = set(tmp_path.iterdir())
    masked = masking.masked_pass(features, masking.plan(features, "random", 0.5, None, 0, seed=1), progress=False)
    assert len(masked) == len(features.distinct) + int(features.store.n_errors)
    (path,) = set(tmp_path.iterdir()) - before
    manifest = FeatureStore.open(path).manifest
    assert manifest["model_fingerprint"].endswith("-bfloat16")
    assert manifest["model_fingerprint"] == features.store.manifest["model_fingerprint"]
    assert manifest["settings"]["intervention"]["kind"] == "patch_mask"
