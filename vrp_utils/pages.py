"""Pages generated from ``results/*.json`` at build time: paper vs this reproduction, the introduction's
findings, and the re-run costs (``python -m vrp_utils.book pages``).

Why: a number typed into prose goes stale the moment a notebook re-runs. Every number on these pages is
read from the results files the notebooks published; a chapter whose results file is absent shows
"not built", and a cell whose selector matches no row shows "missing", never a number from another
scope. The claims are data (``book/claims.yml``: the paper's number, CI and source, where ours lives in
the results, the kind of claim with its margin or bound, and when each rule was declared), so the
verdict code below is generic and tested (``tests/test_pages.py``).

Each claim gets two verdicts, per cell (one model, or the pooled estimate), on our 95% CI [lo, hi].

**Direction** (is the effect there, with the paper's sign, or absent as claimed):

- ``no effect`` (null n0, margin m): **holds** when the whole CI lies inside [n0 - m, n0 + m];
  **differs** when it lies wholly outside; **inconclusive** otherwise.
- ``effect`` (null n0, sign s, optional margin m): **holds** when the CI excludes n0 on the side of s;
  **differs** when it excludes n0 on the other side, or lies wholly inside [n0 - m, n0 + m] (no effect
  as large as the margin); **inconclusive** otherwise.
- ``at least`` / ``at most`` (bound b): **holds** when the whole CI lies on the claimed side of b;
  **differs** when it lies wholly on the other side; **inconclusive** otherwise.
- ``qualitative``: no verdict.

**Size** (is the paper's number compatible with ours): the paper's estimate is a point v or a range
[a, b] (a point is the range [v, v]), per model where the paper gives one (``paper.per_model``), with a
declared equivalence margin m (``size_margin``, default 0). Size **holds** when [a - m, b + m] overlaps
our CI (for a point: v lies in our CI widened by m on each side), and **differs** otherwise. A claim
that is a bound or qualitative declares ``size_na`` with its reason and gets "n/a".

A row's verdict (each of the two) is its declared cell's (``verdict_on: pooled`` or a model name), or
over models (``verdict_on: models``, or a list of model names; ``need`` of them, default all):
**holds** when at least ``need`` hold, **differs** when so many differ that ``need`` cannot be
reached, **inconclusive** otherwise.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vrp_utils.paths import BOOK_DIR, RESULTS_DIR

CLAIMS_FILE = BOOK_DIR / "claims.yml"
GENERATED_DIR = BOOK_DIR / "generated"
POOLED = "pooled"
DASH = "\u2014"
KINDS = ("no effect", "effect", "at least", "at most", "qualitative")
HOLDS, DIFFERS, INCONCLUSIVE = "holds", "differs", "inconclusive"
NOT_BUILT, NOT_IN_RUN, UNDEFINED, NO_VERDICT = "not built", "not in this run", "undefined", "no verdict (qualitative)"
MISSING, NOT_APPLICABLE = "missing", "n/a"
RULES = ("direction", "size")


class ClaimsError(ValueError):
    """``book/claims.yml`` is malformed, or one of its selectors matches several results rows."""


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def cell_verdict(claim: dict, value: float | None, ci_low: float | None, ci_high: float | None) -> str:
    """The direction verdict of one estimate (value and 95% CI, in the claim's displayed units)."""
    kind = claim["kind"]
    if kind == "qualitative":
        return NO_VERDICT
    if not _finite(value):
        return UNDEFINED
    if not (_finite(ci_low) and _finite(ci_high)):
        return INCONCLUSIVE  # a number without an interval decides nothing
    lo, hi = float(ci_low), float(ci_high)
    if kind in ("no effect", "effect"):
        null = float(claim.get("null", 0.0))
        margin = claim.get("margin")
        inside = margin is not None and null - margin <= lo and hi <= null + margin
        if kind == "no effect":
            if inside:
                return HOLDS
            if hi < null - margin or lo > null + margin:
                return DIFFERS
            return INCONCLUSIVE
        sign = claim["sign"]
        if (sign > 0 and lo > null) or (sign < 0 and hi < null):
            return HOLDS
        if (sign > 0 and hi < null) or (sign < 0 and lo > null) or inside:
            return DIFFERS
        return INCONCLUSIVE
    bound = float(claim["bound"])
    if kind == "at least":
        return HOLDS if lo >= bound else DIFFERS if hi < bound else INCONCLUSIVE
    return HOLDS if hi <= bound else DIFFERS if lo > bound else INCONCLUSIVE  # at most


def paper_estimate(claim: dict, cell_name: str) -> tuple[float, float] | None:
    """The paper's number the size verdict compares a cell with, as a range (a point is [v, v]): the
    model's value under ``paper.per_model``, else ``paper.estimate``; None where the paper has none."""
    paper = claim["paper"]
    per_model = paper.get("per_model")
    est = per_model.get(cell_name) if isinstance(per_model, dict) else paper.get("estimate")
    if est is None:
        return None
    if isinstance(est, (list, tuple)):
        return float(min(est)), float(max(est))
    return float(est), float(est)


def size_verdict(claim: dict, cell_name: str, value: float | None, ci_low: float | None, ci_high: float | None) -> str:
    """The size verdict of one estimate: does the paper's point or range, widened by ``size_margin`` on each
    side, overlap our 95% CI?"""
    if claim["kind"] == "qualitative" or "size_na" in claim:
        return NOT_APPLICABLE
    est = paper_estimate(claim, cell_name)
    if est is None:
        return NOT_APPLICABLE
    if not _finite(value):
        return UNDEFINED
    if not (_finite(ci_low) and _finite(ci_high)):
        return INCONCLUSIVE
    margin = float(claim.get("size_margin") or 0.0)
    low, high = est
    return HOLDS if low - margin <= float(ci_high) and float(ci_low) <= high + margin else DIFFERS


def verdict_cells(claim: dict) -> str | list[str]:
    """Which cells a row's verdicts read: ``pooled``, one model's name, ``models`` (all), or a list of models."""
    return claim.get("verdict_on", POOLED)


def _judged(claim: dict, name: str) -> bool:
    on = verdict_cells(claim)
    if isinstance(on, list):
        return name in on
    return name != POOLED if on == "models" else name == on


def _of(cell: "Cell", rule: str) -> str:
    return cell.size or NOT_APPLICABLE if rule == "size" else cell.verdict


def row_verdict(claim: dict, cells: dict[str, "Cell"], built: bool, rule: str = "direction") -> str:
    """The verdict (``rule``: direction or size) of a claim's row from its cells (see the module docstring)."""
    if claim["kind"] == "qualitative":
        return NO_VERDICT if rule == "direction" else NOT_APPLICABLE
    if rule == "size" and "size_na" in claim:
        return NOT_APPLICABLE
    if not built:
        return NOT_BUILT
    on = verdict_cells(claim)
    if not isinstance(on, list) and on != "models":
        cell = cells.get(on)
        return NOT_IN_RUN if cell is None else _of(cell, rule)
    verdicts = [_of(c, rule) for name, c in cells.items() if _judged(claim, name)]
    if not verdicts:
        return NOT_IN_RUN
    need = int(claim.get("need", len(on) if isinstance(on, list) else len(verdicts)))
    holds, differs = verdicts.count(HOLDS), verdicts.count(DIFFERS)
    if holds >= need:
        return HOLDS
    if differs and differs > len(verdicts) - need:  # (fewer models than need, none differing: inconclusive)
        return DIFFERS
    return INCONCLUSIVE


# --------------------------------------------------------------------------------------------------
# Reading our numbers
# --------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    """Our estimate for one model (or pooled), in the claim's displayed units, with its two verdicts
    (``size`` is None on a cell the row's verdicts do not read)."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int | None
    verdict: str
    undefined: str | None = None
    extra: dict = field(default_factory=dict)
    size: str | None = None


def _date(x: Any) -> bool:
    return isinstance(x, (datetime.date, str)) and bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(x)))


def _check_rules(path: Path, claim: dict, models: list) -> None:
    """The parts of a claim added for the two verdicts and the rules' history."""
    name = claim.get("id", "?")
    fail = lambda text: ClaimsError(f"{path}: claim {name}: {text}")  # noqa: E731
    declared, after = claim.get("rule_declared"), claim.get("rule_set_after_results")
    if not (isinstance(declared, dict) and all(_date(declared.get(r)) for r in RULES)):
        raise fail("rule_declared needs a date (YYYY-MM-DD) for each of direction and size")
    if not (isinstance(after, dict) and all(isinstance(after.get(r), bool) for r in RULES)):
        raise fail("rule_set_after_results needs true or false for each of direction and size")
    if any(after.values()) and not str(claim.get("rule_history", "")).strip():
        raise fail("a rule set after the results it judges needs a rule_history sentence saying so")
    if claim["kind"] == "no effect" and not str(claim.get("margin_why", "")).strip():
        raise fail("the no-effect margin needs its reason (margin_why)")
    if "size_margin" in claim:
        if not (_finite(claim["size_margin"]) and claim["size_margin"] >= 0):
            raise fail("size_margin must be a number >= 0")
        if not str(claim.get("size_margin_why", "")).strip():
            raise fail("a size_margin needs its reason (size_margin_why)")
    if claim["kind"] == "qualitative":
        return
    paper = claim["paper"]
    has = [k for k in ("estimate", "per_model") if k in paper]
    if "size_na" in claim:
        if has or not str(claim["size_na"]).strip():
            raise fail("size_na (with its reason) and a paper estimate exclude each other")
        return
    if len(has) != 1:
        raise fail("the size verdict needs exactly one of paper.estimate / paper.per_model, or size_na with a reason")
    values = list(paper["per_model"].values()) if has[0] == "per_model" else [paper["estimate"]]
    if has[0] == "per_model":
        if not isinstance(paper["per_model"], dict) or not paper["per_model"]:
            raise fail("paper.per_model must map model names to values")
        unknown = set(paper["per_model"]) - set(models)
        if models and unknown:
            raise fail(f"paper.per_model names models not in the book's list: {sorted(unknown)}")
    for v in values:
        ok = _finite(v) or (isinstance(v, list) and len(v) == 2 and all(_finite(x) for x in v))
        if not ok:
            raise fail(f"a paper estimate must be a number or a [low, high] range, not {v!r}")
    on = verdict_cells(claim)
    if isinstance(on, list) and (not on or (models and set(on) - set(models))):
        raise fail(f"verdict_on lists models not in the book's list: {on}")


def load_claims(path: Path = CLAIMS_FILE) -> dict:
    """Read and check ``claims.yml``: every claim has an id, text, paper side, a known kind and its parameters,
    a size rule (a paper estimate, or size_na with a reason) and the dates its rules were declared."""
    data = yaml.safe_load(path.read_text())
    claims = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(claims, list) or not claims:
        raise ClaimsError(f"{path}: expected a mapping with a non-empty 'claims' list")
    for claim in claims:
        name = claim.get("id", "?")
        for key in ("id", "claim", "label", "paper", "kind", "differs"):
            if key not in claim:
                raise ClaimsError(f"{path}: claim {name} has no {key!r}")
        kind = claim["kind"]
        if kind not in KINDS:
            raise ClaimsError(f"{path}: claim {name}: kind {kind!r} is not one of {KINDS}")
        if kind == "no effect" and not _finite(claim.get("margin")):
            raise ClaimsError(f"{path}: claim {name}: a claim of no effect needs an equivalence margin")
        if kind == "effect" and claim.get("sign") not in (1, -1):
            raise ClaimsError(f"{path}: claim {name}: a claim of an effect needs sign +1 or -1")
        if kind in ("at least", "at most") and not _finite(claim.get("bound")):
            raise ClaimsError(f"{path}: claim {name}: kind {kind!r} needs a bound")
        if kind != "qualitative" and "ours" not in claim:
            raise ClaimsError(f"{path}: claim {name}: where are our numbers? ('ours')")
        _check_rules(path, claim, data.get("models") or [])
    data.setdefault("models", [])
    return data


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """``{notebook: record}`` of every runner record in ``results_dir`` (files without ``notebook`` skipped)."""
    records = {}
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ClaimsError(f"results file {path} is not valid JSON: {error}") from None
        if isinstance(record, dict) and "notebook" in record and isinstance(record.get("results"), dict):
            records[record["notebook"]] = record
    return records


def _matches(row: dict, where: dict) -> bool:
    for key, wanted in where.items():
        have = row.get(key)
        if _finite(wanted) and _finite(have):
            if not math.isclose(float(have), float(wanted), rel_tol=0, abs_tol=1e-9):
                return False
        elif have != wanted:
            return False
    return True


def _pick(rows: list[dict], ours: dict, results: dict, model: str) -> list[dict]:
    """Rows of one cell after the layer rule: ``layer: last`` keeps the largest layer; ``layer_from: KEY``
    keeps the layer that ``results[KEY][model]`` names (e.g. the probe chapter's chosen layers)."""
    if ours.get("layer") == "last":
        layers = [r.get("layer") for r in rows if _finite(r.get("layer"))]
        if layers:
            rows = [r for r in rows if r.get("layer") == max(layers)]
    elif "layer_from" in ours:
        chosen = (results.get(ours["layer_from"]) or {}).get(model)
        rows = [r for r in rows if chosen is not None and r.get("layer") == chosen]
    return rows


def _one_row(claim: dict, rows: list[dict], where: dict, results: dict, name: str) -> dict | None:
    """The one row of ``rows`` that ``where`` and the layer rule select for cell ``name`` (None: no row)."""
    ours = claim["ours"]
    picked = _pick([r for r in rows if _matches(r, where)], ours, results, name)
    if len(picked) > 1:
        raise ClaimsError(f"claim {claim['id']}: {len(picked)} rows of {ours['notebook']}/{ours['key']} match {name} "
                          f"({ours.get('where', {})} {where}); make the selector in book/claims.yml unique")
    return picked[0] if picked else None


def _as_cell(claim: dict, row: dict, name: str, judged: bool) -> Cell:
    """One results row as a cell in the claim's displayed units, with its direction verdict and, where the
    row's verdicts read it, its size verdict."""
    ours = claim["ours"]
    scale = float(ours.get("scale", 1))
    est = row.get(ours["field"]) if "field" in ours else row
    est = est if isinstance(est, dict) else {}
    value, lo, hi = (est.get(k) for k in ("value", "ci_low", "ci_high"))
    value, lo, hi = (v * scale if _finite(v) else None for v in (value, lo, hi))
    if scale < 0 and lo is not None and hi is not None:
        lo, hi = hi, lo
    size = size_verdict(claim, name, value, lo, hi) if judged else None
    return Cell(value, lo, hi, est.get("n"), cell_verdict(claim, value, lo, hi), est.get("undefined"), size=size)


def _rows_of(claim: dict, results: dict, where: dict) -> list[dict]:
    rows = results.get(claim["ours"]["key"])
    return [r for r in rows if isinstance(r, dict) and _matches(r, where)] if isinstance(rows, list) else []


def read_cells(claim: dict, results: dict, models: list[str]) -> dict[str, Cell]:
    """Our cells for ``claim`` from one notebook's ``results`` dict: one per model that has a matching row,
    and ``pooled`` where the claim names a pooled selector. Several matching rows for one cell: an error.
    A cell with no matching row is absent (the page says "missing"): no selector falls back to another."""
    ours = claim["ours"]
    rows = _rows_of(claim, results, ours.get("where", {}))
    targets = [(m, {"model": m, **ours.get("per_model", {})}) for m in models]
    if ours.get("pooled") is not None:
        targets.append((POOLED, {"model": POOLED, **ours["pooled"]}))
    cells: dict[str, Cell] = {}
    for name, where in targets:
        row = _one_row(claim, rows, where, results, name)
        if row is not None:
            cells[name] = _as_cell(claim, row, name, _judged(claim, name))
    return cells


def read_within_label(claim: dict, results: dict) -> dict[str, Cell]:
    """For ``ours.within_label: [subset, ...]``: the pooled cell of the same selector with ``subset`` replaced,
    judged by the claim's direction rule (e.g. R_pb among the label-positive inputs only)."""
    ours = claim["ours"]
    if ours.get("pooled") is None:
        return {}
    cells = {}
    for subset in ours.get("within_label") or []:
        rows = _rows_of(claim, results, {**ours.get("where", {}), "subset": subset})
        row = _one_row(claim, rows, {"model": POOLED, **ours["pooled"]}, results, POOLED)
        if row is not None:
            cells[subset] = _as_cell(claim, row, POOLED, judged=False)
    return cells


def within_label_flagged(claim: dict, within: dict[str, Cell]) -> list[str]:
    """The labels whose CI leaves the no-effect margin or excludes the null."""
    null = float(claim.get("null", 0))
    return [s for s, c in within.items()
            if c.verdict != HOLDS or (c.ci_low is not None and (c.ci_low > null or c.ci_high < null))]


def within_label_note(claim: dict, within: dict[str, Cell], direction: str) -> str:
    """What the within-label cells say beside a no-effect verdict: each subset inside the margin or not, and a
    warning where one leaves the margin or excludes the null while the pooled 'all' holds."""
    if not within:
        return ""
    null = float(claim.get("null", 0))
    digits = int(claim["ours"].get("digits", 3))
    parts = []
    for subset, cell in within.items():
        text = f"{subset} {_num(cell.value, digits)} [{_num(cell.ci_low, digits)}, {_num(cell.ci_high, digits)}]"
        if cell.verdict == HOLDS and cell.ci_low is not None and (cell.ci_low > null or cell.ci_high < null):
            text += f" inside \u00b1{claim['margin']:g} but excludes {null:g}"
        elif cell.verdict == HOLDS:
            text += f" inside \u00b1{claim['margin']:g}"
        else:
            text += f" not inside \u00b1{claim['margin']:g} ({cell.verdict})"
        parts.append(text)
    flagged = within_label_flagged(claim, within)
    note = "within label (pooled): " + "; ".join(parts)
    if flagged and direction == HOLDS:
        note = f"over all inputs only, **not within label ({', '.join(flagged)})**; " + note
    return note


@dataclass
class Row:
    claim: dict
    built: bool
    cells: dict[str, Cell]
    verdict: str
    run: dict | None = None
    size: str = NOT_APPLICABLE
    within: dict[str, Cell] = field(default_factory=dict)


def evaluate(claims: dict, records: dict[str, dict]) -> list[Row]:
    """Every claim against the results records (``{notebook: record}``)."""
    out = []
    for claim in claims["claims"]:
        if claim["kind"] == "qualitative":
            out.append(Row(claim, False, {}, NO_VERDICT))
            continue
        record = records.get(claim["ours"]["notebook"])
        built = record is not None
        cells = read_cells(claim, record["results"], claims["models"] or _models_in(record)) if built else {}
        within = read_within_label(claim, record["results"]) if built else {}
        out.append(Row(claim, built, cells, row_verdict(claim, cells, built), record,
                       row_verdict(claim, cells, built, "size"), within))
    return out


def _models_in(record: dict) -> list[str]:
    return [m for m in (record.get("results", {}).get("parameters", {}).get("models") or []) if m != POOLED]


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(x: float | None, digits: int) -> str:
    if x is None:
        return "?"
    text = f"{x:.{digits}f}"
    return text.lstrip("-") if float(text) == 0 else text.replace("-", "\u2212")  # never "-0.0"


def format_cell(cell: Cell | None, claim: dict, built: bool, with_verdict: bool = True) -> str:
    if not built:
        return NOT_BUILT
    if cell is None:
        return f"{MISSING} (no row matches its selector)"
    if cell.value is None:
        return f"{UNDEFINED}" + (f" ({cell.undefined})" if cell.undefined else "") + (f", n = {cell.n}" if cell.n else "")
    digits = int(claim["ours"].get("digits", 3))
    text = f"{_num(cell.value, digits)} [{_num(cell.ci_low, digits)}, {_num(cell.ci_high, digits)}]"
    if cell.n is not None:
        text += f", n = {cell.n:,}"
    if not with_verdict:
        return text
    return text + f"; *{cell.verdict}*" + (f" / size *{cell.size}*" if cell.size not in (None, NOT_APPLICABLE) else "")


def _paper(claim: dict) -> str:
    paper = claim["paper"]
    parts = [str(paper.get("value", ""))]
    if paper.get("ci"):
        parts.append(f"95% CI {paper['ci']}")
    if paper.get("p"):
        parts.append(str(paper["p"]))
    if paper.get("n"):
        parts.append(f"n = {paper['n']}")
    return ", ".join(p for p in parts if p) + (f" {paper['source']}" if paper.get("source") else "")


def _estimate(est: Any, digits: int) -> str:
    if isinstance(est, (list, tuple)):
        return f"{_num(float(min(est)), digits)} to {_num(float(max(est)), digits)}"
    return _num(float(est), digits)


def _compared(claim: dict) -> str:
    """The paper's number(s) the size verdict reads, in our units, when they are not plain in its text."""
    paper, digits = claim["paper"], int(claim.get("ours", {}).get("digits", 3))
    if "per_model" in paper:
        return "compared per model: " + ", ".join(f"{m} {_estimate(v, digits)}" for m, v in paper["per_model"].items())
    if "estimate" in paper and paper.get("estimate_note"):
        return f"compared as {_estimate(paper['estimate'], digits)} (see the note under the rules)"
    return ""


def _rule(claim: dict) -> str:
    kind = claim["kind"]
    unit = claim.get("ours", {}).get("unit", "")
    null = claim.get("null", 0)
    if kind == "no effect":
        return f"no effect: holds inside {null:g} \u00b1 {claim['margin']:g}{unit}"
    if kind == "effect":
        text = f"effect {'> ' if claim['sign'] > 0 else '< '}{null:g}{unit}"
        return text + (f" (differs inside \u00b1{claim['margin']:g}{unit})" if claim.get("margin") is not None else "")
    if kind in ("at least", "at most"):
        return f"{kind} {claim['bound']:g}{unit}"
    return "qualitative"


def _size_rule(claim: dict) -> str:
    if claim["kind"] == "qualitative":
        return f"{NOT_APPLICABLE} (qualitative)"
    if "size_na" in claim:
        return f"{NOT_APPLICABLE}: {claim['size_na']}"
    paper, unit = claim["paper"], claim["ours"].get("unit", "")
    digits = int(claim["ours"].get("digits", 3))
    per_model = "per_model" in paper
    values = paper["per_model"].values() if per_model else [paper["estimate"]]
    ranged = any(isinstance(v, (list, tuple)) for v in values)
    margin = claim.get("size_margin")
    what = "each model's paper value" if per_model else ("the paper's range" if ranged else "the paper's value")
    if not per_model:
        what += f" {_estimate(paper['estimate'], digits)}{unit}"
    widened = f" \u00b1 {margin:g}{unit}" if margin else ""
    verb = "overlaps our CI" if ranged else "lies in our CI"
    return f"{what}{widened} {verb}" + ("" if margin else " (no margin)")


def _verdict_scope(claim: dict) -> str:
    if claim["kind"] == "qualitative":
        return DASH
    on = verdict_cells(claim)
    if isinstance(on, list):
        need = claim.get("need")
        return ", ".join(on) if need is None else f"{need} of {', '.join(on)}"
    if on == "models":
        need = claim.get("need")
        return "each model" if need is None else f"{need} of the models"
    return on


def _declared(claim: dict) -> str:
    declared, after = claim.get("rule_declared") or {}, claim.get("rule_set_after_results") or {}
    return "; ".join(f"{r} {declared.get(r, '?')}" + (" (**after its results**)" if after.get(r) else "") for r in RULES)


def _whys(claim: dict) -> list[str]:
    out = []
    if claim.get("margin_why"):
        out.append(f"no-effect margin \u00b1{claim['margin']:g}: {claim['margin_why']}")
    if claim.get("bound_why"):
        out.append(f"bound {claim['bound']:g}: {claim['bound_why']}")
    if claim.get("size_margin_why"):
        out.append(f"size margin \u00b1{claim['size_margin']:g}: {claim['size_margin_why']}")
    elif claim.get("size_why"):
        out.append(f"size: {claim['size_why']}")
    if claim["paper"].get("estimate_note"):
        out.append(f"orientation: {claim['paper']['estimate_note']}")
    if claim.get("rule_history"):
        out.append(f"history: {claim['rule_history']}")
    return out


def _direction_text(row: Row) -> str:
    text = f"**{row.verdict}**"
    note = within_label_note(row.claim, row.within, row.verdict)
    return text + (f"; {note}" if note else "")


def _ours_short(row: Row, models: list[str], weak: Any = None) -> str:
    """The compact table's "ours": the value [CI] of each cell the row's verdicts read (badged where weak)."""
    claim = row.claim
    if claim["kind"] == "qualitative":
        return claim.get("ours_text", "not tested")
    if not row.built:
        return NOT_BUILT
    on = verdict_cells(claim)
    names = list(on) if isinstance(on, list) else models if on == "models" else [on]
    digits = int(claim["ours"].get("digits", 3))
    parts = []
    for name in names:
        cell = row.cells.get(name)
        if cell is None:
            text = MISSING
        elif cell.value is None:
            text = UNDEFINED
        else:
            text = f"{_num(cell.value, digits)} [{_num(cell.ci_low, digits)},\u00a0{_num(cell.ci_high, digits)}]"
        label = weak.label(name) if weak is not None and name != POOLED else name
        parts.append(text if len(names) == 1 and name == POOLED else f"{label}: {text}")
    return "<br>".join(parts)


def _direction_short(row: Row) -> str:
    flagged = within_label_flagged(row.claim, row.within) if row.verdict == HOLDS else []
    return f"**{row.verdict}**" + (f" (over all inputs only; not within label: {', '.join(flagged)})" if flagged else "")


def _details(row: Row, models: list[str], weak: Any = None) -> list[str]:
    """A claim's folded block: the paper in full, every cell, where ours comes from, what differs, the rules."""
    claim = row.claim
    title = f"{claim['id']} \u00b7 {claim['label']}: direction {row.verdict}, size {row.size}"
    lines = [f":::{{dropdown}} {title}", "", f"**The claim.** {claim['claim']}", "",
             f"**The paper.** {_paper(claim)}" + (f"; {_compared(claim)}" if _compared(claim) else "") + ".", ""]
    if claim["kind"] == "qualitative":
        lines += [f"**Ours.** {claim.get('ours_text', 'not tested')}", ""]
    else:
        ours = claim["ours"]
        lines += ["**Ours**, per model and pooled (value [95% CI], n; the direction verdict; where the row's verdicts "
                  "read the cell, its size verdict):", "", "| cell | ours |", "|---|---|"]
        for name in models:
            shown = weak.label(name) if weak is not None else name
            lines.append(f"| {_cell(shown)} | {_cell(format_cell(row.cells.get(name), claim, row.built))} |")
        pooled = ("not computed" if row.built else NOT_BUILT) if ours.get("pooled") is None \
            else format_cell(row.cells.get(POOLED), claim, row.built)
        lines += [f"| {POOLED} | {_cell(pooled)} |", "",
                  f"**Where ours comes from.** `{ours['notebook']}`: {ours.get('description', ours['key'])}.", ""]
    lines += [f"**What differs.** {claim['differs']}", "", f"**Direction.** {_direction_text(row)}.", "",
              f"**Size.** **{row.size}**.", ""]
    weak_here = weak.sentence([m for m in models if m in row.cells]) if weak is not None and row.built else ""
    if weak_here:
        lines += [weak_here, ""]
    lines += ["**The rules.**", "",
              f"- direction rule: {_rule(claim)};",
              f"- size rule: {_size_rule(claim)};",
              f"- verdicts read: {_verdict_scope(claim)};",
              f"- rules declared: {_declared(claim)}."]
    lines += [f"- {w.rstrip('.')}." for w in _whys(claim)]
    return lines + ["", ":::", ""]


def paper_vs_reproduction(rows: list[Row], models: list[str], history: str = "", weak: Any = None) -> str:
    """The page: the verdicts at a glance (a compact table), then each claim in a folded block with every cell,
    where ours comes from, what differs and its rules with their dates; the two verdict rules below."""
    lines = [
        "# Paper vs this reproduction",
        "",
        "Each row is a headline claim of the paper (`PAPER.md` in the project's shared notes; sources: **[A]** the "
        "abstract, **[R]** the released code's README and configs, **[S]** a third-party summary) beside what this "
        "build measured on the zoo models: the value and 95% CI (cluster bootstrap over images) of the cell the "
        "verdicts read, and the two verdicts (rules below). Open a claim's block under the table for every model "
        "and the pooled estimate with n, where our number comes from, what differs from the paper, and the rules "
        "with their reasons and dates. Our numbers are read from `results/*.json` when the book is built "
        "(`python -m vrp_utils.book pages`); a chapter whose results are absent says **not built**, and a cell whose "
        "selector matches no row of the run says **missing** (no other row stands in for it). The claims, with where "
        "each of our numbers comes from, are data: `book/claims.yml`.",
        "",
        "| # | claim | paper | ours [95% CI] | direction | size |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        claim = row.claim
        paper = claim["paper"]
        paper_short = f"{paper.get('value', '')} {paper.get('source', '')}".strip()
        lines.append(f"| {_cell(claim['id'])} | {_cell(claim['label'])} | {_cell(paper_short)} | "
                     f"{_cell(_ours_short(row, models, weak))} | {_cell(_direction_short(row))} | **{row.size}** |")
    note = weak.sentence() if weak is not None else ""
    if note:
        lines += ["", note]
    lines += ["", "## Each claim in full", ""]
    for row in rows:
        lines += _details(row, models, weak)
    lines += ["Runs these numbers come from:", ""]
    runs = {row.claim["ours"]["notebook"]: row.run for row in rows if row.claim["kind"] != "qualitative"}
    for notebook, run in runs.items():
        if run is None:
            lines.append(f"- `{notebook}`: not built (run `python -m vrp_utils.run {notebook}` or `make book`).")
        else:
            commit = ((run.get("git") or {}).get("commit") or "?")[:10]
            lines.append(f"- `{notebook}`: finished {run.get('finished_utc', '?')}, commit `{commit}`, "
                         f"{run.get('duration_s', '?')} s; parameters overridden: "
                         f"{', '.join(run.get('overridden') or []) or 'none (defaults)'}.")
    lines += [
        "",
        "## Two verdicts per claim",
        "",
        "**Direction**: is the effect there with the paper's sign (or absent, where the paper claims no effect)? "
        "On our 95% CI, per cell:",
        "",
        "- **a claim of no effect** (the paper's CI straddles zero) needs an equivalence margin: it **holds** when our "
        "whole CI lies inside \u00b1margin, **differs** when it lies wholly outside, and is **inconclusive** otherwise. "
        "Beside the verdict, the same statistic within each label (label-positive and label-negative inputs, pooled) "
        "is judged by the same margin, and the page says so where a label's CI leaves the margin or excludes zero;",
        "- **a claim of an effect** **holds** when our CI excludes zero (or chance, 0.5 for an AUROC) with the paper's "
        "sign, **differs** when it excludes it with the other sign, or lies wholly inside a declared margin (no "
        "effect that large), and is **inconclusive** otherwise;",
        "- **a bound** (\"at least\", \"at most\") **holds** when the whole CI lies on the claimed side, **differs** "
        "when it lies wholly on the other, and is **inconclusive** otherwise;",
        "- a qualitative claim gets no verdict; a number without a CI is inconclusive.",
        "",
        "**Size**: is the paper's number compatible with ours? It **holds** when the paper's value lies in our 95% CI "
        "widened by the claim's declared size margin on each side (no margin: our CI alone), and **differs** "
        "otherwise. Where the paper gives a range (e.g. \"-8.2 to -11.3 points\"), size holds when the range, widened "
        "by the margin, overlaps our CI (some value the paper reports is compatible with ours). Where the paper gives "
        "one value per family, each model is compared with its family's value. A bound or a qualitative claim has no "
        "value to compare: size is **n/a**, with the reason. Size \"holds\" means *compatible*, not *equal*: a wide CI "
        "holds easily, so read it with the CI.",
        "",
        "Each verdict of a row is that of the cell it is declared on (the pooled estimate for the paper's pooled "
        "numbers, one model for a claim about one family) or, for a claim about several families, the count over "
        "them: **holds** when at least the claimed number hold, **differs** when so many differ that this number "
        "cannot be reached, **inconclusive** otherwise.",
        "",
        "## When the rules were declared",
        "",
        "Each claim's block above gives its rules, their reasons and the dates they were declared, marked "
        "**after its results** where they were set with the results they judge known.",
        "",
    ]
    if history:
        lines += [history.strip(), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def findings(rows: list[Row], models: list[str], weak: Any = None) -> str:
    """The introduction's findings: each claim marked ``finding`` in claims.yml, as this build measured it, with
    both verdicts (and the within-label caveat where there is one); a weak model is badged, and a note under the
    list says why (``weak``: :func:`weak_models_of`)."""
    by_finding: dict[int, list[Row]] = {}
    for row in rows:
        if row.claim.get("finding") is not None:
            by_finding.setdefault(int(row.claim["finding"]), []).append(row)
    lines = ["| finding | claim | paper | this build [95% CI] | direction | size |", "|---|---|---|---|---|---|"]
    for number in sorted(by_finding):
        for row in by_finding[number]:
            paper = row.claim["paper"]
            lines.append(f"| {number} | {_cell(row.claim['label'])} | {_cell(str(paper.get('value', '')))} | "
                         f"{_cell(_ours_short(row, models, weak))} | {_cell(_direction_short(row))} | **{row.size}** |")
    lines += ["", "```{dropdown} The four findings in full: every model, n and the paper's source", ""]
    for number in sorted(by_finding):
        parts = []
        for row in by_finding[number]:
            claim = row.claim
            if not row.built:
                ours = f"nothing yet: chapter `{claim['ours']['notebook']}` is **not built**"
            else:
                shown = [(POOLED, row.cells.get(POOLED))] if claim["ours"].get("pooled") is not None and POOLED in row.cells else []
                shown += [(m, row.cells.get(m)) for m in models if m in row.cells]
                ours = "; ".join(f"{weak.label(name) if weak is not None and name != POOLED else name} "
                                 f"{format_cell(cell, claim, True, with_verdict=False)}" for name, cell in shown) \
                    or f"{MISSING}: no row of this run matches its selector"
            flagged = within_label_flagged(claim, row.within) if row.verdict == HOLDS else []
            caveat = f"; but not cleanly within label: {', '.join(flagged)}" if flagged else ""
            parts.append(f"{claim['finding_text']}: the paper reports {_paper(claim)}; this build measured {ours} "
                         f"(direction: **{row.verdict}**{caveat}; size: **{row.size}**).")
        lines.append(f"{number}. " + " ".join(parts))
    lines.append("```")
    note = weak.sentence() if weak is not None else ""
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def costs(records: dict[str, dict]) -> str:
    """What each chapter cost on this machine, from the runner's records (``duration_s``) and the chapters'
    own timings (``seconds``, ``seconds_per_model``, chapter 04's per-pass cost table)."""
    if not records:
        return "No chapter has run in this build yet, so no cost was measured.\n"
    lines = [
        "| chapter | parameters overridden | wall time (s) | of which in the notebook (s) | per model (s) | machine | finished (UTC) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in sorted(records.items()):
        results = record.get("results", {})
        per_model = results.get("seconds_per_model") or {}
        per_model_text = ", ".join(f"{m} {s}" for m, s in per_model.items() if not isinstance(s, dict)) or "\u2014"
        host = record.get("host", {})
        overridden = ", ".join(f"`{k}={record['parameters'][k]!r}`" for k in record.get("overridden", [])) or "none"
        lines.append(f"| {name} | {_cell(overridden)} | {record.get('duration_s', '?')} | {results.get('seconds', DASH)} | "
                     f"{_cell(per_model_text)} | {host.get('cpus', '?')} CPUs, {host.get('machine', '?')} | "
                     f"{record.get('finished_utc', '?')} |")
    sc = records.get("04_self_consistency", {}).get("results", {})
    if sc.get("cost"):
        lines += ["", f"Chapter 04 timed each pass on its first inputs (one thread; its sample pools took "
                  f"{sc.get('pool_extraction_seconds', '?')} s to extract in this run):", "",
                  "| model | pass | seconds per input | x the greedy answer | inputs timed |", "|---|---|---|---|---|"]
        for row in sc["cost"]:
            lines.append(f"| {row.get('model')} | {_cell(row.get('pass'))} | {row.get('seconds_per_input', 0):.4f} | "
                         f"{row.get('forward_pass_equivalents', 0):.2f} | {row.get('n')} |")
    return "\n".join(lines) + "\n"


def weak_models_of(records: dict[str, dict]):
    """The weak models (:mod:`vrp_utils.flags`) by chapter 00's published accuracies and shortcut baselines; None
    where chapter 00 has not run (nothing to judge by)."""
    from vrp_utils.flags import weak_from_results

    results = (records.get("00_benchmark_and_zoo") or {}).get("results") or {}
    if not results.get("zoo_accuracy") or not results.get("baselines"):
        return None
    return weak_from_results(results["zoo_accuracy"], results["baselines"])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def write_pages(results_dir: Path = RESULTS_DIR, out_dir: Path = GENERATED_DIR, claims_file: Path = CLAIMS_FILE) -> list[Path]:
    """Write ``paper_vs_reproduction.md`` (a toc page) and the fragments the hand-written pages include:
    ``findings.md`` (introduction) and ``costs.md`` (re-run page)."""
    claims = load_claims(claims_file)
    records = load_results(results_dir)
    rows = evaluate(claims, records)
    weak = weak_models_of(records)
    models = claims["models"] or sorted({m for r in rows for m in r.cells if m != POOLED})
    for row in rows:
        if row.built and not row.cells:
            print(f"warning: claim {row.claim['id']}: {row.claim['ours']['notebook']} is built but no result matches "
                  f"its selector in {claims_file.name}", file=sys.stderr)
    return [
        _write(out_dir / "paper_vs_reproduction.md", paper_vs_reproduction(rows, models, claims.get("history", ""), weak)),
        _write(out_dir / "findings.md", findings(rows, models, weak)),
        _write(out_dir / "costs.md", costs(records)),
    ]
