"""Every correctness signal as one function: a model's features -> one score per distinct input.

A :class:`Signal` declares, in code and before any data is seen, its **direction** (+1: a higher raw
value means "more likely correct"; -1: lower; the score the leaderboard ranks is ``direction x raw``,
never flipped on test data), the **pass it needs** (its extra cost over answering greedily, measured by
the chapters: ``greedy`` costs nothing extra, ``capture`` is the attention/hidden-state recording,
``sampling_k10`` ten samples, ``first_token`` the exact limit's pass) and, where it exists only on some
inputs, its **subset** (in-box mass: positive questions). A signal whose code is not built yet names the
module it needs (``requires``): the leaderboard lists it as missing and never fills its row in. Adding
the probe signals once ``vrp_utils/analysis/probes.py`` lands is one entry in :data:`REGISTRY`.

Declared choices: attention metrics are the layer mean of each metric of the step-0 map (chapter 01's
primary map, over every layer the store holds); the probe reads the last layer and the logit lens the first
(both from the store's shape); no layer is picked after seeing data, and the attention and lens scores never
read the labels (``tests/test_signals.py`` recomputes them at their declared layers and with shuffled labels); answer log-probability and entropy are means over
the generated tokens (the end token included, as stored); S_SC is at K = 10 from the sample pool of
chapter 04 (temperature 0.7, top-p 0.9, seed 0); the fusion is a logistic regression on the standardized
cheap signals (greedy and capture), out of fold over 5 image-grouped folds.

Risk-coverage (:func:`risk_coverage`): inputs are kept from the highest score down; within a block of
equal scores the order is random, and every number is its expectation over those random orders (each
input of a block counts as the block's mean correctness), so a tie is never ordered by accident.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.special

from vrp_utils.analysis.stats import Estimate, auroc, auroc_difference, cluster_bootstrap_outputs, grouped_folds, point_biserial

SAMPLING = {"pool": 20, "k": 10, "temperature": 0.7, "top_p": 0.9, "seed": 0}
ATTENTION_METRICS = {"entropy": -1, "entropy_norm": -1, "ck_text": -1, "ck_dbscan": -1, "top10_mass": +1, "gini": +1}


@dataclass
class ModelInputs:
    """What signals read for one model: its features, and lazily its attention metrics and sample pool."""

    features: Any
    sampling: dict = None
    progress: bool = False

    def __post_init__(self) -> None:
        self.sampling = {**SAMPLING, **(self.sampling or {})}
        self._attention = None
        self._samples = None

    @property
    def distinct(self) -> pd.DataFrame:
        return self.features.distinct

    @property
    def attention(self) -> pd.DataFrame:
        """Per distinct input: the layer mean of every attention metric and of in-box mass."""
        if self._attention is None:
            from vrp_utils.analysis.concentration import example_metrics

            metrics, _ = example_metrics(self.distinct, self.features.store.attention(), self.features.adapter)
            self._attention = metrics.groupby("array_index").mean(numeric_only=True)
        return self._attention

    @property
    def samples(self) -> pd.DataFrame:
        if self._samples is None:
            from vrp_utils.analysis import consistency

            s = self.sampling
            frame = consistency.open_samples(self.features, s["pool"], s["temperature"], s["top_p"], s["seed"], self.progress)
            self._samples = consistency.consistency_frame(frame, s["k"], [s["k"]]).set_index("distinct_id")
        return self._samples


@dataclass(frozen=True)
class Signal:
    name: str
    description: str
    direction: int
    cost: str
    compute: Callable[[ModelInputs], np.ndarray] | None
    requires: str | None = None
    subset: str | None = None
    group: str = "behaviour"

    def available(self) -> bool:
        return self.compute is not None and (self.requires is None or importlib.util.find_spec(self.requires) is not None)

    def raw(self, inputs: ModelInputs) -> np.ndarray:
        """The signal's raw value per distinct input (row order of ``inputs.distinct``)."""
        if not self.available():
            raise LookupError(f"signal {self.name!r} needs {self.requires}, which is not built yet")
        return np.asarray(self.compute(inputs), dtype=float)

    def score(self, inputs: ModelInputs) -> np.ndarray:
        """``direction x raw``: higher = more likely correct."""
        return self.direction * self.raw(inputs)


def _mean_list(column: str):
    return lambda m: np.array([float(np.mean(v)) for v in m.distinct[column]])


def _first_of_list(column: str):
    """The first answer token's value of a per-token column (``token_margin[0]`` is the store's ``answer_margin``)."""
    return lambda m: np.array([float(v[0]) for v in m.distinct[column]])


def _attention_metric(metric: str):
    return lambda m: m.attention[metric].reindex(m.distinct["array_index"]).to_numpy()


def _samples_column(column: str):
    return lambda m: m.samples[column].reindex(m.distinct["distinct_id"]).to_numpy()


def _probe_oof(m: ModelInputs) -> np.ndarray:
    """Declared before any data: L1 probe, last layer, last prompt position, 5 image-grouped folds, seed 0."""
    from vrp_utils.analysis.probes import cross_validated, cv_problem

    d = m.distinct
    y, groups = d["correct"].to_numpy(bool), d["image_file"].to_numpy()
    if cv_problem(y, groups) is not None:
        return np.full(len(d), np.nan)
    states = m.features.store.hidden(None, "last_prompt")
    return cross_validated(np.asarray(states[d["array_index"].to_numpy(), -1]), y, groups, "l1", seed=0).scores


def _free_rival(m: ModelInputs) -> np.ndarray:
    """Declared before any data: the probe's free rival (answer is yes, |yes-no margin|, their product) fitted as an
    L1 logistic model with :func:`_probe_oof`'s call (5 image-grouped folds, seed 0), so its folds are the probe's."""
    from vrp_utils.analysis.probes import cross_validated, cv_problem, rival_features

    d = m.distinct
    y, groups = d["correct"].to_numpy(bool), d["image_file"].to_numpy()
    if cv_problem(y, groups) is not None:
        return np.full(len(d), np.nan)
    return cross_validated(rival_features(d), y, groups, "l1", seed=0).scores


def _lens_margin(m: ModelInputs) -> np.ndarray:
    """Declared before any data: the first layer (the last one is the model's own margin), signed toward the answer."""
    from vrp_utils.analysis.probes import LogitLens

    d = m.distinct
    states = m.features.store.hidden(None, "last_prompt")
    margin = LogitLens(str(m.features.model_dir)).margin(np.asarray(states[d["array_index"].to_numpy(), 0]))
    return np.where(d["parsed"].to_numpy() == "yes", 1.0, -1.0) * margin


CHEAP_COSTS = ("greedy", "capture")


def _fusion(m: ModelInputs) -> np.ndarray:
    """Out-of-fold logistic regression on the standardized cheap signals (image-grouped folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # Hidden-state signals and the free rival are out-of-fold scores themselves: stacking them here without nested
    # folds would leak (their training folds hold this fold's labels).
    cheap = [s for s in REGISTRY.values() if s.cost in CHEAP_COSTS and s.subset is None and s.compute not in (_fusion, _free_rival)
             and s.available() and s.group != "hidden state"]
    x = np.column_stack([s.score(m) for s in cheap])
    x = np.where(np.isfinite(x), x, np.nanmean(np.where(np.isfinite(x), x, np.nan), axis=0))
    y = m.distinct["correct"].to_numpy(bool)
    groups = m.distinct["image_file"].to_numpy()
    n_folds = min(5, len(np.unique(groups)))  # 5 image-grouped folds; fewer only when there are fewer images
    if n_folds < 2:
        return np.full(len(y), np.nan)
    folds = grouped_folds(y, groups, folds=n_folds, seed=0)
    out = np.full(len(y), np.nan)
    for fold in np.unique(folds):
        train, test = folds != fold, folds == fold
        if len(np.unique(y[train])) < 2:
            out[test] = y[train].mean()
            continue
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(x[train], y[train])
        out[test] = model.predict_proba(x[test])[:, 1]
    return out


def _registry() -> dict[str, Signal]:
    signals = [
        Signal("yes_no_margin_abs", "|log P(yes) - log P(no)| at the first answer token", +1, "greedy",
               lambda m: np.abs(m.distinct["yes_no_margin"].to_numpy(float))),
        Signal("answer_margin", "top-1 minus top-2 log-probability at the first answer token (any short answer)", +1,
               "greedy", _first_of_list("token_margin")),
        Signal("answer_logprob", "mean log-probability of the generated tokens (P_tok)", +1, "greedy", _mean_list("token_logprob")),
        Signal("answer_entropy", "mean entropy of the next-token distribution over the answer", -1, "greedy",
               _mean_list("token_entropy")),
        Signal("free_rival", "L1 logistic on [answer is yes, |yes-no margin|, product], out-of-fold with the probe's folds",
               +1, "greedy", _free_rival, requires="vrp_utils.analysis.probes"),
        *[Signal(f"attention_{metric}", f"attention {metric} (step-0 map, mean over layers)", direction, "capture",
                 _attention_metric(metric), group="attention") for metric, direction in ATTENTION_METRICS.items()],
        Signal("attention_inbox_mass", "attention mass inside the queried object's box (positives only)", +1, "capture",
               _attention_metric("inbox_mass"), subset="positive", group="attention"),
        Signal("probe_oof", "L1 probe on the last layer's state at the last prompt position, out-of-fold (chapter 03)", +1,
               "capture", _probe_oof, requires="vrp_utils.analysis.probes", group="hidden state"),
        Signal("logit_lens_margin", "logit lens at the first layer: yes-vs-no margin toward the model's own answer", +1,
               "capture", _lens_margin, requires="vrp_utils.analysis.probes", group="hidden state"),
        Signal("s_sc_k10", "self-consistency S_SC over K = 10 samples (T 0.7, top-p 0.9)", +1, "sampling_k10",
               _samples_column("s_sc")),
        Signal("s_sc_limit", "S_SC at K = infinity, max(q, 1 - q), from the first token's distribution", +1,
               "first_token", _samples_column("s_sc_limit")),
        Signal("fusion_cheap", "logistic regression on the greedy and attention signals (grouped CV)", +1, "capture",
               _fusion, group="fusion"),
    ]
    return {s.name: s for s in signals}


REGISTRY: dict[str, Signal] = _registry()


def parse_signals(names: str | Sequence[str]) -> list[Signal]:
    """``"all"`` or comma-separated names -> signals; an unknown name fails naming the valid ones."""
    chosen = list(REGISTRY) if names == "all" else [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in chosen if n not in REGISTRY]
    if unknown or not chosen:
        raise ValueError(f"unknown signal(s) {unknown or chosen!r}; choose from {', '.join(REGISTRY)} or 'all'")
    return [REGISTRY[n] for n in chosen]


# ---------------------------------------------------------------------------------------------- risk-coverage


def _blocks(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Descending order and the start of every block of equal scores in it."""
    order = np.argsort(-score, kind="stable")
    s = score[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    return order, starts


_HARMONIC = np.zeros(1)


def _harmonic(n: np.ndarray) -> np.ndarray:
    """Harmonic numbers H(n) = 1 + 1/2 + ... + 1/n (bootstrap weights are whole counts: a table lookup)."""
    global _HARMONIC
    n = np.asarray(n, dtype=float)
    whole = np.rint(n)
    if np.abs(n - whole).max(initial=0.0) > 1e-6:
        return scipy.special.digamma(n + 1) + np.euler_gamma
    top = int(whole.max()) if whole.size else 0
    if top >= len(_HARMONIC):
        _HARMONIC = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, 2 * top + 2))])
    return _HARMONIC[whole.astype(np.int64)]


def _rc_from_blocks(y: np.ndarray, order: np.ndarray, starts: np.ndarray, weights: np.ndarray, coverage: float):
    """AURC and accuracy at ``coverage`` (expectations over random orders within ties), for weights ``(..., n)``."""
    w = weights[..., order]
    bw = np.add.reduceat(w, starts, axis=-1)
    bc = np.add.reduceat(w * y[order], starts, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.where(bw > 0, bc / np.where(bw > 0, bw, 1), 0.0)
    wb, cb = np.cumsum(bw, -1), np.cumsum(bc, -1)
    w_prev = wb - bw
    c_prev = cb - bc
    total = wb[..., -1]
    kept_correct = bw * m + (c_prev - m * w_prev) * (_harmonic(wb) - _harmonic(w_prev))
    aurc = 1 - kept_correct.sum(-1) / total
    k_star = np.ceil(coverage * total - 1e-9)
    b = (wb >= k_star[..., None]).argmax(-1)
    take = lambda a: np.take_along_axis(a, b[..., None], -1)[..., 0]  # noqa: E731
    acc = (take(c_prev) + take(m) * (k_star - take(w_prev))) / k_star
    return aurc, acc


def risk_coverage(score: np.ndarray, correct: np.ndarray, coverage: float = 0.8) -> dict[str, float]:
    """AURC (area under risk vs coverage, lower is better) and the accuracy kept at ``coverage``, ties averaged."""
    score, y = np.asarray(score, float), np.asarray(correct, float)
    order, starts = _blocks(score)
    aurc, acc = _rc_from_blocks(y, order, starts, np.ones(len(y)), coverage)
    return {"aurc": float(aurc), "accuracy_at_coverage": float(acc)}


def risk_coverage_curve(score: np.ndarray, correct: np.ndarray, coverages: np.ndarray) -> np.ndarray:
    """Expected accuracy of the kept inputs at each coverage (ties averaged over random orders)."""
    score, y = np.asarray(score, float), np.asarray(correct, float)
    order, starts = _blocks(score)
    return np.array([float(_rc_from_blocks(y, order, starts, np.ones(len(y)), c)[1]) for c in coverages])


def risk_coverage_estimates(score, correct, groups, coverage: float = 0.8, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """AURC and accuracy at ``coverage`` with cluster-bootstrap CIs over images."""
    score, y = np.asarray(score, float), np.asarray(correct, float)
    groups = np.asarray(groups)
    order, starts = _blocks(score)
    values = risk_coverage(score, y, coverage)
    n, k = len(y), len(np.unique(groups))
    out = {}
    # both from one resampling (each CI equals its own bootstrap with this seed; half the work)
    cis = cluster_bootstrap_outputs(lambda weights: _rc_from_blocks(y, order, starts, weights, coverage), 2, [], groups,
                                    n_boot=n_boot, seed=seed)
    for key, ci in zip(("aurc", "accuracy_at_coverage"), cis):
        method = (f"{key} (ties averaged over random orders); 95% CI: cluster bootstrap over images, {n_boot} resamples")
        out[key] = Estimate(values[key], ci.low, ci.high, method, n, k, None, {"coverage": coverage})
    return out


# ---------------------------------------------------------------------------------------------- scopes


def pooled(frames: dict[str, pd.DataFrame], columns: Sequence[str]) -> pd.DataFrame:
    """The attention chapter's pooled form: z-score within model x setting, mean per input, models concatenated."""
    parts = []
    for model, frame in frames.items():
        z = frame.groupby("setting")[list(columns)].transform(lambda c: (c - c.mean()) / c.std(ddof=0) if c.std(ddof=0) > 0 else c * 0)
        z = pd.concat([frame[["distinct_id", "image_file", "label", "correct", "parsed"]], z], axis=1)
        per_input = z.groupby("distinct_id").agg({"image_file": "first", "label": "first", "correct": "first", "parsed": "first",
                                                  **{c: "mean" for c in columns}})
        per_input.insert(0, "model", model)
        parts.append(per_input.reset_index())
    return pd.concat(parts, ignore_index=True)


def constant_models(frames: dict[str, pd.DataFrame], column: str) -> list[str]:
    """Models whose ``column`` holds at most one distinct finite value (constant, or no finite value at all)."""
    out = []
    for model, frame in frames.items():
        values = frame[column].to_numpy(float)
        if len(np.unique(values[np.isfinite(values)])) <= 1:
            out.append(model)
    return out


def pooled_scores(frames: dict[str, pd.DataFrame], columns: Sequence[str]) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """:func:`pooled`, with each column set to NaN on the rows of the models whose score for it is constant.

    Why: z-scoring turns a constant score into 0 for every input of that model, which a pooled AUROC then
    averages in as chance (Qwen2-VL's 4x4 grid makes its DBSCAN C_k 0 everywhere). Such a model carries no
    ranking for that signal, so it is left out of the signal's pooled rows and named: returns the frame and
    ``{column: [excluded models]}``.
    """
    frame = pooled(frames, columns)
    excluded = {column: constant_models(frames, column) for column in columns}
    for column, models in excluded.items():
        frame.loc[frame["model"].isin(models), column] = np.nan
    return frame, excluded


DIFFERENCE_METHOD = ("AUROC(signal) - AUROC(best free signal) on the rows where both scores are finite (positives only "
                     "for a positives-only signal); 95% CI: paired cluster bootstrap over images, both AUROCs on each "
                     "resample; p: two-sided z test of 0 with the bootstrap SE. The best free signal is the highest AUROC "
                     "among the greedy-cost signals of the same cell; its own row holds 0 with no interval or p "
                     "(a score minus itself).")
DIFFERENCE_COLUMNS = ("best_free_signal", "auroc_minus_best_free", "auroc_minus_best_free_ci_low",
                      "auroc_minus_best_free_ci_high", "auroc_minus_best_free_p", "auroc_minus_best_free_n")


def differences_from_best_free(frame: pd.DataFrame, chosen: Sequence[Signal], aurocs: dict[str, float], n_boot: int = 1000,
                               seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each signal's paired AUROC difference from the cell's best free signal (:data:`DIFFERENCE_METHOD`).

    ``frame``: one cell's rows (a column per signal's score, ``correct``, ``image_file``, ``label``);
    ``aurocs``: each signal's AUROC in that cell (the best free signal is chosen from these, first in
    ``chosen`` order among ties). Returns ``{signal: {column: value}}`` over :data:`DIFFERENCE_COLUMNS`.
    """
    free = [sig for sig in chosen if sig.cost == "greedy" and sig.subset is None and np.isfinite(aurocs.get(sig.name, np.nan))]
    empty = dict.fromkeys(DIFFERENCE_COLUMNS, math.nan) | {"best_free_signal": None}
    if not free:
        return {sig.name: dict(empty) for sig in chosen}
    best = max(free, key=lambda sig: aurocs[sig.name])
    out = {}
    for sig in chosen:
        row = dict(empty) | {"best_free_signal": best.name}
        part = frame if sig.subset is None else frame[frame["label"] == "yes"]
        a, b = part[sig.name].to_numpy(float), part[best.name].to_numpy(float)
        keep = np.isfinite(a) & np.isfinite(b)
        groups, correct = part["image_file"].to_numpy()[keep], part["correct"].to_numpy(bool)[keep]
        row["auroc_minus_best_free_n"] = int(keep.sum())
        if sig is best:
            row["auroc_minus_best_free"] = 0.0
        elif keep.sum() >= 4 and len(np.unique(groups)) >= 2:
            estimate = auroc_difference(a[keep], b[keep], correct, groups, n_boot=n_boot, seed=seed)
            row.update({"auroc_minus_best_free": estimate.value, "auroc_minus_best_free_ci_low": estimate.ci_low,
                        "auroc_minus_best_free_ci_high": estimate.ci_high,
                        "auroc_minus_best_free_p": math.nan if estimate.p_value is None else estimate.p_value})
        out[sig.name] = row
    return out


def evaluate(score: np.ndarray, correct: np.ndarray, groups: np.ndarray, n_boot: int = 1000, seed: int = 0,
             coverage: float = 0.8, risk_coverage_ci: bool = True) -> dict[str, Any]:
    """AUROC [CI], R_pb [CI], AURC [CI], accuracy at ``coverage`` [CI] of one score; NaN scores dropped and counted.

    ``risk_coverage_ci=False``: AURC and the kept accuracy without their (row-level, slower) bootstrap CIs.
    """
    score, correct, groups = np.asarray(score, float), np.asarray(correct, bool), np.asarray(groups)
    keep = np.isfinite(score)
    score, correct, groups = score[keep], correct[keep], groups[keep]
    row: dict[str, Any] = {"n": int(len(score)), "n_images": int(len(np.unique(groups))), "n_dropped": int((~keep).sum()),
                           "accuracy": float(correct.mean()) if len(correct) else math.nan}
    if len(score) < 4 or len(np.unique(groups)) < 2:
        return row
    if risk_coverage_ci:
        rc = risk_coverage_estimates(score, correct, groups, coverage, n_boot, seed)
    else:
        values = risk_coverage(score, correct, coverage)
        rc = {key: Estimate(value, math.nan, math.nan, f"{key} (ties averaged over random orders); no CI", len(score),
                            len(np.unique(groups))) for key, value in values.items()}
    for key, estimate in (("auroc", auroc(score, correct, groups, n_boot=n_boot, seed=seed)),
                          ("r_pb", point_biserial(score, correct, groups, n_boot=n_boot, seed=seed)), *rc.items()):
        row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = estimate.value, estimate.ci_low, estimate.ci_high
        if not estimate.defined and "undefined" in estimate.details:
            row[f"{key}_undefined"] = estimate.details.get("undefined")
    return row
