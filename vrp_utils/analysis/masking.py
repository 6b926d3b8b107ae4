"""Is looking necessary? Mask image patches chosen by attention and answer again.

Declared before any result (issue: attention analyses). For each distinct input, the tokens to
mask are chosen from the primary map (``step0``, mean over heads; at one ``layer`` or, by default,
averaged over layers):

- ``top``: the ``round(fraction * S)`` tokens with the most mass (ties by token index);
- ``bottom``: as many tokens with the least mass;
- ``random``: as many tokens from a seeded draw (seed, distinct input), the control for "any
  ``fraction`` of the image";
- ``box``: the tokens whose patch overlaps a box of the queried object (positive questions only;
  ``fraction`` does not apply).

The pixels of those tokens' patches are replaced **in the original image, before the processor**
(:func:`vrp_utils.analysis.geometry.pixel_mask`), with the image's own per-channel mean or a
constant grey level; the model answers again through the extraction engine (an
:class:`~vrp_utils.extract.engine.Intervention`, no attention or hidden states recorded), once per
distinct input. Accuracy before is the unmasked greedy pass of the same inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from PIL import Image

from vrp_utils.analysis import changes
from vrp_utils.analysis.concentration import attention_maps, top_tokens
from vrp_utils.analysis.geometry import object_boxes, pixel_mask, token_box_overlap
from vrp_utils.analysis.parallel import side_by_side

CONDITIONS = ("top", "random", "bottom", "box")


def parse_fill(fill: str | int) -> str | int:
    """``"mean"`` (the image's per-channel mean) or a grey level 0..255."""
    if fill == "mean":
        return fill
    try:
        level = int(fill)
    except (TypeError, ValueError):
        raise ValueError(f"fill must be 'mean' or a grey level 0..255; got {fill!r}") from None
    if not 0 <= level <= 255:
        raise ValueError(f"fill must be 'mean' or a grey level 0..255; got {fill!r}")
    return level


def check_parameters(conditions: Sequence[str], fractions: Sequence[float], layer: int | None, n_layers: int | None = None) -> None:
    """Refuse an unknown condition, a fraction outside (0, 1) or a layer out of range, naming the choices."""
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown or not conditions:
        raise ValueError(f"unknown masking condition(s) {unknown or list(conditions)}; choose from {', '.join(CONDITIONS)}")
    bad = [f for f in fractions if not (isinstance(f, (int, float)) and 0 < f < 1)]
    if bad or not fractions:
        raise ValueError(f"masked fractions must lie in (0, 1); got {list(fractions)}")
    if layer is not None and n_layers is not None and not (isinstance(layer, int) and 0 <= layer < n_layers):
        raise ValueError(f"layer must be None (mean over layers) or 0..{n_layers - 1}; got {layer!r}")


def selection_map(features, layer: int | None = None) -> np.ndarray:
    """The primary (step0) map of every distinct input ``[examples, max_tokens]``: one layer, or the layer mean."""
    distinct = features.distinct
    maps = attention_maps(features.store.attention()[distinct["array_index"].to_numpy()],
                          distinct["n_image_tokens"].to_numpy(), "step0").maps
    return maps.mean(axis=1) if layer is None else maps[:, layer]


def select_tokens(p: np.ndarray, condition: str, fraction: float, rng: np.random.Generator,
                  inside: np.ndarray | None = None) -> np.ndarray:
    """Token indices to mask in one map ``p`` (over its S real tokens)."""
    s = len(p)
    k = max(1, int(round(fraction * s)))
    if condition == "top":
        return np.sort(top_tokens(p, k))
    if condition == "bottom":
        return np.sort(top_tokens(-p, k))
    if condition == "random":
        return np.sort(rng.choice(s, size=k, replace=False))
    if condition == "box":
        if inside is None:
            raise ValueError("condition 'box' needs the tokens covering the queried object's box")
        return np.flatnonzero(inside)
    raise ValueError(f"unknown masking condition {condition!r}; choose from {', '.join(CONDITIONS)}")


def mask_image(image: Image.Image, mask: np.ndarray, fill: str | int) -> Image.Image:
    """The image with the ``mask`` pixels replaced by its per-channel mean (``"mean"``) or a grey level."""
    pixels = np.asarray(image.convert("RGB")).copy()
    value = np.round(pixels.reshape(-1, 3).mean(0)).astype(np.uint8) if fill == "mean" else np.uint8(fill)
    pixels[mask] = value
    return Image.fromarray(pixels)


@dataclass(frozen=True)
class MaskPlan:
    """The tokens to mask per distinct input (by distinct id) and everything that identifies them."""

    condition: str
    fraction: float
    layer: int | None
    fill: str | int
    seed: int
    tokens: dict[int, np.ndarray]
    #: (rows, cols) of each input's token grid, by distinct id
    grids: dict[int, tuple[int, int]]

    def identity(self, source: str) -> dict:
        return {"kind": "patch_mask", "condition": self.condition, "fraction": None if self.condition == "box" else self.fraction,
                "layer": self.layer, "fill": self.fill, "seed": self.seed, "map": "step0", "maps_from": source}


def plan(features, condition: str, fraction: float, layer: int | None = None, fill: str | int = "mean", seed: int = 0,
         maps: np.ndarray | None = None) -> MaskPlan:
    """Which tokens to mask for every distinct input (``box``: positive inputs only)."""
    check_parameters([condition], [fraction], layer, features.n_layers)
    distinct = features.distinct
    maps = selection_map(features, layer) if maps is None else maps
    tokens: dict[int, np.ndarray] = {}
    grids: dict[int, tuple[int, int]] = {}
    for i, row in enumerate(distinct.itertuples(index=False)):
        s = int(row.grid_rows) * int(row.grid_cols)
        inside = None
        if condition == "box":
            if row.label != "yes":
                continue
            inside = token_box_overlap(features.adapter, (row.image_width, row.image_height), (int(row.grid_rows), int(row.grid_cols)),
                                       object_boxes(row.boxes, row.object))
        rng = np.random.default_rng([seed, int(row.distinct_id)])
        tokens[int(row.distinct_id)] = select_tokens(maps[i, :s], condition, fraction, rng, inside)
        grids[int(row.distinct_id)] = (int(row.grid_rows), int(row.grid_cols))
    return MaskPlan(condition, float(fraction), layer, fill, seed, tokens, grids)


#: Same answers as batch 16 (the engine's batch-size test), several times less CPU per masked pass.
MASKED_BATCH_SIZE = 64


def _masked_pass_job(model_dir: str, dataset, root, mask_plan: MaskPlan, source: str, progress: bool,
                     device: str = "cpu", dtype: str = "float32"):
    """One masked greedy pass (a worker process of its own when run side by side: one torch thread), on ``device``
    in ``dtype`` (the features'); its store path."""
    import torch
    from transformers import AutoConfig

    from vrp_utils.extract.engine import ExtractionSettings, Intervention
    from vrp_utils.extract.features import open_or_extract
    from vrp_utils.models.adapters import adapter_for

    torch.set_num_threads(1)
    adapter = adapter_for(AutoConfig.from_pretrained(model_dir, local_files_only=True))

    def transform(row: dict, image: Image.Image) -> Image.Image:
        key = int(row["question_id"])
        mask = pixel_mask(adapter, image.size, mask_plan.grids[key], mask_plan.tokens[key])
        return mask_image(image, mask, mask_plan.fill)

    settings = ExtractionSettings(attention=False, hidden=False, batch_size=MASKED_BATCH_SIZE)
    store = open_or_extract(model_dir, dataset, settings, root=root, progress=progress, device=device, dtype=dtype,
                            intervention=Intervention(mask_plan.identity(source), transform))
    return store.path


def _pass_arguments(features, mask_plan: MaskPlan, progress: bool) -> tuple:
    wanted = sorted(mask_plan.tokens)
    return (str(features.model_dir), features.inputs.select([i - 1 for i in wanted]), features.store.path.parent,
            mask_plan, features.store.path.name, progress, features.device, features.dtype)


def _masked_table(path) -> pd.DataFrame:
    from vrp_utils.extract.store import FeatureStore

    table = FeatureStore.open(path).table(include_errors=True)
    return table[["question_id", "error", "parsed", "correct", "answer"]].rename(
        columns={"question_id": "distinct_id", "parsed": "parsed_masked", "correct": "correct_masked", "answer": "answer_masked"})


def masked_pass(features, mask_plan: MaskPlan, progress: bool = True) -> pd.DataFrame:
    """Answer every planned input with its patches masked; one row per distinct input (cached store)."""
    out = _masked_table(_masked_pass_job(*_pass_arguments(features, mask_plan, progress)))
    out["masked_tokens"] = out["distinct_id"].map(lambda d: len(mask_plan.tokens[int(d)]))
    return out


def _after(masked: pd.DataFrame) -> pd.DataFrame:
    """A masked pass's table in :mod:`vrp_utils.analysis.changes`' terms (``correct_after``, ``parsed_after``)."""
    return masked.rename(columns={"correct_masked": "correct_after", "parsed_masked": "parsed_after"})[
        ["distinct_id", "correct_after", "parsed_after", "masked_tokens"]]


def accuracy_changes(features, masked: pd.DataFrame, settings: Sequence[str], n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """Accuracy and yes-ratio change per setting, label-balanced and over distinct inputs (:mod:`changes`)."""
    return changes.accuracy_changes(features.table, _after(masked), settings, n_boot=n_boot, seed=seed,
                                    extra_means=("masked_tokens",))


def sweep(features: dict, conditions: Sequence[str], fractions: Sequence[float], sweep_conditions: Sequence[str],
          sweep_fractions: Sequence[float], layer: int | None, fill: str | int, seed: int, settings: Sequence[str],
          n_boot: int = 1000, progress: bool = True, jobs: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (model, condition, fraction) pass: ``conditions`` at ``fractions``, plus ``sweep_conditions`` over
    ``sweep_fractions``; ``jobs`` passes side by side (worker processes, one torch thread each; same stores).

    Returns the accuracy changes (:func:`accuracy_changes` of every pass) and the paired, label-balanced
    differences of ``top`` and ``bottom`` from ``random`` at each fraction where both ran
    (:func:`vrp_utils.analysis.changes.condition_difference`).
    """
    runs = {(c, float(f)) for c in conditions for f in fractions} | {(c, float(f)) for c in sweep_conditions for f in sweep_fractions}
    runs = sorted({(c, math.nan if c == "box" else f) for c, f in runs},
                  key=lambda r: (CONDITIONS.index(r[0]), 0 if math.isnan(r[1]) else r[1]))
    tasks = []
    for f in features.values():
        maps = selection_map(f, layer)
        for condition, fraction in runs:
            tasks.append((f, condition, fraction, plan(f, condition, 0.5 if condition == "box" else fraction, layer, fill, seed, maps)))
    paths = side_by_side(_masked_pass_job, [_pass_arguments(f, p, progress and jobs <= 1) for f, _, _, p in tasks], jobs)
    rows, passes = [], {}
    for (f, condition, fraction, mask_plan), path in zip(tasks, paths):
        masked = _masked_table(path)
        masked["masked_tokens"] = masked["distinct_id"].map(lambda d: len(mask_plan.tokens[int(d)]))
        passes[(f.model, condition, fraction)] = masked
        for row in accuracy_changes(f, masked, settings, n_boot, seed):
            rows.append({"model": f.model, "condition": condition, "fraction": fraction, **row})
    tables = {f.model: f.table for f in features.values()}
    differences = []
    for (model, condition, fraction), masked in passes.items():
        control = passes.get((model, "random", fraction))
        if condition in ("top", "bottom") and control is not None:
            differences.append({"model": model, "condition": condition, "versus": "random", "fraction": fraction,
                                **changes.condition_difference(tables[model], _after(masked), _after(control), n_boot=n_boot,
                                                               seed=seed)})
    return pd.DataFrame.from_records(rows), pd.DataFrame.from_records(differences)
