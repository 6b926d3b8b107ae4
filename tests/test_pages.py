"""Pages generated from results: the verdict rules on hand cases, and pages built from a small fake results dict.

- each kind of claim (no effect with a margin, effect with a sign, a bound) gives holds / differs /
  inconclusive on CIs built to fall each way; a chapter without results is "not built", never a number;
- a row's verdict over the models counts them against ``need``;
- the paper-vs-reproduction page, the introduction's findings and the cost table contain the numbers of a
  fake results file, and "not built" where a chapter's file is absent;
- a selector that matches two rows for one cell fails naming the claim; the book's own claims.yml loads.
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
    paper: {value: "R_pb = 0.001", ci: "[-0.034, 0.036]", n: "3,090", source: "[A]"}
    kind: no effect
    margin: 0.1
    verdict_on: pooled
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
    paper: {value: "-8.2 to -11.3 points", source: "[A]"}
    kind: effect
    sign: -1
    verdict_on: models
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


def test_pages_from_fake_results(tmp_path):
    results = _fake(tmp_path)
    out = tmp_path / "generated"
    written = pages.write_pages(results, out, tmp_path / "claims.yml")
    assert [p.name for p in written] == ["paper_vs_reproduction.md", "findings.md", "costs.md"]
    page = (out / "paper_vs_reproduction.md").read_text()
    # the last layer's rows, per model and pooled, with CI and n; the layer-0 row is not read
    assert "0.012 [\u22120.031, 0.052], n = 1,080; *holds*" in page
    assert "\u22120.247 [\u22120.301, \u22120.196], n = 1,080; *differs*" in page
    assert "0.004 [\u22120.028, 0.036], n = 5,175; *holds*" in page
    assert "0.500" not in page
    row1 = [line for line in page.splitlines() if line.startswith("| 1 |")][-1]  # the table, after the rules
    assert row1.endswith("| **holds** |")  # verdict on the pooled cell
    row2 = [line for line in page.splitlines() if line.startswith("| 2 |")][-1]
    assert row2.count("not built") == 4 and row2.endswith("| **not built** |")  # two models, pooled, the verdict
    assert "inside 0 \u00b1 0.1" in page  # the declared margin is on the page
    findings = (out / "findings.md").read_text()
    assert findings.startswith("1. Concentration: the paper reports R_pb = 0.001")
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
    assert pages.format_cell(row.cells["zoo-a"], row.claim, True) == "\u22129.1 [\u221212.0, \u22126.0], n = 1,725; *holds*"


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
