"""Attention maps over the image and how concentrated they are: the definitions the chapters read.

Declared before any result (issue: attention analyses). The store keeps, per example, softmax rows
over *all* keys gathered at the image tokens (``[layers, heads, steps, image_tokens]``, float16,
steps after the end token NaN, padded tokens 0). A row's image mass is therefore below 1, so every
map is renormalised over the example's real image tokens, in float64.

Maps (per example and layer):

- ``step0`` (primary): the mean over heads of step 0, the query that produces the first answer
  token, renormalised.
- ``answer``: the mean over heads and over the steps that produce the answer's content tokens
  (steps ``0 .. answer_length - 1``; the step producing the end token is left out), renormalised.
  Yes and no answers can differ in length, so this variant averages over different step counts.
- ``per_row``: each (head, step0) row renormalised first, then averaged over heads; a row with zero
  image mass (float16 underflow) is skipped and counted.

Metrics of a map ``p`` over ``S`` tokens on a ``rows x cols`` grid:

- ``entropy`` H_s = -sum p log p (natural log); ``entropy_norm`` = H_s / log S.
- ``ck_text`` (the paper's text): tokens in decreasing mass, ties by token index, until the
  cumulative mass reaches ``top_mass`` (0.3); 4-connected components of them on the grid, minus 1.
- ``ck_dbscan`` (the released code): DBSCAN (eps 1.5, min_samples 3) on the grid coordinates of the
  top ceil(0.1 S) tokens and every token tied with the last of them (the released code keeps every cell at or
  above the map's 90th percentile, so a tie at the cut keeps all the tied cells); the number of clusters,
  noise excluded.
- ``top10_mass``: the mass of the top ceil(0.1 S) tokens. ``gini``: the Gini coefficient of ``p``.
- ``inbox_mass`` (positive questions only): the mass on tokens whose patch overlaps a box of the
  queried object; ``inbox_chance``: the mass a uniform map puts on those same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

AGGREGATES = ("step0", "answer", "per_row")
METRICS = ("entropy", "entropy_norm", "ck_text", "ck_dbscan", "top10_mass", "gini")
#: Metrics defined on every example (``inbox_mass`` exists on positive questions only).
DBSCAN_EPS = 1.5
DBSCAN_MIN_SAMPLES = 3
TOP_FRACTION = 0.1


@dataclass
class AttentionMaps:
    """``maps[i, layer, :counts[i]]``: renormalised map of example i (NaN where undefined)."""

    maps: np.ndarray
    counts: np.ndarray
    #: (head, step) rows skipped for zero image mass (``per_row``), and examples with no map at all.
    n_rows_skipped: int
    n_undefined: int


def attention_maps(
    attention: np.ndarray,
    counts: np.ndarray,
    aggregate: str = "step0",
    head: int | None = None,
    answer_lengths: np.ndarray | None = None,
) -> AttentionMaps:
    """Maps ``[examples, layers, max_tokens]`` (float64) from stored rows ``[examples, layers, heads, steps, tokens]``.

    ``head`` selects one head instead of the mean over heads. An example whose rows carry no image
    mass at all (or, for ``answer``, has no content token) gets a NaN map and is counted.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    attention = np.asarray(attention)
    if attention.ndim != 5:
        raise ValueError(f"attention must be [examples, layers, heads, steps, tokens], got shape {attention.shape}")
    n, layers, heads, steps, width = attention.shape
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"head must be None (mean over heads) or in 0..{heads - 1}, got {head}")
    counts = np.asarray(counts, dtype=np.int64)
    real = np.arange(width)[None, :] < counts[:, None]  # [n, tokens]
    head_slice = slice(None) if head is None else slice(head, head + 1)
    skipped = 0
    if aggregate == "step0":
        raw = attention[:, :, head_slice, 0, :].astype(np.float64).mean(axis=2)
    elif aggregate == "answer":
        if answer_lengths is None:
            raise ValueError("aggregate='answer' needs answer_lengths (the store's answer_length column)")
        lengths = np.minimum(np.asarray(answer_lengths, dtype=np.int64), steps)
        content = np.arange(steps)[None, :] < lengths[:, None]  # [n, steps]
        rows = attention[:, :, head_slice].astype(np.float64)  # [n, L, h, steps, tokens]
        rows = np.where(content[:, None, None, :, None], np.nan_to_num(rows), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = rows.sum(axis=(2, 3)) / (rows.shape[2] * lengths)[:, None, None]
    else:
        rows = attention[:, :, head_slice, 0, :].astype(np.float64)  # [n, L, h, tokens]
        mass = np.where(real[:, None, None, :], rows, 0.0).sum(-1, keepdims=True)
        good = mass > 0
        skipped = int((~good).sum())
        with np.errstate(invalid="ignore", divide="ignore"):
            normalised = np.where(good, rows / mass, 0.0)
        used = good.sum(axis=2)  # [n, L, 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            raw = normalised.sum(axis=2) / used
    raw = np.where(real[:, None, :], raw, 0.0)
    total = raw.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        maps = np.where(total > 0, raw / total, np.nan)
    maps = np.where(real[:, None, :], maps, 0.0)  # padded tokens: 0; an undefined map stays NaN on its real tokens
    undefined = int(np.isnan(maps).any(axis=(1, 2)).sum())
    return AttentionMaps(maps, counts, skipped, undefined)


def top_count(s: int) -> int:
    """ceil(10% of S) tokens, robust to float rounding (0.1 * 6 * 5 is 3.0000000000000004 in floats)."""
    return math.ceil(round(TOP_FRACTION * s, 9))


def entropy(p: np.ndarray) -> float:
    """Shannon entropy (natural log) of a distribution; 0 log 0 = 0."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def gini(p: np.ndarray) -> float:
    """Gini coefficient of the values of ``p`` (0: uniform; (S-1)/S: all mass on one token)."""
    x = np.sort(np.asarray(p, dtype=np.float64))
    s = len(x)
    return float((2 * np.arange(1, s + 1) - s - 1) @ x / (s * x.sum()))


def top_tokens(p: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest values, in decreasing mass, ties broken by token index."""
    order = np.lexsort((np.arange(len(p)), -p))
    return order[:k]


def tokens_to_mass(p: np.ndarray, mass: float) -> np.ndarray:
    """Tokens in decreasing mass (ties by index) until their cumulative mass reaches ``mass``."""
    order = np.lexsort((np.arange(len(p)), -p))
    cumulative = np.cumsum(p[order])
    # float64 rounding: the cumulative sum of a map that sums to 1 may stop a hair below it
    k = int(np.searchsorted(cumulative, mass - 1e-12, side="left")) + 1
    return order[: min(k, len(p))]


def ck_text(p: np.ndarray, grid: tuple[int, int], mass: float = 0.3) -> int:
    """Components (4-connected) of the tokens holding ``mass`` of the map, minus 1."""
    from scipy import ndimage

    rows, cols = grid
    picked = np.zeros(rows * cols, dtype=bool)
    picked[tokens_to_mass(p, mass)] = True
    _, components = ndimage.label(picked.reshape(rows, cols))  # default structure: 4-connectivity
    return int(components) - 1


def ck_dbscan(p: np.ndarray, grid: tuple[int, int]) -> int:
    """DBSCAN clusters (noise excluded) of the grid coordinates of the top ceil(10% S) tokens, ties at the cut included.

    Ties matter on peaked maps whose float32 softmax underflows to exact zeros: with 33 of 36 cells at 0, the
    released code's 90th percentile is 0 and it clusters every cell (one cluster), where the top 4 alone make none.

    DBSCAN's clusters are the connected components of its core points (points with at least
    ``min_samples`` points, themselves included, within ``eps``), linked when within ``eps``; border
    points join a cluster without making one. So the count is computed from that definition with
    numpy: scikit-learn's ``DBSCAN.fit`` costs 4-20 ms per call on 7 points (thread-pool start-up),
    and a build counts about 10,000 maps. A test checks equality with scikit-learn's DBSCAN.
    """
    from scipy.spatial.distance import cdist

    rows, cols = grid
    k = top_count(rows * cols)
    cut = np.partition(p, len(p) - k)[len(p) - k]  # the k-th largest value
    coordinates = np.stack(np.divmod(np.flatnonzero(p >= cut), cols), axis=1).astype(np.float64)
    near = cdist(coordinates, coordinates) <= DBSCAN_EPS
    core = near.sum(axis=1) >= DBSCAN_MIN_SAMPLES
    if not core.any():
        return 0
    reach = near[np.ix_(core, core)].astype(np.int64)
    while True:  # transitive closure by squaring: at most log2(k) steps on a k x k matrix (k kept tokens)
        closed = ((reach @ reach) > 0).astype(np.int64)
        if np.array_equal(closed, reach):
            break
        reach = closed
    return len({row.tobytes() for row in reach})  # one distinct reachability row per component


def map_metrics(p: np.ndarray, grid: tuple[int, int], top_mass: float = 0.3) -> dict[str, float]:
    """Every metric of one map (``p`` over ``rows*cols`` tokens, summing to 1)."""
    s = len(p)
    if s != grid[0] * grid[1]:
        raise ValueError(f"map has {s} tokens but the grid is {grid}")
    if not np.isfinite(p).all():
        return {name: math.nan for name in METRICS}
    h = entropy(p)
    return {
        "entropy": h,
        "entropy_norm": h / math.log(s) if s > 1 else math.nan,
        "ck_text": float(ck_text(p, grid, top_mass)),
        "ck_dbscan": float(ck_dbscan(p, grid)),
        "top10_mass": float(p[top_tokens(p, top_count(s))].sum()),
        "gini": gini(p),
    }


def metrics_table(maps: AttentionMaps, grids: np.ndarray, top_mass: float = 0.3) -> pd.DataFrame:
    """Long table: one row per (example, layer) with every metric; ``example`` is the map's row."""
    if not 0 < top_mass < 1:
        raise ValueError(f"top_mass must be in (0, 1), got {top_mass}")
    records = []
    n, layers, _ = maps.maps.shape
    for i in range(n):
        grid = (int(grids[i][0]), int(grids[i][1]))
        s = grid[0] * grid[1]
        for layer in range(layers):
            records.append({"example": i, "layer": layer, **map_metrics(maps.maps[i, layer, :s], grid, top_mass)})
    return pd.DataFrame.from_records(records)


def inbox_mass(p: np.ndarray, inside: np.ndarray) -> tuple[float, float]:
    """(mass of ``p`` on the tokens flagged ``inside``, the mass a uniform map puts there)."""
    if len(p) != len(inside):
        raise ValueError(f"map has {len(p)} tokens, box mask {len(inside)}")
    return float(p[inside].sum()), float(inside.mean())


def example_metrics(
    table: pd.DataFrame,
    attention: np.ndarray,
    adapter: object,
    aggregate: str = "step0",
    head: int | None = None,
    top_mass: float = 0.3,
) -> tuple[pd.DataFrame, AttentionMaps]:
    """Every metric of every example and layer: ``table`` rows are the store's OK rows (``array_index``).

    Returns a long frame (``array_index``, ``layer``, the metrics, ``inbox_mass`` and
    ``inbox_chance``; the last two NaN on negative questions, which have no box) and the maps.
    """
    rows = table["array_index"].to_numpy()
    maps = attention_maps(
        attention[rows], table["n_image_tokens"].to_numpy(), aggregate, head,
        table["answer_length"].to_numpy() if aggregate == "answer" else None,
    )
    grids = table[["grid_rows", "grid_cols"]].to_numpy()
    metrics = metrics_table(maps, grids, top_mass)
    metrics.insert(0, "array_index", rows[metrics.pop("example").to_numpy()])
    inbox = np.full((len(table), maps.maps.shape[1]), np.nan)
    chance = np.full(len(table), np.nan)
    from vrp_utils.analysis.geometry import object_boxes, token_box_overlap

    for i, row in enumerate(table.itertuples(index=False)):
        if row.label != "yes":
            continue
        grid = (int(row.grid_rows), int(row.grid_cols))
        inside = token_box_overlap(adapter, (row.image_width, row.image_height), grid, object_boxes(row.boxes, row.object))
        if not inside.any():
            raise ValueError(f"positive question {row.id!r} ({row.object!r}) has no box overlapping any image token")
        s = grid[0] * grid[1]
        for layer in range(maps.maps.shape[1]):
            inbox[i, layer], chance[i] = inbox_mass(maps.maps[i, layer, :s], inside)
    metrics["inbox_mass"] = inbox.reshape(-1)
    metrics["inbox_chance"] = np.repeat(chance, maps.maps.shape[1])
    return metrics, maps
