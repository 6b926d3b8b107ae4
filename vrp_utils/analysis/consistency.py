"""Self-consistency: S_SC from sampled answers, and its exact limit from the first token's distribution.

Declared before any result (issue 14):

- **S_SC at K** = (count of the most frequent parse class among the first K samples) / K; parse classes
  are POPE's yes/no, plus ``"none"`` (a strict-rule answer without yes/no) as its own class. Samples come
  from one pool per distinct input (``pool`` samples, temperature T, top-p p, seed), drawn by the
  engine's prefix-shared sampler; the first K of a pool are exactly a pool of K (per-row seeds), so a
  K sweep reads one pool. Higher S_SC = more likely correct (the direction, fixed in code).
- The label is the **greedy** answer's correctness (the answer a pipeline would gate), from the greedy
  store; "all K agree" is S_SC = 1.
- **q**, the probability that one sample parses as yes (POPE's rule): the first step's nucleus is known
  exactly (probability ``p_t`` of every token with non-zero processed probability). A token that decides
  the parse (:func:`vrp_utils.extract.sampling.first_token_decision`: a yes-word, a negation word, the
  end token or a closed sentence) contributes ``p_t`` to q exactly; the *remaining* mass ``r`` (tokens
  that leave the parse to later tokens) is resolved by sampling: ``r`` x the yes-share of the engine's
  resolve rows (continuations of a non-deciding first token drawn from those tokens alone). Examples
  with ``r > 0`` are flagged, with the standard error of that part.
- **Expected S_SC at K** from q: E[max(X, K - X)] / K with X ~ Binomial(K, q); at K = infinity, max(q, 1 - q).

Any task (issue 25, :mod:`vrp_utils.data.tasks`): parse classes are the task rule's normalised answers
(counting: the count in digits, or ``"none"``), and q generalises to **class probabilities**: each class
gets the nucleus mass of the first tokens that decide it under the task's rule, plus the non-deciding mass
times its share of the resolve rows (:func:`class_probs`). Expected S_SC at K is then E[max_j X_j] / K with
X ~ Multinomial(K, p) (:func:`expected_s_sc_multiclass`); at K = infinity, max_j p_j. For presence the
classes are yes and no with p = (q, 1 - q), and the binomial form above is the same number (tested).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats

from vrp_utils.analysis.parallel import side_by_side

#: One pool of this many samples per distinct input; every K up to it reads the same pool.
DEFAULT_POOL = 20


def check_parameters(k: int, k_sweep: Sequence[int], temperature: float, top_p: float) -> None:
    """Refuse K < 1, a non-integer K, temperature <= 0 or top-p outside (0, 1] before any work, naming the valid range."""
    for name, value in [("k", k), *[("k_sweep", v) for v in k_sweep]]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must hold integers >= 1 (samples per input); got {value!r}")
    if not k_sweep:
        raise ValueError("k_sweep must name at least one K >= 1, e.g. '1-20' or '1,5,10'")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling; got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1]; got {top_p!r}")


def parse_k_sweep(text: str | Sequence[int]) -> list[int]:
    """``"1-20"``, ``"1,2,5,10"`` or a list -> sorted distinct Ks."""
    if not isinstance(text, str):
        return sorted({int(v) for v in text})
    values: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-"))
                values.update(range(low, high + 1))
            else:
                values.add(int(part))
        except ValueError:
            raise ValueError(f"k_sweep must be integers or ranges like '1-20' or '1,5,10'; got {text!r}") from None
    return sorted(values)


def pool_settings(pool: int, temperature: float, top_p: float, seed: int = 0, batch_size: int = 16):
    """The engine settings of one sample pool (answers only): the same definition `make features` extracts with."""
    from vrp_utils.extract.features import sample_pool_settings

    return sample_pool_settings(pool, temperature, top_p, seed, batch_size)


def open_samples(features, pool: int, temperature: float, top_p: float, seed: int = 0, progress: bool = True) -> pd.DataFrame:
    """The sample pool of every distinct input of ``features`` (cached store beside the greedy one; on the features'
    device, in their dtype), joined to greedy correctness."""
    from vrp_utils.extract.features import open_or_extract

    store = open_or_extract(features.model, features.inputs, pool_settings(pool, temperature, top_p, seed),
                            root=features.store.path.parent, progress=progress, device=features.device,
                            dtype=features.dtype)
    table = store.table().rename(columns={"question_id": "distinct_id"})
    keep = ["distinct_id", "answer", "sample_parsed", "sample_first_token", "resolve_parsed", "nucleus_ids",
            "nucleus_probs", "nucleus_decision"]
    greedy = features.distinct[[c for c in ("distinct_id", "image_file", "task", "label", "object", "answer", "parsed",
                                            "correct") if c in features.distinct.columns]]
    frame = greedy.merge(table[keep].rename(columns={"answer": "pool_greedy_answer"}), on="distinct_id", how="inner",
                         validate="one_to_one")
    frame["correct"] = frame["correct"].astype(bool)
    frame.attrs["store"] = store.path.name  # the name, not the checkout-dependent absolute path
    return frame


def s_sc(parsed: Sequence[Sequence[str]], k: int) -> np.ndarray:
    """Majority count / K over the first ``k`` samples of each input."""
    out = np.empty(len(parsed))
    for i, samples in enumerate(parsed):
        first = list(samples)[:k]
        if len(first) < k:
            raise ValueError(f"input {i} has {len(first)} samples; K = {k} needs a pool of at least {k}")
        _, counts = np.unique(first, return_counts=True)
        out[i] = counts.max() / k
    return out


def exact_q(frame: pd.DataFrame) -> pd.DataFrame:
    """Per input: q, its exactly known part, the remaining (non-deciding) mass, its resolution and a flag."""
    rows = []
    for ids, probs, decisions, resolve in zip(frame["nucleus_ids"], frame["nucleus_probs"], frame["nucleus_decision"],
                                              frame["resolve_parsed"]):
        probs = np.asarray(probs, dtype=float)
        decisions = np.asarray(decisions, dtype=object)
        exact_yes = float(probs[decisions == "yes"].sum())
        exact_no = float(probs[decisions == "no"].sum())
        remainder = float(probs[decisions == "open"].sum())
        resolved = np.asarray([p == "yes" for p in resolve], dtype=float)
        share = float(resolved.mean()) if len(resolved) else float("nan")
        se = remainder * float(np.sqrt(share * (1 - share) / len(resolved))) if len(resolved) else 0.0
        q = exact_yes + (remainder * share if remainder > 0 else 0.0)
        rows.append({"q": q, "q_exact_yes": exact_yes, "q_exact_no": exact_no, "remainder_mass": remainder,
                     "resolve_yes_share": share if remainder > 0 else np.nan, "q_se": se if remainder > 0 else 0.0,
                     "flagged": remainder > 0, "nucleus_size": len(ids), "first_token_certain": bool(probs.max() >= 1 - 1e-12)})
    return pd.DataFrame(rows, index=frame.index)


def expected_s_sc(q: np.ndarray, k: int) -> np.ndarray:
    """E[max(X, K - X)] / K for X ~ Binomial(K, q), per input (the S_SC a K-sample run gives on average).

    Rounded to 12 decimals: the sum leaves float noise of a few 1e-16 (at K = 1 the value is exactly 1 for every
    q), and a ranking statistic reads that noise as order; another CPU's kernels give other noise, which moved
    the AUROC at K = 1 by 0.03 between kernel paths (benchmarks/kernel_paths.py) where it is a tie (0.5).
    """
    q = np.asarray(q, dtype=float)
    x = np.arange(k + 1)
    pmf = scipy.stats.binom.pmf(x[None, :], k, np.clip(q, 0, 1)[:, None])
    return np.round((pmf * np.maximum(x, k - x)[None, :]).sum(1) / k, 12)


def expected_s_sc_multiclass(probs: np.ndarray, k: int) -> np.ndarray:
    """E[max_j X_j] / K for X ~ Multinomial(K, p), per input: the S_SC of K samples whose answer classes have
    probabilities ``probs`` ``[inputs, classes]`` (rows sum to 1), e.g. counts decided by their first token.

    Exact, as sum over m = 1..K of P(max_j X_j >= m) = 1 - P(every X_j <= m - 1), each computed by conditioning
    class by class (X_j given the earlier ones is binomial on the samples left): O(classes K^3) per input,
    where summing over every composition of K grows as C(K + classes - 1, classes - 1) (3.1 million at K = 20
    and 9 classes). With two classes it is :func:`expected_s_sc` of q = p_0. Rounded to 12 decimals as that
    function is (ranking statistics read float noise).
    """
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be [inputs, classes]; got shape {probs.shape}")
    if k < 1:
        raise ValueError(f"K must be at least 1; got {k}")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-9) or (probs < 0).any():
        raise ValueError("each row of probs must be a probability distribution (non-negative, summing to 1)")
    n, classes = probs.shape
    left = np.arange(k + 1)
    # conditional[:, j]: P(class j | not an earlier class) = p_j / (p_j + ... + p_last); 1 for the last class
    tail = np.cumsum(probs[:, ::-1], axis=1)[:, ::-1]
    conditional = np.divide(probs, tail, out=np.zeros_like(probs), where=tail > 0).clip(0, 1)
    # pmf[:, j, r, x] = P(x of the r samples left fall in class j | they fall in class j or a later one)
    pmf = scipy.stats.binom.pmf(left[None, None, None, :], left[None, None, :, None], conditional[:, :, None, None])
    total = np.zeros(n)
    for most in range(k):  # P(every X_j <= most)
        state = np.zeros((n, k + 1))  # state[:, r] = P(classes so far each <= most, r samples left)
        state[:, k] = 1.0
        for j in range(classes):
            nxt = np.zeros_like(state)
            for x in range(min(most, k) + 1):
                nxt[:, : k + 1 - x] += state[:, x:] * pmf[:, j, x:, x]
            state = nxt
        total += 1.0 - state[:, 0]
    return np.round(total / k, 12)


def limit_s_sc(q: np.ndarray) -> np.ndarray:
    """S_SC at K = infinity: max(q, 1 - q)."""
    q = np.asarray(q, dtype=float)
    return np.maximum(q, 1 - q)


def class_probs(frame: pd.DataFrame) -> list[dict[str, float]]:
    """Per input: the probability of each answer class for one sample, from the first token's nucleus.

    A first token that decides a class under the input's task rule (``nucleus_decision``) gives it its
    probability exactly; the remaining (``"open"``) mass is split by the classes of the resolve rows
    (``resolve_parsed``), as :func:`exact_q` splits it for presence. Remaining mass without resolve rows
    gives NaN for every class.
    """
    out = []
    for probs, decisions, resolve in zip(frame["nucleus_probs"], frame["nucleus_decision"], frame["resolve_parsed"]):
        classes: dict[str, float] = {}
        remainder = 0.0
        for p, decision in zip(probs, decisions):
            if decision == "open":
                remainder += float(p)
            else:
                classes[decision] = classes.get(decision, 0.0) + float(p)
        if remainder > 0:
            resolved = Counter(resolve)
            if not resolved:
                out.append({name: float("nan") for name in classes or {"none": 0}})
                continue
            for name, count in resolved.items():
                classes[name] = classes.get(name, 0.0) + remainder * count / len(resolve)
        out.append(classes)
    return out


def _as_matrix(probs: Sequence[dict[str, float]]) -> np.ndarray:
    """Class dicts -> ``[inputs, classes]`` (each row renormalised against float drift; zero-padded)."""
    width = max((len(p) for p in probs), default=1)
    matrix = np.zeros((len(probs), max(width, 1)))
    for i, p in enumerate(probs):
        values = np.sort(np.asarray(list(p.values()), dtype=float))[::-1]
        matrix[i, : len(values)] = values / values.sum() if len(values) else 1.0
    return matrix


def expected_s_sc_by_task(frame: pd.DataFrame, q: np.ndarray, probs: Sequence[dict[str, float]], k: int) -> np.ndarray:
    """Expected S_SC at ``k`` per input: presence from q (the binomial, :func:`expected_s_sc`), any other task
    from its class probabilities (the multinomial, :func:`expected_s_sc_multiclass`).

    Why presence keeps the binomial: the same number (tested), computed exactly as every published result was.
    """
    presence = _is_presence(frame)
    out = np.full(len(frame), np.nan)
    out[presence] = expected_s_sc(np.asarray(q, dtype=float)[presence], k)
    others = np.flatnonzero(~presence)
    usable = [i for i in others if not any(np.isnan(v) for v in probs[i].values())]
    if usable:
        out[usable] = expected_s_sc_multiclass(_as_matrix([probs[i] for i in usable]), k)
    return out


def limit_s_sc_by_task(frame: pd.DataFrame, q: np.ndarray, probs: Sequence[dict[str, float]]) -> np.ndarray:
    """S_SC at K = infinity per input: max(q, 1 - q) for presence, the largest class probability otherwise.

    The class probabilities are float32 softmax sums, so they are renormalised first (as :func:`_as_matrix`
    does): unnormalised, a certain answer's limit came out as 1 + 1e-7.
    """
    presence = _is_presence(frame)
    largest = np.array([max(p.values()) / sum(p.values()) if p else float("nan") for p in probs], dtype=float)
    return np.where(presence, limit_s_sc(q), largest)


def _is_presence(frame: pd.DataFrame) -> np.ndarray:
    """Which inputs are presence questions (all, in a frame without a ``task`` column: POPE stores)."""
    from vrp_utils.data.tasks import DEFAULT_TASK

    return (_task_of(frame) == DEFAULT_TASK).to_numpy(dtype=bool)


def decision_violations(frame: pd.DataFrame) -> dict[str, int]:
    """How often a sample whose first token "decided" the parse ended with the other parse (should be rare; counted)."""
    n_decided = n_violated = 0
    for ids, decisions, first, parsed in zip(frame["nucleus_ids"], frame["nucleus_decision"], frame["sample_first_token"],
                                             frame["sample_parsed"]):
        lookup = dict(zip(ids, decisions))
        for token, result in zip(first, parsed):
            decided = lookup.get(int(token), "open")
            if decided in ("yes", "no"):
                n_decided += 1
                n_violated += int(result != decided)
    return {"n_decided_samples": n_decided, "n_violations": n_violated}


def consistency_frame(frame: pd.DataFrame, k: int, k_sweep: Sequence[int]) -> pd.DataFrame:
    """Per input: S_SC at ``k`` and at every K of the sweep (sampled and expected from q), q and its limit."""
    out = frame[[c for c in ("distinct_id", "image_file", "task", "label", "object", "answer", "parsed", "correct")
                 if c in frame.columns]].copy()
    q = exact_q(frame)
    presence = _is_presence(frame)
    q.loc[~presence, ["q", "q_exact_yes", "q_exact_no", "resolve_yes_share", "q_se"]] = np.nan  # P(yes): presence only
    out = pd.concat([out, q], axis=1)
    probs = class_probs(frame)
    out["s_sc"] = s_sc(frame["sample_parsed"], k)
    out["s_sc_expected"] = expected_s_sc_by_task(frame, out["q"].to_numpy(), probs, k)
    out["s_sc_limit"] = limit_s_sc_by_task(frame, out["q"].to_numpy(), probs)
    for kk in k_sweep:
        out[f"s_sc@{kk}"] = s_sc(frame["sample_parsed"], kk)
        out[f"expected@{kk}"] = expected_s_sc_by_task(frame, out["q"].to_numpy(), probs, kk)
    out["pool_greedy_agrees"] = frame["pool_greedy_answer"].to_numpy() == frame["answer"].to_numpy()
    return out


def _pool_job(model: str, settings: tuple[str, ...], limit: int | None, pool: int, temperature: float, top_p: float,
              seed: int, device: str = "cpu", dtype: str = "float32", questions: tuple[str, ...] | None = None,
              image_dir: str | None = None) -> str:
    import torch

    from vrp_utils.data.questions import question_splits
    from vrp_utils.extract.features import open_features

    torch.set_num_threads(1)  # one thread per model, as `make features`: bytes independent of the machine's cores
    if questions is not None:  # the chapter's question files, read again here: the same splits, so the same store
        features = open_features(model, splits=question_splits(questions, image_dir, limit), progress=False,
                                 device=device, dtype=dtype)
    else:
        features = open_features(model, settings, limit, progress=False, device=device, dtype=dtype)
    frame = open_samples(features, pool, temperature, top_p, seed, progress=False)
    return frame.attrs["store"]


def missing_pools(features: dict, pool: int, temperature: float, top_p: float, seed: int = 0) -> list[str]:
    """The models (of ``{name: Features}``) whose sample pool is not extracted yet (nothing is run)."""
    from vrp_utils.extract.features import open_or_extract

    missing = []
    for name, f in features.items():
        try:
            open_or_extract(f.model, f.inputs, pool_settings(pool, temperature, top_p, seed), root=f.store.path.parent,
                            extract_missing=False, device=f.device, dtype=f.dtype)
        except FileNotFoundError:
            missing.append(name)
    return missing


def build_pools(models: Sequence[str], settings: tuple[str, ...], limit: int | None, pool: int, temperature: float,
                top_p: float, seed: int = 0, jobs: int = 2, *, device: str = "cpu", dtype: str = "float32",
                questions: str | Sequence[str | Path] | None = None, image_dir: str | Path | None = None) -> None:
    """Extract the sample pools of ``models``, ``jobs`` models side by side (worker processes, one thread each), on
    ``device`` in ``dtype`` (those the chapter opened the models' features with).

    ``questions`` and ``image_dir``: the question files the chapter read instead of the embedded benchmark's
    ``settings`` (:func:`vrp_utils.data.questions.question_splits`, with ``limit``). Each worker reads them again
    (paths travel to a worker, datasets do not), so it opens the very features, and pool, the chapter opens.
    """
    from vrp_utils.data.questions import parse_question_files

    files = None if questions is None else tuple(str(path.resolve()) for path in parse_question_files(questions))
    folder = None if image_dir is None else str(Path(image_dir).resolve())
    side_by_side(_pool_job, [(m, settings, limit, pool, temperature, top_p, seed, device, dtype, files, folder)
                             for m in models], jobs)


def _reasons(errors: pd.DataFrame) -> str:
    """Error rows by reason, most frequent first: ``"4 x ValueError: ... ('<question>') has words outside ..."``
    (each row's own question text replaced, so that rows failing for one reason count together)."""
    reasons: Counter = Counter()
    questions = errors["question"] if "question" in errors else [None] * len(errors)
    for reason, question in zip(errors["error"].astype(str), questions):
        if isinstance(question, str) and question:
            reason = reason.replace(repr(question), "'<question>'").replace(question, "<question>")
        reasons[reason[:200]] += 1
    return "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())


def task_counts(features: Mapping[str, Any], per_input: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model and task: how many questions were read, how many were error rows, how many inputs are scored.

    Columns: ``questions`` (rows of the question files), ``error_rows`` (those the model gave no answer for: an
    unknown word, an unreadable image; the store's error rows, counted, never dropped unseen), ``distinct``
    (distinct inputs among the questions), ``n`` (distinct inputs scored here: a greedy answer and a sample pool)
    and ``errors`` (the error rows by reason, :func:`_reasons`). Tasks come from the store's ``task`` column (rows
    without one are presence questions), presence first.
    """
    rows = []
    for name, f in features.items():
        joined = pd.concat([f.table, f.errors], ignore_index=True)
        task, scored_task = _task_of(joined), _task_of(per_input[name])
        for name_of_task in _in_order(task):
            mine = joined[task == name_of_task]
            failed = mine[mine["error"].notna()]
            rows.append({"model": name, "task": name_of_task, "questions": int(len(mine)), "error_rows": int(len(failed)),
                         "distinct": int(mine["distinct_id"].nunique()), "n": int((scored_task == name_of_task).sum()),
                         "errors": _reasons(failed)})
    return pd.DataFrame(rows, columns=["model", "task", "questions", "error_rows", "distinct", "n", "errors"])


def check_answered(features: Mapping[str, Any]) -> None:
    """Refuse, naming it, a model whose answers cover fewer than two images (every interval here resamples images):
    e.g. one whose every counting question is an error row (words its vocabulary lacks). Its questions, error rows
    and their reasons are counted in the message; nothing is dropped unseen."""
    for name, f in features.items():
        answered = f.distinct
        if answered["image_file"].nunique() >= 2:
            continue
        errors = f.errors
        raise ValueError(f"{name} answered {len(answered)} distinct input(s), on {answered['image_file'].nunique()} "
                         f"image(s), of {len(f.membership)} questions; {len(errors)} are error rows"
                         + (f" ({_reasons(errors)})" if len(errors) else "")
                         + ". Its intervals resample images, so it needs answers on at least 2 images: leave it out, "
                         "or ask it questions it can read")


def task_scopes(frame: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``{"task: <name>": rows}`` of a per-input frame, one scope per task it holds (presence first)."""
    task = _task_of(frame)
    return {f"task: {name}": frame[task == name] for name in _in_order(task)}


def _task_of(frame: pd.DataFrame) -> pd.Series:
    """Each row's task (the default, presence, where the frame has no ``task`` column or a row names none)."""
    from vrp_utils.data.tasks import DEFAULT_TASK

    if "task" not in frame.columns:
        return pd.Series(DEFAULT_TASK, index=frame.index, dtype=object)
    return frame["task"].fillna(DEFAULT_TASK)


def _in_order(task: pd.Series) -> list[str]:
    """The tasks present, presence first, then by name."""
    from vrp_utils.data.tasks import DEFAULT_TASK

    return sorted(set(task), key=lambda t: (t != DEFAULT_TASK, t))
