"""Does where the model looks predict whether it is right? The attention chapter's computations.

Everything here reads :class:`~vrp_utils.extract.features.Features` (never the model) and the
declared definitions of :mod:`vrp_utils.analysis.concentration`; every number comes out of
:mod:`vrp_utils.analysis.stats` with its CI and n. Scopes and families, declared before any result:

- **Per setting**: the setting's questions, grouped by image.
- **Pooled** (the paper's headline form): each metric z-scored within model x setting; an input
  asked in several settings (POPE's shared positives) gets the mean of its z-scores and counts once
  per model; models are concatenated and resampled by image (an image is one cluster across models).
- **Subsets**: all questions, positive questions only, negative questions only. ``inbox_mass``
  exists on positives only.
- **Holm family**: every (metric x layer) test of one model, scope and subset (pooled rows form
  their own families).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vrp_utils.analysis.concentration import METRICS, example_metrics
from vrp_utils.analysis.stats import Estimate, grouped_cv_pseudo_r2, holm, mean_estimate, point_biserial

SUBSETS = ("all", "positive", "negative")
POOLED = "pooled"
#: Columns of a per-question frame that every analysis keeps next to the metrics.
KEYS = ["setting", "question_id", "distinct_id", "array_index", "image_file", "object", "label", "correct", "parsed", "answer"]


@dataclass
class ModelMetrics:
    """One model's metrics per asked question and layer (``frame``), and how many maps were undefined."""

    model: str
    frame: pd.DataFrame
    n_layers: int
    n_rows_skipped: int
    n_undefined: int
    n_errors: dict[str, int]


def model_metrics(features, aggregate: str = "step0", head: int | None = None, top_mass: float = 0.3) -> ModelMetrics:
    """Metrics of every distinct input (computed once), joined onto every setting's questions."""
    distinct = features.distinct
    metrics, maps = example_metrics(distinct, features.store.attention(), features.adapter, aggregate, head, top_mass)
    wide = metrics.pivot(index="array_index", columns="layer")
    wide.columns = [f"{metric}@{layer}" for metric, layer in wide.columns]
    frame = features.table[KEYS].merge(wide, left_on="array_index", right_index=True, how="left", validate="many_to_one")
    frame["correct"] = frame["correct"].astype(bool)
    return ModelMetrics(features.model, frame, features.n_layers, maps.n_rows_skipped, maps.n_undefined, features.error_counts())


def metric_columns(n_layers: int, metrics: Sequence[str] = (*METRICS, "inbox_mass")) -> list[tuple[str, int]]:
    return [(metric, layer) for metric in metrics for layer in range(n_layers)]


def _subset(frame: pd.DataFrame, subset: str) -> pd.DataFrame:
    if subset == "all":
        return frame
    return frame[frame["label"] == ("yes" if subset == "positive" else "no")]


def _row(estimate: Estimate, **keys) -> dict:
    flat = estimate.as_dict()
    details = flat.pop("details") or {}
    return {**keys, **flat, "undefined": details.get("undefined")}


def pooled_frame(models: Sequence[ModelMetrics], columns: Sequence[str]) -> pd.DataFrame:
    """One row per (model, distinct input): z-scores within model x setting, averaged over settings."""
    parts = []
    for mm in models:
        frame = mm.frame
        z = frame.groupby("setting")[list(columns)].transform(lambda c: (c - c.mean()) / c.std(ddof=0))
        z = pd.concat([frame[["distinct_id", "image_file", "label", "correct"]], z], axis=1)
        per_input = z.groupby("distinct_id").agg({"image_file": "first", "label": "first", "correct": "first",
                                                  **{c: "mean" for c in columns}})
        per_input.insert(0, "model", mm.model)
        parts.append(per_input.reset_index())
    return pd.concat(parts, ignore_index=True)


def point_biserial_table(
    models: Sequence[ModelMetrics], settings: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> pd.DataFrame:
    """R_pb [CI], p and Holm-adjusted p of every metric x layer x model, per setting and pooled, by subset."""
    rows: list[dict] = []
    for mm in models:
        for scope in settings:
            frame = mm.frame[mm.frame["setting"] == scope]
            rows += _tests(frame, mm.model, scope, metric_columns(mm.n_layers), n_boot, seed)
    layers = min(mm.n_layers for mm in models)
    columns = metric_columns(layers)
    pooled = pooled_frame(models, [f"{m}@{l}" for m, l in columns])
    rows += _tests(pooled, POOLED, POOLED, columns, n_boot, seed)
    table = pd.DataFrame.from_records(rows)
    table["p_holm"] = np.nan
    for _, family in table.groupby(["model", "scope", "subset"]).groups.items():
        table.loc[family, "p_holm"] = holm(table.loc[family, "p_value"].to_numpy(dtype=float))
    return table


def _tests(frame: pd.DataFrame, model: str, scope: str, columns, n_boot: int, seed: int) -> list[dict]:
    rows = []
    for subset in SUBSETS:
        part = _subset(frame, subset)
        for metric, layer in columns:
            if metric == "inbox_mass" and subset != "positive":
                continue
            values = part[f"{metric}@{layer}"].to_numpy(dtype=float)
            keep = np.isfinite(values)
            images = part["image_file"].to_numpy()[keep]
            n_images = len(set(images))
            if n_images < 2:
                # A metric constant within a setting (C_k on a 2x2 token grid, say) has no z-score, so the
                # pooled column is all NaN: report it undefined, as point_biserial does a constant score.
                estimate = Estimate(np.nan, np.nan, np.nan, "point-biserial r", len(images), n_images, None,
                                    {"undefined": f"finite on {len(images)} of {len(values)} rows ({n_images} images): "
                                                  "constant within a setting?"})
            else:
                estimate = point_biserial(values[keep], part["correct"].to_numpy()[keep], images, n_boot=n_boot,
                                          seed=seed)
            rows.append(_row(estimate, model=model, scope=scope, subset=subset, metric=metric, layer=layer,
                             n_dropped=int((~keep).sum())))
    return rows


def explained_variance(models: Sequence[ModelMetrics], settings: Sequence[str], folds: int = 5, seed: int = 0,
                       n_boot: int = 1000) -> pd.DataFrame:
    """Out-of-fold McFadden R^2 of all attention metrics together (logistic, image-grouped CV), per model and setting.

    Metrics constant over the scope (undefined) and ``inbox_mass`` (positives only) are left out.
    """
    rows = []
    for mm in models:
        for scope in settings:
            frame = mm.frame[mm.frame["setting"] == scope]
            columns = [f"{m}@{l}" for m, l in metric_columns(mm.n_layers, METRICS)]
            x = frame[columns]
            used = [c for c in columns if x[c].notna().all() and x[c].nunique() > 1]
            images = frame["image_file"].nunique()
            keys = {"model": mm.model, "scope": scope, "n_features": len(used), "folds": min(folds, images)}
            reason = ("no attention metric varies" if not used else "fewer than 2 images" if images < 2
                      else "every answer is right or every answer is wrong" if frame["correct"].nunique() < 2 else None)
            if reason:
                rows.append({**keys, "value": None, "ci_low": None, "ci_high": None, "n": len(frame), "n_groups": images,
                             "undefined": reason})
                continue
            estimate = grouped_cv_pseudo_r2(x[used].to_numpy(), frame["correct"].to_numpy(), frame["image_file"].to_numpy(),
                                            folds=min(folds, images), seed=seed, n_boot=n_boot)
            rows.append(_row(estimate, **keys))
    return pd.DataFrame.from_records(rows)


def mean_row(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int, **keys) -> dict:
    """A mean with its image-level CI as a table row (undefined, with a reason, below 2 images)."""
    values = np.asarray(values, dtype=float)
    if len(set(groups)) < 2:
        return {**keys, "value": float(values.mean()) if len(values) else None, "ci_low": None, "ci_high": None,
                "n": int(len(values)), "n_groups": int(len(set(groups))), "undefined": "fewer than 2 images"}
    return _row(mean_estimate(values, groups, n_boot=n_boot, seed=seed), **keys)


def inbox_summary(models: Sequence[ModelMetrics], settings: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """In-box mass of correct vs wrong answers on positive questions, against its chance level.

    One row per model, scope (each setting, and ``distinct``: each positive input once) and layer:
    mean in-box mass of correct and of wrong answers and the uniform map's mass on the same tokens,
    each with its image-level CI and n.
    """
    rows = []
    for mm in models:
        positives = mm.frame[mm.frame["label"] == "yes"]
        scopes = {scope: positives[positives["setting"] == scope] for scope in settings}
        scopes["distinct"] = positives.drop_duplicates("distinct_id")
        for scope, frame in scopes.items():
            for layer in range(mm.n_layers):
                column = f"inbox_mass@{layer}"
                for outcome, part in (("correct", frame[frame["correct"]]), ("wrong", frame[~frame["correct"]])):
                    rows.append(mean_row(part[column].to_numpy(), part["image_file"].to_numpy(), n_boot, seed,
                                         model=mm.model, scope=scope, layer=layer, outcome=outcome))
                rows.append(mean_row(frame["inbox_chance@0"].to_numpy(), frame["image_file"].to_numpy(), n_boot, seed,
                                     model=mm.model, scope=scope, layer=layer, outcome="chance (uniform map)"))
    return pd.DataFrame.from_records(rows)


def entropy_by_layer(models: Sequence[ModelMetrics], settings: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean H_s per layer (CI), and the change from one layer to the next vs correctness (R_pb [CI]).

    With the zoo's 2-layer language models there is one step of depth: no trend can be read into it.
    """
    rows = []
    for mm in models:
        distinct = mm.frame.drop_duplicates("distinct_id")
        for layer in range(mm.n_layers):
            rows.append(mean_row(distinct[f"entropy@{layer}"].to_numpy(), distinct["image_file"].to_numpy(), n_boot, seed,
                                 model=mm.model, quantity="entropy", layer=layer))
        for layer in range(1, mm.n_layers):
            for scope in (*settings, "distinct"):
                frame = distinct if scope == "distinct" else mm.frame[mm.frame["setting"] == scope]
                delta = (frame[f"entropy@{layer}"] - frame[f"entropy@{layer - 1}"]).to_numpy()
                keep = np.isfinite(delta)
                estimate = point_biserial(delta[keep], frame["correct"].to_numpy()[keep], frame["image_file"].to_numpy()[keep],
                                          n_boot=n_boot, seed=seed)
                rows.append(_row(estimate, model=mm.model, quantity="delta_entropy_rpb", layer=layer, scope=scope))
    return pd.DataFrame.from_records(rows)


def overlay_pairs(mm: ModelMetrics, per_model: int = 2) -> pd.DataFrame:
    """Positive questions to show side by side: for each of ``per_model`` object classes with both
    outcomes, the first correct and the first wrong example (by distinct id: deterministic)."""
    positives = mm.frame[mm.frame["label"] == "yes"].drop_duplicates("distinct_id").sort_values("distinct_id")
    both = positives.groupby("object")["correct"].agg(lambda c: c.any() and (~c).any())
    chosen = []
    for obj in sorted(both[both].index)[:per_model]:
        of = positives[positives["object"] == obj]
        chosen += [of[of["correct"]].iloc[0], of[~of["correct"]].iloc[0]]
    return pd.DataFrame(chosen)


def check_parameters(models: str, settings: str, aggregate: str, head: int | None, top_mass: float, n_boot: int,
                     limit: int | None) -> tuple[list[str], tuple[str, ...]]:
    """Refuse a bad notebook parameter before any work, naming the valid choices; return models and settings."""
    from vrp_utils.analysis.concentration import AGGREGATES
    from vrp_utils.extract.features import language_model_shape, parse_models, parse_settings

    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(AGGREGATES)}; got {aggregate!r}")
    if not 0 < top_mass < 1:
        raise ValueError(f"top_mass must be in (0, 1); got {top_mass}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (all questions) or an integer >= 1; got {limit!r}")
    names, chosen = parse_models(models), parse_settings(settings)
    for name in names:
        _, heads = language_model_shape(name)  # also refuses an unknown model, listing the zoo
        if head is not None and not (isinstance(head, int) and 0 <= head < heads):
            raise ValueError(f"head must be None (mean over heads) or 0..{heads - 1} for {name}; got {head!r}")
    return names, chosen
