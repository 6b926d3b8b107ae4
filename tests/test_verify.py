"""`make verify`: results compared with the committed reference under the rules of tolerances.yml."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vrp_utils import verify
from vrp_utils.paths import REPO_ROOT

RECORD = {
    "notebook": "01_attention", "source": "notebooks/01_attention.md", "parameters": {"n_boot": 200, "seed": 0},
    "overridden": [], "duration_s": 12.5, "finished_utc": "2026-01-01T00:00:00Z",
    "host": {"machine": "x86_64", "cpus": 2, "python": "3.11.7"}, "versions": {"torch": "2.13.0"},
    "git": {"commit": "abc", "dirty": False}, "inputs": {"models": {"zoo-llava": "0123"}},
    "results": {
        "zoo_accuracy": {"zoo-llava/random": 0.8, "zoo-llava/popular": 0.75},
        "benchmark_questions": {"random": 1080},
        "seconds": 3.2,
    },
}
RULES = """
rules:
  - {match: "*/duration_s", ignore: true, why: wall time}
  - {match: "*/finished_utc", ignore: true, why: when}
  - {match: "*/host/**", ignore: true, why: machine}
  - {match: "*/versions/**", ignore: true, why: pins}
  - {match: "*/git/**", ignore: true, why: commit}
  - {match: "*/inputs/**", ignore: true, why: fingerprints}
  - {match: "*/results/**/seconds*", ignore: true, why: run time}
  - {match: "*/results/zoo_accuracy/*", abs: 0.01, why: 11 of 1080 answers}
  - {match: "**", types: [int, str, bool, "null", empty], exact: true, why: counts and names}
"""


@pytest.fixture
def dirs(tmp_path):
    results, reference = tmp_path / "results", tmp_path / "reference"
    results.mkdir()
    reference.mkdir()
    (reference / "tolerances.yml").write_text(RULES)
    for where in (results, reference):
        (where / "01_attention.json").write_text(json.dumps(RECORD))
    return results, reference


def _edit(path: Path, change) -> None:
    payload = json.loads(path.read_text())
    change(payload)
    path.write_text(json.dumps(payload))


def _check(results: Path, reference: Path) -> tuple[int, str, dict]:
    """``verify check`` in-process (the CLI itself is run once, below)."""
    summary = results / "verify" / "summary.json"
    out = io.StringIO()
    code = verify.check(results, reference, summary, out=out)
    return code, out.getvalue(), json.loads(summary.read_text()) if summary.is_file() else {}


def test_cli_exits_nonzero_naming_the_quantity(dirs):
    results, reference = dirs
    _edit(reference / "01_attention.json", lambda p: p["results"]["benchmark_questions"].update({"random": 1000}))
    done = subprocess.run(
        [sys.executable, "-m", "vrp_utils.verify", "check", "--results", str(results), "--reference", str(reference)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=os.environ | {"PYTHONPATH": str(REPO_ROOT)}, timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "01_attention/results/benchmark_questions/random" in done.stdout and "1000" in done.stdout
    assert (results / "verify" / "summary.json").is_file()


def test_identical_results_pass_and_summary_is_written(dirs):
    code, out, summary = _check(*dirs)
    assert code == 0, out
    assert "OK" in out
    assert summary["passed"] is True and summary["failed"] == 0 and summary["compared"] == 8 and summary["ignored"] == 10


def test_within_tolerance_passes_and_ignored_quantities_may_change(dirs):
    results, reference = dirs

    def change(payload):
        payload["results"]["zoo_accuracy"]["zoo-llava/random"] = 0.809  # 0.009 < 0.01
        payload["duration_s"] = 99.0
        payload["versions"]["torch"] = "9.9"
        payload["results"]["seconds"] = 100.0

    _edit(results / "01_attention.json", change)
    code, out, _ = _check(results, reference)
    assert code == 0, out


def test_reference_number_edited_beyond_tolerance_fails_naming_it(dirs):
    results, reference = dirs
    _edit(reference / "01_attention.json", lambda p: p["results"]["zoo_accuracy"].update({"zoo-llava/random": 0.78}))
    code, out, summary = _check(results, reference)
    assert code == 1, out
    row = next(line for line in out.splitlines() if "zoo-llava~1random" in line)
    assert "01_attention/results/zoo_accuracy/zoo-llava~1random" in row
    assert "0.78" in row and "0.8" in row and "abs 0.01" in row and "outside tolerance" in row
    assert "zoo-llava~1popular" not in out  # only the edited quantity is named
    assert summary["passed"] is False and summary["failures"][0]["quantity"].endswith("zoo-llava~1random")


def test_exact_quantities_and_parameters_fail_on_any_change(dirs):
    results, reference = dirs
    _edit(results / "01_attention.json", lambda p: p["parameters"].update({"n_boot": 201}))
    code, out, _ = _check(results, reference)
    assert code == 1 and "01_attention/parameters/n_boot" in out and "exact" in out


def test_quantity_missing_from_new_results_fails(dirs):
    results, reference = dirs
    _edit(results / "01_attention.json", lambda p: p["results"]["zoo_accuracy"].pop("zoo-llava/popular"))
    code, out, _ = _check(results, reference)
    assert code == 1 and "zoo-llava~1popular" in out and "missing from the new results" in out


def test_extra_quantity_not_in_reference_fails(dirs):
    results, reference = dirs
    _edit(results / "01_attention.json", lambda p: p["results"]["benchmark_questions"].update({"popular": 1080}))
    code, out, _ = _check(results, reference)
    assert code == 1 and "01_attention/results/benchmark_questions/popular" in out and "not in the reference" in out


def test_whole_results_file_on_one_side_fails(dirs):
    results, reference = dirs
    shutil.copy(results / "01_attention.json", results / "02_masking.json")
    code, out, _ = _check(results, reference)
    assert code == 1 and "02_masking/results/zoo_accuracy" in out


def test_quantity_without_a_rule_fails_and_update_refuses_it(dirs):
    results, reference = dirs
    _edit(results / "01_attention.json", lambda p: p["results"].update({"new_statistic": 0.5}))
    code, out, _ = _check(results, reference)
    assert code == 1 and "01_attention/results/new_statistic" in out and "no rule" in out
    assert verify.update(results, reference, out=open(os.devnull, "w")) == 1
    assert "new_statistic" not in (reference / "01_attention.json").read_text()


def test_update_refuses_a_compared_absolute_path(dirs, tmp_path):
    """A checkout's absolute path in a compared quantity would fail every other clone's `make verify` (CI did)."""
    results, reference = dirs
    store = str(tmp_path / "data" / "features" / "abc__def")
    _edit(results / "01_attention.json", lambda p: p["results"].update({"sample_store": store}))
    out = io.StringIO()
    assert verify.update(results, reference, out=out) == 1
    assert "01_attention/results/sample_store" in out.getvalue() and "absolute path" in out.getvalue()
    assert store not in (reference / "01_attention.json").read_text()
    _edit(results / "01_attention.json", lambda p: p["results"].update({"sample_store": "abc__def"}))
    assert verify.update(results, reference, out=io.StringIO()) == 0


def test_update_records_provenance_and_says_what_changed(dirs, capsys):
    results, reference = dirs
    _edit(results / "01_attention.json", lambda p: p["results"]["zoo_accuracy"].update({"zoo-llava/random": 0.9}))
    assert verify.update(results, reference) == 0
    out = capsys.readouterr().out
    assert "01_attention/results/zoo_accuracy/zoo-llava~1random" in out and "0.8" in out and "0.9" in out
    assert "zoo-llava~1popular" not in out
    provenance = json.loads((reference / "provenance.json").read_text())
    assert provenance["cpu"] and provenance["python"] and "torch" in provenance["versions"]
    assert _check(results, reference)[0] == 0


def test_summary_and_provenance_are_not_compared(dirs):
    results, reference = dirs
    assert _check(results, reference)[0] == 0
    verify.update(results, reference, out=open(os.devnull, "w"))
    assert (results / "verify" / "summary.json").is_file() and (reference / "provenance.json").is_file()
    assert set(verify.results_files(reference)) == {"01_attention"}


def test_patterns():
    assert verify._compile("*/duration_s").fullmatch("00/duration_s")
    assert not verify._compile("*/duration_s").fullmatch("00/results/duration_s")
    assert verify._compile("*/results/**/seconds*").fullmatch("00/results/seconds")
    assert verify._compile("*/results/**/seconds*").fullmatch("00/results/a/b/seconds_total")
    assert verify.flatten({"a/b": [1, {"c": []}]}, "x") == {"x/a~1b/0": 1, "x/a~1b/1/c": []}


def test_rules_need_a_reason_and_one_kind(tmp_path):
    (tmp_path / "tolerances.yml").write_text("rules:\n  - {match: '**', abs: 0.1}\n")
    with pytest.raises(verify.VerifyError, match="why"):
        verify.load_rules(tmp_path / "tolerances.yml")
    (tmp_path / "tolerances.yml").write_text("rules:\n  - {match: '**', abs: 0.1, exact: true, why: x}\n")
    with pytest.raises(verify.VerifyError, match="exactly one"):
        verify.load_rules(tmp_path / "tolerances.yml")


def test_committed_reference_is_complete_and_covered():
    """The committed reference: tolerances parse, provenance is recorded, and every quantity has a rule."""
    rules = verify.load_rules()
    provenance = json.loads((verify.REFERENCE_DIR / "provenance.json").read_text())
    assert {"cpu", "platform", "python", "versions"} <= set(provenance)
    stored = verify.quantities(verify.REFERENCE_DIR)
    assert stored, "results/reference/ holds no results: run `make reference`"
    uncovered = [name for name, value in stored.items() if verify.rule_for(name, value, rules) is None]
    assert not uncovered, uncovered
    assert not verify.compared_absolute_paths(stored, rules), "a compared quantity names a checkout's path"
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/reference/provenance.json"], cwd=REPO_ROOT)
    assert ignored.returncode == 1, "results/reference/ must not be git-ignored"
    assert yaml.safe_load((verify.TOLERANCES).read_text())["rules"]



def test_update_summarises_a_new_or_removed_results_file(dirs, capsys):
    results, reference = dirs
    shutil.copy(results / "01_attention.json", results / "02_masking.json")
    assert verify.update(results, reference) == 0
    out = capsys.readouterr().out
    assert "new in the reference: 02_masking (" in out and "02_masking/results" not in out
    (results / "02_masking.json").unlink()
    assert verify.update(results, reference) == 0
    assert "removed from the reference: 02_masking" in capsys.readouterr().out
    assert not (reference / "02_masking.json").exists()


def test_a_changed_default_shows_on_the_status_page_and_fails_verify_until_reference(tmp_path):
    """The promise of issue 15, end to end on a tiny real notebook and the committed tolerance rules: change one
    parameter default and re-run; the status page shows the new default, `make verify` (``check``) fails naming
    the parameter and the number it moved, the status page then shows that failure, and only `make reference`
    (``update``) makes verify pass again."""
    from vrp_utils import book, run

    results, reference, generated = tmp_path / "results", tmp_path / "reference", tmp_path / "generated"
    reference.mkdir()
    # The committed rules, and one for the two fields that hold this temporary checkout's absolute paths (in the
    # book they are relative to the repository: notebooks/..., book/generated/...).
    rules = yaml.safe_load(verify.TOLERANCES.read_text())
    rules["rules"][:0] = [{"match": f"demo_chapter/{key}", "ignore": True, "why": "a tmp path"} for key in ("source", "executed_notebook")]
    (reference / "tolerances.yml").write_text(yaml.safe_dump(rules))
    header = ("---\njupytext:\n  text_representation: {extension: .md, format_name: myst, format_version: 0.13}\n"
              "kernelspec: {name: python3, display_name: Python 3, language: python}\n---\n\n")
    notebook = tmp_path / "demo_chapter.md"

    def run_with_default(n: int) -> None:
        notebook.write_text(header + f"```{{code-cell}}\n:tags: [parameters]\n\nn = {n}  # an analysis parameter\n```\n\n"
                            "```{code-cell}\nfrom vrp_utils.results import publish\npublish({'total': sum(range(n))})\n```\n")
        run.execute(notebook, {}, output_dir=generated, results_dir=results, progress=False)

    def status() -> str:
        return book.write_status(results, tmp_path / "status.md", benchmarks_dir=tmp_path / "none",
                                 verify_summary=results / "verify" / "summary.json").read_text()

    def check() -> tuple[int, str]:
        out = io.StringIO()
        return verify.check(results, reference, summary=results / "verify" / "summary.json", out=out), out.getvalue()

    run_with_default(4)
    assert verify.update(results, reference, out=io.StringIO()) == 0
    assert check()[0] == 0
    assert "n = 4" in status() and "**passed**" in status()

    run_with_default(5)  # the changed default, re-run as `make` re-runs a changed notebook
    page = status()
    assert "n = 5" in page and "n = 4" not in page
    assert "| demo_chapter |" in page and "none (defaults)" in page  # a default run, not an override
    assert "Results changed since that check (demo_chapter)" in page  # the earlier pass no longer vouches for it
    code, out = check()
    assert code == 1
    assert re.search(r"demo_chapter/parameters/n\s+4\s+5\s+exact", out), out
    assert re.search(r"demo_chapter/results/total\s+6\s+10\s+exact", out), out
    page = status()
    assert "**failed** (2 quantities)" in page and "| `demo_chapter/parameters/n` | 4 | 5 | exact |" in page
    assert check()[0] == 1  # still failing: nothing but `make reference` changes the reference

    assert verify.update(results, reference, out=io.StringIO()) == 0
    assert check()[0] == 0
    assert "**passed**" in status() and "n = 5" in status()
