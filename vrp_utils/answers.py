"""Each chapter's one-paragraph answer, written from the results that chapter publishes.

Why: the paragraph that opens a chapter is the sentence most readers quote, so it must never hold a
typed-in number, and its wording must follow the numbers: "excludes 0" or "includes 0", "more than"
or "not distinguishable from", chosen here from the same values the chapter publishes. A notebook ends
with ``glue("answer", Markdown(answer(NAME, published())), display=False)`` and opens with the
``{glue:md}`` directive, so the rendered chapter starts with this paragraph (myst-nb reads every glued
value of a notebook before rendering it, so a value glued in the last cell shows at the top).

Each function takes the chapter's published ``results`` dict (``results/<notebook>.json["results"]``)
and returns Markdown. A quantity the run did not compute (a condition left out by a parameter, say) is
named as absent, never filled in; an interval is always quoted with its value. A single estimate is judged
by its 95% interval against a value ("excludes 0"). Two estimates of the same inputs are compared only
through their **paired** difference, as the chapters publish it (the difference recomputed on each image
resample): "more than", "beats", "above" and "not distinguishable" are read from that difference's interval,
never from whether two separate intervals overlap. Accuracy changes are the label-balanced ones (yes- and
no-questions weighted 1/2 each, as a POPE setting is), which the chapters publish beside the per-setting ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from vrp_utils.analysis.attention import DEPTH_FOR_TREND

POOLED = "pooled"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _est(row: dict, value: str = "value", low: str = "ci_low", high: str = "ci_high", scale: float = 1.0) -> tuple:
    return tuple(row.get(k) * scale if _finite(row.get(k)) else None for k in (value, low, high))


def _signed(x: float, spec: str) -> str:
    """``x`` formatted, with a value that rounds to zero printed as zero (never "-0.0")."""
    text = f"{x:{spec}}"
    return text.replace("-", "+" if "+" in spec else "", 1) if float(text) == 0 and text.startswith("-") else text


def _ci(row: dict, digits: int = 3, signed: bool = False, scale: float = 1.0, **keys: str) -> str:
    """``value [low, high]`` of a row (``undefined`` where the value is missing)."""
    value, low, high = _est(row, scale=scale, **keys)
    if value is None:
        return "undefined"
    spec = f"{'+' if signed else ''}.{digits}f"
    if low is None or high is None:
        return f"{_signed(value, spec)} (no interval)"
    return f"{_signed(value, spec)} [{_signed(low, spec)}, {_signed(high, spec)}]"


def _excludes(row: dict, null: float, **keys: str) -> bool | None:
    """True when the 95% CI lies wholly on one side of ``null``; None when there is no interval."""
    _, low, high = _est(row, **keys)
    if low is None or high is None:
        return None
    return low > null or high < null


def _rows(results: dict, key: str, **where: Any) -> list[dict]:
    rows = results.get(key)
    if not isinstance(rows, list):
        raise KeyError(f"the chapter's results have no list {key!r} (published keys: {', '.join(sorted(results))})")
    return [r for r in rows if all(_same(r.get(k), v) for k, v in where.items())]


def _same(have: Any, wanted: Any) -> bool:
    if _finite(have) and _finite(wanted):
        return math.isclose(float(have), float(wanted), rel_tol=0, abs_tol=1e-9)
    return have == wanted


def _one(rows: list[dict]) -> dict | None:
    return rows[0] if rows else None


def _count(n: int, total: int) -> str:
    return f"all {total}" if n == total and total > 1 else f"{n} of {total}"


def _join(parts: Iterable[str]) -> str:
    parts = list(parts)
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1] if parts else ""


def _models(results: dict) -> list[str]:
    return [m for m in (results.get("parameters", {}).get("models") or []) if m != POOLED]


# --------------------------------------------------------------------------------------------------
# The chapters
# --------------------------------------------------------------------------------------------------


def benchmark_and_zoo(results: dict, low: float = 0.70, high: float = 0.92) -> str:
    """Chapter 00: is there something to predict, and can the benchmark be answered without looking?"""
    accuracy = results["zoo_accuracy"]
    models = sorted({key.split("/")[0] for key in accuracy})
    settings = sorted({key.split("/")[1] for key in accuracy})
    random = {m: accuracy.get(f"{m}/random") for m in models}
    in_target = [m for m, a in random.items() if _finite(a) and low <= a <= high]
    baselines = results["baselines"]
    best = {s: max(v for k, v in baselines.items() if k.endswith(f"/{s}")) for s in settings}
    margin = min(accuracy[f"{m}/{s}"] - best[s] for m in models for s in settings)
    worst = min(((m, s) for m in models for s in settings), key=lambda ms: accuracy[f"{ms[0]}/{ms[1]}"])
    questions = results.get("benchmark_questions", {})
    text = (
        f"**The answer in this build.** {_count(len(in_target), len(models)).capitalize()} zoo models "
        f"{'reaches' if len(in_target) == 1 else 'reach'} the target of {low:.0%}-{high:.0%} accuracy on the random setting "
        f"({', '.join(f'{m} {a:.1%}' for m, a in random.items())}), so every later chapter has "
        f"{'errors to predict' if all(_finite(a) and a < 1 for a in random.values()) else 'a model without errors in it'}. "
    )
    if margin > 0:
        text += (f"Every model beats the best shortcut baseline on every setting, by at least {100 * margin:.1f} points: "
                 "the questions cannot be answered from the question alone or from image statistics as well as by "
                 "looking at the objects. ")
    else:
        text += (f"Not every model beats the best shortcut baseline on every setting (the smallest margin is "
                 f"{100 * margin:+.1f} points): a correctness signal could learn the shortcut there. ")
    text += (f"The weakest cell is {worst[0]} on {worst[1]} ({accuracy[f'{worst[0]}/{worst[1]}']:.1%}); "
             f"the benchmark asks {_join(f'{n:,} {s}' for s, n in questions.items())} questions.")
    return text


def attention(results: dict, margin: float = 0.1) -> str:
    """Chapter 01: does how concentrated attention is predict correctness? (``margin``: the equivalence margin
    declared for claim 1 in ``book/claims.yml``.)"""
    rows = [r for r in _rows(results, "point_biserial", model=POOLED, scope=POOLED, subset="all") if r.get("metric") != "inbox_mass"]
    layers = [r["layer"] for r in rows if _finite(r.get("layer"))]
    if not layers:
        raise KeyError("no pooled point-biserial rows in the chapter's results")
    last = max(layers)
    named = {m: _one([r for r in rows if r["metric"] == m and r["layer"] == last]) for m in ("ck_text", "entropy")}
    defined = [r for r in rows if _finite(r.get("value"))]
    inside = [r for r in defined if _finite(r.get("ci_low")) and _finite(r.get("ci_high"))
              and -margin <= r["ci_low"] and r["ci_high"] <= margin]
    strongest = max(defined, key=lambda r: abs(r["value"])) if defined else None
    tests = [r for r in _rows(results, "point_biserial") if _finite(r.get("p_value"))]
    significant = [r for r in tests if _finite(r.get("p_holm")) and r["p_holm"] < 0.05]
    n = max((int(r["n"]) for r in rows if _finite(r.get("n"))), default=0)
    parts = []
    for metric, label in (("ck_text", "C_k"), ("entropy", "spatial entropy H_s")):
        row = named[metric]
        if row is None:
            parts.append(f"{label}: not in this run")
            continue
        side = _excludes(row, 0.0)
        parts.append(f"{label} R_pb = {_ci(row, signed=True)} ({'excludes' if side else 'includes'} 0)")
    text = (f"**The answer in this build.** Pooled over the models and settings (n = {n:,}), at the last layer: "
            f"{'; '.join(parts)}. ")
    if defined and len(inside) == len(defined):
        text += (f"Every pooled metric at every layer has its whole 95% CI inside \u00b1{margin:g}, so however concentrated "
                 "attention is, it says next to nothing about whether the answer is right")
    else:
        text += (f"{len(inside)} of {len(defined)} pooled metric x layer estimates have their whole 95% CI inside "
                 f"\u00b1{margin:g}; so concentration is {'not ' if len(inside) < len(defined) else ''}shown to be negligible "
                 "for every metric")
    if strongest is not None:
        text += f" (the largest in size: {strongest['metric']} at layer {strongest['layer']}, {_ci(strongest, signed=True)})"
    text += (f". {len(significant)} of {len(tests)} tests (per model, setting and pooled; all answers and within one "
             "label) have a Holm-adjusted p < 0.05. ")
    text += _within_labels(results, last, margin)
    text += _depth(results)
    r2 = [r for r in _rows(results, "explained_variance") if _finite(r.get("value"))]
    if r2:
        values = [r["value"] for r in r2]
        high = max(r2, key=lambda r: r["ci_high"] if _finite(r.get("ci_high")) else r["value"])
        text += (f"Together, every metric at every layer reaches an out-of-fold McFadden pseudo-R^2 between "
                 f"{min(values):+.3f} and {max(values):+.3f} over the {len(r2)} model x setting fits (the highest upper "
                 f"95% bound: {high['ci_high']:+.3f}, {high['model']} on {high['scope']}).")
    return text


def _depth(results: dict) -> str:
    """What depth shows: ΔH_s from the first layer to the last (a paired change of one input's H_s, judged by its own
    interval against 0) and the layer where in-box mass peaks, with the paired peak-minus-last difference."""
    if "entropy_first_to_last" not in results and "inbox_peak_layer" not in results:
        return "ΔH_s from the first layer to the last and the in-box peak layer are not in this run's results. "
    parts = []
    changes = _rows(results, "entropy_first_to_last") if "entropy_first_to_last" in results else []
    pooled_mean = _one([r for r in changes if r.get("model") == POOLED and r.get("quantity") == "delta_entropy_mean"])
    pooled_rpb = _one([r for r in changes if r.get("model") == POOLED and r.get("quantity") == "delta_entropy_rpb"])
    per_model = [r for r in changes if r.get("model") != POOLED and r.get("scope") == "distinct"
                 and r.get("quantity") == "delta_entropy_mean"]
    depth = {r["model"]: int(r["to_layer"]) + 1 for r in per_model if _finite(r.get("to_layer"))}
    if pooled_mean is not None or per_model:
        text = "From the first layer to the last, H_s changes by (paired: each input at both layers) "
        if pooled_mean is not None:
            side = _excludes(pooled_mean, 0.0)
            word = ("falls" if pooled_mean["value"] < 0 else "rises") + "; excludes 0" if side else "includes 0"
            text += f"{_ci(pooled_mean, signed=True)} nats pooled ({word})"
        if per_model:
            text += ("; " if pooled_mean is not None else "") + "per model " + ", ".join(
                f"{r['model']} {_ci(r, signed=True)}" for r in per_model)
        if pooled_rpb is not None:
            text += (f"; the change's R_pb with correctness is {_ci(pooled_rpb, signed=True)} pooled "
                     f"({'excludes' if _excludes(pooled_rpb, 0.0) else 'includes'} 0)")
        parts.append(text)
    else:
        parts.append("ΔH_s from the first layer to the last is not in this run's results")
    peaks = _rows(results, "inbox_peak_layer", outcome="all") if "inbox_peak_layer" in results else []
    located = []
    for r in peaks:
        if r.get("quantity") != "peak_layer" or not _finite(r.get("value")):
            continue
        gap = _one([g for g in peaks if g.get("model") == r.get("model") and g.get("quantity") == "peak_minus_last"])
        bounds = (f"[{int(r['ci_low'])}, {int(r['ci_high'])}]" if _finite(r.get("ci_low")) and _finite(r.get("ci_high"))
                  else "(no interval)")
        where = f"layer {int(r['value'])} {bounds} of 0-{int(r['layers']) - 1}"
        depth.setdefault(r["model"], int(r["layers"]))
        if gap is None or not _finite(gap.get("value")):
            located.append(f"{r['model']} {where}")
        elif int(r["value"]) == int(r["layers"]) - 1:
            located.append(f"{r['model']} {where} (the last layer)")
        else:
            above = _excludes(gap, 0.0)
            located.append(f"{r['model']} {where} ({'above' if above else 'not distinguishable from'} the last layer, "
                           f"paired difference {_ci(gap, signed=True)})")
    parts.append("in-box attention mass (positive questions) peaks at " + "; ".join(located) if located
                 else "the in-box peak layer is not in this run's results")
    text = ". ".join(p[0].upper() + p[1:] for p in parts) + ". "
    shallow = [f"{m} ({n})" for m, n in depth.items() if n < DEPTH_FOR_TREND]
    if shallow:
        text += (f"With fewer than {DEPTH_FOR_TREND} layers ({', '.join(shallow)}), that is one step of depth, from which "
                 "no trend across depth can be read. ")
    return text


def _within_labels(results: dict, layer: int, margin: float) -> str:
    """What the pooled figure can hide: the last layer's within-label estimates (yes- or no-questions, pooled and per
    model x setting) whose CI excludes 0."""
    rows = [r for r in _rows(results, "point_biserial", layer=layer) if r.get("subset") in ("positive", "negative")
            and r.get("metric") != "inbox_mass" and _finite(r.get("value")) and _finite(r.get("ci_low"))]
    if not rows:
        return ""
    shown = [r for r in rows if _excludes(r, 0.0)]
    if not shown:
        return (f"Within one label (yes- or no-questions) too, every estimate at the last layer ({len(rows)}, pooled and per "
                "model x setting) has a CI that includes 0. ")
    label = {"positive": "yes-questions", "negative": "no-questions"}
    pooled = [r for r in shown if r.get("model") == POOLED]
    strongest = max(shown, key=lambda r: abs(r["value"]))
    where = "pooled" if strongest.get("model") == POOLED else f"{strongest['model']} on {strongest['scope']}"
    text = (f"The pooled \"no effect\" does not hold within one label: {len(shown)} of {len(rows)} within-label estimates at "
            f"the last layer have a CI that excludes 0 (unadjusted), the largest {strongest['metric']} within "
            f"{label[strongest['subset']]}, {where}: {_ci(strongest, signed=True)}")
    if pooled:
        text += ("; pooled over models, " + "; ".join(f"{r['metric']} within {label[r['subset']]} {_ci(r, signed=True)}"
                                                       + ("" if -margin <= r["ci_low"] and r["ci_high"] <= margin
                                                          else f" (not inside \u00b1{margin:g})") for r in pooled))
    return text + ". "


def masking(results: dict) -> str:
    """Chapter 02: does masking what the model attends to cost more than masking at random?"""
    fraction = results["parameters"]["fraction"]
    models = _models(results)

    def row(model: str, condition: str, scope: str = "balanced", subset: str = "all", with_fraction: bool = True) -> dict | None:
        where = {"model": model, "condition": condition, "scope": scope, "subset": subset}
        if with_fraction:
            where["fraction"] = fraction
        return _one(_rows(results, "accuracy_change", **where))

    def points(r: dict | None) -> str:
        return "not run" if r is None else _ci(r, digits=1, signed=True, scale=100)

    versus = results.get("top_minus_random") or []
    lines, more, hurts, compared = [], 0, 0, 0
    for model in models:
        top, rnd = row(model, "top"), row(model, "random")
        pair = _one([r for r in versus if r.get("model") == model and r.get("condition") == "top"
                     and _same(r.get("fraction"), fraction)])
        text = f"{model} {points(top)} (as many at random: {points(rnd)}"
        if pair is not None and _finite(pair.get("value")):
            compared += 1
            text += f"; paired difference {points(pair)}"
            more += bool(_excludes(pair, 0.0)) and pair["value"] < 0
        lines.append(text + ")")
        if top is not None and _excludes(top, 0.0) and top["value"] < 0:
            hurts += 1
    text = (f"**The answer in this build.** Masking the {fraction:.0%} of image tokens the model attends to most changes "
            f"accuracy, in points (95% CI; each model's distinct inputs, yes- and no-questions weighted 1/2 each), by: "
            f"{'; '.join(lines)}. For {_count(hurts, len(models))} model{'s' if len(models) > 1 else ''} the loss excludes 0; "
            f"for {_count(more, compared)} it is larger than masking as many tokens at random, by a paired difference "
            "whose interval excludes 0")
    text += ("" if more == compared else
             " (for the others this run cannot tell attention's choice from chance)")
    boxes = [(m, row(m, "box", scope="distinct", subset="positive", with_fraction=False)) for m in models]
    boxes = [(m, r) for m, r in boxes if r is not None]
    if boxes:
        text += (". Masking the queried object's own box, on positive questions, costs "
                 + "; ".join(f"{m} {points(r)}" for m, r in boxes))
    return text + "."


#: The paper's probe layers (its reliability claim), as layer / layers, per ``config.model_type`` (PAPER.md: 21 of 32,
#: 10 of 18, 18 of 28).
PAPER_LAYERS = {"llava": "LLaVA 21/32 = 0.66", "paligemma": "PaliGemma 10/18 = 0.56", "qwen2_vl": "Qwen2-VL 18/28 = 0.64"}


def _family(results: dict, model: str) -> str | None:
    """The paper's family of ``model``: the ``model_type`` chapter 03 published for it (None if absent or unknown)."""
    family = ((results.get("language_model_shape") or {}).get(model) or {}).get("model_type")
    return family if family in PAPER_LAYERS else None


def probes(results: dict) -> str:
    """Chapter 03: does a probe on the hidden states tell right from wrong, beyond what the answer gives for free?"""
    models = _models(results)
    layers = results.get("layers_used", {})
    params = results["parameters"]
    probe = "l1" if "l1" in params.get("probes", []) else (params.get("probes") or ["l1"])[0]
    position = "last_prompt" if "last_prompt" in params.get("positions", []) else (params.get("positions") or ["last_prompt"])[0]
    versus = results.get("probe_vs_control") or []
    lines, above, beats_rival, below_rival, beats_twin, fitted, compared = [], 0, 0, 0, 0, 0, 0
    for model in models:
        layer = layers.get(model)
        best = _one(_rows(results, "probe_auroc", model=model, source="probe", probe=probe, position=position, subset="all",
                          layer=layer)) if layer is not None else None
        if best is None or not _finite(best.get("value")):
            lines.append(f"{model}: no probe fitted")
            continue
        fitted += 1
        text = f"{model} {_ci(best)} at layer {layer}"
        rival = _one([r for r in versus if r.get("model") == model and r.get("control") == "free_rival"])
        if rival is not None and _finite(rival.get("value")):
            compared += 1
            text += f" (minus the free rival: {_ci(rival, signed=True)})"
            beats_rival += bool(_excludes(rival, 0.0)) and rival["value"] > 0
            below_rival += bool(_excludes(rival, 0.0)) and rival["value"] < 0
        twin = _one([r for r in versus if r.get("model") == model and r.get("control") == "untrained_twin"])
        if twin is not None and _finite(twin.get("value")):
            beats_twin += bool(_excludes(twin, 0.0)) and twin["value"] > 0
        above += bool(_excludes(best, 0.5)) and best["value"] > 0.5
        lines.append(text)
    name = {"l1": "An L1 logistic", "mlp": "An MLP"}.get(probe, f"A {probe}")
    where = {"last_prompt": "the last prompt position's hidden state",
             "answer_mean": "the hidden state averaged over the answer"}.get(position, f"the {position} hidden state")
    text = (f"**The answer in this build.** {name} probe on {where}, cross-validated by image, scores AUROC "
            f"{'; '.join(lines)} (95% CI, distinct inputs). Its interval excludes chance (0.5) for {_count(above, fitted)} "
            f"model{'s' if fitted != 1 else ''}. ")
    if compared:
        text += (f"The free rival (a model on the answer, its |yes-no margin| and their product, fitted on the probe's folds) "
                 f"is beaten, by a paired difference whose interval lies above 0, for {_count(beats_rival, compared)}; "
                 f"it beats the probe for {_count(below_rival, compared)}")
        text += (". So this build does not show that the hidden state knows more about correctness than the answer and its "
                 "confidence already say" if beats_rival < compared else
                 ". So the hidden state knows more about correctness than the answer and its confidence say, in every model")
        text += (f"; the same probe on an untrained twin's hidden states is beaten (paired) for {_count(beats_twin, compared)}. ")
    else:
        text += "No paired comparison with the controls was published in this run. "
    where = {m: r for m, r in (results.get("reliability_layer") or {}).items() if m in models}
    if where:
        shallow = min(r["n_layers"] for r in where.values()) < DEPTH_FOR_TREND
        text += ("The reliability layer (the first layer whose probe is not worse than the best layer's, by the paired "
                 "difference; 95% CI of its relative depth from one paired image bootstrap of all layers) is "
                 + "; ".join(f"{m} layer {r['layer']} of {r['n_layers']} (relative depth {r['relative_depth']:.2f}"
                             + (f" [{r['relative_depth_ci_low']:.2f}, {r['relative_depth_ci_high']:.2f}]"
                                if _finite(r.get("relative_depth_ci_low")) and _finite(r.get("relative_depth_ci_high")) else
                                ", no interval")
                             + (f"; the paper's {PAPER_LAYERS[family]}" if (family := _family(results, m)) else "") + ")"
                             for m, r in where.items())
                 + (" (the paper: LLaVA 21/32, PaliGemma 10/18, Qwen2-VL 18/28)" if not all(_family(results, m) for m in where) else "")
                 + (", which with so few layers does not locate reliability in depth. " if shallow else ". "))
    top = [r for r in _rows(results, "ablation", condition="top", scope="balanced", subset="all") if _finite(r.get("value"))]
    if top:
        costly = [r for r in top if _excludes(r, 0.0) and r["value"] < 0]
        roles = any(r.get("layer_role") for r in top)
        text += (f"Zeroing the top {_join(sorted({str(r['k']) for r in top}))} probe dimensions changes accuracy "
                 "(label-balanced) by "
                 + "; ".join(f"{r['model']}" + (f" at the {r['layer_role']} layer ({r['layer']})" if r.get("layer_role") else "")
                             + f" {_ci(r, digits=1, signed=True, scale=100)} points" for r in top)
                 + f": a loss that excludes 0 for {_count(len(costly), len(top))}" + (" ablated layers." if roles else "."))
    return text.rstrip()


def self_consistency(results: dict) -> str:
    """Chapter 04: how often can samples disagree, and how well does S_SC predict correctness?"""
    k = results["parameters"]["k"]
    models = _models(results)
    sampled, limit = f"S_SC sampled, K={k}", "exact limit max(q, 1-q)"
    lines, shares, above = [], [], 0
    for model in models:
        one = _one(_rows(results, "disagreement", model=model, quantity=f"s_sc_is_1_at_k{k}"))
        auc = _one(_rows(results, "association", model=model, scope="distinct", score=sampled, statistic="auroc"))
        if one is not None and _finite(one.get("value")):
            shares.append(one["value"])
        if auc is None:
            lines.append(f"{model} not in this run")
            continue
        above += bool(_excludes(auc, 0.5)) and auc["value"] > 0.5
        lines.append(f"{model} {_ci(auc)}")
    p = results["parameters"]
    text = (f"**The answer in this build.** With K = {k} samples at temperature {p.get('temperature')} and top-p "
            f"{p.get('top_p')}, all K samples agree (S_SC = 1) on "
            + (f"{min(shares):.0%} to {max(shares):.0%}" if len(shares) > 1 else f"{shares[0]:.0%}" if shares else "an unknown share")
            + f" of a model's inputs. The AUROC of S_SC for the greedy answer's correctness is {'; '.join(lines)} "
            f"(95% CI, distinct inputs), above chance with the interval excluding 0.5 for {_count(above, len(models))} "
            f"model{'s' if len(models) != 1 else ''}. ")
    r_s = _one(_rows(results, "association", model=POOLED, score=sampled, statistic="r_pb"))
    r_l = _one(_rows(results, "association", model=POOLED, score=limit, statistic="r_pb"))
    if r_s is not None:
        text += (f"Pooled, R_pb = {_ci(r_s, signed=True)}, an interval that {'excludes' if _excludes(r_s, 0.0) else 'includes'} 0")
        pair = _one(_rows(results, "limit_minus_sampled", model=POOLED, statistic="r_pb")) if "limit_minus_sampled" in results else None
        if r_l is not None:
            text += f"; the exact limit max(q, 1 - q), from one pass, gives {_ci(r_l, signed=True)}"
            if pair is not None and _finite(pair.get("value")):
                side = _excludes(pair, 0.0) and (1 if pair["value"] > 0 else -1)
                text += (", " + ("above" if side == 1 else "below" if side == -1 else "not distinguishable from")
                         + f" the sampled score by a paired difference of {_ci(pair, signed=True)}")
        text += ". "
    costs = [r for r in results.get("cost") or [] if str(r.get("pass", "")).startswith(f"S_SC K={k}")
             and _finite(r.get("forward_pass_equivalents"))]
    if costs:
        text += (f"K = {k} prefix-shared samples cost "
                 + ", ".join(f"{r['forward_pass_equivalents']:.1f}x" for r in costs)
                 + f" the greedy answer ({_join(r['model'] for r in costs)}; measured once, on {costs[0].get('n')} inputs).")
    return text.rstrip()


_PAIRED = {"value": "auroc_minus_best_free", "low": "auroc_minus_best_free_ci_low", "high": "auroc_minus_best_free_ci_high"}


def _paired(row: dict) -> tuple[str, str]:
    """(verdict, quoted difference) of a leaderboard row's paired AUROC difference from the best free signal:
    "above" / "below" when its 95% CI excludes 0, "not distinguishable" when it includes 0, "untested" without one."""
    side = _excludes(row, 0.0, **_PAIRED)
    p = row.get("auroc_minus_best_free_p")
    quoted = f"paired AUROC difference {_ci(row, signed=True, **_PAIRED)}" + (
        "" if not _finite(p) else ", p < 0.0001" if p < 1e-4 else f", p = {p:.2g}")
    if side is None:
        return "untested", quoted
    return ("above" if row["auroc_minus_best_free"] > 0 else "below") if side else "not distinguishable", quoted


def leaderboard(results: dict) -> str:
    """Chapter 05: which signal tells right from wrong best, and what does it cost beyond the answer?

    Two signals are compared only through a paired test (each row's AUROC difference from the cell's best
    free signal, with its paired image-bootstrap CI), never through overlapping intervals: a difference is
    "above" or "below" when its 95% CI excludes 0 and "not distinguishable" when it includes 0.
    """
    models = _models(results)
    scope = POOLED if len(models) > 1 else "distinct"
    model = POOLED if scope == POOLED else models[0]
    cell = _rows(results, "leaderboard", model=model, scope=scope, subset="all")
    rows = [r for r in cell if _finite(r.get("auroc")) and not r.get("only")]
    if not rows:
        raise KeyError("no leaderboard rows with an AUROC in the chapter's results")
    keys = {"value": "auroc", "low": "auroc_ci_low", "high": "auroc_ci_high"}
    ranked = sorted(rows, key=lambda r: -r["auroc"])
    best = ranked[0]
    named = {r.get("best_free_signal") for r in rows} - {None}
    free = next((r for r in ranked if r["signal"] in named), None) if len(named) == 1 else None

    def cost(r: dict) -> str:
        seconds = r.get("extra_seconds_per_input")
        return "no extra cost" if r.get("cost") == "greedy" else (
            f"{1000 * seconds:.2f} ms extra per input" if _finite(seconds) else "an extra cost not measured in this run")

    where = "pooled over the models" if scope == POOLED else f"on {model}'s distinct inputs"
    text = (f"**The answer in this build.** {where.capitalize()}, the best signal is **{best['signal']}**, AUROC "
            f"{_ci(best, **keys)} ({cost(best)}, n = {int(best['n']):,}). ")
    if free is None:
        text += "This run published no paired test against a free signal, so no two signals are compared here. "
    else:
        if free is best:
            text += "It is also the best signal that costs nothing beyond the greedy answer. "
        else:
            verdict, quoted = _paired(best)
            text += (f"The best signal that costs nothing beyond the greedy answer, {free['signal']}, scores "
                     f"{_ci(free, **keys)}; " + {
                         "above": f"the best is above it ({quoted}). ",
                         "below": f"on the rows both score, the best is below it ({quoted}). ",
                         "not distinguishable": f"the two are not distinguishable ({quoted}, an interval that includes 0). ",
                         "untested": f"the two have no paired test ({quoted}). "}[verdict])
        others = [r for r in ranked if r is not free and r is not best]
        verdicts = {r["signal"]: _paired(r)[0] for r in others}
        same = [name for name, v in verdicts.items() if v == "not distinguishable"]
        below = [name for name, v in verdicts.items() if v == "below"]
        above = [name for name, v in verdicts.items() if v == "above"]
        if others:
            text += (f"Of the {len(others)} other signals, paired with {free['signal']} (AUROC difference, 95% CI from a "
                     f"paired bootstrap over images), {len(below)} {'lies' if len(below) == 1 else 'lie'} below it")
            if above:
                text += f", {len(above)} above it ({_join(above)})"
            text += (f" and {len(same)} {'is' if len(same) == 1 else 'are'} not distinguishable from it"
                     + (f" (paired CI includes 0: {_join(same)})" if same else "") + ". ")
    attention = [r for r in rows if r.get("group") == "attention"]
    if attention:
        chance = [r for r in attention if not _excludes(r, 0.5, **keys)]
        text += (f"{_count(len(chance), len(attention)).capitalize()} attention metrics "
                 f"{'has' if len(chance) == 1 else 'have'} an AUROC interval that includes chance (0.5).")
    left_out = [f"{r['signal']} ({r['excluded_models']})" for r in cell if r.get("excluded_models")]
    if left_out:
        text += (f" Left out of the pooled rows because their score is constant for that model (z-scored, it would "
                 f"count as chance): {_join(left_out)}.")
    missing = results.get("missing") or []
    if missing:
        text += f" Missing from this run (their chapter not built): {_join(missing)}."
    return text.rstrip()


# --------------------------------------------------------------------------------------------------
# What stands out: results against the expected direction, chosen by declared rules
# --------------------------------------------------------------------------------------------------
#
# Declared rules (the same for every build; nothing here is typed in):
# 1. against the expected direction: an intervention (masking, zeroing dimensions) whose label-balanced
#    change has its 95% CI wholly above 0 (it helps); a control whose paired difference from the probe has
#    its CI wholly below 0 (it beats the probe); a correctness score whose AUROC CI lies wholly below 0.5;
# 2. a label subset (yes- or no-questions) whose CI excludes 0 with the sign opposite to the estimate over
#    both labels, whose CI excludes 0 too (the pooled figure hides it);
# 3. the sign convention of the chapter's metrics, stated once.

SIGN_CONVENTIONS = {
    "01_attention": ("R_pb > 0 means a larger metric goes with correct answers. H_s (entropy) is larger when attention is "
                     "more diffuse, C_k when the attended patches form more separate clusters, top-10% mass and Gini when "
                     "attention is more concentrated."),
    "02_masking": "A change is accuracy after masking minus before, in points: negative means masking costs accuracy.",
    "03_probes": ("A probe's score is its out-of-fold P(correct), so AUROC > 0.5 means it ranks correct answers higher; "
                  "a paired difference is the probe's AUROC minus the control's; an ablation's change is accuracy after "
                  "minus before."),
    "04_self_consistency": "S_SC and the exact limit are larger when the samples agree more; AUROC > 0.5 means agreement "
                           "goes with correct answers.",
    "05_leaderboard": ("Every signal is scored as its declared direction times its raw value, so that larger means more "
                       "likely correct (the chapter's signal table lists each direction): attention entropy enters as "
                       "-H_s here, the opposite sign of chapter 01's R_pb of +H_s."),
}


def _label(subset: str) -> str:
    return {"positive": "yes-questions", "negative": "no-questions", "answer_yes": "yes-answers",
            "answer_no": "no-answers"}.get(subset, subset)


def _below_chance(rows: list[dict], name: Callable[[dict], str], **keys: str) -> list[str]:
    out = []
    for r in rows:
        _, _, high = _est(r, **keys)
        if high is not None and high < 0.5:
            out.append(f"{name(r)} {_ci(r, **keys)}")
    return out


def _flips(pairs: list[tuple[str, dict, dict]], scale: float = 1.0, digits: int = 3) -> list[str]:
    """(what, whole, subset) triples where the subset's CI excludes 0 with the sign opposite to the whole's value."""
    out = []
    for what, whole, part in pairs:
        if not (_finite(whole.get("value")) and _finite(part.get("value"))) or not (_excludes(part, 0.0) and _excludes(whole, 0.0)):
            continue  # a sign is read only from an interval that excludes 0, on both sides of the comparison
        if whole["value"] * part["value"] < 0:
            out.append(f"{what}: {_ci(whole, digits=digits, signed=True, scale=scale)} over both labels, "
                       f"{_ci(part, digits=digits, signed=True, scale=scale)} within {_label(part['subset'])}")
    return out


def _intervention_notes(rows: list[dict], label: Callable[[dict], str]) -> tuple[list[str], list[str]]:
    """Interventions that help (balanced CI above 0) and label subsets whose change runs the other way."""
    helps = [f"{label(r)} {_ci(r, digits=1, signed=True, scale=100)} points" for r in rows
             if r.get("scope") == "balanced" and _finite(r.get("ci_low")) and r["ci_low"] > 0]
    flips = []
    for r in rows:
        if r.get("scope") != "balanced":
            continue
        same = [x for x in rows if x.get("scope") == "distinct" and x.get("model") == r.get("model")
                and x.get("condition") == r.get("condition") and _same(x.get("fraction"), r.get("fraction"))
                and _same(x.get("k"), r.get("k")) and _same(x.get("draw"), r.get("draw"))]
        for part in same:
            if part.get("subset") in ("positive", "negative"):
                flips += _flips([(label(r), r, part)], scale=100, digits=1)
    return helps, flips


def what_stands_out(notebook: str, results: dict) -> str:
    """The "what stands out" paragraph of a chapter, by the declared rules above ("" for a chapter without one)."""
    notes: list[str] = []
    if notebook == "01_attention":
        rows = [r for r in results.get("point_biserial") or [] if r.get("model") == POOLED and r.get("metric") != "inbox_mass"]
        layers = [r["layer"] for r in rows if _finite(r.get("layer"))]
        if layers:
            last = max(layers)
            whole = {r["metric"]: r for r in rows if r.get("subset") == "all" and r.get("layer") == last}
            flips = _flips([(f"pooled {r['metric']}", whole[r["metric"]], r) for r in rows
                            if r.get("layer") == last and r.get("subset") in ("positive", "negative") and r["metric"] in whole])
            if flips:
                notes.append("Within one label the sign runs against the pooled one: " + "; ".join(flips) + ".")
    elif notebook == "02_masking":
        fraction = results.get("parameters", {}).get("fraction")
        rows = [r for r in results.get("accuracy_change") or [] if r.get("condition") != "box"
                and _same(r.get("fraction"), fraction)]
        helps, flips = _intervention_notes(rows, lambda r: f"{r['model']}, {r['condition']}")
        if helps:
            notes.append("Masking raises accuracy for " + "; ".join(helps) + ".")
        if flips:
            notes.append("The change falls on one label and runs the other way on the other (distinct inputs): "
                         + "; ".join(flips) + ".")
    elif notebook == "03_probes":
        helps, flips = _intervention_notes(results.get("ablation") or [],
                                           lambda r: f"{r['model']}, {r['condition']} {r['k']} dimensions")
        if helps:
            notes.append("Zeroing dimensions raises accuracy for " + "; ".join(helps) + ".")
        if flips:
            notes.append("Ablation changes that run the other way within one label (distinct inputs): " + "; ".join(flips) + ".")
        beaten = [f"{r['model']}: {r['control']} {_ci(r, signed=True)}" for r in results.get("probe_vs_control") or []
                  if _finite(r.get("ci_high")) and r["ci_high"] < 0]
        if beaten:
            notes.append("Controls that beat the probe (paired probe minus control): " + "; ".join(beaten) + ".")
        low = _below_chance([r for r in results.get("logit_lens") or [] if r.get("statistic") == "auroc_answer_margin"],
                            lambda r: f"{r['model']} at layer {r['layer']}")
        low += _below_chance([r for r in results.get("probe_auroc") or [] if r.get("source") == "probe"],
                             lambda r: f"{r['model']} {r['probe']} probe at {r['position']}, layer {r['layer']}, {_label(r['subset'])}")
        if low:
            notes.append("Scores below chance (AUROC interval under 0.5): logit-lens answer margin or probe, " + "; ".join(low) + ".")
    elif notebook == "04_self_consistency":
        low = _below_chance([r for r in results.get("association") or [] if r.get("statistic") == "auroc"],
                            lambda r: f"{r['model']} {r['score']} ({r['scope']})")
        if low:
            notes.append("Scores below chance (AUROC interval under 0.5): " + "; ".join(low) + ".")
    elif notebook == "05_leaderboard":
        keys = {"value": "auroc", "low": "auroc_ci_low", "high": "auroc_ci_high"}
        low = _below_chance([r for r in results.get("leaderboard") or [] if r.get("subset") == "all"],
                            lambda r: f"{r['signal']} ({r['model']}, {r['scope']})", **keys)
        if low:
            notes.append(f"Signals below chance (AUROC interval under 0.5, {len(low)}): " + "; ".join(low) + ".")
    if notebook not in SIGN_CONVENTIONS:
        return ""
    found = " ".join(notes) if notes else "Nothing in this run runs against the expected direction by these rules."
    return (f"**What stands out.** {found} Sign convention: {SIGN_CONVENTIONS[notebook]} (Chosen by declared rules: an "
            "intervention whose label-balanced CI lies above 0; a control that beats the probe by a paired CI below 0; an "
            "AUROC whose CI lies under 0.5; a label subset and both labels together with CIs that exclude 0 on opposite sides.)")


ANSWERS: dict[str, Callable[[dict], str]] = {
    "00_benchmark_and_zoo": benchmark_and_zoo,
    "01_attention": attention,
    "02_masking": masking,
    "03_probes": probes,
    "04_self_consistency": self_consistency,
    "05_leaderboard": leaderboard,
}


def answer(notebook: str, results: dict) -> str:
    """The opening paragraph of ``notebook`` from its published ``results``."""
    if notebook not in ANSWERS:
        raise KeyError(f"no answer is written for {notebook!r}; chapters with one: {', '.join(ANSWERS)}")
    text = attention(results, margin=_claim_margin("1")) if notebook == "01_attention" else ANSWERS[notebook](results)
    notes = what_stands_out(notebook, results)
    return f"{text}\n\n{notes}" if notes else text


def _claim_margin(claim_id: str) -> float:
    """The equivalence margin declared for a claim in ``book/claims.yml`` (the same one the paper-vs-reproduction
    page judges by)."""
    from vrp_utils.pages import load_claims

    for claim in load_claims()["claims"]:
        if claim["id"] == claim_id:
            return float(claim["margin"])
    raise KeyError(f"book/claims.yml has no claim {claim_id!r}")
