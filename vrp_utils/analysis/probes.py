"""Does the model know when it is wrong, and where? Hidden-state probes, their controls, the logit
lens, transfer across settings and neuron ablation.

Declared before any result (issue 13):

- **Data.** Probes train and test on a model's *distinct inputs* (POPE's settings repeat every
  positive question with the same hidden state and the same correctness; see
  :mod:`vrp_utils.extract.features`). Every fold, inner fold, bootstrap and transfer split is grouped
  by image.
- **Features.** Each decoder block's output (before the final norm) at the last prompt position
  (``last_prompt``, primary) or averaged over the answer tokens (``answer_mean``), one layer at a time.
- **Probes** (scikit-learn ``Pipeline``: ``StandardScaler`` then the classifier):
  ``l1``: L1-regularised logistic regression (liblinear), ``C`` from :data:`L1_GRID`;
  ``mlp``: one hidden layer of :data:`MLP_HIDDEN` units (Adam, :data:`MLP_EPOCHS` epochs), L2
  ``alpha`` from :data:`MLP_GRID`. The strength is chosen by an inner :data:`INNER_FOLDS`-fold
  image-grouped CV on the outer training rows only (best mean inner AUROC; ties go to the stronger
  regularisation), then refitted on all outer training rows.
- **Scores.** 5-fold ``StratifiedGroupKFold`` by image (:func:`vrp_utils.analysis.stats.grouped_folds`),
  out-of-fold probability of "correct" for every input; AUROC with the image-level bootstrap CI, per
  CV seed; a summary row gives the mean over seeds, their spread, and the seeds' CI bounds averaged.
- **Controls.** The model's answer alone (yes/no), the queried object (one-hot), both (one-hot of
  the (object, answer) pair), all fitted like the ``l1`` probe on the same folds; the absolute
  yes-vs-no logit margin and the answer tokens' mean log-probability as scores (no fit, higher =
  more confident); the same probes on an untrained twin's hidden states
  (:mod:`vrp_utils.extract.untrained`) at ``last_prompt``, labelled with the trained model's
  correctness; and every probe's AUROC within "yes" answers and within "no" answers.
- **Leakage test.** Labels permuted across distinct inputs (duplicates keep one shared label), on
  the per-setting rows with the duplicates left in: image-grouped folds vs plain row folds, with a
  probe of fixed, weakest regularisation (a tuned probe would choose to predict a constant from
  random labels and hide the leak).
- **Logit lens.** The model's own final norm and unembedding (and PaliGemma's logit soft-capping,
  if configured) applied to each layer's stored ``last_prompt`` state: ``margin`` = log P(yes
  variants) - log P(no variants) (the engine's ``yes_no_margin``, which it equals at the last layer);
  ``truth_margin`` = margin signed toward the label (the paper's ΔM_l; it uses the label, so its
  AUROC for correctness is not a usable signal); ``answer_margin`` = margin signed toward the
  model's final answer (label-free).
- **Transfer.** Images split at random into two disjoint halves; a probe trained on one setting's
  rows of one half scores every setting's rows of the other half (and the other way round), so each
  test row is scored by a probe that never saw its image. AUROC per (train, test) cell; the drop is
  the paired AUROC difference to the in-setting probe on the same test rows.
- **Neuron ablation.** At the probe's layer, the ``k`` dimensions with the largest absolute
  ``l1`` weight (probe fitted on all distinct inputs, strength by inner grouped CV; standardised
  features, so weights are comparable) are zeroed at every position during a new greedy pass through
  the extraction engine (:func:`zeroed_dimensions`, an :class:`~vrp_utils.extract.engine.Intervention`
  hook); controls: ``k`` random dimensions and half of the width at random (``draws`` each). Accuracy
  change vs the unablated pass of the same inputs, image-level CI and exact McNemar p.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from vrp_utils.analysis import changes
from vrp_utils.analysis.parallel import side_by_side
from vrp_utils.analysis.stats import Estimate, auroc, auroc_difference, auroc_difference_bootstrap, grouped_folds

PROBES = ("l1", "mlp")
POSITIONS = ("last_prompt", "answer_mean")
#: Inverse L1 strength C of the logistic probe (strongest regularisation first).
L1_GRID = (0.03, 0.1, 0.3)
#: L2 strength alpha of the MLP probe (strongest first).
MLP_GRID = (1.0, 0.01)
MLP_HIDDEN = 32
MLP_EPOCHS = 15
MLP_BATCH = 128
INNER_FOLDS = 2
CONTROLS = ("answer", "object", "answer_x_object", "free_rival", "abs_margin", "mean_logprob")
ABLATIONS = ("top", "random", "half")


# --------------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------------


def split_list(text: str | Sequence[str]) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()] if isinstance(text, str) else [str(x) for x in text]


def parse_ablation(ks: str | Sequence, width: int) -> tuple[list[int], bool]:
    """``"1,5,10%,25%,half"`` -> (dimension counts for a layer of ``width``, whether to run the half-width control).

    A percentage is of the width (rounded, at least 1); ``half``: half of the width at random.
    """
    counts, half = [], False
    for item in split_list(ks) if isinstance(ks, str) else list(ks):
        text = str(item).strip()
        if text == "half":
            half = True
            continue
        try:
            k = max(1, round(float(text[:-1]) / 100 * width)) if text.endswith("%") else int(text)
        except ValueError:
            raise ValueError(f"ablation_k takes integers, percentages of the width and 'half' (e.g. '1,5,10%,25%,half'); "
                             f"got {text!r}") from None
        if not 1 <= k <= width:
            raise ValueError(f"ablation_k must lie in 1..{width} (the layer's width); got {text!r} -> {k}")
        counts.append(k)
    if not counts and not half:
        raise ValueError("ablation_k: give at least one count or 'half', e.g. '5,half' or '1,5,10%,25%,half'")
    return sorted(set(counts)), half


def language_model_width(model: str) -> int:
    """Hidden width of a model's language model, from its config alone."""
    from transformers import AutoConfig

    from vrp_utils.models.loading import read_model_type, resolve_model_dir

    model_dir = resolve_model_dir(model)
    read_model_type(model_dir)
    return int(AutoConfig.from_pretrained(model_dir, local_files_only=True).get_text_config().hidden_size)


def check_parameters(probes: Sequence[str], positions: Sequence[str], folds: int, seeds: int, *, ablation_k: str | Sequence = "5",
                     draws: int = 1, jobs: int = 1, layer: int | None = None, n_layers: int | None = None,
                     width: int | None = None) -> None:
    """Refuse unknown probes or positions, folds < 2, seeds < 1, a layer out of range or k > width, naming the choices."""
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ValueError(f"unknown probe(s) {unknown or list(probes)}; choose from {', '.join(PROBES)}")
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown or not positions:
        raise ValueError(f"unknown position(s) {unknown or list(positions)}; choose from {', '.join(POSITIONS)}")
    for name, value, low in (("folds", folds, 2), ("seeds", seeds, 1), ("ablation_draws", draws, 1), ("jobs", jobs, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}")
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or (n_layers is not None and not 0 <= layer < n_layers)):
        raise ValueError(f"layer must be None (the probe's peak layer) or 0..{n_layers - 1 if n_layers else 'layers-1'}; got {layer!r}")
    if width is not None:
        parse_ablation(ablation_k, width)


# --------------------------------------------------------------------------------------------------
# Probes and grouped cross-validation
# --------------------------------------------------------------------------------------------------


def make_probe(kind: str, strength: float, seed: int = 0) -> Pipeline:
    """The probe ``kind`` at regularisation ``strength`` (C for ``l1``, alpha for ``mlp``), standardised first."""
    if kind == "l1":
        classifier = LogisticRegression(C=strength, l1_ratio=1.0, solver="liblinear", tol=1e-3, max_iter=1000,
                                        random_state=seed)
    elif kind == "mlp":
        classifier = MLPClassifier((MLP_HIDDEN,), alpha=strength, max_iter=MLP_EPOCHS, batch_size=MLP_BATCH, learning_rate_init=1e-3,
                                   random_state=seed)
    else:
        raise ValueError(f"unknown probe {kind!r}; choose from {', '.join(PROBES)}")
    return Pipeline([("scale", StandardScaler()), ("probe", classifier)])


def grid(kind: str) -> tuple[float, ...]:
    return {"l1": L1_GRID, "mlp": MLP_GRID}[kind]


def _fit(kind: str, strength: float, seed: int, X: np.ndarray, y: np.ndarray) -> Pipeline | float:
    """A fitted probe, or the training base rate when the training rows hold one class only."""
    y = np.asarray(y).astype(int)
    if np.ptp(y) == 0:
        return float(y[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="Got `batch_size` less than 1 or larger than sample size")
        return make_probe(kind, strength, seed).fit(X, y)


def _predict(model: Pipeline | float, X: np.ndarray) -> np.ndarray:
    return np.full(len(X), model) if isinstance(model, float) else model.predict_proba(X)[:, 1]


def cv_problem(correct, groups, folds: int = 5, inner_folds: int = INNER_FOLDS) -> str | None:
    """Why grouped cross-validation cannot run on these rows (None: it can), e.g. a few-example run."""
    y = np.asarray(correct, dtype=bool)
    images = len(set(np.asarray(groups).tolist()))
    if y.all() or not y.any():
        return f"all {len(y)} examples are {'correct' if y.all() else 'wrong'}: AUROC is undefined"
    if images < folds + 1 or images * (folds - 1) // folds < inner_folds:
        return f"{images} images: too few for {folds} image-grouped folds with {inner_folds} inner folds"
    return None


@dataclass
class FoldPlan:
    """Outer fold per row, and for each outer fold the inner fold of its training rows (-1: outer test row)."""

    outer: np.ndarray
    inner: list[np.ndarray]


def fold_plan(correct, groups, folds: int = 5, inner_folds: int = INNER_FOLDS, seed: int = 0) -> FoldPlan:
    """Outer and inner folds, both ``StratifiedGroupKFold`` by image (no image in two folds at either level)."""
    y = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups)
    outer = grouped_folds(y, groups, folds=folds, seed=seed)
    inner = []
    for f in range(folds):
        train = outer != f
        assignment = np.full(len(y), -1, dtype=np.intp)
        assignment[train] = grouped_folds(y[train], groups[train], folds=inner_folds, seed=seed + 1000 * (f + 1))
        inner.append(assignment)
    return FoldPlan(outer, inner)


def choose_strength(kind: str, X: np.ndarray, y: np.ndarray, inner: np.ndarray, seed: int = 0) -> float:
    """The grid value with the best mean AUROC over the inner folds (rows with ``inner == -1`` unused)."""
    values = grid(kind)
    if len(values) == 1:
        return values[0]
    folds = sorted(set(inner[inner >= 0].tolist()))
    means = []
    for strength in values:
        aucs = []
        for f in folds:
            train, test = (inner >= 0) & (inner != f), inner == f
            if np.ptp(y[test]) == 0:
                continue
            aucs.append(roc_auc_score(y[test], _predict(_fit(kind, strength, seed, X[train], y[train]), X[test])))
        means.append(np.mean(aucs) if aucs else -np.inf)
    return values[int(np.argmax(means))]  # first maximum: the strongest regularisation among ties


@dataclass
class ProbeRun:
    """Out-of-fold scores of one probe, the folds they came from and the strength chosen per fold."""

    kind: str
    seed: int
    scores: np.ndarray
    plan: FoldPlan
    chosen: list[float]


def cross_validated(X, correct, groups, kind: str, *, folds: int = 5, inner_folds: int = INNER_FOLDS, seed: int = 0,
                    strength: float | None = None) -> ProbeRun:
    """Out-of-fold P(correct) of every row; ``strength`` fixed, or chosen per outer fold by the inner grouped CV."""
    X = np.asarray(X, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    if not np.isfinite(X).all():
        raise ValueError(f"features hold {int((~np.isfinite(X)).sum())} non-finite values; drop those rows first")
    y = np.asarray(correct, dtype=bool).astype(int)
    plan = fold_plan(y, groups, folds, inner_folds, seed)
    scores = np.empty(len(y))
    chosen = []
    for f in range(folds):
        test = plan.outer == f
        train = ~test
        value = strength if strength is not None else choose_strength(kind, X[train], y[train], plan.inner[f][train], seed)
        chosen.append(value)
        scores[test] = _predict(_fit(kind, value, seed, X[train], y[train]), X[test])
    return ProbeRun(kind, seed, scores, plan, chosen)


def _estimate_row(estimate: Estimate, **keys) -> dict:
    flat = estimate.as_dict()
    details = flat.pop("details") or {}
    return {**keys, **flat, "undefined": details.get("undefined")}


def subset_aurocs(scores, correct, groups, answers, n_boot: int = 1000, seed: int = 0, **keys) -> list[dict]:
    """AUROC of ``scores`` over all rows and within "yes" and within "no" answers."""
    answers = np.asarray(answers, dtype=object)
    rows = []
    for subset, keep in (("all", np.ones(len(answers), bool)), ("answer_yes", answers == "yes"), ("answer_no", answers == "no")):
        if keep.sum() < 2:
            continue
        rows.append(_estimate_row(auroc(np.asarray(scores)[keep], np.asarray(correct)[keep], np.asarray(groups)[keep],
                                        n_boot=n_boot, seed=seed), subset=subset, **keys))
    return rows


def summarise_seeds(rows: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per ``keys``: mean AUROC over seeds, seed spread, and the seeds' CI bounds averaged."""
    out = []
    for key, part in rows.groupby(list(keys), sort=False, dropna=False):
        values = part["value"].astype(float)
        out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))),
                    "value": values.mean(), "ci_low": part["ci_low"].astype(float).mean(), "ci_high": part["ci_high"].astype(float).mean(),
                    "seed_sd": values.std(ddof=1) if len(values) > 1 else 0.0, "seed_min": values.min(), "seed_max": values.max(),
                    "seeds": len(part), "n": int(part["n"].iloc[0]), "n_groups": int(part["n_groups"].iloc[0]),
                    "method": "mean over CV seeds of out-of-fold AUROC; ci_low/ci_high: the seeds' image-level 95% "
                              "bootstrap bounds averaged; seed_sd/min/max: spread over seeds"})
    return pd.DataFrame.from_records(out)


# --------------------------------------------------------------------------------------------------
# A model's probe table
# --------------------------------------------------------------------------------------------------


def hidden_matrix(store, distinct: pd.DataFrame, layer: int, position: str) -> np.ndarray:
    """``[distinct inputs, width]`` float64 states of one layer and position, rows as ``distinct``."""
    return np.asarray(store.hidden(layer, position), dtype=float)[distinct["array_index"].to_numpy()]


def mean_answer_logprob(distinct: pd.DataFrame) -> np.ndarray:
    """Mean log-probability of the answer tokens (the end token excluded; the first token if the answer is empty)."""
    return np.array([float(np.mean(lp[: max(int(n), 1)])) for lp, n in zip(distinct["token_logprob"], distinct["answer_length"])])


def rival_features(distinct: pd.DataFrame) -> np.ndarray:
    """The probe's free rival: [answer is yes, |yes-no margin|, their product], one row per distinct input.

    Why: everything in it comes with the greedy answer at no extra cost, so a hidden-state probe shows that
    the state knows more than the answer only when it beats a model fitted on these three columns with the
    same folds.
    """
    answer = (distinct["parsed"] == "yes").to_numpy(float)
    margin = np.abs(distinct["yes_no_margin"].to_numpy(float))
    return np.column_stack([answer, margin, answer * margin])


def control_features(distinct: pd.DataFrame) -> dict[str, np.ndarray]:
    """Design matrices of the fitted controls: the answer, the object (one-hot), their pair (one-hot) and the
    free rival (:func:`rival_features`)."""
    answer = (distinct["parsed"] == "yes").to_numpy(float)[:, None]
    objects = pd.get_dummies(distinct["object"].astype(str)).to_numpy(float)
    pair = pd.get_dummies(distinct["object"].astype(str) + "|" + distinct["parsed"].astype(str)).to_numpy(float)
    return {"answer": answer, "object": objects, "answer_x_object": pair, "free_rival": rival_features(distinct)}


def probe_kinds(source: str, position: str, probes: Sequence[str], positions: Sequence[str]) -> list[str]:
    """The probe kinds :func:`probe_table` fits for one matrix: controls get ``l1``; the trained model's primary
    position (the first of ``positions``) every kind; other positions and the untrained twin the first kind only."""
    if source == "control":
        return ["l1"]
    return list(probes) if (source, position) == ("probe", positions[0]) else list(probes[:1])


def probe_table(features, probes: Sequence[str], positions: Sequence[str], *, folds: int = 5, seeds: int = 3, seed: int = 0,
                n_boot: int = 1000, layers: Sequence[int] | None = None, untrained=None, jobs: int = 1) -> pd.DataFrame:
    """Per-seed AUROC rows (subset all / answer_yes / answer_no) of every probe, position and layer, plus controls.

    Every kind in ``probes`` is fitted at the first of ``positions`` (the primary one) at every layer; the other
    positions, and the untrained twin, get the first kind only (the per-layer sweep's probe). Why: at 6 layers the
    MLP at every position and on the twin was two thirds of the chapter's fits and added no question the
    primary position's MLP does not answer (measured in the commit that made it so).
    ``untrained``: an untrained twin's store (its rows matched to ``features.distinct`` by distinct id),
    probed at ``last_prompt`` with the first probe, labels and folds. Column ``source``: ``probe``,
    ``control`` or ``untrained``. CV seeds are ``seed .. seed + seeds - 1``; ``jobs`` processes fit
    the probes side by side (every fit is seeded: the result does not depend on ``jobs``).
    """
    distinct = features.distinct
    y = distinct["correct"].to_numpy(bool)
    groups = distinct["image_file"].to_numpy()
    answers = distinct["parsed"].to_numpy(object)
    layers = range(features.store.hidden(None, "last_prompt").shape[1]) if layers is None else layers
    base = {"model": features.model, "n_inputs": len(distinct)}
    problem = cv_problem(y, groups, folds)
    if problem is not None:
        return pd.DataFrame.from_records([{**base, "source": "probe", "probe": kind, "position": position, "layer": layer, "subset": "all",
                                           "cv_seed": seed, "value": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": len(y),
                                           "n_groups": len(set(groups.tolist())), "undefined": problem}
                                          for position in positions for kind in probe_kinds("probe", position, probes, positions)
                                          for layer in layers])
    matrices: dict[tuple, np.ndarray] = {}
    for position in positions:
        for layer in layers:
            matrices[("probe", position, layer)] = hidden_matrix(features.store, distinct, layer, position)
    if untrained is not None:
        twin = untrained.table().set_index("question_id")
        twin_index = twin.loc[distinct["distinct_id"].to_numpy(), "array_index"].to_numpy()
        for layer in layers:
            matrices[("untrained", "last_prompt", layer)] = np.asarray(untrained.hidden(layer, "last_prompt"), dtype=float)[twin_index]
    for name, X in control_features(distinct).items():
        matrices[("control", name, None)] = X
    tasks = []  # (keys, matrix key, probe kind, seed)
    for s in range(seed, seed + seeds):
        for (source, position, layer) in matrices:
            kinds = probe_kinds(source, position, probes, positions)
            for kind in kinds:
                keys = ({"source": source, "probe": position} if source == "control"
                        else {"source": source, "probe": kind, "position": position, "layer": layer})
                tasks.append((keys, (source, position, layer), kind, s))
    keeps = {key: np.isfinite(X).all(axis=1) for key, X in matrices.items()}

    def run(task):
        _, key, kind, s = task
        keep = keeps[key]
        return cross_validated(matrices[key][keep], y[keep], groups[keep], kind, folds=folds, seed=s)

    if jobs > 1:
        from joblib import Parallel, delayed

        runs = Parallel(n_jobs=jobs)(delayed(cross_validated)(matrices[key][keeps[key]], y[keeps[key]], groups[keeps[key]], kind,
                                                               folds=folds, seed=s) for _, key, kind, s in tasks)
    else:
        runs = [run(task) for task in tasks]
    rows: list[dict] = []
    for (keys, key, kind, s), result in zip(tasks, runs):
        keep = keeps[key]
        rows += subset_aurocs(result.scores, y[keep], groups[keep], answers[keep], n_boot, s, **base, **keys, cv_seed=s,
                              chosen=",".join(map(str, result.chosen)), n_dropped=int((~keep).sum()))
    for name, score in (("abs_margin", np.abs(distinct["yes_no_margin"].to_numpy(float))), ("mean_logprob", mean_answer_logprob(distinct))):
        rows += subset_aurocs(score, y, groups, answers, n_boot, seed, **base, source="control", probe=name, cv_seed=None, chosen="no fit",
                              n_dropped=0)
    return pd.DataFrame.from_records(rows)


def control_comparisons(features, layer: int, *, position: str = "last_prompt", kind: str = "l1", folds: int = 5, seeds: int = 3,
                        seed: int = 0, n_boot: int = 1000, untrained=None) -> pd.DataFrame:
    """The probe's AUROC minus each control's, on the same inputs and CV seeds: a paired image-level bootstrap.

    Why: "the hidden state knows more than X" is a comparison of two scores of the same inputs, so it is
    judged by the paired difference, never by whether two intervals overlap. Controls: the fitted ones of
    :func:`control_features` (the free rival among them) and the untrained twin's state at ``layer``, each
    fitted like the probe with the same folds (same labels, groups and CV seed); the unfitted scores
    |yes-no margin| and the answer's mean log-probability. One row per control: the mean over CV seeds of
    the difference, its seeds' 95% bounds averaged and the largest of their p-values.
    """
    distinct = features.distinct
    y = distinct["correct"].to_numpy(bool)
    groups = distinct["image_file"].to_numpy()
    if cv_problem(y, groups, folds) is not None:
        return pd.DataFrame()
    X = hidden_matrix(features.store, distinct, layer, position)
    fitted = dict(control_features(distinct))
    if untrained is not None:
        twin = untrained.table().set_index("question_id")
        index = twin.loc[distinct["distinct_id"].to_numpy(), "array_index"].to_numpy()
        fitted["untrained_twin"] = np.asarray(untrained.hidden(layer, "last_prompt"), dtype=float)[index]
    unfitted = {"abs_margin": np.abs(distinct["yes_no_margin"].to_numpy(float)), "mean_logprob": mean_answer_logprob(distinct)}
    rows = []
    for s in range(seed, seed + seeds):
        probe = cross_validated(X, y, groups, kind, folds=folds, seed=s).scores
        scores = {name: cross_validated(C, y, groups, kind if name == "untrained_twin" else "l1", folds=folds, seed=s).scores
                  for name, C in fitted.items()}
        for name, score in {**scores, **unfitted}.items():
            rows.append({"control": name, "cv_seed": s,
                         **_estimate_row(auroc_difference(probe, score, y, groups, n_boot=n_boot, seed=s))})
    frame = pd.DataFrame.from_records(rows)
    out = []
    for name, part in frame.groupby("control", sort=False):
        out.append({"model": features.model, "layer": layer, "position": position, "probe": kind, "control": name,
                    "value": part["value"].mean(), "ci_low": part["ci_low"].mean(), "ci_high": part["ci_high"].mean(),
                    "p_value": part["p_value"].max(), "seed_min": part["value"].min(), "seed_max": part["value"].max(),
                    "seeds": len(part), "n": int(part["n"].iloc[0]), "n_groups": int(part["n_groups"].iloc[0]),
                    "method": "probe AUROC minus control AUROC on the same inputs and folds (stats.auroc_difference, paired "
                              "cluster bootstrap over images); mean over CV seeds, the seeds' 95% bounds averaged, p: the "
                              "largest of the seeds' p-values"})
    return pd.DataFrame.from_records(out)


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`summarise_seeds` over a :func:`probe_table` (score controls have one "seed")."""
    keys = ["model", "source", "probe", "position", "layer", "subset"]
    frame = table.copy()
    for key in ("position", "layer"):
        frame[key] = frame[key].astype(object).where(frame[key].notna(), "-") if key in frame else "-"
    out = summarise_seeds(frame, keys)
    out["layer"] = out["layer"].replace("-", None)
    out["position"] = out["position"].replace("-", None)
    return out


def peak_layer(summary_table: pd.DataFrame, model: str, probe: str = "l1", position: str = "last_prompt") -> int:
    """The layer where ``probe`` at ``position`` has its highest mean AUROC (all answers) for ``model``."""
    rows = summary_table[(summary_table["model"] == model) & (summary_table["source"] == "probe") & (summary_table["probe"] == probe)
                         & (summary_table["position"] == position) & (summary_table["subset"] == "all")]
    if rows.empty:
        raise ValueError(f"no {probe} probe at {position} for {model}: run the probe table with them first")
    return int(rows.loc[rows["value"].astype(float).idxmax(), "layer"])


# --------------------------------------------------------------------------------------------------
# Across layers: out-of-fold scores of a probe trained at one layer and read at every layer
# --------------------------------------------------------------------------------------------------


def cross_layer_scores(matrices: Sequence[np.ndarray], correct, groups, kind: str = "l1", *, folds: int = 5,
                       inner_folds: int = INNER_FOLDS, seed: int = 0, train: Sequence[int] | None = None) -> np.ndarray:
    """``[train layer, test layer, row]`` out-of-fold P(correct): for each outer fold, the probe fitted on the
    training folds' rows of ``matrices[i]`` (strength by the inner grouped CV, as :func:`cross_validated`) scores
    the held-out rows of every ``matrices[j]``.

    One fit per (train layer, fold), never per test layer; the diagonal equals :func:`cross_validated` of that
    layer with the same seed (same folds, strengths and fits). ``train``: the train layers (default all).
    """
    Xs = [np.asarray(X, dtype=float) for X in matrices]
    for i, X in enumerate(Xs):
        if not np.isfinite(X).all():
            raise ValueError(f"layer {i}'s features hold {int((~np.isfinite(X)).sum())} non-finite values")
    y = np.asarray(correct, dtype=bool).astype(int)
    plan = fold_plan(y, groups, folds, inner_folds, seed)
    train_layers = range(len(Xs)) if train is None else train
    scores = np.full((len(train_layers), len(Xs), len(y)), np.nan)
    for a, i in enumerate(train_layers):
        for f in range(folds):
            test = plan.outer == f
            fit_rows = ~test
            strength = choose_strength(kind, Xs[i][fit_rows], y[fit_rows], plan.inner[f][fit_rows], seed)
            model = _fit(kind, strength, seed, Xs[i][fit_rows], y[fit_rows])
            for j, X in enumerate(Xs):
                scores[a, j, test] = _predict(model, X[test])
    return scores


@dataclass
class LayerScores:
    """Out-of-fold scores of one probe at every (train layer, test layer) pair, per CV seed, and the rows' labels."""

    model: str
    position: str
    kind: str
    layers: list[int]
    cv_seeds: list[int]
    scores: np.ndarray  # [seed, train layer, test layer, row]
    correct: np.ndarray
    groups: np.ndarray

    def diagonal(self) -> np.ndarray:
        """``[seed, layer, row]``: each layer's own out-of-fold scores (:func:`cross_validated`)."""
        return np.stack([self.scores[:, i, i] for i in range(len(self.layers))], axis=1)


def _cross_layer_job(matrices, correct, groups, kind, folds, seed, train):
    return cross_layer_scores(matrices, correct, groups, kind, folds=folds, seed=seed, train=train)


def layer_scores(features, *, position: str = "last_prompt", kind: str = "l1", folds: int = 5, seeds: int = 2, seed: int = 0,
                 layers: Sequence[int] | None = None, jobs: int = 1) -> LayerScores | None:
    """:func:`cross_layer_scores` of every layer of ``features`` (from the store's shape) for CV seeds
    ``seed .. seed + seeds - 1``; ``layers x folds`` fits per seed, ``jobs`` processes side by side (every fit is
    seeded: the scores do not depend on ``jobs``). None when grouped CV cannot run (:func:`cv_problem`)."""
    distinct = features.distinct
    y = distinct["correct"].to_numpy(bool)
    groups = distinct["image_file"].to_numpy()
    if cv_problem(y, groups, folds) is not None:
        return None
    layers = list(range(features.store.hidden(None, position).shape[1]) if layers is None else layers)
    matrices = [hidden_matrix(features.store, distinct, layer, position) for layer in layers]
    calls = [(matrices, y, groups, kind, folds, s, [i]) for s in range(seed, seed + seeds) for i in range(len(layers))]
    parts = side_by_side(_cross_layer_job, calls, jobs)
    scores = np.stack([np.concatenate(parts[k * len(layers):(k + 1) * len(layers)]) for k in range(seeds)])
    return LayerScores(features.model, position, kind, [int(x) for x in layers], list(range(seed, seed + seeds)), scores, y, groups)


def layer_transfer(scores: LayerScores, n_boot: int = 1000) -> pd.DataFrame:
    """AUROC of the probe trained at each layer and read at each layer (image-grouped folds), one row per pair.

    Per CV seed the AUROC and its image-bootstrap CI (``stats.auroc``, bootstrap seed = CV seed, as the probe
    table's); a row holds the mean over seeds and the seeds' bounds averaged, so the diagonal equals the
    probe table's AUROC of that layer.
    """
    rows = []
    for a, train in enumerate(scores.layers):
        for b, test in enumerate(scores.layers):
            per_seed = [auroc(scores.scores[k, a, b], scores.correct, scores.groups, n_boot=n_boot, seed=s)
                        for k, s in enumerate(scores.cv_seeds)]
            values = np.array([e.value for e in per_seed], dtype=float)
            rows.append({"model": scores.model, "train_layer": train, "test_layer": test, "position": scores.position,
                         "probe": scores.kind, "value": float(values.mean()),
                         "ci_low": float(np.mean([e.ci_low for e in per_seed])),
                         "ci_high": float(np.mean([e.ci_high for e in per_seed])),
                         "seed_sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "seeds": len(per_seed),
                         "n": per_seed[0].n, "n_groups": per_seed[0].n_groups,
                         "method": "probe fitted at train_layer on the training folds' inputs, scoring the held-out folds' "
                                   "inputs at test_layer (StratifiedGroupKFold by image); AUROC (stats.auroc) per CV seed, "
                                   "mean over seeds, the seeds' 95% image-bootstrap bounds averaged"})
    return pd.DataFrame.from_records(rows)


def layer_transfer_summary(transfer: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, train layer) of a :func:`layer_transfer` table: the in-layer AUROC, the lowest AUROC
    at another layer (and which), and the test layers where the probe's AUROC interval lies above chance (0.5)."""
    out = []
    for (model, train), part in transfer.groupby(["model", "train_layer"], sort=False):
        own = part[part["test_layer"] == train].iloc[0]
        others = part[part["test_layer"] != train]
        low = others.loc[others["value"].idxmin()] if len(others) else None
        above = [int(t) for t, lo in zip(part["test_layer"], part["ci_low"]) if pd.notna(lo) and lo > 0.5]
        out.append({"model": model, "train_layer": int(train), "value": own["value"], "ci_low": own["ci_low"],
                    "ci_high": own["ci_high"], "lowest_layer": None if low is None else int(low["test_layer"]),
                    "lowest_value": None if low is None else low["value"], "lowest_ci_low": None if low is None else low["ci_low"],
                    "lowest_ci_high": None if low is None else low["ci_high"],
                    "above_chance": _layer_ranges(above), "n": int(own["n"]), "n_groups": int(own["n_groups"])})
    return pd.DataFrame.from_records(out)


def _layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"`` (``"none"`` when empty)."""
    if not layers:
        return "none"
    runs, start = [], layers[0]
    for prev, cur in zip(layers, [*layers[1:], None]):
        if cur is None or cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(runs)


def layer_differences(features, best: int, *, position: str = "last_prompt", kind: str = "l1", folds: int = 5,
                      seeds: int = 2, seed: int = 0, n_boot: int = 1000, layers: Sequence[int] | None = None,
                      scores: LayerScores | None = None) -> pd.DataFrame:
    """Each layer's probe AUROC minus the ``best`` layer's, on the same inputs, folds and CV seeds (paired).

    One row per layer: the mean over CV seeds of the paired difference (``stats.auroc_difference``), the seeds'
    95% bounds averaged and the largest of their p-values. The best layer's own row is 0 with no interval.
    ``scores``: the :func:`layer_scores` of these features (their diagonal is used), computed here when None.
    """
    if scores is None:
        scores = layer_scores(features, position=position, kind=kind, folds=folds, seeds=seeds, seed=seed, layers=layers)
    if scores is None:
        return pd.DataFrame()
    y, groups, diagonal = scores.correct, scores.groups, scores.diagonal()
    reference = scores.layers.index(best)
    rows = []
    for k, s in enumerate(scores.cv_seeds):
        for i, layer in enumerate(scores.layers):
            if layer != best:
                rows.append({"layer": int(layer), "cv_seed": s,
                             **_estimate_row(auroc_difference(diagonal[k, i], diagonal[k, reference], y, groups, n_boot=n_boot,
                                                              seed=s))})
    frame = pd.DataFrame.from_records(rows)
    out = [{"model": scores.model, "layer": int(best), "best_layer": int(best), "position": scores.position, "probe": scores.kind,
            "value": 0.0, "ci_low": None, "ci_high": None, "p_value": None, "seeds": len(scores.cv_seeds), "n": len(y),
            "n_groups": len(set(groups.tolist()))}]
    for layer, part in (frame.groupby("layer", sort=True) if len(frame) else []):
        out.append({"model": scores.model, "layer": int(layer), "best_layer": int(best), "position": scores.position,
                    "probe": scores.kind, "value": part["value"].mean(), "ci_low": part["ci_low"].mean(),
                    "ci_high": part["ci_high"].mean(), "p_value": part["p_value"].max(), "seeds": len(part),
                    "n": int(part["n"].iloc[0]), "n_groups": int(part["n_groups"].iloc[0])})
    return pd.DataFrame.from_records(out).sort_values("layer", ignore_index=True).assign(
        method="layer's probe AUROC minus the best layer's, same inputs, folds and CV seeds (stats.auroc_difference, "
               "paired cluster bootstrap over images); mean over CV seeds, the seeds' 95% bounds averaged, p: the largest")


#: The z of a two-sided 95% normal interval: "its 95% CI includes 0" read on one bootstrap replicate as d + z * se >= 0.
RELIABILITY_Z = 1.959963984540054
#: How the reliability layer's own CI is made (declared with the rule, before any deep zoo result, issue 24).
RELIABILITY_CI = ("95% CI of the reliability layer: each layer's out-of-fold probe scores averaged over the CV seeds; one "
                  "paired cluster bootstrap over images (stats.cluster_bootstrap_outputs, one resampling shared by all "
                  "layers) of d_l = AUROC_l - AUROC_best; in each replicate the layer is the first l with "
                  "d_l + 1.96 se_l >= 0 (se_l: the bootstrap SE of d_l); the interval is the 2.5th and 97.5th "
                  "percentiles (inverted CDF) of the replicates' (layer + 1) / number of layers")
#: Declared before any zoo with depth was trained (issue 24): where reliability "lives" is the shallowest layer whose
#: probe is not shown worse than the best layer's, by the paired difference (not by overlapping intervals).
RELIABILITY_RULE = ("the first layer (from the input) whose paired AUROC difference from the best layer's probe has a "
                    "95% CI that includes 0; relative depth = (layer + 1) / number of layers; " + RELIABILITY_CI)


def reliability_layer_ci(scores: np.ndarray, correct, groups, best: int, *, n_boot: int = 1000, seed: int = 0,
                         confidence: float = 0.95) -> dict:
    """The reliability layer's bootstrap CI by :data:`RELIABILITY_CI`, from ``scores`` ``[layer, row]`` (each
    layer's out-of-fold scores, mean over CV seeds) and the ``best`` layer's index.

    Returns ``layer_ci_low/high``, ``relative_depth_ci_low/high``, the share of replicates at each layer and
    how many replicates were undefined (a resample with one class) and dropped.
    """
    S = np.asarray(scores, dtype=float)
    n_layers = S.shape[0]
    if not 0 <= best < n_layers:
        raise ValueError(f"best must lie in 0..{n_layers - 1}; got {best}")
    y = np.asarray(correct, dtype=bool)
    if y.all() or not y.any():
        raise ValueError("correct holds one class only: AUROC is undefined")
    cis = auroc_difference_bootstrap(S, best, y, groups, n_boot=n_boot, seed=seed, confidence=confidence)
    reps = np.stack([ci.replicates for ci in cis])  # [layer, replicate]
    se = np.array([0.0 if l == best else ci.standard_error for l, ci in enumerate(cis)])
    defined = np.isfinite(reps).all(axis=0)
    qualifies = reps[:, defined] + RELIABILITY_Z * se[:, None] >= 0
    qualifies[best] = True  # d_best is 0 in every replicate
    chosen = np.argmax(qualifies, axis=0)
    if chosen.size == 0:
        raise ValueError(f"all {n_boot} bootstrap replicates are undefined (a resample with one class)")
    alpha = (1.0 - confidence) / 2.0
    low, high = (int(np.quantile(chosen, q, method="inverted_cdf")) for q in (alpha, 1.0 - alpha))
    share = np.bincount(chosen, minlength=n_layers) / max(1, chosen.size)
    return {"layer_ci_low": low, "layer_ci_high": high, "relative_depth_ci_low": (low + 1) / n_layers,
            "relative_depth_ci_high": (high + 1) / n_layers, "replicate_share": {int(l): float(v) for l, v in enumerate(share)},
            "n_boot": int(n_boot), "undefined_replicates": int((~defined).sum()), "ci_method": RELIABILITY_CI}


def reliability_layer(differences: pd.DataFrame, n_layers: int, scores: LayerScores | None = None, *, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """The reliability layer of one model from its :func:`layer_differences` rows, by :data:`RELIABILITY_RULE`; with
    ``scores`` (its :func:`layer_scores`) also its CI (:func:`reliability_layer_ci`, bootstrap seed ``seed``)."""
    if differences.empty:
        raise ValueError("no layer differences: the probes were not fitted for this model")
    ordered = differences.sort_values("layer")
    for row in ordered.itertuples():
        not_worse = row.layer == row.best_layer or (pd.notna(row.ci_high) and row.ci_high >= 0)
        if not_worse:
            found = {"layer": int(row.layer), "relative_depth": (int(row.layer) + 1) / n_layers, "n_layers": int(n_layers),
                     "best_layer": int(row.best_layer), "difference": float(row.value),
                     "ci_low": None if pd.isna(row.ci_low) else float(row.ci_low),
                     "ci_high": None if pd.isna(row.ci_high) else float(row.ci_high), "rule": RELIABILITY_RULE}
            if scores is not None:
                if len(scores.layers) != n_layers:
                    raise ValueError(f"scores cover {len(scores.layers)} layers; the CI needs all {n_layers}")
                found.update(reliability_layer_ci(scores.diagonal().mean(axis=0), scores.correct, scores.groups,
                                                  scores.layers.index(int(row.best_layer)), n_boot=n_boot, seed=seed))
            return found
    raise AssertionError("unreachable: the best layer always qualifies")


def reliability_depth_rows(reliability: dict[str, dict]) -> list[dict]:
    """One row per model: the reliability layer's relative depth [CI], as rows (what the paper-vs-reproduction page
    reads; ``reliability`` maps model -> :func:`reliability_layer`)."""
    return [{"model": model, "layer": r["layer"], "n_layers": r["n_layers"], "value": r["relative_depth"],
             "ci_low": r.get("relative_depth_ci_low"), "ci_high": r.get("relative_depth_ci_high"),
             "method": r["rule"]} for model, r in reliability.items()]


# --------------------------------------------------------------------------------------------------
# Leakage test
# --------------------------------------------------------------------------------------------------


def leakage_test(X_distinct, rows_distinct, groups_rows, *, kind: str = "mlp", folds: int = 5, seed: int = 0,
                 n_boot: int = 1000) -> list[dict]:
    """Shuffled labels on duplicated rows: AUROC with image-grouped folds vs plain row folds.

    ``X_distinct`` ``[distinct, width]``; ``rows_distinct`` (per row, with duplicates) the distinct
    input each row shows; ``groups_rows`` its image. Labels are a random 50/50 assignment per
    distinct input (seeded), so a row's label is shared by its duplicates and unrelated to the
    features: a probe can only beat 0.5 by seeing a duplicate of a test row in training. The probe
    has fixed, weakest regularisation of its grid (tuned, it would predict a constant).
    """
    X_distinct = np.asarray(X_distinct, dtype=float)
    rows_distinct = np.asarray(rows_distinct)
    groups_rows = np.asarray(groups_rows)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(len(X_distinct)) % 2).astype(bool)
    y, X = labels[rows_distinct], X_distinct[rows_distinct]
    strength = grid(kind)[-1]
    grouped = cross_validated(X, y, groups_rows, kind, folds=folds, seed=seed, strength=strength).scores
    by_row = np.empty(len(y))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        by_row[test] = _predict(_fit(kind, strength, seed, X[train], y[train]), X[test])
    n_dup = int(len(rows_distinct) - len(np.unique(rows_distinct)))
    return [
        _estimate_row(auroc(scores, y, groups_rows, n_boot=n_boot, seed=seed), split=split, probe=kind, strength=strength,
                      n_duplicate_rows=n_dup)
        for split, scores in (("grouped by image", grouped), ("by row, duplicates kept", by_row))
    ]


# --------------------------------------------------------------------------------------------------
# Logit lens
# --------------------------------------------------------------------------------------------------


class LogitLens:
    """A model's final norm + unembedding (+ soft-capping), applied to stored pre-norm states."""

    def __init__(self, model: str, loaded=None):
        from vrp_utils.models.loading import load_model

        self.loaded = loaded if loaded is not None else load_model(model)
        self.model = self.loaded.model
        text = self.model.config.get_text_config()
        self.softcap = getattr(text, "final_logit_softcapping", None)
        self.yes_ids, self.no_ids = self.loaded.adapter.yes_no_token_ids(self.loaded.processor.tokenizer)

    def logits(self, states) -> "torch.Tensor":  # noqa: F821
        import torch

        head, norm = self.model.get_output_embeddings(), self.model.get_decoder().norm
        with torch.no_grad():
            h = torch.as_tensor(np.asarray(states)).to(norm.weight.device, norm.weight.dtype)
            logits = head(norm(h).to(head.weight.device)).float().cpu()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def margin(self, states) -> np.ndarray:
        """log P(yes variants) - log P(no variants) of each state, as the engine's ``yes_no_margin``."""
        import torch

        logits = self.logits(states)
        return (torch.logsumexp(logits[:, self.yes_ids], -1) - torch.logsumexp(logits[:, self.no_ids], -1)).numpy().astype(float)


def logit_lens(features, loaded=None, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per input and layer margins (``margins``) and per layer AUROCs and mean truth margins (``table``); the model
    (unless ``loaded`` is given) on the features' device in their dtype."""
    lens = LogitLens(str(features.model_dir), loaded if loaded is not None else features.load())
    distinct = features.distinct
    states = features.store.hidden(None, "last_prompt")
    idx = distinct["array_index"].to_numpy()
    y = distinct["correct"].to_numpy(bool)
    groups = distinct["image_file"].to_numpy()
    sign_label = np.where(distinct["label"].to_numpy() == "yes", 1.0, -1.0)
    sign_answer = np.where(distinct["parsed"].to_numpy() == "yes", 1.0, -1.0)
    parts, rows = [], []
    from vrp_utils.analysis.stats import mean_estimate

    for layer in range(states.shape[1]):
        margin = lens.margin(np.asarray(states[idx, layer]))
        parts.append(pd.DataFrame({"model": features.model, "distinct_id": distinct["distinct_id"], "layer": layer, "margin": margin,
                                   "truth_margin": sign_label * margin, "answer_margin": sign_answer * margin, "correct": y}))
        if len(set(groups.tolist())) < 2:
            continue  # one image: no image-level interval
        for name in ("answer_margin", "truth_margin"):
            score = (sign_answer if name == "answer_margin" else sign_label) * margin
            rows.append(_estimate_row(auroc(score, y, groups, n_boot=n_boot, seed=seed), model=features.model, layer=layer,
                                      statistic=f"auroc_{name}"))
        for outcome, keep in (("correct", y), ("wrong", ~y)):
            if len(set(groups[keep].tolist())) >= 2:
                rows.append(_estimate_row(mean_estimate(sign_label[keep] * margin[keep], groups[keep], n_boot=n_boot, seed=seed),
                                          model=features.model, layer=layer, statistic=f"mean_truth_margin_{outcome}"))
    return pd.concat(parts, ignore_index=True), pd.DataFrame.from_records(rows)


# --------------------------------------------------------------------------------------------------
# Transfer across settings
# --------------------------------------------------------------------------------------------------


def image_halves(images: Sequence[str], seed: int = 0) -> dict[str, int]:
    """Each distinct image -> half 0 or 1 (a seeded random split, sizes differing by at most one)."""
    unique = sorted(set(images))
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[i]: int(rank >= len(unique) // 2) for rank, i in enumerate(order)}


def transfer_matrix(features, layer: int, position: str = "last_prompt", kind: str = "l1", *, seed: int = 0,
                    n_boot: int = 1000) -> pd.DataFrame:
    """AUROC of a probe trained on one setting and tested on each, across disjoint image halves; drop vs in-setting."""
    table = features.table
    settings = [s for s in features.settings if (table["setting"] == s).any()]
    states = np.asarray(features.store.hidden(layer, position), dtype=float)
    X = states[table["array_index"].to_numpy()]
    y = table["correct"].to_numpy(bool)
    groups = table["image_file"].to_numpy()
    half = table["image_file"].map(image_halves(groups, seed)).to_numpy()
    setting = table["setting"].to_numpy()
    scores = {s: np.full(len(table), np.nan) for s in settings}
    chosen = {s: [] for s in settings}
    for train_setting in settings:
        for h in (0, 1):
            train = (setting == train_setting) & (half == h)
            inner = grouped_folds(y[train], groups[train], folds=INNER_FOLDS, seed=seed)
            strength = choose_strength(kind, X[train], y[train].astype(int), inner, seed)
            chosen[train_setting].append(strength)
            model = _fit(kind, strength, seed, X[train], y[train].astype(int))
            scores[train_setting][half != h] = _predict(model, X[half != h])
    rows = []
    for train_setting in settings:
        for test_setting in settings:
            rows_t = setting == test_setting
            est = auroc(scores[train_setting][rows_t], y[rows_t], groups[rows_t], n_boot=n_boot, seed=seed)
            drop = auroc_difference(scores[train_setting][rows_t], scores[test_setting][rows_t], y[rows_t], groups[rows_t],
                                    n_boot=n_boot, seed=seed)
            row = _estimate_row(est, model=features.model, train=train_setting, test=test_setting, layer=layer, position=position,
                                probe=kind, chosen=",".join(map(str, chosen[train_setting])))
            row.update({"drop": drop.value, "drop_ci_low": drop.ci_low, "drop_ci_high": drop.ci_high, "drop_p": drop.p_value})
            rows.append(row)
    return pd.DataFrame.from_records(rows)


# --------------------------------------------------------------------------------------------------
# Neuron ablation
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def zeroed_dimensions(model, layer: int, dims: Sequence[int]) -> Iterator[None]:
    """While active, decoder block ``layer``'s output has ``dims`` set to 0 at every position (hook removed on exit)."""
    import torch

    layers = model.get_decoder().layers
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer must lie in 0..{len(layers) - 1}; got {layer}")
    index = torch.as_tensor(sorted(int(d) for d in dims), dtype=torch.long)

    def hook(module, args, output):
        states = output[0] if isinstance(output, tuple) else output
        states = states.index_fill(-1, index.to(states.device), 0.0)
        return (states, *output[1:]) if isinstance(output, tuple) else states

    handle = layers[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ablation_intervention(layer: int, dims: Sequence[int], condition: str, k: int, draw: int | None, seed: int):
    """The engine intervention zeroing ``dims`` at ``layer`` (identity names the layer and every dimension)."""
    from vrp_utils.extract.engine import Intervention

    dims = sorted(int(d) for d in dims)
    identity = {"kind": "zero_hidden_dims", "layer": int(layer), "dims": dims, "positions": "all",
                "condition": condition, "k": int(k), "draw": draw, "seed": int(seed)}
    return Intervention(identity, hooks=lambda model: zeroed_dimensions(model, layer, dims))


def probe_weights(features, layer: int, position: str = "last_prompt", seed: int = 0) -> tuple[np.ndarray, float]:
    """|weight| per dimension of the ``l1`` probe fitted on all distinct inputs (strength by inner grouped CV), and C."""
    distinct = features.distinct
    X = hidden_matrix(features.store, distinct, layer, position)
    y = distinct["correct"].to_numpy(int)
    groups = distinct["image_file"].to_numpy()
    strength = choose_strength("l1", X, y, grouped_folds(y, groups, folds=INNER_FOLDS, seed=seed), seed)
    model = _fit("l1", strength, seed, X, y)
    weights = np.zeros(X.shape[1]) if isinstance(model, float) else np.abs(model[-1].coef_[0])
    return weights, strength


def ablation_plan(weights: np.ndarray, ks: Sequence[int], draws: int, seed: int = 0, half: bool = True) -> list[dict]:
    """Every pass: top-k by |weight| (ties by index), k random dimensions per draw, half of the width per draw."""
    width = len(weights)
    order = np.lexsort((np.arange(width), -weights))  # largest |weight| first
    plans = []
    for k in ks:
        plans.append({"condition": "top", "k": k, "draw": None, "dims": np.sort(order[:k]).tolist(),
                      "nonzero_in_top": int((weights[order[:k]] > 0).sum())})
        for d in range(draws):
            rng = np.random.default_rng([seed, k, d])
            plans.append({"condition": "random", "k": k, "draw": d, "dims": np.sort(rng.choice(width, k, replace=False)).tolist()})
    if half:
        for d in range(draws):
            rng = np.random.default_rng([seed, width // 2, d, 1])
            plans.append({"condition": "half", "k": width // 2, "draw": d, "dims": np.sort(rng.choice(width, width // 2, replace=False)).tolist()})
    return plans


def _ablation_pass(model_dir: str, dataset, settings, root, layer: int, plan: dict, seed: int, progress: bool,
                   device: str = "cpu", dtype: str = "float32"):
    """One ablated greedy pass (one torch thread: a worker process of its own when run side by side), on ``device``
    in ``dtype`` (the features'); its store path."""
    import torch

    from vrp_utils.extract.features import open_or_extract

    torch.set_num_threads(1)
    intervention = ablation_intervention(layer, plan["dims"], plan["condition"], plan["k"], plan["draw"], seed)
    return open_or_extract(model_dir, dataset, settings, root=root, progress=progress, intervention=intervention,
                           device=device, dtype=dtype).path


def layer_roles(roles: int | Mapping[str, int]) -> dict[int, str]:
    """``{"reliability": 3, "best": 5}`` -> ``{3: "reliability", 5: "best"}``: each layer once, its roles joined
    (``{"reliability": 5, "best": 5}`` -> ``{5: "reliability and best"}``); a plain layer is role ``chosen``."""
    roles = {"chosen": roles} if isinstance(roles, (int, np.integer)) else roles
    out: dict[int, list[str]] = {}
    for role, layer in roles.items():
        out.setdefault(int(layer), []).append(role)
    return {layer: " and ".join(names) for layer, names in out.items()}


def ablation_sweep(features: Mapping, layers: Mapping[str, int | Mapping[str, int]], ablation_k: str | Sequence, draws: int = 1,
                   *, position: str = "last_prompt", seed: int = 0, n_boot: int = 1000, progress: bool = True,
                   jobs: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, dict]]:
    """One greedy pass per planned ablation of every model in ``features`` (``{name: Features}``) at each of its
    ``layers[name]``: one layer, or ``{role: layer}`` (e.g. ``{"reliability": 2, "best": 5}``; a layer named by
    two roles runs once, its rows' ``layer_role`` naming both, :func:`layer_roles`).

    Returns the accuracy changes of every pass in every scope (:func:`vrp_utils.analysis.changes.accuracy_changes`:
    per setting, label-balanced, distinct), the paired label-balanced difference of each layer's top-k pass from
    its first random draw of as many dimensions, and per model the probe's C and weight counts at each layer.

    ``ablation_k`` is read against each model's width (:func:`parse_ablation`). The passes of all models run in
    one pool of ``jobs`` processes (one torch thread each; the stores, hence the results, do not depend on it).
    """
    from vrp_utils.extract.engine import ExtractionSettings
    from vrp_utils.extract.store import FeatureStore

    # batch 64: same answers as the batch-16 pass (0 of 1,725 differ, zoo-llava), 2.4x less CPU
    settings = ExtractionSettings(attention=False, hidden=False, batch_size=64)
    tasks, info = [], {}
    for name, f in features.items():
        info[name] = {"layers": {}, "passes": 0}
        for layer, role in layer_roles(layers[name]).items():
            weights, strength = probe_weights(f, layer, position, seed)
            ks, half = parse_ablation(ablation_k, len(weights))
            plans = ablation_plan(weights, ks, draws, seed, half)
            info[name]["layers"][role] = {"layer": layer, "probe_C": strength, "nonzero_weights": int((weights > 0).sum()),
                                          "passes": len(plans)}
            info[name].update(width=len(weights), passes=info[name]["passes"] + len(plans))
            tasks += [(name, layer, role, plan) for plan in plans]
    calls = [(str(features[name].model_dir), features[name].inputs, settings, features[name].store.path.parent, layer,
              plan, seed, progress and jobs <= 1, features[name].device, features[name].dtype) for name, layer, _, plan in tasks]
    paths = side_by_side(_ablation_pass, calls, jobs)
    rows, answered = [], {}
    for (name, layer, role, plan), path in zip(tasks, paths):
        store = FeatureStore.open(path)
        after = store.table().rename(columns={"question_id": "distinct_id", "correct": "correct_after", "parsed": "parsed_after"})
        after = after[["distinct_id", "correct_after", "parsed_after"]]
        answered[(name, layer, role, plan["condition"], plan["k"], plan["draw"])] = after
        keys = {"model": features[name].model, "layer": layer, "layer_role": role, "position": position,
                **{k: v for k, v in plan.items() if k != "dims"}, "dims": ",".join(map(str, plan["dims"]))}
        for row in changes.accuracy_changes(features[name].table, after, sorted(features[name].table["setting"].unique()),
                                            n_boot=n_boot, seed=seed):
            rows.append({**keys, **row, "n_error_rows": store.n_errors})
    differences = []
    for (name, layer, role, condition, k, _), after in answered.items():
        control = answered.get((name, layer, role, "random", k, 0))
        if condition == "top" and control is not None:
            differences.append({"model": features[name].model, "layer": layer, "layer_role": role, "condition": "top",
                                "versus": "random", "k": k,
                                **changes.condition_difference(features[name].table, after, control, n_boot=n_boot, seed=seed)})
    return pd.DataFrame.from_records(rows), pd.DataFrame.from_records(differences), info


def _untrained_job(model_dir: str, dataset, root, seed: int, progress: bool, device: str = "cpu", dtype: str = "float32"):
    """The untrained twin's store path (one torch thread: a worker process of its own when run side by side), on
    ``device`` in ``dtype`` (the features')."""
    import torch

    from vrp_utils.extract.engine import ExtractionSettings
    from vrp_utils.extract.features import open_or_extract
    from vrp_utils.extract.untrained import untrained_twin

    torch.set_num_threads(1)
    twin = untrained_twin(model_dir, seed)
    return open_or_extract(str(twin), dataset, ExtractionSettings(max_new_tokens=1, attention=False, batch_size=64),
                           root=root, progress=progress, device=device, dtype=dtype).path


def untrained_stores(features: Mapping, seed: int = 0, progress: bool = True, jobs: int = 1) -> dict:
    """Per model of ``{name: Features}``: the untrained twin's ``last_prompt`` states over the same distinct inputs
    (one prefill step, no attention); ``jobs`` twins side by side."""
    from vrp_utils.extract.store import FeatureStore

    calls = [(str(f.model_dir), f.inputs, f.store.path.parent, seed, progress and jobs <= 1, f.device, f.dtype)
             for f in features.values()]
    return {name: FeatureStore.open(path) for name, path in zip(features, side_by_side(_untrained_job, calls, jobs))}


def untrained_store(features, seed: int = 0, progress: bool = True):
    """The untrained twin's store for one model's ``features`` (see :func:`untrained_stores`)."""
    return untrained_stores({features.model: features}, seed, progress)[features.model]


@dataclass
class Timing:
    """Seconds per stage, for the chapter's cost statement."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        import time

        start = time.time()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.time() - start, 1)

