"""What an intervention (masking patches, zeroing hidden dimensions) does to accuracy, in every scope a claim reads.

Why one module: chapters 02 and 03 both answer every distinct input again under an intervention and compare
with the greedy pass, and both must report the change the same way. The distinct inputs are not a POPE
setting: the three settings share their positive questions, so only about a third of the distinct inputs
are yes-questions, and an intervention that pushes a model toward "no" gains accuracy there for free.
So each change is reported

- per POPE setting (50/50 yes/no by construction; exact McNemar p),
- ``balanced``: over the distinct inputs with yes- and no-questions weighted 1/2 each (the figure claims
  quote; p from the image-level bootstrap, McNemar within each label beside it),
- ``distinct``: over the distinct inputs unweighted (secondary, named as such),

each with the yes-ratio change, because a change of accuracy that is only a change of the yes-ratio is a
bias, not a loss of perception. Every interval resamples images.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from vrp_utils.analysis.stats import balanced_accuracy_change, balanced_mean, mean_estimate, paired_accuracy_change

#: Label subsets of the per-setting and distinct scopes (the balanced scope is over both labels by definition).
SUBSETS = ("all", "positive", "negative")


def _joined(table: pd.DataFrame, after: pd.DataFrame) -> pd.DataFrame:
    """Every question row with its distinct input's answer under the intervention (``correct_after``, ``parsed_after``)."""
    missing = {"distinct_id", "correct_after", "parsed_after"} - set(after.columns)
    if missing:
        raise KeyError(f"the intervention's table lacks columns {sorted(missing)}")
    if after["distinct_id"].duplicated().any():
        raise ValueError("the intervention's table has more than one row for a distinct input")
    return table.merge(after, on="distinct_id", how="inner", suffixes=("", "_after"))


def _flat(estimate) -> dict:
    flat = estimate.as_dict()
    details = flat.pop("details") or {}
    return {**flat, **details}


def accuracy_changes(table: pd.DataFrame, after: pd.DataFrame, settings: Sequence[str], *, n_boot: int = 1000,
                     seed: int = 0, extra_means: Sequence[str] = ()) -> list[dict]:
    """Accuracy change and yes-ratio change of an intervention, per setting, ``balanced`` and ``distinct``.

    ``table``: the features' question rows (``distinct_id``, ``setting``, ``label``, ``correct``, ``parsed``,
    ``image_file``); ``after``: one row per distinct input with ``correct_after`` (NaN: the intervention's pass
    could not answer it, counted in ``n_error_rows``) and ``parsed_after``. ``extra_means``: columns of
    ``after`` averaged per row (e.g. how many tokens were masked).
    """
    joined = _joined(table, after)
    n_error = int(after["correct_after"].isna().sum())
    ok = joined[joined["correct_after"].notna()]
    distinct = ok.drop_duplicates("distinct_id")
    scopes = {**{s: ok[ok["setting"] == s] for s in settings}, "balanced": distinct, "distinct": distinct}
    rows = []
    for scope, frame in scopes.items():
        for subset in ("all",) if scope == "balanced" else SUBSETS:
            part = frame if subset == "all" else frame[frame["label"] == ("yes" if subset == "positive" else "no")]
            if len(part) == 0 or part["image_file"].nunique() < 2:
                continue
            if scope == "balanced" and part["label"].nunique() < 2:
                continue  # e.g. masking the object's box, defined on yes-questions only: nothing to balance
            before_ok, after_ok = part["correct"].to_numpy(bool), part["correct_after"].to_numpy(bool)
            groups = part["image_file"].to_numpy()
            yes_shift = (part["parsed_after"] == "yes").to_numpy(float) - (part["parsed"] == "yes").to_numpy(float)
            if scope == "balanced":
                labels = part["label"].to_numpy()
                change = balanced_accuracy_change(before_ok, after_ok, labels, groups, n_boot=n_boot, seed=seed)
                yes = balanced_mean(yes_shift, labels, groups, n_boot=n_boot, seed=seed)
            else:
                change = paired_accuracy_change(before_ok, after_ok, groups, n_boot=n_boot, seed=seed)
                yes = mean_estimate(yes_shift, groups, n_boot=n_boot, seed=seed)
            rows.append({"scope": scope, "subset": subset, **_flat(change),
                         "yes_ratio_change": yes.value, "yes_ratio_change_ci_low": yes.ci_low,
                         "yes_ratio_change_ci_high": yes.ci_high,
                         **{f"mean_{c}": float(part[c].mean()) for c in extra_means}, "n_error_rows": n_error})
    return rows


def condition_difference(table: pd.DataFrame, after_a: pd.DataFrame, after_b: pd.DataFrame, *, n_boot: int = 1000,
                         seed: int = 0) -> dict:
    """Label-balanced accuracy under intervention a minus under b, on the distinct inputs both answered (paired).

    Why: "masking the attended patches costs more than masking as many at random" compares two answers
    of the same inputs, so it is judged by the paired difference, never by whether two intervals overlap.
    A negative value: a costs more accuracy than b. Exact McNemar between a and b within each label beside it.
    """
    a = after_a[["distinct_id", "correct_after"]].rename(columns={"correct_after": "correct_a"})
    b = after_b[["distinct_id", "correct_after"]].rename(columns={"correct_after": "correct_b"})
    both = (table.drop_duplicates("distinct_id").merge(a, on="distinct_id").merge(b, on="distinct_id")
            .dropna(subset=["correct_a", "correct_b"]))
    change = balanced_accuracy_change(both["correct_b"].to_numpy(bool), both["correct_a"].to_numpy(bool),
                                      both["label"].to_numpy(), both["image_file"].to_numpy(), n_boot=n_boot, seed=seed)
    flat = _flat(change)
    flat["method"] = ("label-balanced accuracy under a minus under b, the same distinct inputs; "
                      + flat["method"].split("; ", 1)[1])
    for side in ("yes", "no"):  # in a-vs-b terms: b right and a wrong, b wrong and a right
        flat[f"n_b_right_a_wrong_{side}"] = flat.pop(f"n_correct_to_wrong_{side}")
        flat[f"n_b_wrong_a_right_{side}"] = flat.pop(f"n_wrong_to_correct_{side}")
    for name in ("accuracy_before", "accuracy_after"):
        for suffix in ("", "_yes", "_no"):
            flat[name.replace("before", "b").replace("after", "a") + suffix] = flat.pop(name + suffix)
    return {"scope": "balanced", "subset": "all", **flat}
