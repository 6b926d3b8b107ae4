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
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

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
    greedy = features.distinct[["distinct_id", "image_file", "label", "object", "answer", "parsed", "correct"]]
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

    Exact: a sum over every composition of K into the classes (scipy's multinomial pmf); with two classes it is
    :func:`expected_s_sc` of q = p_0. Rounded to 12 decimals as that function is (ranking statistics read float noise).
    """
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise ValueError(f"probs must be [inputs, classes]; got shape {probs.shape}")
    if k < 1:
        raise ValueError(f"K must be at least 1; got {k}")
    if not np.allclose(probs.sum(axis=1), 1.0, atol=1e-9) or (probs < 0).any():
        raise ValueError("each row of probs must be a probability distribution (non-negative, summing to 1)")
    classes = probs.shape[1]
    # every composition of k into `classes` non-negative parts (stars and bars)
    bars = np.array(list(itertools.combinations(range(k + classes - 1), classes - 1)), dtype=int).reshape(-1, classes - 1)
    edges = np.column_stack([np.full(len(bars), -1), bars, np.full(len(bars), k + classes - 1)])
    counts = np.diff(edges, axis=1) - 1
    pmf = np.stack([scipy.stats.multinomial.pmf(counts, k, row) for row in probs])
    return np.round((pmf * counts.max(axis=1)[None, :]).sum(axis=1) / k, 12)


def limit_s_sc(q: np.ndarray) -> np.ndarray:
    """S_SC at K = infinity: max(q, 1 - q)."""
    q = np.asarray(q, dtype=float)
    return np.maximum(q, 1 - q)


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
    out = frame[["distinct_id", "image_file", "label", "object", "answer", "parsed", "correct"]].copy()
    q = exact_q(frame)
    out = pd.concat([out, q], axis=1)
    out["s_sc"] = s_sc(frame["sample_parsed"], k)
    out["s_sc_expected"] = expected_s_sc(out["q"].to_numpy(), k)
    out["s_sc_limit"] = limit_s_sc(out["q"].to_numpy())
    for kk in k_sweep:
        out[f"s_sc@{kk}"] = s_sc(frame["sample_parsed"], kk)
        out[f"expected@{kk}"] = expected_s_sc(out["q"].to_numpy(), kk)
    out["pool_greedy_agrees"] = frame["pool_greedy_answer"].to_numpy() == frame["answer"].to_numpy()
    return out


def _pool_job(model: str, settings: tuple[str, ...], limit: int | None, pool: int, temperature: float, top_p: float,
              seed: int, device: str = "cpu", dtype: str = "float32") -> str:
    import torch

    from vrp_utils.extract.features import open_features

    torch.set_num_threads(1)  # one thread per model, as `make features`: bytes independent of the machine's cores
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
                top_p: float, seed: int = 0, jobs: int = 2, *, device: str = "cpu", dtype: str = "float32") -> None:
    """Extract the sample pools of ``models``, ``jobs`` models side by side (worker processes, one thread each), on
    ``device`` in ``dtype`` (those the chapter opened the models' features with)."""
    side_by_side(_pool_job, [(m, settings, limit, pool, temperature, top_p, seed, device, dtype) for m in models], jobs)
