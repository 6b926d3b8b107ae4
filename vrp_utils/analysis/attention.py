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
- **Depth**: every per-layer quantity runs over the layers the store holds (``ModelMetrics.n_layers``,
  from the store's shape), never a fixed count; pooled per-layer rows cover the layers every model has.
  ΔH_s is the change of H_s from one layer to the next and from the first layer to the model's last
  (:func:`entropy_by_layer`); the in-box peak is the layer of the largest mean in-box mass, re-chosen on
  every image resample (:func:`inbox_peak_layer`); :data:`EVERY_LAYER_RULE` summarises "near zero at
  every layer" (:func:`every_layer_summary`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from vrp_utils.analysis.concentration import METRICS, example_metrics
from vrp_utils.analysis.stats import (Estimate, cluster_bootstrap_outputs, grouped_cv_pseudo_r2, holm, mean_estimate,
                                      point_biserial)

SUBSETS = ("all", "positive", "negative")
POOLED = "pooled"
#: Columns of a per-question frame that every analysis keeps next to the metrics.
KEYS = ["setting", "question_id", "distinct_id", "array_index", "image_file", "object", "label", "correct", "parsed", "answer"]
#: The margin of "near zero at every layer": claim 1's equivalence margin in ``book/claims.yml`` (an |R_pb| of 0.1 is an
#: AUROC of about 0.57; a test checks the two agree).
EVERY_LAYER_MARGIN = 0.1
#: The primary metrics of claim 1 (C_k, the paper's text) and claim 1b (H_s).
EVERY_LAYER_METRICS = ("ck_text", "entropy")
#: How :func:`every_layer_summary` judges "attention metrics near zero at every layer" (published with the rows).
EVERY_LAYER_RULE = (
    "Per model x setting and pooled (all questions), for each primary metric (C_k as the paper's text defines it, H_s): "
    "the R_pb of largest size over the layers the store holds, with its 95% CI (bootstrap over images), and "
    "all_within_margin: true when every layer's R_pb is defined and its whole 95% CI lies inside "
    f"\u00b1{EVERY_LAYER_MARGIN:g} (claim 1's margin), false when some layer's CI reaches outside, null when some "
    "layer's R_pb is undefined (a metric constant over the scope). Unadjusted: every layer must pass on its own, so "
    "more layers make the verdict harder to earn, never easier."
)


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


def middle_layer(n_layers: int) -> int:
    """The layer "late" is counted from (claim 6b: attention diffuses late): (L - 1) // 2, the last of the first half."""
    return (n_layers - 1) // 2


def _entropy_steps(n_layers: int) -> list[tuple[str, int, int]]:
    """(span, from_layer, to_layer): each consecutive step, then the first layer to the last and the middle layer
    (:func:`middle_layer`) to the last (from the layer count; with 2 layers the two spans are the one step)."""
    steps = [("consecutive", layer - 1, layer) for layer in range(1, n_layers)]
    if n_layers < 2:
        return steps
    return steps + [("first_to_last", 0, n_layers - 1), ("middle_to_last", middle_layer(n_layers), n_layers - 1)]


def _delta_column(span: str, start: int, stop: int) -> str:
    # the spans to the last layer get one name in every model, so models of different depth pool their own change
    return f"delta_entropy@{span}" if span in ("first_to_last", "middle_to_last") else f"delta_entropy@{start}-{stop}"


def _change_rows(frame: pd.DataFrame, column: str, n_boot: int, seed: int,
                 quantities: Sequence[str] = ("delta_entropy_mean", "delta_entropy_rpb"), **keys) -> list[dict]:
    """Mean change [CI] (paired: one input at two layers) and R_pb of the change with correctness [CI]."""
    delta = frame[column].to_numpy(dtype=float)
    keep = np.isfinite(delta)
    images = frame["image_file"].to_numpy()[keep]
    rows = []
    if "delta_entropy_mean" in quantities:
        rows.append(mean_row(delta[keep], images, n_boot, seed, quantity="delta_entropy_mean", **keys))
    if "delta_entropy_rpb" not in quantities:
        return rows
    if len(set(images)) < 2:
        rows.append({**keys, "quantity": "delta_entropy_rpb", "value": None, "ci_low": None, "ci_high": None,
                     "n": int(keep.sum()), "n_groups": len(set(images)), "undefined": "fewer than 2 images"})
    else:
        estimate = point_biserial(delta[keep], frame["correct"].to_numpy()[keep], images, n_boot=n_boot, seed=seed)
        rows.append(_row(estimate, quantity="delta_entropy_rpb", **keys))
    return rows


def entropy_by_layer(models: Sequence[ModelMetrics], settings: Sequence[str], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean H_s per layer, and ΔH_s from each layer to the next and from the first layer to the last, with CIs.

    Rows (``quantity``): ``entropy``, each model's mean H_s per layer over its distinct inputs (``span`` "layer");
    ``delta_entropy_mean``, the mean paired change H_s(to_layer) - H_s(from_layer) of one input (nats; negative:
    attention sharpens with depth); ``delta_entropy_rpb``, the R_pb of that change with correctness. Each change is
    given for every consecutive step (``span`` "consecutive"), from the first layer to the model's last
    (``first_to_last``) and from its middle layer to its last (``middle_to_last``, :func:`middle_layer`), per model (scopes: each setting, and ``distinct``: each input once) and pooled (model and
    scope ``pooled``: the mean change over every model's distinct inputs; the R_pb on changes z-scored within model x
    setting as :func:`pooled_frame`; consecutive steps over the layers every model has, first-to-last each model's
    own). CIs: bootstrap over images (an image is one cluster across models). ``layer`` repeats ``to_layer``.
    The layers come from each store (``n_layers``); a store with one layer has no change.
    """
    rows = []
    extended = []
    for mm in models:
        frame = mm.frame.copy()
        steps = _entropy_steps(mm.n_layers)
        for span, start, stop in steps:
            frame[_delta_column(span, start, stop)] = frame[f"entropy@{stop}"] - frame[f"entropy@{start}"]
        extended.append(ModelMetrics(mm.model, frame, mm.n_layers, mm.n_rows_skipped, mm.n_undefined, mm.n_errors))
        distinct = frame.drop_duplicates("distinct_id")
        for layer in range(mm.n_layers):
            rows.append(mean_row(distinct[f"entropy@{layer}"].to_numpy(), distinct["image_file"].to_numpy(), n_boot, seed,
                                 model=mm.model, scope="distinct", quantity="entropy", span="layer", from_layer=layer,
                                 to_layer=layer, layer=layer))
        for span, start, stop in steps:
            for scope in (*settings, "distinct"):
                part = distinct if scope == "distinct" else frame[frame["setting"] == scope]
                rows += _change_rows(part, _delta_column(span, start, stop), n_boot, seed, model=mm.model, scope=scope,
                                     span=span, from_layer=start, to_layer=stop, layer=stop)
    if models:
        depths = sorted({mm.n_layers for mm in models})
        shared = _entropy_steps(depths[0])  # consecutive steps every model has, then first-to-last (each model's own)
        columns = [_delta_column(*step) for step in shared]
        distinct_all = pd.concat([mm.frame.drop_duplicates("distinct_id") for mm in extended], ignore_index=True)
        pooled = pooled_frame(extended, columns) if columns else None
        for (span, start, stop), column in zip(shared, columns):
            last = stop if span == "consecutive" or len(depths) == 1 else None  # models of different depth: no one last layer
            first = None if span == "middle_to_last" and len(depths) > 1 else start  # nor one middle layer
            keys = dict(model=POOLED, scope=POOLED, span=span, from_layer=first, to_layer=last, layer=last)
            rows += _change_rows(distinct_all, column, n_boot, seed, quantities=("delta_entropy_mean",), **keys)
            rows += _change_rows(pooled, column, n_boot, seed, quantities=("delta_entropy_rpb",), **keys)
    return _whole_numbers(pd.DataFrame.from_records(rows), ["from_layer", "to_layer", "layer"])


#: The in-box peak's interval: the percentile bounds of the resampled peak layers, widened to whole layers.
PEAK_METHOD = ("layer of the largest mean in-box mass (positive questions, each distinct input once); 95% CI: cluster "
               "bootstrap over images ({n_boot} resamples, percentile, seed {seed}), the peak re-chosen on each resample, "
               "bounds floored / ceiled to whole layers; peak_minus_last: mean in-box mass at the peak layer minus at the "
               "last layer (paired: the same inputs), the peak re-chosen on each resample, so the interval carries the "
               "choice (its value is >= 0 by construction: it excludes 0 only when under 2.5% of resamples peak at the "
               "last layer)")


def peak_statistics(mass: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Peak layer and (peak minus last layer) of the weighted mean in-box mass, for weights ``(..., n)``.

    ``mass``: ``[n, layers]`` (rows: inputs, or images' sums with a last column of row counts, see
    :func:`inbox_peak_layer`). Ties go to the earliest layer (``argmax``). Vectorised over resamples.
    """
    sums = np.asarray(weights, dtype=float) @ mass
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums[..., :-1] / sums[..., -1:]
    defined = np.isfinite(means).all(axis=-1)
    peak = np.where(defined, np.argmax(np.where(np.isfinite(means), means, -np.inf), axis=-1), np.nan)
    gap = np.where(defined, np.max(np.where(np.isfinite(means), means, -np.inf), axis=-1) - means[..., -1], np.nan)
    return peak, gap


def inbox_peak_layer(models: Sequence[ModelMetrics], n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Where in-box attention mass peaks over depth, per model and outcome, with image-bootstrap CIs.

    On each model's distinct positive inputs (all, answered right, answered wrong): ``quantity`` ``peak_layer``, the
    layer (0 .. n_layers - 1, from the store) whose mean in-box mass is largest, with ``resamples_at_peak`` (how many
    resamples chose the same layer); ``peak_minus_last``, the mean mass at the peak layer minus at the last layer;
    ``peak_relative_depth``, (peak + 1) / n_layers with the peak's whole-layer CI likewise.
    Both come from one :func:`~vrp_utils.analysis.stats.cluster_bootstrap_outputs` resampling of images (method:
    :data:`PEAK_METHOD`).
    """
    rows = []
    for mm in models:
        positives = mm.frame[mm.frame["label"] == "yes"].drop_duplicates("distinct_id")
        columns = [f"inbox_mass@{layer}" for layer in range(mm.n_layers)]
        for outcome, part in (("all", positives), ("correct", positives[positives["correct"]]),
                              ("wrong", positives[~positives["correct"]])):
            part = part[np.isfinite(part[columns].to_numpy(dtype=float)).all(axis=1)]
            keys = {"model": mm.model, "scope": "distinct", "outcome": outcome, "layers": mm.n_layers,
                    "last_layer": mm.n_layers - 1, "n": len(part), "n_groups": part["image_file"].nunique(),
                    "method": PEAK_METHOD.format(n_boot=n_boot, seed=seed)}
            if keys["n_groups"] < 2:
                for quantity in ("peak_layer", "peak_minus_last", "peak_relative_depth"):
                    rows.append({**keys, "quantity": quantity, "value": None, "ci_low": None, "ci_high": None,
                                 "undefined": "fewer than 2 images"})
                continue
            codes, images = pd.factorize(part["image_file"])
            k = len(images)
            # per image: summed mass at each layer and its number of inputs (the weighted mean is a ratio of sums)
            per_image = np.zeros((k, mm.n_layers + 1))
            np.add.at(per_image, codes, np.column_stack([part[columns].to_numpy(dtype=float), np.ones(len(part))]))
            peak, gap = (float(v) for v in peak_statistics(per_image, np.ones(k)))
            peak_ci, gap_ci = cluster_bootstrap_outputs(lambda m, weights: peak_statistics(m, weights), 2, [per_image],
                                                        np.arange(k), n_boot=n_boot, seed=seed)
            reps = peak_ci.replicates
            rows.append({**keys, "quantity": "peak_layer", "value": int(peak), "ci_low": int(np.floor(peak_ci.low)),
                         "ci_high": int(np.ceil(peak_ci.high)), "resamples_at_peak": int((reps == peak).sum()),
                         "undefined": None})
            rows.append({**keys, "quantity": "peak_minus_last", "value": gap, "ci_low": gap_ci.low, "ci_high": gap_ci.high,
                         "undefined": None})
            # where in the stack, as the reliability layer is given (claim 6a: visual features fixed early)
            rows.append({**keys, "quantity": "peak_relative_depth", "value": (peak + 1) / mm.n_layers,
                         "ci_low": (np.floor(peak_ci.low) + 1) / mm.n_layers,
                         "ci_high": (np.ceil(peak_ci.high) + 1) / mm.n_layers, "undefined": None})
    return _whole_numbers(pd.DataFrame.from_records(rows), ["resamples_at_peak"])


def _whole_numbers(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Columns of layer indices and counts as Python ints (None where missing), not floats padded with NaN."""
    for column in columns:
        if column in table:
            table[column] = pd.Series([None if pd.isna(v) else int(v) for v in table[column]], index=table.index, dtype=object)
    return table


#: Fewer layers than this: one step of depth at most per model, read as no trend (:func:`depth_caveat`).
DEPTH_FOR_TREND = 3


def depth_caveat(layers: dict[str, int]) -> str:
    """The caveat on reading a trend across depth, for the models with fewer than :data:`DEPTH_FOR_TREND` layers
    ("" when every model has enough; ``layers``: model -> language-model layers, from the stores)."""
    shallow = {model: n for model, n in layers.items() if n < DEPTH_FOR_TREND}
    if not shallow:
        return ""
    names = ", ".join(f"{model} ({n})" for model, n in shallow.items())
    every = len(shallow) == len(layers)
    return (f"{'The' if every else 'Some'} language models here have fewer than {DEPTH_FOR_TREND} layers ({names}): at most one "
            "step of depth, from which no trend across depth can be read; their first-to-last change is that one step, "
            "and their in-box peak can only be the first or the last layer.")


def every_layer_summary(rpb: pd.DataFrame, metrics: Sequence[str] = EVERY_LAYER_METRICS,
                        margin: float = EVERY_LAYER_MARGIN) -> pd.DataFrame:
    """:data:`EVERY_LAYER_RULE` applied to :func:`point_biserial_table` rows (all questions): one row per model,
    scope and metric with the largest |R_pb| over layers (``value``, ``layer``, its CI), ``all_within_margin``, and
    ``envelope``: that value with the lowest and highest CI bound over every layer (inside the margin exactly when
    every layer is).

    The margin is not a column (the rule text, published beside the rows, states it): every float a chapter publishes
    is a value, a CI bound or a p-value, the quantities ``results/reference/tolerances.yml`` has rules for."""
    rows = []
    part = rpb[(rpb["subset"] == "all") & rpb["metric"].isin(metrics)]
    for (model, scope, metric), group in part.groupby(["model", "scope", "metric"], sort=False):
        group = group.sort_values("layer")
        values = group["value"].to_numpy(dtype=float)
        low, high = group["ci_low"].to_numpy(dtype=float), group["ci_high"].to_numpy(dtype=float)
        defined = np.isfinite(values) & np.isfinite(low) & np.isfinite(high)
        within = defined & (low >= -margin) & (high <= margin)
        row = {"model": model, "scope": scope, "subset": "all", "metric": metric, "layers": len(group),
               "n_defined": int(defined.sum()), "n_within_margin": int(within.sum()),
               "all_within_margin": None if not defined.all() else bool(within.all())}
        if defined.any():
            best = group.iloc[int(np.nanargmax(np.where(defined, np.abs(values), -np.inf)))]
            row.update(layer=int(best["layer"]), value=float(best["value"]), ci_low=float(best["ci_low"]),
                       ci_high=float(best["ci_high"]), n=int(best["n"]), n_groups=int(best["n_groups"]), undefined=None)
            # every layer's CI at once: inside +-margin exactly when all_within_margin (claim 1d's "no effect" cell)
            row["envelope"] = ({"value": row["value"], "ci_low": float(low.min()), "ci_high": float(high.max()), "n": row["n"]}
                               if defined.all() else {"value": None, "ci_low": None, "ci_high": None, "n": row["n"],
                                                      "undefined": "some layer's R_pb is undefined"})
        else:
            row.update(layer=None, value=None, ci_low=None, ci_high=None, n=int(group["n"].max()),
                       n_groups=int(group["n_groups"].max()), undefined="no layer's R_pb is defined",
                       envelope={"value": None, "ci_low": None, "ci_high": None, "n": int(group["n"].max()),
                                 "undefined": "no layer's R_pb is defined"})
        rows.append(row)
    return _whole_numbers(pd.DataFrame.from_records(rows), ["layer"])


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
