"""Each chapter's opening paragraph (vrp_utils/answers.py): its numbers are the published ones, its wording
follows them both ways, and every chapter glues it at its top from what it published.

- per chapter, small hand-made results where the judgement goes one way and then the other: the
  wording changes with the numbers ("includes 0" / "excludes 0", "all 3" / "1 of 3"), and the quoted
  numbers are the given ones;
- every notebook opens with the ``{glue:md}`` directive right under its title and ends by gluing
  ``answer("<its own name>", published())`` after its last ``publish``;
- ``published()`` returns what the runner writes into ``results/<notebook>.json`` (a real kernel);
- on a built book, each chapter's results file gives a paragraph (the chapters' real keys).
"""

from __future__ import annotations

import copy
import json
import re
import textwrap

import pytest

from vrp_utils import answers, run
from vrp_utils.paths import NOTEBOOKS_DIR, RESULTS_DIR

MODELS = ["m-a", "m-b"]


def est(value, low, high, **keys):
    return {"value": value, "ci_low": low, "ci_high": high, "n": 100, **keys}


# -- 00 --------------------------------------------------------------------------------------------


def zoo(a_random=0.8, b_random=0.75):
    accuracy = {"m-a/random": a_random, "m-a/adversarial": 0.72, "m-b/random": b_random, "m-b/adversarial": 0.71}
    baselines = {"always_yes/random": 0.5, "always_yes/adversarial": 0.5, "text_only/random": 0.55, "text_only/adversarial": 0.6}
    return {"zoo_accuracy": accuracy, "baselines": baselines, "benchmark_questions": {"random": 1080, "adversarial": 1080}}


def test_benchmark_and_zoo_answer_counts_the_models_in_target_and_the_margin():
    text = answers.benchmark_and_zoo(zoo())
    assert "All 2 zoo models reach" in text and "m-a 80.0%, m-b 75.0%" in text
    assert "by at least 11.0 points" in text and "m-b on adversarial (71.0%)" in text
    low = answers.benchmark_and_zoo(zoo(b_random=0.52))
    assert "1 of 2 zoo models reaches" in low and "Not every model beats the best shortcut baseline" in low
    assert "(the smallest margin is -3.0 points)" in low and "m-b on random (52.0%)" in low


# -- 01 --------------------------------------------------------------------------------------------


def attention_results(ck=(0.01, -0.02, 0.04), entropy=(-0.02, -0.05, 0.01)):
    rows = []
    for metric, (v, lo, hi) in (("ck_text", ck), ("entropy", entropy)):
        for layer in (0, 1):
            rows.append(est(v if layer == 1 else 0.0, lo if layer == 1 else -0.03, hi if layer == 1 else 0.03,
                            model="pooled", scope="pooled", subset="all", metric=metric, layer=layer,
                            p_value=0.5, p_holm=0.9))
    rows.append(est(0.2, 0.1, 0.3, model="m-a", scope="random", subset="all", metric="gini", layer=0,
                    p_value=0.001, p_holm=0.01))
    r2 = [est(-0.01, -0.03, 0.02, model="m-a", scope="random"), est(0.004, -0.01, 0.03, model="m-b", scope="random")]
    return {"point_biserial": rows, "explained_variance": r2, "parameters": {"models": MODELS}}


def test_attention_answer_reads_intervals_against_zero_and_the_margin():
    text = answers.attention(attention_results(), margin=0.1)
    assert "C_k R_pb = +0.010 [-0.020, +0.040] (includes 0)" in text
    assert "spatial entropy H_s R_pb = -0.020 [-0.050, +0.010] (includes 0)" in text
    assert "Every pooled metric at every layer has its whole 95% CI inside \u00b10.1" in text
    assert "1 of 5 tests" in text and "between -0.010 and +0.004 over the 2 model x setting fits" in text
    assert "highest upper 95% bound: +0.030, m-b on random" in text
    wide = answers.attention(attention_results(ck=(0.09, 0.05, 0.13)), margin=0.1)
    assert "C_k R_pb = +0.090 [+0.050, +0.130] (excludes 0)" in wide
    assert "3 of 4 pooled metric x layer estimates" in wide and "not shown to be negligible" in wide
    assert "Every pooled metric" not in wide


def test_attention_answer_says_when_a_label_subset_shows_what_pooling_hides():
    results = attention_results()
    quiet = answers.attention(results, margin=0.1)
    results["point_biserial"] += [
        est(0.268, 0.19, 0.342, model="m-a", scope="random", subset="negative", metric="entropy", layer=1),
        est(-0.02, -0.08, 0.04, model="m-b", scope="random", subset="negative", metric="entropy", layer=1),
        est(0.05, 0.01, 0.09, model="pooled", scope="pooled", subset="negative", metric="entropy", layer=1)]
    loud = answers.attention(results, margin=0.1)
    assert "Every pooled metric at every layer has its whole 95% CI inside" in loud  # the pooled verdict still holds
    assert ('does not hold within one label: 2 of 3 within-label estimates at the last layer have a CI that excludes 0 '
            '(unadjusted), the largest entropy within no-questions, m-a on random: +0.268 [+0.190, +0.342]') in loud
    assert "pooled over models, entropy within no-questions +0.050 [+0.010, +0.090]." in loud
    assert "does not hold within one label" not in quiet and "Within one label" not in quiet


def test_the_attention_margin_is_the_one_declared_for_claim_1():
    from vrp_utils.pages import load_claims

    declared = next(c for c in load_claims()["claims"] if c["id"] == "1")["margin"]
    assert answers._claim_margin("1") == declared
    assert f"inside \u00b1{declared:g}" in answers.answer("01_attention", attention_results())


def depth_results(n_layers=6, peak=(2, 1, 4), gap=(0.03, 0.01, 0.05), change=(-0.5, -0.6, -0.4)):
    results = attention_results()
    last = n_layers - 1
    results["entropy_first_to_last"] = [
        est(*change, model="pooled", scope="pooled", quantity="delta_entropy_mean", span="first_to_last", from_layer=0,
            to_layer=last),
        est(0.02, -0.01, 0.05, model="pooled", scope="pooled", quantity="delta_entropy_rpb", span="first_to_last",
            from_layer=0, to_layer=last),
        est(*change, model="m-a", scope="distinct", quantity="delta_entropy_mean", span="first_to_last", from_layer=0,
            to_layer=last),
        est(-9.0, -9.5, -8.5, model="m-a", scope="random", quantity="delta_entropy_mean", span="first_to_last",
            from_layer=0, to_layer=last)]  # one setting's row: not quoted
    results["inbox_peak_layer"] = [
        est(*peak, model="m-a", scope="distinct", outcome="all", quantity="peak_layer", layers=n_layers),
        est(*gap, model="m-a", scope="distinct", outcome="all", quantity="peak_minus_last", layers=n_layers),
        est(0, 0, 0, model="m-a", scope="distinct", outcome="wrong", quantity="peak_layer", layers=n_layers)]
    return results


def test_attention_answer_names_the_first_to_last_change_and_the_in_box_peak():
    text = answers.attention(depth_results(), margin=0.1)
    assert ("From the first layer to the last, H_s changes by (paired: each input at both layers) -0.500 [-0.600, -0.400] "
            "nats pooled (falls; excludes 0)") in text
    assert "per model m-a -0.500 [-0.600, -0.400]" in text and "-9.000" not in text
    assert "the change's R_pb with correctness is +0.020 [-0.010, +0.050] pooled (includes 0)" in text
    assert ("peaks at m-a layer 2 [1, 4] of 0-5 (above the last layer, paired difference +0.030 [+0.010, +0.050])"
            in text)
    assert "no trend" not in text  # six layers: no two-layer caveat
    # The peak is compared with the last layer only through the paired difference's interval.
    close = answers.attention(depth_results(gap=(0.03, 0.0, 0.05), change=(0.1, -0.05, 0.2)), margin=0.1)
    assert "not distinguishable from the last layer, paired difference +0.030 [+0.000, +0.050]" in close
    assert "+0.100 [-0.050, +0.200] nats pooled (includes 0)" in close
    assert comparisons_without_a_paired_test(close) == []
    shallow = answers.attention(depth_results(n_layers=2, peak=(1, 1, 1), gap=(0.0, 0.0, 0.0)), margin=0.1)
    assert "layer 1 [1, 1] of 0-1 (the last layer)" in shallow
    assert "With fewer than 3 layers (m-a (2)), that is one step of depth, from which no trend" in shallow
    assert "not in this run" in answers.attention(attention_results(), margin=0.1)


# -- 02 --------------------------------------------------------------------------------------------


def masking_results(pair_b=(-0.06, -0.08, -0.04)):
    rows, versus = [], []
    for model, top, rnd, pair in (("m-a", (-0.085, -0.107, -0.064), (-0.005, -0.020, 0.009), (-0.08, -0.10, -0.06)),
                                  ("m-b", (-0.08, -0.10, -0.06), (-0.02, -0.04, 0.0), pair_b)):
        rows.append(est(*top, model=model, condition="top", fraction=0.3, scope="balanced", subset="all"))
        rows.append(est(*rnd, model=model, condition="random", fraction=0.3, scope="balanced", subset="all"))
        rows.append(est(0.5, 0.4, 0.6, model=model, condition="top", fraction=0.3, scope="distinct", subset="all"))  # not quoted
        rows.append(est(*top, model=model, condition="top", fraction=0.5, scope="balanced", subset="all"))  # not the main
        versus.append(est(*pair, model=model, condition="top", versus="random", fraction=0.3, scope="balanced", subset="all"))
    return {"parameters": {"models": MODELS, "fraction": 0.3}, "accuracy_change": rows, "top_minus_random": versus}


def test_masking_answer_quotes_balanced_changes_and_compares_by_the_paired_difference():
    text = answers.masking(masking_results())
    assert "m-a -8.5 [-10.7, -6.4] (as many at random: -0.5 [-2.0, +0.9]; paired difference -8.0 [-10.0, -6.0])" in text
    assert "yes- and no-questions weighted 1/2 each" in text and "+50.0" not in text  # the unweighted row is not quoted
    assert "For all 2 models the loss excludes 0; for all 2 it is larger" in text and "cannot tell" not in text
    # The two intervals overlap for m-b ([-10, -6] vs [-4, 0] do not; make them overlap) but the paired one decides.
    close = answers.masking(masking_results(pair_b=(-0.02, -0.05, 0.01)))
    assert "for 1 of 2 it is larger" in close and "cannot tell attention's choice from chance" in close
    assert "box" not in close  # no box condition in this run: nothing said about it
    overlapping = masking_results(pair_b=(-0.03, -0.05, -0.01))
    overlapping["accuracy_change"][4].update(ci_low=-0.12, ci_high=-0.01)  # m-b's top interval overlaps random's
    assert "for all 2 it is larger" in answers.masking(overlapping)
    unpaired = masking_results()
    del unpaired["top_minus_random"]
    assert "for 0 of 0 it is larger" in answers.masking(unpaired)


# -- 03 --------------------------------------------------------------------------------------------


def probe_results(probe_b=(0.74, 0.72, 0.76), rival_b=(-0.02, -0.04, -0.01)):
    rows, versus = [], []
    for model, probe, rival in (("m-a", (0.80, 0.77, 0.82), (0.03, 0.01, 0.05)), ("m-b", probe_b, rival_b)):
        rows.append(est(*probe, model=model, source="probe", probe="l1", position="last_prompt", subset="all", layer=1))
        rows.append(est(0.6, 0.55, 0.65, model=model, source="probe", probe="l1", position="last_prompt", subset="all", layer=0))
        versus.append(est(*rival, model=model, control="free_rival", layer=1))
        versus.append(est(0.25, 0.2, 0.3, model=model, control="untrained_twin", layer=1))
    ablation = [est(-0.005, -0.009, -0.001, model="m-a", condition="top", k=5, scope="balanced", subset="all"),
                est(-0.05, -0.09, -0.01, model="m-a", condition="top", k=5, scope="distinct", subset="all"),  # not quoted
                est(0.001, -0.006, 0.008, model="m-b", condition="top", k=5, scope="balanced", subset="all")]
    return {"parameters": {"models": MODELS, "probes": ["l1"], "positions": ["last_prompt"]},
            "layers_used": {"m-a": 1, "m-b": 1}, "probe_auroc": rows, "ablation": ablation, "probe_vs_control": versus}


def test_probe_answer_weighs_the_probe_against_chance_the_free_rival_and_the_twin_paired():
    text = answers.probes(probe_results())
    assert "m-a 0.800 [0.770, 0.820] at layer 1 (minus the free rival: +0.030 [+0.010, +0.050])" in text
    assert "excludes chance (0.5) for all 2 models" in text
    assert "lies above 0, for 1 of 2; it beats the probe for 1 of 2" in text and "does not show" in text
    assert "untrained twin's hidden states is beaten (paired) for all 2" in text
    assert "m-a -0.5 [-0.9, -0.1] points" in text and "excludes 0 for 1 of 2" in text and "-5.0" not in text
    both = answers.probes(probe_results(rival_b=(0.02, 0.01, 0.03)))
    assert "for all 2; it beats the probe for 0 of 2" in both and "knows more about correctness" in both
    chance = answers.probes(probe_results(probe_b=(0.52, 0.48, 0.56)))
    assert "excludes chance (0.5) for 1 of 2 models" in chance
    deep = probe_results()
    deep["reliability_layer"] = {"m-a": {"layer": 4, "n_layers": 8, "relative_depth": 5 / 8, "relative_depth_ci_low": 3 / 8,
                                         "relative_depth_ci_high": 6 / 8},
                                 "m-b": {"layer": 1, "n_layers": 2, "relative_depth": 1.0}}
    located = answers.probes(deep)
    assert "is m-a layer 4 of 8 (relative depth 0.62 [0.38, 0.75]); m-b layer 1 of 2 (relative depth 1.00, no interval)" in located
    assert "(the paper: LLaVA 21/32, PaliGemma 10/18, Qwen2-VL 18/28)" in located  # no family named: all three listed
    assert "does not locate reliability in depth" in located  # m-b has 2 layers
    deep["reliability_layer"]["m-b"] = {"layer": 2, "n_layers": 3, "relative_depth": 1.0}
    assert "does not locate" not in answers.probes(deep)  # three layers or more: the interval says how well it is located
    assert comparisons_without_a_paired_test(answers.probes(deep)) == []


def test_probe_answer_sets_each_familys_reliability_layer_beside_the_papers():
    """The paper's layer comes from the model_type chapter 03 published, never from the model's name."""
    results = probe_results()
    results["parameters"]["models"] = ["zoo-llava", "/data/zoo-depth/6x96/my-model"]
    for row in results["probe_auroc"] + results["probe_vs_control"] + results["ablation"]:
        row["model"] = {"m-a": "zoo-llava", "m-b": "/data/zoo-depth/6x96/my-model"}[row["model"]]
    results["layers_used"] = {"zoo-llava": 1, "/data/zoo-depth/6x96/my-model": 1}
    results["language_model_shape"] = {"zoo-llava": {"layers": 6, "model_type": "paligemma"},  # the name misleads
                                       "/data/zoo-depth/6x96/my-model": {"layers": 6, "model_type": "qwen2_vl"}}
    results["reliability_layer"] = {m: {"layer": 3, "n_layers": 6, "relative_depth": 4 / 6, "relative_depth_ci_low": 3 / 6,
                                        "relative_depth_ci_high": 5 / 6} for m in results["layers_used"]}
    for row in results["ablation"]:
        row.update(layer=3, layer_role="reliability")
    text = answers.probes(results)
    assert "zoo-llava layer 3 of 6 (relative depth 0.67 [0.50, 0.83]; the paper's PaliGemma 10/18 = 0.56)" in text
    assert "my-model layer 3 of 6 (relative depth 0.67 [0.50, 0.83]; the paper's Qwen2-VL 18/28 = 0.64)" in text
    assert "(the paper: LLaVA" not in text and "does not locate" not in text
    assert "zoo-llava at the reliability layer (3) -0.5 [-0.9, -0.1] points" in text and "for 1 of 2 ablated layers." in text
    assert comparisons_without_a_paired_test(text) == []
    bare = probe_results()
    del bare["probe_vs_control"]
    assert "No paired comparison with the controls" in answers.probes(bare)


# -- 04 --------------------------------------------------------------------------------------------


def consistency_results(auc_b=(0.68, 0.65, 0.71), r_sampled=(0.28, 0.25, 0.31), pair=(0.02, -0.01, 0.05)):
    assoc = []
    for model, auc in (("m-a", (0.70, 0.67, 0.73)), ("m-b", auc_b)):
        assoc.append(est(*auc, model=model, scope="distinct", score="S_SC sampled, K=10", statistic="auroc"))
    assoc.append(est(*r_sampled, model="pooled", scope="pooled", score="S_SC sampled, K=10", statistic="r_pb"))
    assoc.append(est(0.30, 0.27, 0.33, model="pooled", scope="pooled", score="exact limit max(q, 1-q)", statistic="r_pb"))
    disagree = [{"model": "m-a", "quantity": "s_sc_is_1_at_k10", "value": 0.71}, {"model": "m-b", "quantity": "s_sc_is_1_at_k10", "value": 0.58}]
    return {"parameters": {"models": MODELS, "k": 10, "temperature": 0.7, "top_p": 0.9}, "association": assoc,
            "limit_minus_sampled": [est(*pair, model="pooled", scope="pooled", statistic="r_pb")],
            "disagreement": disagree, "cost": [{"model": "m-a", "pass": "S_SC K=10 (prefix-shared)", "forward_pass_equivalents": 1.14, "n": 32}]}


def test_self_consistency_answer():
    text = answers.self_consistency(consistency_results())
    assert "agree (S_SC = 1) on 58% to 71% of a model's inputs" in text
    assert "m-a 0.700 [0.670, 0.730]; m-b 0.680 [0.650, 0.710]" in text and "excluding 0.5 for all 2 models" in text
    assert "R_pb = +0.280 [+0.250, +0.310], an interval that excludes 0" in text
    assert "not distinguishable from the sampled score by a paired difference of +0.020 [-0.010, +0.050]" in text
    assert "cost 1.1x the greedy answer (m-a; measured once, on 32 inputs)" in text
    # Intervals that overlap ([0.25, 0.31] and [0.27, 0.33]) with a paired difference that excludes 0: "above".
    above = answers.self_consistency(consistency_results(pair=(0.02, 0.01, 0.03)))
    assert "above the sampled score by a paired difference of +0.020 [+0.010, +0.030]" in above
    flat = answers.self_consistency(consistency_results(auc_b=(0.51, 0.47, 0.55), r_sampled=(0.02, -0.01, 0.05)))
    assert "excluding 0.5 for 1 of 2 models" in flat and "an interval that includes 0" in flat


# -- 05 --------------------------------------------------------------------------------------------


def board(second=(0.74, 0.72, 0.76), paired=(0.010, 0.004, 0.016, 0.001), att_b=(-0.21, -0.24, -0.18, 1e-9),
          excluded="", with_paired=True):
    """A pooled cell: fusion (capture) best, entropy the best free signal; every difference is from entropy."""
    def row(signal, auroc, cost, group="behaviour", only="", diff=(-0.2, -0.23, -0.17, 1e-9), excluded_models=""):
        v, lo, hi = auroc
        r = {"model": "pooled", "scope": "pooled", "subset": "all", "signal": signal, "group": group, "cost": cost,
             "only": only, "auroc": v, "auroc_ci_low": lo, "auroc_ci_high": hi, "n": 5175,
             "extra_seconds_per_input": 0.0 if cost == "greedy" else 0.0007, "excluded_models": excluded_models}
        if with_paired:
            d, dlo, dhi, p = diff
            r.update({"best_free_signal": "entropy", "auroc_minus_best_free": d, "auroc_minus_best_free_ci_low": dlo,
                      "auroc_minus_best_free_ci_high": dhi, "auroc_minus_best_free_p": p})
        return r
    rows = [row("fusion", (0.75, 0.73, 0.77), "capture", "fusion", diff=paired),
            row("entropy", second, "greedy", diff=(0.0, None, None, None)),
            row("margin", (0.735, 0.715, 0.755), "greedy", diff=(-0.005, -0.012, 0.002, 0.17)),
            row("att_a", (0.50, 0.48, 0.52), "capture", "attention", diff=(-0.24, -0.27, -0.21, 1e-9)),
            row("att_b", (0.53, 0.51, 0.55), "capture", "attention", diff=att_b, excluded_models=excluded),
            row("inbox", (0.9, 0.88, 0.92), "capture", "attention", only="positive", diff=(0.1, 0.05, 0.15, 1e-4))]
    return {"parameters": {"models": MODELS}, "leaderboard": rows, "missing": []}


def test_leaderboard_answer_reads_the_paired_difference_not_overlapping_intervals():
    # the two AUROC intervals overlap, but the paired difference excludes 0: the best is above the best free signal
    text = answers.leaderboard(board())
    assert "the best signal is **fusion**, AUROC 0.750 [0.730, 0.770] (0.70 ms extra per input, n = 5,175)" in text
    assert ("The best signal that costs nothing beyond the greedy answer, entropy, scores 0.740 [0.720, 0.760]; the best is "
            "above it (paired AUROC difference +0.010 [+0.004, +0.016], p = 0.001)") in text
    assert ("Of the 3 other signals, paired with entropy (AUROC difference, 95% CI from a paired bootstrap over images), "
            "2 lie below it and 1 is not distinguishable from it (paired CI includes 0: margin)") in text
    assert "1 of 2 attention metrics has an AUROC interval that includes chance" in text
    assert "inbox" not in text  # positives only: not ranked against the rest
    for overlap_words in ("cannot be told", "overlapping", "intervals apart"):
        assert overlap_words not in text
    # paired CI includes 0: not distinguishable, quoted with the paired interval
    tied = answers.leaderboard(board(paired=(0.010, -0.002, 0.022, 0.10)))
    assert ("the two are not distinguishable (paired AUROC difference +0.010 [-0.002, +0.022], p = 0.1, an interval "
            "that includes 0)") in tied
    # intervals apart, paired CI excludes 0: still read from the paired test
    apart = answers.leaderboard(board(second=(0.70, 0.68, 0.72), paired=(0.05, 0.04, 0.06, 1e-12)))
    assert "the best is above it (paired AUROC difference +0.050 [+0.040, +0.060], p < 0.0001)" in apart
    # a signal above the best free one is named; a left-out model is named
    up = answers.leaderboard(board(att_b=(0.02, 0.01, 0.03, 0.001), excluded="zoo-qwen2-vl"))
    assert "1 lie below it, 1 above it (att_b)" not in up and "1 lies below it, 1 above it (att_b)" in up
    assert "Left out of the pooled rows because their score is constant for that model" in up and "att_b (zoo-qwen2-vl)" in up


def test_leaderboard_answer_when_the_best_is_free_or_nothing_is_paired():
    free_best = answers.leaderboard(board(second=(0.80, 0.78, 0.82), paired=(-0.05, -0.06, -0.04, 1e-9)))
    assert "the best signal is **entropy**, AUROC 0.800 [0.780, 0.820] (no extra cost" in free_best
    assert "It is also the best signal that costs nothing beyond the greedy answer" in free_best
    assert "Of the 4 other signals" in free_best and "3 lie below it and 1 is not distinguishable" in free_best
    unpaired = answers.leaderboard(board(with_paired=False))
    assert "published no paired test against a free signal, so no two signals are compared here" in unpaired
    for word in ("above", "below", "distinguishable", "beats"):
        assert word not in unpaired.split("compared here")[1].split("attention metrics")[0]


# -- the notebooks ---------------------------------------------------------------------------------


CHAPTERS = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.md"))


def test_every_chapter_has_an_answer_function():
    assert CHAPTERS and set(CHAPTERS) == set(answers.ANSWERS)


@pytest.mark.parametrize("name", CHAPTERS)
def test_each_chapter_opens_with_its_glued_answer_and_glues_it_from_what_it_published(name):
    notebook = run.read_notebook(NOTEBOOKS_DIR / f"{name}.md")
    first = notebook.cells[0]
    assert first.cell_type == "markdown"
    lines = [line for line in first.source.splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```{glue:md} answer", f"{name}: the answer is not right under the title"
    code = [c for c in notebook.cells if c.cell_type == "code"]
    glued = [i for i, c in enumerate(code) if re.search(r"glue\(\"answer\", Markdown\(answer\(\"(\w+)\", published\(\)\)\)", c.source)]
    assert len(glued) == 1, f"{name}: no single cell glues answer(..., published())"
    assert f'answer("{name}", published())' in code[glued[0]].source
    last_publish = max(i for i, c in enumerate(code) if re.search(r"^publish\(", c.source, re.MULTILINE))
    assert glued[0] > last_publish, f"{name}: the answer is glued before the chapter's last publish"


def test_published_is_what_the_runner_writes(tmp_path):
    notebook = tmp_path / "demo.md"
    notebook.write_text(textwrap.dedent("""\
        ---
        jupytext:
          text_representation: {extension: .md, format_name: myst, format_version: 0.13}
        kernelspec: {name: python3, display_name: Python 3, language: python}
        ---

        ```{code-cell}
        import numpy as np
        from vrp_utils.results import publish, published
        publish({"a": np.float32(0.5), "b": [1, 2]})
        publish({"b": {"c": float("nan")}})
        seen = published()
        seen["a"] = "changed"  # a copy: changing it changes nothing published
        publish({"seen": published()})
        ```
        """))
    record = run.execute(notebook, {}, output_dir=tmp_path, results_dir=tmp_path, progress=False)
    expected = {"a": 0.5, "b": {"c": None}}
    assert record["results"] == {**expected, "seen": expected}


@pytest.mark.built
@pytest.mark.parametrize("name", CHAPTERS)
def test_each_built_chapter_gives_an_answer(name):
    path = RESULTS_DIR / f"{name}.json"
    assert path.is_file(), f"{path} missing: run `make notebooks`"
    results = json.loads(path.read_text())["results"]
    text = answers.answer(name, copy.deepcopy(results))
    assert text.startswith("**The answer in this build.**") and re.search(r"\d", text)
    assert "undefined" not in text and "not in this run" not in text, text


#: Words that compare two estimates; a sentence holding one must rest on a paired difference, unless the word
#: compares with a fixed value (chance, zero, a bound) rather than with another estimate.
COMPARISONS = re.compile(r"\b(not distinguishable|cannot be told|beats?|beaten|above|below|larger than|more than)\b")
FIXED = re.compile(r"^\W*(chance|0\b|zero|the best shortcut baseline)")


def comparisons_without_a_paired_test(text: str) -> list[str]:
    bad = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*])", text):
        for match in COMPARISONS.finditer(sentence):
            if "paired" not in sentence and not FIXED.match(sentence[match.end():]):
                bad.append(f"{match.group(0)!r} in: {sentence}")
    return bad


def test_the_comparison_check_catches_an_unpaired_comparison():
    assert comparisons_without_a_paired_test("The probe beats the rival. Its CI lies above chance (0.5).") == [
        "'beats' in: The probe beats the rival."]
    assert comparisons_without_a_paired_test("The probe beats the rival by a paired difference of +0.03.") == []


@pytest.mark.built
@pytest.mark.parametrize("name", [c for c in CHAPTERS if c in answers.ANSWERS])
def test_built_answers_compare_two_estimates_only_through_a_paired_test(name):
    path = RESULTS_DIR / f"{name}.json"
    assert path.is_file(), f"{path} missing: run `make notebooks`"
    text = answers.answer(name, copy.deepcopy(json.loads(path.read_text())["results"]))
    assert comparisons_without_a_paired_test(text) == []


# -- what stands out -------------------------------------------------------------------------------


def test_what_stands_out_finds_an_ablation_that_helps_a_control_that_wins_and_a_flipped_label():
    results = probe_results(rival_b=(-0.03, -0.05, -0.01))
    results["ablation"] += [
        est(0.04, 0.02, 0.06, model="m-b", condition="half", k=64, draw=0, scope="balanced", subset="all"),
        est(-0.05, -0.07, -0.03, model="m-a", condition="half", k=64, draw=0, scope="balanced", subset="all"),
        est(0.08, 0.05, 0.11, model="m-a", condition="half", k=64, draw=0, scope="distinct", subset="positive"),
        est(0.02, -0.01, 0.05, model="m-b", condition="half", k=64, draw=0, scope="distinct", subset="negative")]
    results["logit_lens"] = [est(0.37, 0.33, 0.41, model="m-a", layer=0, statistic="auroc_answer_margin"),
                             est(0.45, 0.40, 0.52, model="m-b", layer=0, statistic="auroc_answer_margin")]
    text = answers.what_stands_out("03_probes", results)
    assert "Zeroing dimensions raises accuracy for m-b, half 64 dimensions +4.0 [+2.0, +6.0] points." in text
    assert "m-a, half 64 dimensions: -5.0 [-7.0, -3.0] over both labels, +8.0 [+5.0, +11.0] within yes-questions" in text
    assert "m-b, half 64 dimensions: +4.0 [+2.0, +6.0] over both labels" not in text  # m-b's subset CI includes 0
    assert "Controls that beat the probe (paired probe minus control): m-b: free_rival -0.030 [-0.050, -0.010]." in text
    assert "m-a at layer 0 0.370 [0.330, 0.410]" in text and "m-b at layer 0" not in text
    assert "Sign convention: A probe's score is its out-of-fold P(correct)" in text
    assert answers.answer("03_probes", results).endswith(text)

def test_what_stands_out_says_nothing_was_found_and_still_states_the_convention():
    results = probe_results(rival_b=(0.02, 0.01, 0.03))
    results["probe_vs_control"] = [r for r in results["probe_vs_control"] if r["value"] > 0]
    text = answers.what_stands_out("03_probes", results)
    assert "Nothing in this run runs against the expected direction by these rules." in text
    assert answers.what_stands_out("00_benchmark_and_zoo", zoo()) == ""
    board_text = answers.what_stands_out("05_leaderboard", {"leaderboard": [
        {"signal": "lens", "model": "m-a", "scope": "distinct", "subset": "all", "auroc": 0.4, "auroc_ci_low": 0.35, "auroc_ci_high": 0.45},
        {"signal": "lens", "model": "m-a", "scope": "distinct", "subset": "yes answers", "auroc": 0.3, "auroc_ci_low": 0.2, "auroc_ci_high": 0.4}]})
    assert "Signals below chance (AUROC interval under 0.5, 1): lens (m-a, distinct) 0.400 [0.350, 0.450]." in board_text
    assert "-H_s here" in board_text
