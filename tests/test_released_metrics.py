"""The book's H_s and DBSCAN C_k against the released code's definitions, re-implemented here independently.

The released code (``itsloganmann/VLM-Reliability-Probe``, ``vrp/metrics/structural.py``) defines, on an
L1-normalised square map M:

- spatial entropy H_s = -sum M log(M + delta), delta = 1e-9, natural log, in float64;
- cluster count C_k: threshold t = the 90th percentile of M's values (numpy's default, linear
  interpolation); the (row, col) grid coordinates of every cell with M >= t; fewer than min_samples (3)
  of them -> 0; else the number of DBSCAN (eps 1.5, min_samples 3) clusters, noise (-1) excluded.

The functions below follow those words, not that file's code (the paper's page ``../shared/PAPER.md``
names the same settings), and use scikit-learn's DBSCAN; ``vrp_utils.analysis.concentration`` computes
C_k from DBSCAN's definition in numpy on the top ceil(10% S) tokens (ties by token index). They must
agree: H_s within 1e-6 (delta shifts it by at most S x 1e-9), C_k exactly, on random maps of the grids the
zoo uses (8x8, 4x4 for Qwen2-VL's merged cells) and a larger one (12x12), and on the maps of real tiny
stores. With eps 1.0 instead of 1.5 (diagonal neighbours no longer linked) the C_k check fails
(``test_the_check_can_fail``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.cluster import DBSCAN

from vrp_utils.analysis.concentration import attention_maps, ck_dbscan, entropy
from vrp_utils.extract.features import open_features

RELEASED_EPS, RELEASED_MIN_SAMPLES, RELEASED_PERCENTILE, RELEASED_DELTA = 1.5, 3, 90.0, 1e-9
GRIDS = (8, 4, 12)


def released_entropy(grid_map: np.ndarray) -> float:
    """H_s as released: natural-log Shannon entropy with delta = 1e-9 inside the log."""
    values = np.ravel(grid_map).astype(np.float64)
    return float(-(values * np.log(values + RELEASED_DELTA)).sum())


def released_ck(grid_map: np.ndarray, eps: float = RELEASED_EPS) -> int:
    """C_k as released: DBSCAN clusters of the cells at or above the 90th percentile of the map."""
    cut = np.percentile(grid_map, RELEASED_PERCENTILE)
    rows, cols = np.nonzero(grid_map >= cut)
    if rows.size < RELEASED_MIN_SAMPLES:
        return 0
    labels = DBSCAN(eps=eps, min_samples=RELEASED_MIN_SAMPLES).fit(np.column_stack([rows, cols]).astype(float)).labels_
    return len(np.setdiff1d(np.unique(labels), [-1]))


def random_maps(side: int, count: int, seed: int) -> list[np.ndarray]:
    """Flat maps summing to 1: flat ones, peaked ones (power 8) and one-blob ones, so 0, 1 and several clusters occur."""
    rng = np.random.default_rng(seed)
    maps = []
    for i in range(count):
        p = rng.random(side * side)
        kind = i % 3
        if kind == 1:
            p = p ** 8
        elif kind == 2:
            r, c = rng.integers(0, side, 2)
            rr, cc = np.divmod(np.arange(side * side), side)
            p = p + 4 * np.exp(-((rr - r) ** 2 + (cc - c) ** 2) / 2.0)
        maps.append(p / p.sum())
    return maps


def mismatches(maps, side: int, eps: float = RELEASED_EPS) -> int:
    return sum(ck_dbscan(p, (side, side)) != released_ck(p.reshape(side, side), eps) for p in maps)


@pytest.mark.parametrize("side", GRIDS)
def test_entropy_equals_the_released_h_s(side):
    maps = random_maps(side, 300, seed=side)
    gaps = [abs(entropy(p) - released_entropy(p.reshape(side, side))) for p in maps]
    assert max(gaps) < 1e-6
    # a map with empty cells: 0 log 0 = 0 in both
    sparse = np.zeros(side * side)
    sparse[:3] = [0.5, 0.3, 0.2]
    assert entropy(sparse) == pytest.approx(released_entropy(sparse.reshape(side, side)), abs=1e-6)


@pytest.mark.parametrize("side", GRIDS)
def test_ck_dbscan_equals_the_released_c_k(side):
    maps = random_maps(side, 300, seed=100 + side)
    counts = [released_ck(p.reshape(side, side)) for p in maps]
    assert mismatches(maps, side) == 0
    if side >= 8:  # the check covers 0, 1 and more than one cluster (4x4 keeps 2 cells: always 0)
        assert {0, 1} <= set(counts) and max(counts) >= 2
    else:
        assert set(counts) == {0}


@pytest.mark.parametrize("side", GRIDS)
def test_ck_dbscan_keeps_the_ties_at_the_cut_as_the_released_percentile_does(side):
    """Maps with ties at the top-10% cut: peaked maps whose float32 softmax underflows to exact zeros (a tiny
    Qwen2-VL store gave 33 zeros of 36: released C_k 1, the top 4 alone 0), and coarsely quantised maps."""
    rng = np.random.default_rng(7 + side)
    maps = []
    for i in range(300):
        p = np.zeros(side * side)
        if i % 2:
            few = rng.choice(side * side, size=int(rng.integers(1, 4)), replace=False)
            p[few] = rng.random(len(few)) * 0.1
            p[few[0]] += 1.0  # one peak, a few small cells, the rest exact zeros
        else:
            p = np.round(rng.random(side * side) * 3) + 1e-3  # four levels: ties everywhere
        maps.append(p / p.sum())
    kept = [int((p >= np.percentile(p, RELEASED_PERCENTILE)).sum()) for p in maps]
    assert sum(k > math.ceil(round(0.1 * side * side, 9)) for k in kept) > 100  # the ties do keep more cells
    assert mismatches(maps, side) == 0
    peaked = np.zeros(side * side)
    peaked[[0, 1, 2]] = [0.9514, 0.0486, 1.2e-5]
    assert ck_dbscan(peaked, (side, side)) == released_ck(peaked.reshape(side, side)) == (0 if side == 4 else 1)  # 4x4: 13 zeros of 16, the cut lies above 0


def test_the_check_can_fail():
    """eps 1.0 drops diagonal links: the released-C_k check then disagrees on many 8x8 and 12x12 maps."""
    for side in (8, 12):
        assert mismatches(random_maps(side, 300, seed=100 + side), side, eps=1.0) > 10


def test_the_top_ten_percent_is_the_same_cell_count():
    """numpy's 90th percentile keeps floor(0.1 S + 0.9) distinct cells; the book keeps ceil(0.1 S): equal for every S."""
    for s in range(1, 2000):
        values = np.arange(s, dtype=float)
        assert int((values >= np.percentile(values, RELEASED_PERCENTILE)).sum()) == math.ceil(round(0.1 * s, 9))


@pytest.fixture(scope="module")
def store_maps(tiny_model_dir, tiny_benchmark, tmp_path_factory):
    """Step-0 maps of every layer of real tiny stores: zoo-llava (8x8 grid) and zoo-qwen2-vl (4x4 merged cells)."""
    root = tmp_path_factory.mktemp("released-metric-stores")
    out = []
    for name in ("zoo-llava", "zoo-qwen2-vl"):
        features = open_features(str(tiny_model_dir(name)), "random", root=root, benchmark_dir=tiny_benchmark, progress=False)
        table = features.table
        maps = attention_maps(features.store.attention()[table["array_index"].to_numpy()], table["n_image_tokens"].to_numpy())
        for i, (rows, cols) in enumerate(table[["grid_rows", "grid_cols"]].to_numpy()):
            for layer in range(maps.maps.shape[1]):
                out.append((name, (int(rows), int(cols)), maps.maps[i, layer, : rows * cols]))
    return out


def test_store_maps_agree_with_the_released_definitions(store_maps):
    grids = {name: grid for name, grid, _ in store_maps}
    assert grids == {"zoo-llava": (12, 12), "zoo-qwen2-vl": (6, 6)} and len(store_maps) >= 2 * 24 * 2  # zoo v2's grids
    for name, (rows, cols), p in store_maps:
        assert np.isfinite(p).all() and p.sum() == pytest.approx(1.0)
        square = p.reshape(rows, cols)
        assert abs(entropy(p) - released_entropy(square)) < 1e-6, name
        assert ck_dbscan(p, (rows, cols)) == released_ck(square), name
