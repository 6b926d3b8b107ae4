"""Pages generated from ``results/*.json`` at build time: paper vs this reproduction, the introduction's
findings, and the re-run costs (``python -m vrp_utils.book pages``).

Why: a number typed into prose goes stale the moment a notebook re-runs. Every number on these pages is
read from the results files the notebooks published; a chapter whose results file is absent shows
"not built", never a number. The claims are data (``book/claims.yml``: the paper's number, CI and
source, where ours lives in the results and how to read it, and the kind of claim with its margin or
bound, declared before any of our numbers was read), so the verdict code below is generic and tested
(``tests/test_pages.py``).

Verdict rules, per cell (one model, or the pooled estimate), on our 95% CI [lo, hi]:

- ``no effect`` (null n0, margin m): **holds** when the whole CI lies inside [n0 - m, n0 + m];
  **differs** when it lies wholly outside; **inconclusive** otherwise.
- ``effect`` (null n0, sign s, optional margin m): **holds** when the CI excludes n0 on the side of s;
  **differs** when it excludes n0 on the other side, or lies wholly inside [n0 - m, n0 + m] (no effect
  as large as the margin); **inconclusive** otherwise.
- ``at least`` / ``at most`` (bound b): **holds** when the whole CI lies on the claimed side of b;
  **differs** when it lies wholly on the other side; **inconclusive** otherwise.
- ``qualitative``: no verdict.

A row's verdict is its declared cell's (``verdict_on: pooled`` or a model name), or over the models
(``verdict_on: models``, ``need`` of them, default all): **holds** when at least ``need`` models hold,
**differs** when so many differ that ``need`` cannot be reached, **inconclusive** otherwise.
"""

from __future__ import annotations

import json
import math
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


class ClaimsError(ValueError):
    """``book/claims.yml`` is malformed, or one of its selectors matches several results rows."""


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def cell_verdict(claim: dict, value: float | None, ci_low: float | None, ci_high: float | None) -> str:
    """The verdict of one estimate (value and 95% CI, in the claim's displayed units) under the claim's kind."""
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


def row_verdict(claim: dict, cells: dict[str, "Cell"], built: bool) -> str:
    """The verdict of a claim's row from its cells (see the module docstring)."""
    if claim["kind"] == "qualitative":
        return NO_VERDICT
    if not built:
        return NOT_BUILT
    on = claim.get("verdict_on", POOLED)
    if on != "models":
        cell = cells.get(on)
        return NOT_IN_RUN if cell is None else cell.verdict
    verdicts = [c.verdict for name, c in cells.items() if name != POOLED]
    if not verdicts:
        return NOT_IN_RUN
    need = int(claim.get("need", len(verdicts)))
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
    """Our estimate for one model (or pooled), in the claim's displayed units."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int | None
    verdict: str
    undefined: str | None = None
    extra: dict = field(default_factory=dict)


def load_claims(path: Path = CLAIMS_FILE) -> dict:
    """Read and check ``claims.yml``: every claim has an id, text, paper side, a known kind and its parameters."""
    data = yaml.safe_load(path.read_text())
    claims = data.get("claims") if isinstance(data, dict) else None
    if not isinstance(claims, list) or not claims:
        raise ClaimsError(f"{path}: expected a mapping with a non-empty 'claims' list")
    for claim in claims:
        name = claim.get("id", "?")
        for key in ("id", "claim", "paper", "kind", "differs"):
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


def read_cells(claim: dict, results: dict, models: list[str]) -> dict[str, Cell]:
    """Our cells for ``claim`` from one notebook's ``results`` dict: one per model that has a matching row,
    and ``pooled`` where the claim names a pooled selector. Several matching rows for one cell: an error."""
    ours = claim["ours"]
    rows = results.get(ours["key"])
    if not isinstance(rows, list):
        return {}
    rows = [r for r in rows if isinstance(r, dict) and _matches(r, ours.get("where", {}))]
    scale = float(ours.get("scale", 1))
    cells: dict[str, Cell] = {}
    targets = [(m, {"model": m, **ours.get("per_model", {})}) for m in models]
    if ours.get("pooled") is not None:
        targets.append((POOLED, {"model": POOLED, **ours["pooled"]}))
    for name, where in targets:
        picked = _pick([r for r in rows if _matches(r, where)], ours, results, name)
        if not picked:
            continue
        if len(picked) > 1:
            raise ClaimsError(f"claim {claim['id']}: {len(picked)} rows of {ours['notebook']}/{ours['key']} match {name} "
                              f"({ours.get('where', {})} {where}); make the selector in book/claims.yml unique")
        row = picked[0]
        est = row.get(ours["field"]) if "field" in ours else row
        est = est if isinstance(est, dict) else {}
        value, lo, hi = (est.get(k) for k in ("value", "ci_low", "ci_high"))
        value, lo, hi = (v * scale if _finite(v) else None for v in (value, lo, hi))
        if scale < 0 and lo is not None and hi is not None:
            lo, hi = hi, lo
        cells[name] = Cell(value, lo, hi, est.get("n"), cell_verdict(claim, value, lo, hi), est.get("undefined"))
    return cells


@dataclass
class Row:
    claim: dict
    built: bool
    cells: dict[str, Cell]
    verdict: str
    run: dict | None = None


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
        out.append(Row(claim, built, cells, row_verdict(claim, cells, built), record))
    return out


def _models_in(record: dict) -> list[str]:
    return [m for m in (record.get("results", {}).get("parameters", {}).get("models") or []) if m != POOLED]


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _num(x: float | None, digits: int) -> str:
    return "?" if x is None else f"{x:.{digits}f}".replace("-", "\u2212")


def format_cell(cell: Cell | None, claim: dict, built: bool, with_verdict: bool = True) -> str:
    if not built:
        return NOT_BUILT
    if cell is None:
        return "\u2014"
    if cell.value is None:
        return f"{UNDEFINED}" + (f" ({cell.undefined})" if cell.undefined else "") + (f", n = {cell.n}" if cell.n else "")
    digits = int(claim["ours"].get("digits", 3))
    text = f"{_num(cell.value, digits)} [{_num(cell.ci_low, digits)}, {_num(cell.ci_high, digits)}]"
    if cell.n is not None:
        text += f", n = {cell.n:,}"
    return text + (f"; *{cell.verdict}*" if with_verdict else "")


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


def _verdict_scope(claim: dict) -> str:
    on = claim.get("verdict_on", POOLED)
    if on == "models":
        need = claim.get("need")
        return "each model" if need is None else f"{need} of the models"
    return on


def paper_vs_reproduction(rows: list[Row], models: list[str]) -> str:
    """The page: the verdict rule, the declared margins and bounds, then the table (one row per claim)."""
    lines = [
        "# Paper vs this reproduction",
        "",
        "Each row is a headline claim of the paper (`PAPER.md` in the project's shared notes; sources: **[A]** the "
        "abstract, **[R]** the released code's README and configs, **[S]** a third-party summary) beside what this "
        "build measured on the zoo models, per model and pooled: value, 95% CI (cluster bootstrap over images) and n. "
        "Our numbers are read from `results/*.json` when the book is built (`python -m vrp_utils.book pages`); a "
        "chapter whose results are absent says **not built**, and a cell with no matching result in the run says "
        "\u2014. The claims, with where each of our numbers comes from, are data: `book/claims.yml`.",
        "",
        "## The verdict rule (declared before the numbers)",
        "",
        "For each cell, on our 95% CI:",
        "",
        "- **a claim of no effect** (the paper's CI straddles zero) needs an equivalence margin: it **holds** when our "
        "whole CI lies inside \u00b1margin, **differs** when it lies wholly outside, and is **inconclusive** otherwise;",
        "- **a claim of an effect** **holds** when our CI excludes zero (or chance, 0.5 for an AUROC) with the paper's "
        "sign, **differs** when it excludes it with the other sign, or lies wholly inside a declared margin (no "
        "effect that large), and is **inconclusive** otherwise;",
        "- **a bound** (\"at least\", \"at most\") **holds** when the whole CI lies on the claimed side, **differs** "
        "when it lies wholly on the other, and is **inconclusive** otherwise;",
        "- a qualitative claim gets no verdict; a number without a CI is inconclusive.",
        "",
        "The row's verdict is the cell it is declared on (the pooled estimate for the paper's pooled numbers, one model "
        "for a claim about one family) or, for a claim about the families, the count over the models: **holds** when "
        "at least the claimed number of models hold, **differs** when so many differ that this number cannot be "
        "reached, **inconclusive** otherwise.",
        "",
        "| claim | kind and margin | verdict on |",
        "|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| {_cell(row.claim['id'])} | {_cell(_rule(row.claim))} | {_cell(_verdict_scope(row.claim))} |")
    lines += [
        "",
        "## The table",
        "",
        "| # | claim | paper | " + " | ".join(f"ours: {m}" for m in models) + " | ours: pooled | where ours comes from "
        "| what differs | verdict |",
        "|---|---|---|" + "---|" * len(models) + "---|---|---|---|",
    ]
    for row in rows:
        claim = row.claim
        if claim["kind"] == "qualitative":
            cells = [_cell(claim.get("ours_text", "not tested"))] * (len(models) + 1)
            source = "\u2014"
        else:
            cells = [format_cell(row.cells.get(m), claim, row.built) for m in models]
            if claim["ours"].get("pooled") is None:
                cells.append("not computed" if row.built else NOT_BUILT)
            else:
                cells.append(format_cell(row.cells.get(POOLED), claim, row.built))
            ours = claim["ours"]
            source = f"`{ours['notebook']}`: {ours.get('description', ours['key'])}"
        lines.append(f"| {_cell(claim['id'])} | {_cell(claim['claim'])} | {_cell(_paper(claim))} | "
                     + " | ".join(_cell(c) for c in cells)
                     + f" | {_cell(source)} | {_cell(claim['differs'])} | **{row.verdict}** |")
    lines += ["", "Runs these numbers come from:", ""]
    runs = {row.claim["ours"]["notebook"]: row.run for row in rows if row.claim["kind"] != "qualitative"}
    for notebook, run in runs.items():
        if run is None:
            lines.append(f"- `{notebook}`: not built (run `python -m vrp_utils.run {notebook}` or `make book`).")
        else:
            commit = ((run.get("git") or {}).get("commit") or "?")[:10]
            lines.append(f"- `{notebook}`: finished {run.get('finished_utc', '?')}, commit `{commit}`, "
                         f"{run.get('duration_s', '?')} s; parameters overridden: "
                         f"{', '.join(run.get('overridden') or []) or 'none (defaults)'}.")
    return "\n".join(lines) + "\n"


def findings(rows: list[Row], models: list[str]) -> str:
    """The introduction's findings: each claim marked ``finding`` in claims.yml, as this build measured it."""
    by_finding: dict[int, list[Row]] = {}
    for row in rows:
        if row.claim.get("finding") is not None:
            by_finding.setdefault(int(row.claim["finding"]), []).append(row)
    lines = []
    for number in sorted(by_finding):
        parts = []
        for row in by_finding[number]:
            claim = row.claim
            if not row.built:
                ours = f"nothing yet: chapter `{claim['ours']['notebook']}` is **not built**"
            else:
                shown = [(POOLED, row.cells.get(POOLED))] if claim["ours"].get("pooled") is not None and POOLED in row.cells else []
                shown += [(m, row.cells.get(m)) for m in models if m in row.cells]
                ours = "; ".join(f"{name} {format_cell(cell, claim, True, with_verdict=False)}" for name, cell in shown) \
                    or "no matching result in this run"
            parts.append(f"{claim['finding_text']}: the paper reports {_paper(claim)}; this build measured {ours} "
                         f"(verdict: **{row.verdict}**).")
        lines.append(f"{number}. " + " ".join(parts))
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
    models = claims["models"] or sorted({m for r in rows for m in r.cells if m != POOLED})
    for row in rows:
        if row.built and not row.cells:
            print(f"warning: claim {row.claim['id']}: {row.claim['ours']['notebook']} is built but no result matches "
                  f"its selector in {claims_file.name}", file=sys.stderr)
    return [
        _write(out_dir / "paper_vs_reproduction.md", paper_vs_reproduction(rows, models)),
        _write(out_dir / "findings.md", findings(rows, models)),
        _write(out_dir / "costs.md", costs(records)),
    ]
