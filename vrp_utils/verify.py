"""Check every notebook's numbers against a committed reference: ``python -m vrp_utils.verify {check,update}``.

Why: a book whose figures silently drift is not a reproduction. Each ``results/*.json`` (what a notebook
published, its parameters, and the data behind its figures) is compared with its copy in
``results/reference/`` under the per-quantity rules of ``results/reference/tolerances.yml``, the one file
that states and justifies every tolerance. ``check`` (``make verify``) exits non-zero with a table of
quantity, reference, new value and tolerance; a quantity present on one side only fails too, and so does a
quantity no rule covers. ``update`` (``make reference``) is the only way to rewrite the reference; it prints
what changed and records the machine and library versions the reference came from
(``results/reference/provenance.json``): same bytes hold only on the same kind of machine.

A quantity is named by its file's stem and its JSON pointer (RFC 6901: ``/`` between keys and list
indices, a ``/`` inside a key written ``~1``), e.g. ``00_benchmark_and_zoo/results/zoo_accuracy/zoo-llava~1random``.
Rule patterns match that name: ``*`` is any run of characters within one segment, ``**`` any number of
whole segments (``**/`` may match none). The first matching rule wins.

``check`` also writes ``results/verify/summary.json`` (outside ``results/*.json``, so never compared itself),
which the status page shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from vrp_utils.paths import REPO_ROOT, RESULTS_DIR
from vrp_utils.provenance import provenance
from vrp_utils.results import write_json_atomic

REFERENCE_DIR = RESULTS_DIR / "reference"
TOLERANCES = REFERENCE_DIR / "tolerances.yml"
PROVENANCE = "provenance.json"
SUMMARY = RESULTS_DIR / "verify" / "summary.json"
KINDS = ("exact", "abs", "rel", "ignore")
#: Types a rule's ``types`` list may name (JSON's, with numbers split into int and float).
TYPE_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "null": type(None), "empty": (dict, list)}


class VerifyError(RuntimeError):
    """The tolerances file or a results file cannot be used as it is."""


@dataclass(frozen=True)
class Rule:
    match: str
    kind: str
    tol: float
    why: str
    types: tuple[str, ...] = ()

    @property
    def regex(self) -> re.Pattern:
        return _compile(self.match)

    def covers(self, name: str, value: Any) -> bool:
        if self.types and not any(_is_type(value, t) for t in self.types):
            return False
        return self.regex.fullmatch(name) is not None

    def describe(self) -> str:
        if self.kind == "abs":
            return f"abs {self.tol:g}"
        if self.kind == "rel":
            return f"rel {self.tol:g}"
        return self.kind


@dataclass(frozen=True)
class Mismatch:
    quantity: str
    reference: Any
    new: Any
    tolerance: str
    problem: str

    def row(self) -> tuple[str, str, str, str, str]:
        return (self.quantity, _show(self.reference), _show(self.new), self.tolerance, self.problem)


_MISSING = object()


def _is_type(value: Any, name: str) -> bool:
    if name == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "float":
        return isinstance(value, float)
    if name == "empty":
        return isinstance(value, (dict, list)) and not value
    return isinstance(value, TYPE_NAMES[name])


@lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]*/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load_rules(path: Path = TOLERANCES) -> list[Rule]:
    """Read and validate the tolerance rules (each needs ``match``, a kind, a tolerance where numeric, ``why``)."""
    if not path.is_file():
        raise VerifyError(f"tolerances file {path} is missing")
    data = yaml.safe_load(path.read_text()) or {}
    rules = []
    for i, raw in enumerate(data.get("rules", [])):
        where = f"{path.name} rule {i + 1} ({raw.get('match', '?')!r})"
        kinds = [k for k in KINDS if k in raw]
        if "match" not in raw or len(kinds) != 1:
            raise VerifyError(f"{where}: needs 'match' and exactly one of {', '.join(KINDS)}")
        if not str(raw.get("why", "")).strip():
            raise VerifyError(f"{where}: needs a 'why' justifying it")
        kind = kinds[0]
        tol = 0.0
        if kind in ("abs", "rel"):
            tol = raw[kind]
            if not isinstance(tol, (int, float)) or isinstance(tol, bool) or tol < 0:
                raise VerifyError(f"{where}: {kind} must be a non-negative number, got {tol!r}")
        types = tuple(raw.get("types", ()))
        unknown = [t for t in types if t not in TYPE_NAMES]
        if unknown:
            raise VerifyError(f"{where}: unknown types {unknown}; known: {', '.join(TYPE_NAMES)}")
        rules.append(Rule(str(raw["match"]), kind, float(tol), str(raw["why"]).strip(), types))
    if not rules:
        raise VerifyError(f"{path} has no rules")
    return rules


def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """Leaves of a JSON value by pointer; an empty dict or list is a leaf of its own."""
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}/{str(key).replace('~', '~0').replace('/', '~1')}"))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}/{index}"))
        return out
    return {prefix: value}


def results_files(directory: Path) -> dict[str, Path]:
    """The compared files of a directory: every ``*.json`` but the reference's provenance record."""
    return {p.stem: p for p in sorted(directory.glob("*.json")) if p.name != PROVENANCE and not p.name.startswith(".")}


def quantities(directory: Path) -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for stem, path in results_files(directory).items():
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise VerifyError(f"{path} is not valid JSON: {error}") from None
        leaves.update(flatten(payload, stem))
    return leaves


def rule_for(name: str, value: Any, rules: list[Rule]) -> Rule | None:
    for rule in rules:
        if rule.covers(name, value):
            return rule
    return None


def compared_absolute_paths(named: dict[str, Any], rules: list[Rule]) -> list[str]:
    """Quantities that hold an absolute path and are compared: they can only match in the same checkout."""
    return sorted(name for name, value in named.items()
                  if isinstance(value, str) and (value.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", value))
                  and (rule := rule_for(name, value, rules)) is not None and rule.kind != "ignore")


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _within(ref: Any, new: Any, rule: Rule) -> bool:
    """Exact: same type and value. abs/rel: numbers within the bound; anything else must be equal."""
    if rule.kind == "exact" or not (_numeric(ref) and _numeric(new)):
        return type(ref) is type(new) and ref == new
    if math.isnan(ref) or math.isnan(new):
        return math.isnan(ref) and math.isnan(new)
    bound = rule.tol if rule.kind == "abs" else rule.tol * abs(ref)
    return abs(new - ref) <= bound * (1 + 1e-9) + 1e-15


def compare(reference: dict[str, Any], new: dict[str, Any], rules: list[Rule]) -> tuple[list[Mismatch], dict[str, int]]:
    """Every failing quantity, and counts (compared, ignored) over the union of both sides."""
    mismatches: list[Mismatch] = []
    counts = {"compared": 0, "ignored": 0}
    for name in sorted(set(reference) | set(new)):
        ref, cur = reference.get(name, _MISSING), new.get(name, _MISSING)
        probe = ref if ref is not _MISSING else cur
        rule = rule_for(name, probe, rules)
        if rule is None:
            mismatches.append(Mismatch(name, ref, cur, "(none)", f"no rule in {TOLERANCES.name} covers it"))
            continue
        if rule.kind == "ignore":
            counts["ignored"] += 1
            continue
        counts["compared"] += 1
        if ref is _MISSING:
            mismatches.append(Mismatch(name, ref, cur, rule.describe(), "not in the reference"))
        elif cur is _MISSING:
            mismatches.append(Mismatch(name, ref, cur, rule.describe(), "missing from the new results"))
        elif cur is not _MISSING and ref is not _MISSING and rule_for(name, cur, rules) is not rule:
            mismatches.append(Mismatch(name, ref, cur, rule.describe(), "type changed"))
        elif not _within(ref, cur, rule):
            mismatches.append(Mismatch(name, ref, cur, rule.describe(), "differs" if rule.kind == "exact" else "outside tolerance"))
    return mismatches, counts


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def results_digest(directory: Path) -> dict[str, str]:
    return {stem: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for stem, p in results_files(directory).items()}


def check(results_dir: Path = RESULTS_DIR, reference_dir: Path = REFERENCE_DIR, summary: Path | None = SUMMARY,
          out=None) -> int:
    out = out or sys.stdout
    rules = load_rules(reference_dir / TOLERANCES.name)
    if not results_files(reference_dir):
        raise VerifyError(f"no reference in {reference_dir}: run `make reference` once and commit it")
    mismatches, counts = compare(quantities(reference_dir), quantities(results_dir), rules)
    ref_prov = {}
    if (reference_dir / PROVENANCE).is_file():
        ref_prov = json.loads((reference_dir / PROVENANCE).read_text())
    here = provenance()
    files = sorted(set(results_files(results_dir)) | set(results_files(reference_dir)))
    print(f"verify: {len(files)} results files ({', '.join(files)}), {counts['compared']} quantities compared, "
          f"{counts['ignored']} ignored by rule", file=out)
    differs = [f"{k} {ref_prov.get(k)} -> {here[k]}" for k in ("cpu", "cpu_capability", "machine", "python")
               if ref_prov.get(k) != here[k]]
    differs += [f"{k} {ref_prov.get('versions', {}).get(k)} -> {v}" for k, v in here["versions"].items()
                if ref_prov.get("versions", {}).get(k) != v]
    if differs:
        print(f"note: the reference came from another setup ({'; '.join(differs)}); "
              f"reference: {ref_prov.get('cpu', '?')}, here: {here['cpu']}", file=out)
    if mismatches:
        print(f"\nFAILED: {len(mismatches)} quantities differ from results/reference "
              f"(tolerances: {TOLERANCES.relative_to(REPO_ROOT) if TOLERANCES.is_relative_to(REPO_ROOT) else TOLERANCES}):\n",
              file=out)
        print(table([m.row() for m in mismatches], ("quantity", "reference", "new", "tolerance", "problem")), file=out)
        print("\nIf the change is intended, run `make reference` and commit results/reference/.", file=out)
    else:
        print("verify: OK, every quantity within its tolerance", file=out)
    if summary is not None:
        write_json_atomic(summary, {
            "passed": not mismatches, "checked_utc": here["written_utc"], "git_commit": here["git_commit"],
            "compared": counts["compared"], "ignored": counts["ignored"], "failed": len(mismatches),
            "failures": [dict(zip(("quantity", "reference", "new", "tolerance", "problem"), m.row())) for m in mismatches[:50]],
            "files": results_digest(results_dir), "reference_cpu": ref_prov.get("cpu"), "cpu": here["cpu"],
        })
    return 1 if mismatches else 0


def update(results_dir: Path = RESULTS_DIR, reference_dir: Path = REFERENCE_DIR, out=None) -> int:
    """Replace the reference with the current results; print what changed. Refuses uncovered quantities."""
    out = out or sys.stdout
    rules = load_rules(reference_dir / TOLERANCES.name)
    current = results_files(results_dir)
    if not current:
        raise VerifyError(f"no results in {results_dir}: build the notebooks first (`make notebooks baselines`)")
    new = quantities(results_dir)
    uncovered = sorted(name for name, value in new.items() if rule_for(name, value, rules) is None)
    if uncovered:
        print(f"error: {len(uncovered)} quantities have no rule in {TOLERANCES.name}; add rules first:", file=out)
        for name in uncovered[:40]:
            print(f"  {name} = {_show(new[name])}", file=out)
        if len(uncovered) > 40:
            print(f"  ... and {len(uncovered) - 40} more", file=out)
        return 1
    paths = compared_absolute_paths(new, rules)
    if paths:
        print(f"error: {len(paths)} compared quantities hold an absolute path, which differs per checkout; publish a "
              f"name or a path relative to the data directory, or ignore them in {TOLERANCES.name} with a reason:", file=out)
        for name in paths[:40]:
            print(f"  {name} = {_show(new[name])}", file=out)
        return 1
    old = quantities(reference_dir) if results_files(reference_dir) else {}
    added = sorted(set(current) - set(results_files(reference_dir)))
    removed = sorted(set(results_files(reference_dir)) - set(current))
    whole = tuple(f"{stem}/" for stem in added + removed)  # summarised per file, not per quantity
    changes = []
    for name in sorted(set(old) | set(new)):
        if name.startswith(whole):
            continue
        a, b = old.get(name, _MISSING), new.get(name, _MISSING)
        if a is _MISSING or b is _MISSING or type(a) is not type(b) or a != b:
            rule = rule_for(name, b if b is not _MISSING else a, rules)
            changes.append((name, _show(a), _show(b), rule.describe() if rule else "(none)"))
    for stale in set(results_files(reference_dir)) - set(current):
        results_files(reference_dir)[stale].unlink()
    for stem, path in current.items():
        write_json_atomic(reference_dir / path.name, json.loads(path.read_text()))
    write_json_atomic(reference_dir / PROVENANCE, provenance())
    if not old:
        print(f"reference created: {len(new)} quantities from {', '.join(current)}", file=out)
        changes = []
    for stem in added:
        if old:
            print(f"new in the reference: {stem} ({sum(k.startswith(stem + '/') for k in new)} quantities)", file=out)
    for stem in removed:
        print(f"removed from the reference: {stem} (no results/{stem}.json)", file=out)
    if changes:
        print(f"reference updated: {len(changes)} quantities changed (including ignored ones):\n", file=out)
        print(table(changes, ("quantity", "old reference", "new reference", "rule")), file=out)
    elif old and not added and not removed:
        print("reference updated: no quantity changed (provenance rewritten)", file=out)
    print(f"\nnow commit {reference_dir.relative_to(REPO_ROOT) if reference_dir.is_relative_to(REPO_ROOT) else reference_dir}/",
          file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.verify", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["check", "update"])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="directory of results/*.json (default: results/)")
    parser.add_argument("--reference", type=Path, default=REFERENCE_DIR, help="reference directory (default: results/reference/)")
    parser.add_argument("--summary", type=Path, default=None, help="where check writes its summary (default: results/verify/summary.json)")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            summary = args.summary or (SUMMARY if args.results == RESULTS_DIR else args.results / "verify" / "summary.json")
            return check(args.results, args.reference, summary)
        return update(args.results, args.reference)
    except VerifyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
