"""Build the book strictly: ``python -m vrp_utils.book {status,check,build}``.

Why: a book that "builds" while notebooks failed, or with a page silently missing, is the classic
failure of executable papers. Here the build refuses a missing toc page, runs Sphinx with
warnings as errors, and checks that ``index.html`` exists (jupyter-book can exit 0 having built
nothing). The status page says what ran, with which parameters, how long it took and where.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

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


def check_toc(root: Path = REPO_ROOT) -> None:
    """Raise naming every toc page that has no source (a notebook that never ran, a typo)."""
    missing = []
    for name in toc_files(root / "_toc.yml"):
        stem = root / name
        if not any(stem.with_suffix(s).is_file() for s in (".md", ".ipynb", ".rst")) and not (root / name).is_file():
            hint = ""
            if name.startswith("book/generated/"):
                hint = f" (executed notebook: run `python -m vrp_utils.run {Path(name).name}` or `make book`)"
            missing.append(f"{name}{hint}")
    if missing:
        raise BookBuildError("pages named in _toc.yml are missing: " + "; ".join(missing))


def write_status(results_dir: Path = RESULTS_DIR, out: Path = GENERATED_DIR / "status.md") -> Path:
    """Write the status page from ``results/*.json``: what ran, how long, where, with which settings."""
    records = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise BookBuildError(f"results file {path} is not valid JSON: {error}") from None
        if "notebook" in record and "duration_s" in record:
            records.append(record)
    lines = [
        "# Build status",
        "",
        "Every chapter of this book is a notebook executed by `python -m vrp_utils.run` (papermill) "
        "before the book was rendered; this page is generated from the runner's records in `results/`.",
        "",
        "| notebook | finished (UTC) | run time (s) | parameters overridden | machine | torch | transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        versions = record.get("versions", {})
        host = record.get("host", {})
        overridden = ", ".join(f"`{k}={record['parameters'][k]!r}`" for k in record.get("overridden", [])) or "none (defaults)"
        lines.append(
            f"| {record['notebook']} | {record['finished_utc']} | {record['duration_s']} | {overridden} | "
            f"{host.get('machine', '?')}, {host.get('cpus', '?')} CPUs, Python {host.get('python', '?')} | "
            f"{versions.get('torch', '?')} | {versions.get('transformers', '?')} |"
        )
    if not records:
        lines.append("| (no notebook has run yet) | | | | | | |")
    lines += ["", "## Parameters of each run", ""]
    for record in records:
        lines.append(f"**{record['notebook']}** (`{record['source']}`)")
        lines.append("")
        lines.append("```")
        lines += [f"{k} = {v!r}" for k, v in sorted(record["parameters"].items())]
        lines.append("```")
        lines.append("")
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
    completed = subprocess.run(command, cwd=root)
    if completed.returncode != 0:
        raise BookBuildError(f"jupyter-book build failed (exit {completed.returncode}); see the warnings above")
    index = root / "_build" / "html" / "index.html"
    if not index.is_file():
        raise BookBuildError(f"jupyter-book exited 0 but {index} does not exist")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.book", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["status", "check", "build"])
    args = parser.parse_args(argv)
    try:
        if args.command == "status":
            print(write_status())
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
