"""Pages generated from results: the verdict rules on hand cases, and pages built from a small fake results dict.

- each kind of claim (no effect with a margin, effect with a sign, a bound) gives holds / differs /
  inconclusive on CIs built to fall each way; a chapter without results is "not built", never a number;
- a row's verdict over the models counts them against ``need``;
- the paper-vs-reproduction page, the introduction's findings and the cost table contain the numbers of a
  fake results file, and "not built" where a chapter's file is absent;
- a selector that matches two rows for one cell fails naming the claim; the book's own claims.yml loads;
- the size verdict: a point in our CI, outside it but within the margin, a range overlapping it or not;
  per family (claim 3b of the book's claims.yml); claim 5b failing on a 14-point loss; a missing scope
  shown as missing with no fallback; the within-label note; each claim's rule dates and flags.
"""

from __future__ import annotations

import json

import pytest

from vrp_utils import pages
from vrp_utils.pages import DIFFERS, HOLDS, INCONCLUSIVE, NOT_BUILT, Cell

NO_EFFECT = {"id": "n", "kind": "no effect", "null": 0, "margin": 0.1}
EFFECT = {"id": "e", "kind": "effect", "null": 0, "sign": -1, "margin": 2}
AT_LEAST = {"id": "b", "kind": "at least", "bound": 0.95}


@pytest.mark.parametrize("ci, expected", [
    ((-0.03, 0.05), HOLDS),          # whole CI inside +-0.1
    ((0.02, 0.08), HOLDS),           # excludes zero, still inside the margin: no effect of that size
    ((0.12, 0.30), DIFFERS),         # wholly outside
    ((-0.40, -0.11), DIFFERS),
    ((0.05, 0.20), INCONCLUSIVE),    # straddles the margin
])
def test_no_effect_verdict(ci, expected):
    assert pages.cell_verdict(NO_EFFECT, sum(ci) / 2, *ci) == expected


@pytest.mark.parametrize("ci, expected", [
    ((-11.0, -3.0), HOLDS),          # excludes zero with the paper's (negative) sign
    ((1.0, 4.0), DIFFERS),           # excludes zero with the other sign
    ((-1.5, 1.2), DIFFERS),          # wholly inside the declared margin: no effect that large
    ((-5.0, 0.5), INCONCLUSIVE),     # includes zero, not inside the margin
])
def test_effect_verdict(ci, expected):
    assert pages.cell_verdict(EFFECT, sum(ci) / 2, *ci) == expected


def test_effect_without_margin_and_auroc_null():
    claim = {"id": "a", "kind": "effect", "null": 0.5, "sign": 1}
    assert pages.cell_verdict(claim, 0.7, 0.62, 0.78) == HOLDS
    assert pages.cell_verdict(claim, 0.5, 0.49, 0.51) == INCONCLUSIVE  # no margin: cannot say "differs"
    assert pages.cell_verdict(claim, 0.4, 0.35, 0.45) == DIFFERS


@pytest.mark.parametrize("ci, expected", [((0.955, 0.99), HOLDS), ((0.70, 0.80), DIFFERS), ((0.93, 0.97), INCONCLUSIVE)])
def test_bound_verdict(ci, expected):
    assert pages.cell_verdict(AT_LEAST, sum(ci) / 2, *ci) == expected
    at_most = {"id": "m", "kind": "at most", "bound": 0.08}
    assert pages.cell_verdict(at_most, 0.01, -0.02, 0.03) == HOLDS


def test_undefined_and_missing_ci():
    assert pages.cell_verdict(NO_EFFECT, None, None, None) == pages.UNDEFINED
    assert pages.cell_verdict(NO_EFFECT, 0.0, None, None) == INCONCLUSIVE


def test_row_verdict_over_models_and_not_built():
    claim = {**AT_LEAST, "verdict_on": "models", "need": 2}
    cells = lambda *v: {f"m{i}": Cell(0.9, 0.8, 0.99, 10, x) for i, x in enumerate(v)}  # noqa: E731
    assert pages.row_verdict(claim, cells(HOLDS, HOLDS, DIFFERS), True) == HOLDS
    assert pages.row_verdict(claim, cells(HOLDS, DIFFERS, DIFFERS), True) == DIFFERS
    assert pages.row_verdict(claim, cells(HOLDS, INCONCLUSIVE, DIFFERS), True) == INCONCLUSIVE
    assert pages.row_verdict(claim, cells(HOLDS), True) == INCONCLUSIVE  # a run with one model cannot show two
    every = {**AT_LEAST, "verdict_on": "models"}
    assert pages.row_verdict(every, cells(HOLDS, HOLDS, DIFFERS), True) == DIFFERS
    assert pages.row_verdict(every, cells(HOLDS, HOLDS, HOLDS), True) == HOLDS
    pooled = {**NO_EFFECT, "verdict_on": "pooled"}
    assert pages.row_verdict(pooled, {"pooled": Cell(0.0, -0.01, 0.01, 10, HOLDS)}, True) == HOLDS
    assert pages.row_verdict(pooled, {}, False) == NOT_BUILT


CLAIMS = """
models: [zoo-a, zoo-b]
claims:
  - id: "1"
    claim: concentration vs correctness
    label: concentration
    paper: {value: "R_pb = 0.001", ci: "[-0.034, 0.036]", n: "3,090", source: "[A]"}
    kind: no effect
    margin: 0.1
    margin_why: the smallest r that matters
    size_na: not compared in this fake
    verdict_on: pooled
    rule_declared: {direction: 2026-11-27, size: 2026-12-04}
    rule_set_after_results: {direction: false, size: true}
    rule_history: size set after the results
    finding: 1
    finding_text: "Concentration"
    ours:
      notebook: 01_attention
      key: point_biserial
      where: {metric: ck_text, subset: all}
      per_model: {scope: adversarial}
      pooled: {scope: pooled}
      layer: last
    differs: tiny models
  - id: "2"
    claim: masking
    label: masking
    paper: {value: "-8.2 to -11.3 points", source: "[A]", estimate: [-11.3, -8.2]}
    kind: effect
    sign: -1
    verdict_on: models
    rule_declared: {direction: 2026-11-27, size: 2026-12-04}
    rule_set_after_results: {direction: false, size: true}
    rule_history: size set after the results
    finding: 2
    finding_text: "Masking"
    ours: {notebook: 02_masking, key: accuracy_change, where: {condition: top}, pooled: null, scale: 100, digits: 1}
    differs: tiny models
"""


def _rpb(model, scope, layer, value, lo, hi, n):
    return {"model": model, "scope": scope, "subset": "all", "metric": "ck_text", "layer": layer, "value": value,
            "ci_low": lo, "ci_high": hi, "n": n}


def _fake(tmp_path):
    (tmp_path / "claims.yml").write_text(CLAIMS)
    results = tmp_path / "results"
    results.mkdir()
    rows = [_rpb("zoo-a", "adversarial", 0, 0.5, 0.4, 0.6, 99), _rpb("zoo-a", "adversarial", 1, 0.0123, -0.0311, 0.0522, 1080),
            _rpb("zoo-b", "adversarial", 1, -0.2468, -0.3012, -0.1957, 1080), _rpb("pooled", "pooled", 1, 0.0042, -0.0275, 0.0361, 5175),
            {**_rpb("zoo-a", "random", 1, 0.9, 0.8, 0.95, 3), "metric": "entropy"}]
    record = {"notebook": "01_attention", "duration_s": 548.4, "finished_utc": "2026-11-27T15:58:02Z", "parameters": {},
              "overridden": [], "host": {"cpus": 2, "machine": "x86_64"}, "results": {"point_biserial": rows, "seconds": 522.4}}
    (results / "01_attention.json").write_text(json.dumps(record))
    (results / "baselines.json").write_text(json.dumps({"table": []}))  # not a run record: ignored
    return results


def _block(page: str, claim_id: str) -> str:
    """The folded block of one claim on the paper-vs-reproduction page."""
    start = page.index(f":::{{dropdown}} {claim_id} \u00b7 ")
    return page[start:page.index("\n:::\n", start)]


def test_pages_from_fake_results(tmp_path):
    results = _fake(tmp_path)
    out = tmp_path / "generated"
    written = pages.write_pages(results, out, tmp_path / "claims.yml")
    assert [p.name for p in written] == ["paper_vs_reproduction.md", "findings.md", "costs.md"]
    page = (out / "paper_vs_reproduction.md").read_text()
    # the last layer's rows, per model and pooled, with CI and n; the layer-0 row is not read
    assert "0.012 [\u22120.031, 0.052], n = 1,080; *holds* |" in page  # a cell the verdicts do not read: no size
    assert "\u22120.247 [\u22120.301, \u22120.196], n = 1,080; *differs*" in page
    assert "0.004 [\u22120.028, 0.036], n = 5,175; *holds*" in page
    assert "0.500" not in page
    row1 = [line for line in page.splitlines() if line.startswith("| 1 |")][-1]  # the table, after the rules
    assert row1.endswith("| **holds** | **n/a** |")  # direction on the pooled cell; size declared n/a
    row2 = [line for line in page.splitlines() if line.startswith("| 2 |")][-1]
    assert row2.endswith("| masking | -8.2 to -11.3 points [A] | not built | **not built** | **not built** |")
    assert [line for line in _block(page, "2").splitlines() if line.startswith("| ")][1:] == [
        "| zoo-a | not built |", "| zoo-b | not built |", "| pooled | not built |"]  # 2 models and pooled, folded
    assert "inside 0 \u00b1 0.1" in page  # the declared margin is on the page
    findings = (out / "findings.md").read_text()
    glance = findings.split("```{dropdown}")[0].splitlines()  # the findings at a glance: one row per claim, both verdicts
    assert glance[0] == "| finding | claim | paper | this build [95% CI] | direction | size |"
    assert glance[2].startswith("| 1 |") and glance[2].endswith("| **holds** | **n/a** |")
    assert "\n1. Concentration: the paper reports R_pb = 0.001" in findings  # in full, folded under the table
    assert "pooled 0.004 [\u22120.028, 0.036], n = 5,175" in findings and "`02_masking` is **not built**" in findings
    costs = (out / "costs.md").read_text()
    assert "| 01_attention | none | 548.4 | 522.4 |" in costs


def test_masking_scale_and_model_verdicts(tmp_path):
    results = _fake(tmp_path)
    rows = [{"model": m, "condition": c, "value": v, "ci_low": lo, "ci_high": hi, "n": 1725}
            for m, c, v, lo, hi in [("zoo-a", "top", -0.091, -0.12, -0.06), ("zoo-b", "top", -0.05, -0.08, -0.02),
                                    ("zoo-a", "random", 0.0, -0.01, 0.01)]]
    (results / "02_masking.json").write_text(json.dumps({"notebook": "02_masking", "duration_s": 1.0, "results": {"accuracy_change": rows}}))
    claims = pages.load_claims(tmp_path / "claims.yml")
    row = pages.evaluate(claims, pages.load_results(results))[1]
    assert row.verdict == HOLDS
    assert row.size == DIFFERS  # zoo-b's [-8, -2] does not reach the paper's range [-11.3, -8.2]
    assert pages.format_cell(row.cells["zoo-a"], row.claim, True) == "\u22129.1 [\u221212.0, \u22126.0], n = 1,725; *holds* / size *holds*"


def test_ambiguous_selector_fails_naming_the_claim(tmp_path):
    results = _fake(tmp_path)
    record = json.loads((results / "01_attention.json").read_text())
    record["results"]["point_biserial"].append(_rpb("pooled", "pooled", 1, 0.1, 0.0, 0.2, 10))
    (results / "01_attention.json").write_text(json.dumps(record))
    with pytest.raises(pages.ClaimsError, match="claim 1: 2 rows"):
        pages.write_pages(results, tmp_path / "generated", tmp_path / "claims.yml")


def test_a_claim_of_no_effect_needs_a_margin(tmp_path):
    (tmp_path / "claims.yml").write_text(CLAIMS.replace("    margin: 0.1\n", ""))
    with pytest.raises(pages.ClaimsError, match="equivalence margin"):
        pages.load_claims(tmp_path / "claims.yml")


def test_the_books_claims_load_and_cover_the_four_findings():
    claims = pages.load_claims()
    assert {c.get("finding") for c in claims["claims"]} >= {1, 2, 3, 4}
    rows = pages.evaluate(claims, {})
    assert all(r.verdict in (NOT_BUILT, pages.NO_VERDICT) for r in rows)


def test_a_missing_included_fragment_is_named(tmp_path):
    from vrp_utils import book

    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# Intro\n\n```{include} generated/findings.md\n```\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    with pytest.raises(book.BookBuildError, match=r"generated/findings.md \(included by book/intro.md\).*vrp_utils.book pages"):
        book.check_toc(tmp_path)
    (tmp_path / "book" / "generated").mkdir()
    (tmp_path / "book" / "generated" / "findings.md").write_text("1. x\n")
    book.check_toc(tmp_path)


# --------------------------------------------------------------------------------------------------
# Two verdicts: direction and size
# --------------------------------------------------------------------------------------------------

SC = {"id": "4", "kind": "effect", "null": 0, "sign": 1, "margin": 0.1, "paper": {"estimate": 0.43}, "size_margin": 0.03}


def _verdicts(claim, lo, hi, name=pages.POOLED):
    value = (lo + hi) / 2
    return pages.cell_verdict(claim, value, lo, hi), pages.size_verdict(claim, name, value, lo, hi)


def test_direction_holds_and_size_differs():
    # the book's claim 4 on today's pooled numbers: correlated, but far below the paper's 0.43
    assert _verdicts(SC, 0.255, 0.321) == (HOLDS, DIFFERS)


def test_both_hold():
    assert _verdicts(SC, 0.40, 0.46) == (HOLDS, HOLDS)


def test_size_holds_inside_the_margin_only():
    assert _verdicts(SC, 0.36, 0.41) == (HOLDS, HOLDS)  # 0.43 is outside the CI but within 0.41 + 0.03
    assert _verdicts({**SC, "size_margin": 0}, 0.36, 0.41) == (HOLDS, DIFFERS)
    assert _verdicts(SC, 0.36, 0.39) == (HOLDS, DIFFERS)  # 0.39 + 0.03 < 0.43


def test_a_range_is_judged_by_overlap():
    claim = {"id": "4b", "kind": "effect", "null": 0.5, "sign": 1, "paper": {"estimate": [0.81, 0.78]}}
    assert _verdicts(claim, 0.649, 0.690) == (HOLDS, DIFFERS)  # today's pooled AUROC
    assert _verdicts(claim, 0.70, 0.785) == (HOLDS, HOLDS)     # reaches the range's low end
    assert _verdicts(claim, 0.82, 0.90) == (HOLDS, DIFFERS)    # above the range
    assert _verdicts({**claim, "size_margin": 0.1}, 0.649, 0.690)[1] == HOLDS


def test_size_is_na_for_a_bound_and_undefined_without_a_value():
    bound = {**AT_LEAST, "paper": {}, "size_na": "a bound"}
    assert pages.size_verdict(bound, "m", 0.9, 0.8, 0.99) == pages.NOT_APPLICABLE
    assert pages.row_verdict(bound, {}, True, "size") == pages.NOT_APPLICABLE
    assert pages.size_verdict(SC, pages.POOLED, None, None, None) == pages.UNDEFINED


def _book_record(tmp_path, notebook, results):
    results_dir = tmp_path / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / f"{notebook}.json").write_text(json.dumps({"notebook": notebook, "duration_s": 1.0, "results": results}))
    return results_dir


def _book_rows(results_dir):
    rows = pages.evaluate(pages.load_claims(), pages.load_results(results_dir))
    return {row.claim["id"]: row for row in rows}


def _auroc(model, value, lo, hi):
    return {"model": model, "source": "probe", "probe": "l1", "position": "last_prompt", "subset": "all", "layer": 1,
            "value": value, "ci_low": lo, "ci_high": hi, "n": 1725}


def test_claim_3b_per_family(tmp_path):
    """The book's claim 3b: each family against its own paper value (LLaVA 0.956, Qwen2-VL 0.971, PaliGemma 0.738)."""
    layers = {"zoo-llava": 1, "zoo-paligemma": 1, "zoo-qwen2-vl": 1}
    matching = [_auroc("zoo-llava", 0.95, 0.93, 0.97), _auroc("zoo-paligemma", 0.74, 0.70, 0.78),
                _auroc("zoo-qwen2-vl", 0.97, 0.96, 0.98)]
    row = _book_rows(_book_record(tmp_path, "03_probes", {"probe_auroc": matching, "layers_used": layers}))["3b"]
    assert (row.verdict, row.size) == (HOLDS, HOLDS)
    # today's zoo: every family near 0.78, so the pattern (two high, PaliGemma low) is not reproduced
    today = [_auroc("zoo-llava", 0.791, 0.765, 0.816), _auroc("zoo-paligemma", 0.793, 0.765, 0.821),
             _auroc("zoo-qwen2-vl", 0.762, 0.736, 0.787)]
    row = _book_rows(_book_record(tmp_path, "03_probes", {"probe_auroc": today, "layers_used": layers}))["3b"]
    assert (row.verdict, row.size) == (HOLDS, DIFFERS)
    assert [row.cells[m].size for m in ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")] == [DIFFERS] * 3
    # swapping the families' values must fail: PaliGemma at 0.95 is not the paper's 0.738
    swapped = [_auroc("zoo-llava", 0.74, 0.70, 0.78), *matching[1:]]
    row = _book_rows(_book_record(tmp_path, "03_probes", {"probe_auroc": swapped, "layers_used": layers}))["3b"]
    assert row.cells["zoo-llava"].size == DIFFERS and row.size == DIFFERS


def _ablation(model, condition, k, value, lo, hi, scope="balanced"):
    return {"model": model, "condition": condition, "k": k, "layer": 1, "scope": scope, "value": value,
            "ci_low": lo, "ci_high": hi, "p_value": 0.01, "n": 1725}


def test_claim_5b_fails_when_paligemma_loses_14_points(tmp_path):
    rows = [_ablation("zoo-llava", "top", 5, -0.083, -0.11, -0.06),
            _ablation("zoo-llava", "half", 64, 0.017, 0.005, 0.030),
            _ablation("zoo-paligemma", "half", 64, -0.143, -0.161, -0.125),
            _ablation("zoo-qwen2-vl", "half", 64, 0.015, 0.001, 0.029)]
    by_id = _book_rows(_book_record(tmp_path, "03_probes", {"ablation": rows, "layers_used": {"zoo-llava": 1, "zoo-paligemma": 1, "zoo-qwen2-vl": 1}}))
    assert (by_id["5"].verdict, by_id["5"].size) == (HOLDS, HOLDS)  # -8.3 points in [-11, -6]
    five_b = by_id["5b"]
    assert five_b.cells["zoo-paligemma"].verdict == DIFFERS and five_b.cells["zoo-qwen2-vl"].verdict == HOLDS
    assert five_b.verdict == DIFFERS and five_b.size == pages.NOT_APPLICABLE
    page = pages.paper_vs_reproduction(list(by_id.values()), pages.load_claims()["models"])
    line = [x for x in page.splitlines() if x.startswith("| 5b |")][-1]
    assert "zoo-paligemma: \u221214.3 [\u221216.1,\u00a0\u221212.5]<br>" in line and line.endswith("| **differs** | **n/a** |")
    assert "| zoo-paligemma | \u221214.3 [\u221216.1, \u221212.5], n = 1,725; *differs* |" in _block(page, "5b")
    # both families within a point: holds
    rows[2] = _ablation("zoo-paligemma", "half", 64, -0.004, -0.009, 0.001)
    assert _book_rows(_book_record(tmp_path, "03_probes", {"ablation": rows, "layers_used": {"zoo-llava": 1, "zoo-paligemma": 1, "zoo-qwen2-vl": 1}}))["5b"].verdict == HOLDS


def test_a_missing_balanced_scope_shows_missing_and_never_falls_back(tmp_path):
    """Today's results have no "balanced" scope: the cells say missing even where "distinct" rows exist."""
    ablation = [_ablation(m, "half", 64, 0.0, -0.005, 0.005, scope=None) for m in ("zoo-paligemma", "zoo-qwen2-vl")]
    ablation += [_ablation("zoo-llava", "top", 5, -0.083, -0.11, -0.06, scope="distinct")]
    masking = [{"model": m, "condition": "top", "fraction": 0.3, "scope": "distinct", "subset": "all", "value": -0.09,
                "ci_low": -0.11, "ci_high": -0.07, "n": 1725} for m in ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl")]
    _book_record(tmp_path, "03_probes", {"ablation": ablation, "layers_used": {"zoo-llava": 1, "zoo-paligemma": 1, "zoo-qwen2-vl": 1}})
    results = _book_record(tmp_path, "02_masking", {"accuracy_change": masking})
    rows = pages.evaluate(pages.load_claims(), pages.load_results(results))
    by_id = {row.claim["id"]: row for row in rows}
    for claim_id in ("2", "5", "5b"):
        assert by_id[claim_id].cells == {} and by_id[claim_id].verdict == pages.NOT_IN_RUN
    page = pages.paper_vs_reproduction(rows, pages.load_claims()["models"])
    line = [x for x in page.splitlines() if x.startswith("| 2 |")][-1]
    assert line.count(": missing") == 3 and "\u22129.0" not in line
    assert _block(page, "2").count("missing (no row matches its selector)") == 3 and "\u22129.0" not in _block(page, "2")
    assert "missing: no row of this run matches its selector" in pages.findings(rows, pages.load_claims()["models"])


def _label_rows(entropy_negative):
    rows = [_rpb("pooled", "pooled", 1, 0.018, -0.009, 0.044, 5175)]
    rows += [{**_rpb("pooled", "pooled", 1, *values, 1620), "subset": subset}
             for subset, values in (("positive", (-0.016, -0.067, 0.038)), ("negative", entropy_negative))]
    return [{**r, "metric": "entropy"} for r in rows]


def test_the_within_label_note(tmp_path):
    results = _book_record(tmp_path, "01_attention", {"point_biserial": _label_rows((0.034, 0.008, 0.061))})
    row = _book_rows(results)["1b"]
    assert row.verdict == HOLDS and set(row.within) == {"positive", "negative"}
    note = pages.within_label_note(row.claim, row.within, row.verdict)
    assert "not within label (negative)" in note and "0.034 [0.008, 0.061] inside \u00b10.1 but excludes 0" in note
    assert "not cleanly within label: negative" in pages.findings([row], [])
    # a label whose CI crosses the margin is named too
    row = _book_rows(_book_record(tmp_path, "01_attention", {"point_biserial": _label_rows((0.08, 0.03, 0.13))}))["1b"]
    assert "not inside \u00b10.1 (inconclusive)" in pages.within_label_note(row.claim, row.within, row.verdict)
    # both labels inside the margin and straddling 0: no warning
    row = _book_rows(_book_record(tmp_path, "01_attention", {"point_biserial": _label_rows((0.01, -0.02, 0.04))}))["1b"]
    note = pages.within_label_note(row.claim, row.within, row.verdict)
    assert note.startswith("within label (pooled): positive") and "not within label" not in note


def test_every_claim_dates_its_rules_and_says_when_set_after_results():
    claims = pages.load_claims()["claims"]
    for claim in claims:
        assert set(claim["rule_declared"]) == {"direction", "size"}, claim["id"]
        assert all(isinstance(v, bool) for v in claim["rule_set_after_results"].values()), claim["id"]
        if any(claim["rule_set_after_results"].values()):
            assert claim["rule_history"].strip(), claim["id"]
    # the size rules of 2026-12-04's first pass were written with the results known, and say so; the depth claims
    # were declared before a deeper zoo's results, and their history says what they preceded
    before = [c for c in claims if c["kind"] != "qualitative" and not c["rule_set_after_results"]["size"]]
    assert {c["id"] for c in before} == {"1d", "3c", "6a", "6b"}
    assert all("before any zoo of more than 2 layers" in c["rule_history"] for c in before)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("rule_declared"), "rule_declared"),
    (lambda c: c["rule_set_after_results"].update(size="yes"), "rule_set_after_results"),
    (lambda c: c.update(size_margin=0.1), "size_margin_why"),
    (lambda c: c.pop("margin_why"), "margin_why"),
    (lambda c: c.pop("size_na"), "paper.estimate"),
    (lambda c: (c.pop("size_na"), c["paper"].update(per_model={"zoo-x": 0.9})), "not in the book's list"),
])
def test_the_loader_refuses_incomplete_rules(tmp_path, edit, message):
    import yaml

    data = yaml.safe_load(CLAIMS)
    edit(data["claims"][0])
    (tmp_path / "claims.yml").write_text(yaml.safe_dump(data))
    with pytest.raises(pages.ClaimsError, match=message):
        pages.load_claims(tmp_path / "claims.yml")


def test_a_bounds_reason_is_shown_with_the_claims_details():
    whys = pages._whys({"kind": "at most", "bound": 0.8, "bound_why": "the last fifth of the stack", "paper": {}})
    assert whys == ["bound 0.8: the last fifth of the stack"]
