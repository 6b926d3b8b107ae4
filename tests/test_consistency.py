"""Self-consistency and the signal registry: S_SC, the exact limit q, expected S_SC, risk-coverage with ties.

- the exact-limit test (built zoo-llava, T 0.7, top-p 0.9, where at least 20 inputs have 0.2 < q < 0.8):
  over 300 samples per input, the empirical yes-frequency equals q within a binomial tolerance;
- the same on a tiny random model, where most of q is left to the resolve rows (flagged, with their SE);
- expected S_SC from the binomial against simulation; K = 1 gives 1, large K approaches max(q, 1 - q);
- risk-coverage against brute force over random orders of tied scores;
- bad parameters and unknown signals fail naming the valid choices; probe signals are missing until built.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pandas as pd
import pytest
import torch

from vrp_utils.analysis import consistency, signals
from vrp_utils.extract.engine import run_batch

torch.set_num_threads(1)


def _frame(records) -> pd.DataFrame:
    return pd.DataFrame.from_records(records)


def _check_q_against_frequency(loaded, images, questions, n_samples: int, temperature: float, top_p: float,
                               min_middle: int, resolve: int = 8) -> int:
    settings = consistency.pool_settings(n_samples, temperature, top_p, seed=3)
    settings = type(settings)(**{**settings.__dict__, "resolve_samples": resolve})
    records = []
    for start in range(0, len(images), 8):
        records += run_batch(loaded, images[start:start + 8], questions[start:start + 8], settings).records
    frame = _frame(records)
    q = consistency.exact_q(frame)
    freq = np.array([np.mean([p == "yes" for p in parsed]) for parsed in frame["sample_parsed"]])
    middle = ((q["q"] > 0.2) & (q["q"] < 0.8)).to_numpy()
    assert middle.sum() >= min_middle, f"only {middle.sum()} inputs with 0.2 < q < 0.8"
    se = np.sqrt(q["q"].clip(1e-3, 1 - 1e-3) * (1 - q["q"].clip(1e-3, 1 - 1e-3)) / n_samples + q["q_se"] ** 2)
    z = (freq - q["q"].to_numpy()) / se
    assert np.all(np.abs(z) < 4.5), np.sort(np.abs(z))[-5:]
    # and jointly: the sum of squared z-scores of the undecided inputs is chi-square with one degree of freedom
    # each (a fixed cut on their mean square fails by chance with few inputs: 2.3 over 6 inputs has p = 0.03)
    from scipy.stats import chi2

    assert chi2.sf(float(np.sum(z[middle] ** 2)), df=int(middle.sum())) > 1e-3, np.sort(np.abs(z[middle]))
    return int(middle.sum())


@pytest.mark.built
def test_exact_limit_equals_the_sampled_frequency_on_the_zoo():
    from vrp_utils.data.pope import load_benchmark
    from vrp_utils.models.loading import load_model

    loaded = load_model("zoo-llava")
    split = load_benchmark("adversarial").select(range(160))
    images = [row["image"].convert("RGB") for row in split]
    n_middle = _check_q_against_frequency(loaded, images, list(split["question"]), 300, 0.7, 0.9, min_middle=20)
    assert n_middle >= 20


def test_q_with_a_sampled_remainder_matches_the_frequency_on_a_random_model(tiny_loaded, tiny_benchmark):
    from vrp_utils.data.pope import load_benchmark

    # 16 inputs x 200 samples (SE of a frequency <= 0.035) with 200 resolve rows each: a q that dropped or
    # mis-weighted the resolved remainder (most of q on a random model) is off by far more than 4.5 SE
    split = load_benchmark("random", tiny_benchmark).select(range(16))
    images = [row["image"].convert("RGB") for row in split]
    loaded = tiny_loaded("zoo-qwen2-vl")
    _check_q_against_frequency(loaded, images, list(split["question"]), 200, 1.0, 1.0, min_middle=5, resolve=200)


def test_flagged_inputs_are_those_with_a_non_deciding_first_token():
    frame = pd.DataFrame({"nucleus_ids": [[1, 2], [1, 2, 3]], "nucleus_probs": [[0.7, 0.3], [0.5, 0.3, 0.2]],
                          "nucleus_decision": [["yes", "no"], ["yes", "no", "open"]],
                          "resolve_parsed": [[], ["yes", "no", "no", "no"]]})
    q = consistency.exact_q(frame)
    assert q["q"].tolist() == pytest.approx([0.7, 0.5 + 0.2 * 0.25])
    assert q["flagged"].tolist() == [False, True] and q["q_se"].iloc[0] == 0
    assert q["q_se"].iloc[1] == pytest.approx(0.2 * math.sqrt(0.25 * 0.75 / 4))


def test_s_sc_is_the_majority_share_of_the_first_k():
    parsed = [["yes"] * 7 + ["no"] * 3, ["no", "yes", "none", "none"] * 3]
    assert consistency.s_sc(parsed, 10).tolist() == [0.7, 0.4]
    assert consistency.s_sc(parsed, 4).tolist() == [1.0, 0.5]  # "none" (no yes/no under the strict rule) is a class
    assert consistency.s_sc(parsed, 1).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs a pool of at least"):
        consistency.s_sc(parsed, 11)


def test_expected_s_sc_follows_the_binomial():
    q = np.array([0.0, 0.3, 0.5, 0.9])
    assert consistency.expected_s_sc(q, 1).tolist() == pytest.approx([1, 1, 1, 1])
    rng = np.random.default_rng(0)
    draws = rng.binomial(10, q[:, None], size=(4, 200_000))
    simulated = (np.maximum(draws, 10 - draws) / 10).mean(1)
    assert consistency.expected_s_sc(q, 10) == pytest.approx(simulated, abs=2e-3)
    assert consistency.expected_s_sc(q, 2001) == pytest.approx(consistency.limit_s_sc(q), abs=0.01)


def test_expected_s_sc_has_no_float_noise_to_rank():
    """At K = 1 every input's expected S_SC is exactly 1: an AUROC over it is a tie (0.5), not an order drawn from
    float rounding, which differs between CPU kernel paths."""
    from sklearn.metrics import roc_auc_score

    q = np.random.default_rng(3).random(2000)
    assert set(consistency.expected_s_sc(q, 1).tolist()) == {1.0}
    assert roc_auc_score(np.arange(2000) % 2, consistency.expected_s_sc(q, 1)) == 0.5
    # equal q, equal score, at any K (as they must be to tie)
    assert len(set(consistency.expected_s_sc(np.full(50, 0.37), 7).tolist())) == 1


def test_risk_coverage_averages_over_random_orders_of_ties():
    rng = np.random.default_rng(1)
    score = rng.integers(0, 3, 24).astype(float)
    correct = rng.random(24) < 0.6
    expected_aurc, expected_acc = [], []
    for _ in range(30_000):
        order = np.lexsort((rng.random(24), -score))
        kept = np.cumsum(correct[order]) / np.arange(1, 25)
        expected_aurc.append(np.mean(1 - kept))
        expected_acc.append(kept[math.ceil(0.8 * 24) - 1])
    got = signals.risk_coverage(score, correct, 0.8)
    assert got["aurc"] == pytest.approx(np.mean(expected_aurc), abs=2e-3)
    assert got["accuracy_at_coverage"] == pytest.approx(np.mean(expected_acc), abs=2e-3)
    # a constant score keeps the mean accuracy at every coverage
    assert signals.risk_coverage(np.zeros(24), correct)["accuracy_at_coverage"] == pytest.approx(correct.mean())
    # bootstrap CIs bracket the value
    estimates = signals.risk_coverage_estimates(score, correct, np.arange(24) // 2, n_boot=200)
    assert estimates["aurc"].ci_low <= estimates["aurc"].value <= estimates["aurc"].ci_high


@pytest.mark.parametrize(("args", "message"), [
    ((0, [1], 0.7, 0.9), "k must hold integers >= 1"),
    ((10, [0, 5], 0.7, 0.9), "k_sweep must hold integers >= 1"),
    ((10, [], 0.7, 0.9), "k_sweep must name at least one"),
    ((10, [1], 0.0, 0.9), "temperature must be > 0"),
    ((10, [1], 0.7, 0.0), r"top_p must lie in \(0, 1\]"),
    ((10, [1], 0.7, 1.2), r"top_p must lie in \(0, 1\]"),
])
def test_bad_parameters_name_the_valid_range(args, message):
    with pytest.raises(ValueError, match=message):
        consistency.check_parameters(*args)


def test_k_sweep_parses_ranges_and_lists():
    assert consistency.parse_k_sweep("1-3,5,10") == [1, 2, 3, 5, 10]
    with pytest.raises(ValueError, match="ranges like"):
        consistency.parse_k_sweep("one")


def test_unknown_signal_names_the_choices_and_probe_signals_wait_for_chapter_03():
    with pytest.raises(ValueError, match="choose from yes_no_margin_abs"):
        signals.parse_signals("yes_no_margin_abs,telepathy")
    assert [s.name for s in signals.parse_signals("all")] == list(signals.REGISTRY)
    built = importlib.util.find_spec("vrp_utils.analysis.probes") is not None
    for name in ("probe_oof", "logit_lens_margin"):
        assert signals.REGISTRY[name].available() == built
    for signal in signals.REGISTRY.values():
        assert signal.direction in (-1, 1) and signal.cost in ("greedy", "capture", "sampling_k10", "first_token")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_expected_s_sc_multiclass_equals_enumerating_every_sample_sequence(k):
    """Against all 3**K sequences of K samples over 3 answers, each weighed by its probability."""
    import itertools

    probs = np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.4, 0.6]])
    got = consistency.expected_s_sc_multiclass(probs, k)
    for row, p in zip(got, probs):
        brute = 0.0
        for seq in itertools.product(range(3), repeat=k):
            brute += np.prod(p[list(seq)]) * np.bincount(seq, minlength=3).max() / k
        assert row == pytest.approx(brute, abs=1e-12)


def test_expected_s_sc_multiclass_with_two_classes_is_the_binomial_one():
    q = np.array([0.0, 0.2, 0.5, 0.77, 1.0])
    for k in (1, 4, 10):
        np.testing.assert_allclose(consistency.expected_s_sc_multiclass(np.column_stack([q, 1 - q]), k), consistency.expected_s_sc(q, k),
                                   atol=1e-12)


def test_expected_s_sc_multiclass_refuses_a_row_that_is_not_a_distribution():
    with pytest.raises(ValueError, match="probability distribution"):
        consistency.expected_s_sc_multiclass(np.array([[0.5, 0.6]]), 3)
    with pytest.raises(ValueError, match="at least 1"):
        consistency.expected_s_sc_multiclass(np.array([[0.5, 0.5]]), 0)
