"""Build the book strictly: ``python -m vrp_utils.book {status,pages,check,build}``.

Why: a book that "builds" while notebooks failed, or with a page silently missing, is the classic
failure of executable papers. Here the build refuses a missing toc page, runs Sphinx with
warnings as errors, and checks that ``index.html`` exists (jupyter-book can exit 0 having built
nothing). The status page says what ran, with which parameters, how long it took and where; ``pages``
writes the pages generated from the results (:mod:`vrp_utils.pages`: paper vs this reproduction, the
introduction's findings, the re-run costs).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from vrp_utils.paths import REPO_ROOT, RESULTS_DIR

GENERATED_DIR = REPO_ROOT / "book" / "generated"
BUILD_HTML = REPO_ROOT / "_build" / "html"
MATHJAX_ENTRY = REPO_ROOT / "book" / "mathjax_root" / "mathjax" / "tex-chtml.js"


class BookBuildError(RuntimeError):
    """The book cannot be built as configured (missing page, failed build, no index.html)."""


def toc_files(toc_path: Path = REPO_ROOT / "_toc.yml") -> list[str]:
    """Every document named in the table of contents (root included), without suffix."""
    toc = yaml.safe_load(toc_path.read_text())
    files = [toc["root"]]

    def walk(node) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return files


#: Pages under book/generated/ that are written from the results, not executed notebooks: name -> the command.
WRITTEN_PAGES = {"status": "status", "paper_vs_reproduction": "pages"}


def check_toc(root: Path = REPO_ROOT) -> None:
    """Raise naming every toc page that has no source (a notebook that never ran, a typo)."""
    missing = []
    for name in toc_files(root / "_toc.yml"):
        stem = root / name
        if not any(stem.with_suffix(s).is_file() for s in (".md", ".ipynb", ".rst")) and not (root / name).is_file():
            hint = ""
            if name.startswith("book/generated/") and Path(name).name in WRITTEN_PAGES:
                hint = f" (written from results: run `python -m vrp_utils.book {WRITTEN_PAGES[Path(name).name]}` or `make book`)"
            elif name.startswith("book/generated/"):
                hint = f" (executed notebook: run `python -m vrp_utils.run {Path(name).name}` or `make book`)"
            missing.append(f"{name}{hint}")
    if missing:
        raise BookBuildError("pages named in _toc.yml are missing: " + "; ".join(missing))
    absent = []
    for name in toc_files(root / "_toc.yml"):
        page = (root / name).with_suffix(".md")
        if page.is_file():
            for target in INCLUDE.findall(page.read_text()):
                if not (page.parent / target.strip()).is_file():
                    absent.append(f"{target.strip()} (included by {name}.md)")
    if absent:
        raise BookBuildError("included fragments are missing: " + "; ".join(absent)
                             + " (generated from results: run `python -m vrp_utils.book pages` or `make book`)")


#: A MyST include directive's target (the pages that read generated fragments).
INCLUDE = re.compile(r"^```\{include\}\s+(\S+)", re.MULTILINE)


BENCHMARK_RESULTS = REPO_ROOT / "benchmarks" / "results"


def _cell(value) -> str:
    """Text safe inside a Markdown table cell."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _run_records(results_dir: Path) -> list[dict]:
    records = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise BookBuildError(f"results file {path} is not valid JSON: {error}") from None
        if isinstance(record, dict) and "notebook" in record and "duration_s" in record:
            records.append(record)
    return records


def _commit(record: dict) -> str:
    git = record.get("git") or {}
    if not git.get("commit"):
        return "?"
    return f"`{git['commit'][:10]}`" + (" (uncommitted changes)" if git.get("dirty") else "")


def _benchmark_lines(benchmarks_dir: Path) -> list[str]:
    rows = []
    for path in sorted(benchmarks_dir.glob("*.json")):
        try:
            payload = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        ratios = payload.get("ratios") if isinstance(payload, dict) else None
        if not isinstance(ratios, dict):
            continue
        env = payload.get("environment", {})
        where = ", ".join(f"{k} {env[k]}" for k in ("cpu", "threads", "torch") if k in env) or "?"
        for name, value in ratios.items():
            shown = f"{value:.3g}x" if isinstance(value, (int, float)) else value
            rows.append(f"| `{path.name}` | {_cell(name)} | {shown} | {_cell(where)} | {_cell(payload.get('claim', ''))} |")
    if not rows:
        return ["No benchmark in `benchmarks/results/` records ratios."]
    return [
        "Speed claims are measured as ratios within one run of a script in `benchmarks/` (see its README), "
        "so they hold across machines better than seconds do.",
        "",
        "| results file | ratio | value | measured with | claim |",
        "|---|---|---|---|---|",
        *rows,
    ]


def verify_state(summary_path: Path, results_dir: Path) -> tuple[str, dict | None]:
    """The last ``make verify`` as this build's status: ``passed`` or ``failed`` (on exactly these results),
    ``stale`` (it checked other results: they changed since) or ``not run``; with its summary (None if not run)."""
    if not summary_path.is_file():
        return "not run", None
    summary = json.loads(summary_path.read_text())
    from vrp_utils.verify import results_digest  # the digests `make verify` recorded

    if results_digest(results_dir) != summary.get("files", {}):
        return "stale", summary
    return ("passed" if summary.get("passed") else "failed"), summary


def _verify_lines(summary_path: Path, results_dir: Path, records: list[dict] | None = None) -> list[str]:
    state, summary = verify_state(summary_path, results_dir)
    finished = sorted(r["finished_utc"] for r in records or [] if r.get("finished_utc"))
    built = f" (chapters finished {finished[-1]})" if finished else ""
    how = ("`make book` and `make test` do not run it; CI (`.ci/run`) runs `make verify` after `make test`, and "
           "`make verify` rewrites this page and re-renders the book with its result.")
    if state == "not run":
        return [f"**Not run** on this build{built}: {how}"]
    from vrp_utils.verify import results_digest

    checked = f"{summary.get('checked_utc', '?')}, commit `{(summary.get('git_commit') or '?')[:10]}`"
    verdict = "**passed**" if summary.get("passed") else f"**failed** ({summary.get('failed')} quantities)"
    lines = []
    if state == "stale":
        current, seen = results_digest(results_dir), summary.get("files", {})
        changed = sorted(k for k in set(current) | set(seen) if current.get(k) != seen.get(k))
        lines += [f"**Not run on these results**{built}: the last `make verify` ({checked}) {verdict} on earlier "
                  f"results. Results changed since that check ({', '.join(changed)}): run `make verify` again. {how}", ""]
    else:
        lines += [f"The last `make verify` ({checked}) {verdict} on exactly the results this book shows{built}.", ""]
    lines += [
        f"{summary.get('compared')} quantities compared with `results/reference/` under "
        f"`results/reference/tolerances.yml`, {summary.get('ignored')} excluded by rule (run times, versions, "
        f"fingerprints). Reference CPU: {summary.get('reference_cpu') or '?'}; this CPU: {summary.get('cpu') or '?'}.",
        "",
    ]
    failures = summary.get("failures") or []
    if failures:
        lines += ["| quantity | reference | new | tolerance | problem |", "|---|---|---|---|---|"]
        lines += [f"| `{_cell(f['quantity'])}` | {_cell(f['reference'])} | {_cell(f['new'])} | {_cell(f['tolerance'])} | "
                  f"{_cell(f['problem'])} |" for f in failures[:30]]
        if len(failures) > 30 or summary.get("failed", 0) > len(failures):
            lines.append(f"\n({summary.get('failed')} in all; `make verify` prints every one.)")
    return lines


def _released_models(release_dir: Path | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """``{weights fingerprint: zoo name}`` of the released zoo, and its manifest ({} where there is none)."""
    from vrp_utils.models.loading import fingerprint_files
    from vrp_utils.models.release import ReleaseError, read_manifest
    from vrp_utils.paths import ZOO_DIR

    release_dir = release_dir or ZOO_DIR
    try:
        manifest = read_manifest(release_dir)
    except ReleaseError:
        return {}, {}
    return {fingerprint_files(release_dir / name): name for name in manifest["models"]}, manifest


def _model_lines(records: list[dict], release_dir: Path | None = None) -> list[str]:
    """Which zoo made each chapter's numbers: every model a chapter declared, matched against the release."""
    released, manifest = _released_models(release_dir)
    lines = ["## Which models made these numbers", ""]
    if manifest:
        machines = sorted({f"{m['provenance']['cpu']} ({m['provenance']['cpu_capability']} kernels)"
                           for m in manifest["models"].values()})
        lines += [f"The released zoo (`zoo/`, published {manifest['published_utc'][:10]}, trained on {', '.join(machines)}; "
                  "`python -m vrp_utils.models.release check` verifies its files) or another model, per chapter:", ""]
    rows = []
    for record in records:
        for name, fingerprint in sorted((record.get("inputs") or {}).get("models", {}).items()):
            weights = fingerprint.split("-")[0]
            source = (f"released zoo ({released[weights]})" if weights in released
                      else "**not the released zoo** (a retrain, a directory or a hub id)")
            rows.append(f"| {record['notebook']} | {_cell(name)} | `{_cell(fingerprint)}` | {source} |")
    if rows:
        lines += ["| notebook | model | weights fingerprint | source |", "|---|---|---|---|", *rows]
    else:
        lines.append("No notebook has declared the models it read yet.")
    return lines


def write_status(results_dir: Path = RESULTS_DIR, out: Path = GENERATED_DIR / "status.md",
                 benchmarks_dir: Path = BENCHMARK_RESULTS, verify_summary: Path | None = None) -> Path:
    """Write the status page from ``results/*.json``: what ran, how long, from which commit and inputs,
    with which settings and versions; the benchmarks' ratios; the last ``make verify`` result."""
    records = _run_records(results_dir)
    if verify_summary is None:
        verify_summary = results_dir / "verify" / "summary.json"
    state, summary = verify_state(verify_summary, results_dir)
    verdict = {"not run": "**not run**", "stale": "**not run on these results**"}.get(state, f"**{state}**")
    if summary is not None:
        verdict += f", last check {summary.get('checked_utc', '?')}"
    declared = [r["notebook"] for r in records if any((r.get("inputs") or {}).values())]
    lines = [
        "# Build status",
        "",
        "Every chapter of this book is a notebook executed by `python -m vrp_utils.run` (papermill) "
        "before the book was rendered; this page is generated from the runner's records in `results/`, "
        "by `make book` (`python -m vrp_utils.book status`) and again by `make verify`.",
        "",
        f"**This build:** {len(records)} chapters run"
        + (f", the last finished {max(r['finished_utc'] for r in records)}" if records else "")
        + f"; {len(declared)} of {len(records)} declare the inputs they read; `make verify`: {verdict} "
        "(see {ref}`make-verify` below).",
        "",
        "| notebook | finished (UTC) | run time (s) | parameters overridden | git commit |",
        "|---|---|---|---|---|",
    ]
    for record in records:
        overridden = ", ".join(f"`{k}={record['parameters'][k]!r}`" for k in record.get("overridden", [])) or "none (defaults)"
        lines.append(f"| {record['notebook']} | {record['finished_utc']} | {record['duration_s']} | {_cell(overridden)} | "
                     f"{_commit(record)} |")
    if not records:
        lines.append("| (no notebook has run yet) | | | | |")
    setups: dict[str, list[str]] = {}
    for record in records:
        versions, host = record.get("versions", {}), record.get("host", {})
        setup = (f"{host.get('machine', '?')}, {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')}, "
                 f"torch {versions.get('torch', '?')}, transformers {versions.get('transformers', '?')}")
        setups.setdefault(setup, []).append(record["notebook"])
    if setups:
        lines += ["", "Machines and versions: " + "; ".join(f"{', '.join(names)} on {setup}" for setup, names in setups.items())
                  + "."]
    lines += ["", *_model_lines(records)]
    lines += ["", "## Each run: parameters, inputs, versions", ""]
    for record in records:
        lines.append(f"### {record['notebook']}")
        lines.append("")
        lines.append(f"Source `{record['source']}`, commit {_commit(record)}, run time {record['duration_s']} s.")
        lines.append("")
        lines.append("Parameters:")
        lines.append("")
        lines.append("```")
        lines += [f"{k} = {v!r}" for k, v in sorted(record["parameters"].items())]
        lines.append("```")
        lines.append("")
        inputs = record.get("inputs") or {}
        if any(inputs.values()):
            lines.append("Inputs it read (fingerprints):")
            lines.append("")
            lines += ["| kind | input | fingerprint |", "|---|---|---|"]
            for kind in sorted(inputs):
                lines += [f"| {kind} | {_cell(name)} | `{_cell(fp)}` |" for name, fp in sorted(inputs[kind].items())]
        else:
            lines.append("Inputs it read: not declared by this notebook (`vrp_utils.results.publish_inputs`).")
        lines.append("")
        versions = record.get("versions") or {}
        if versions:
            lines.append("Package versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
            lines.append("")
    lines += ["## Benchmarks", "", *_benchmark_lines(benchmarks_dir), "", "(make-verify)=", "## `make verify`", "",
              *_verify_lines(verify_summary, results_dir, records), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return out


def build(root: Path = REPO_ROOT) -> Path:
    """Render the book with warnings as errors; return the path of index.html."""
    if not MATHJAX_ENTRY.is_file():
        raise BookBuildError(f"vendored MathJax missing at {MATHJAX_ENTRY}: run `make mathjax`")
    check_toc(root)
    command = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(root), "--warningiserror", "--keep-going", "--quiet"]
    # Sphinx copies _static/ only when some page is out of date: a changed stylesheet alone needs every page rebuilt.
    built_static = root / "_build" / "html" / "_static"
    if any(not (built_static / css.name).is_file() or css.read_bytes() != (built_static / css.name).read_bytes()
           for css in (root / "_static").glob("*.css")):
        command.append("--all")
    completed = subprocess.run(command, cwd=root)
    if completed.returncode != 0:
        raise BookBuildError(f"jupyter-book build failed (exit {completed.returncode}); see the warnings above")
    index = root / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BookBuildError(f"jupyter-book exited 0 but {index} does not exist")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.book", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "pages", "check", "build"])
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            print(write_status())
        elif args.command == "pages":
            from vrp_utils.pages import ClaimsError, write_pages

            try:
                for path in write_pages():
                    print(path)
            except ClaimsError as error:
                raise BookBuildError(str(error)) from None
        elif args.command == "check":
            check_toc()
        else:
            print(f"book built: {build()}")
    except BookBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
