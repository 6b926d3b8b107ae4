"""Execute one jupytext notebook with papermill: ``python -m vrp_utils.run NOTEBOOK [-p NAME VALUE]...``.

Why a runner of our own: papermill cannot read jupytext text notebooks, only *warns* on unknown
parameters, and passes strings through unchecked. This runner reads the text notebook with
jupytext, refuses unknown names and ill-typed values (listing the valid ones), executes with a
progress bar, and writes the executed notebook and ``results/<notebook>.json`` atomically, so the
book never reads half a run. A cell that raises gives a non-zero exit naming notebook and cell.

Default-parameter runs write where the book reads them (``book/generated/``, ``results/``);
runs with ``-p`` go to ``runs/`` unless ``--into-book`` is given, so a what-if run never
replaces a chapter of the published book by accident.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vrp_utils.paths import BOOK_DIR, NOTEBOOKS_DIR, REPO_ROOT, RESULTS_DIR
from vrp_utils.results import collect, collect_inputs, strip_bookkeeping, write_json_atomic

GENERATED_DIR = BOOK_DIR / "generated"
RUNS_DIR = REPO_ROOT / "runs"
KERNEL_NAME = "python3"


class NotebookParameterError(ValueError):
    """A parameter name or value that the notebook does not accept."""


class NotebookExecutionError(RuntimeError):
    """A notebook cell raised; the message names the notebook and the cell."""


@dataclass(frozen=True)
class NotebookParameter:
    name: str
    default: Any
    type_name: str
    help: str


def resolve_notebook(spec: str | Path) -> Path:
    """Accept a path (``notebooks/01_attention.md``) or a bare name (``01_attention``)."""
    path = Path(spec)
    candidates = [path, NOTEBOOKS_DIR / path, NOTEBOOKS_DIR / f"{path}.md"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    available = sorted(p.stem for p in NOTEBOOKS_DIR.glob("*.md"))
    raise FileNotFoundError(f"notebook {str(spec)!r} not found; available notebooks: {', '.join(available) or '(none)'}")


def read_notebook(path: Path):
    """Read a jupytext text notebook (or an .ipynb) into an nbformat node."""
    import jupytext

    notebook = jupytext.read(path)
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    return notebook


def notebook_parameters(notebook) -> dict[str, NotebookParameter]:
    """The parameters papermill infers from the cell tagged ``parameters``, with parsed defaults."""
    import nbformat
    import papermill as pm

    with tempfile.TemporaryDirectory() as tmp:
        ipynb = Path(tmp) / "inspect.ipynb"
        nbformat.write(notebook, ipynb)
        inferred = pm.inspect_notebook(str(ipynb))
    params = {}
    for name, info in inferred.items():
        try:
            default = ast.literal_eval(info["default"])
        except (ValueError, SyntaxError):
            default = info["default"]
        params[name] = NotebookParameter(name, default, info["inferred_type_name"], info.get("help", ""))
    return params


#: Declared types (``name: str = None`` in a parameters cell, as papermill reads them) of a parameter whose default is
#: None but whose value is text, e.g. a file name: a command-line value is taken as it is, not read as a literal.
TEXT_TYPES = ("str", "Optional[str]")


def _type_label(param: NotebookParameter) -> str:
    """The parameter's type as a reader should see it: the default's, or the declared one where the default is None."""
    if param.default is None and param.type_name in TEXT_TYPES:
        return "str or None"
    return type(param.default).__name__


def _coerce(raw: Any, param: NotebookParameter) -> Any:
    """Convert a command-line string to the type of the parameter's default, or refuse."""
    default = param.default
    if not isinstance(raw, str):
        value = raw
    elif default is None and param.type_name in TEXT_TYPES:
        return raw
    elif isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered not in {"true", "false", "1", "0", "yes", "no"}:
            raise NotebookParameterError(f"parameter {param.name!r} expects a bool (true/false), got {raw!r}")
        value = lowered in {"true", "1", "yes"}
    elif isinstance(default, int):
        try:
            value = int(raw)
        except ValueError:
            raise NotebookParameterError(f"parameter {param.name!r} expects an int (default {default!r}), got {raw!r}") from None
    elif isinstance(default, float):
        try:
            value = float(raw)
        except ValueError:
            raise NotebookParameterError(f"parameter {param.name!r} expects a float (default {default!r}), got {raw!r}") from None
    elif isinstance(default, str):
        value = raw
    else:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise NotebookParameterError(
                f"parameter {param.name!r} expects a Python literal like {default!r}, got {raw!r}"
            ) from None
    if default is not None and not isinstance(value, type(default)) and not (
        isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool)
    ):
        raise NotebookParameterError(
            f"parameter {param.name!r} expects {type(default).__name__} (default {default!r}), got {type(value).__name__} {value!r}"
        )
    return float(value) if isinstance(default, float) else value


def check_parameters(notebook, given: dict[str, Any], notebook_name: str) -> dict[str, Any]:
    """Validate names and types of ``given``; return the coerced values."""
    params = notebook_parameters(notebook)
    valid = ", ".join(f"{p.name} ({_type_label(p)}, default {p.default!r})" for p in params.values())
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise NotebookParameterError(
            f"notebook {notebook_name!r} has no parameter named {', '.join(map(repr, unknown))}; "
            f"valid parameters: {valid or '(none)'}"
        )
    return {name: _coerce(value, params[name]) for name, value in given.items()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "numpy", "pandas", "scipy", "scikit-learn", "statsmodels", "papermill"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The commit the notebook ran from, and whether tracked files differed from it."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status)}


def _run_label(parameters: dict[str, Any]) -> str:
    text = ",".join(f"{k}={parameters[k]!r}" for k in sorted(parameters))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def execute(
    spec: str | Path,
    parameters: dict[str, Any] | None = None,
    output_dir: Path | None = None,
    results_dir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one notebook; return its results record (also written to ``results_dir/<name>.json``)."""
    import nbformat
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    source = resolve_notebook(spec)
    name = source.stem
    notebook = read_notebook(source)
    coerced = check_parameters(notebook, dict(parameters or {}), name)
    if output_dir is None:
        output_dir = GENERATED_DIR if not coerced else RUNS_DIR / f"{name}-{_run_label(coerced)}"
    if results_dir is None:
        results_dir = RESULTS_DIR if not coerced else output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / f"{name}.ipynb"
    tmp = output_dir / f".{name}.running.ipynb"
    started = time.time()
    saved = {key: os.environ.get(key) for key in ("VRP_NOTEBOOK", "VRP_OUTPUT_DIR", "HF_HUB_DISABLE_PROGRESS_BARS")}
    os.environ["VRP_NOTEBOOK"] = name
    # Where the chapter's tables write their full rows (vrp_utils.tables: tables/ beside the executed notebook).
    os.environ["VRP_OUTPUT_DIR"] = str(output_dir.resolve())
    # The kernel inherits this: transformers' "Loading weights" and "Writing model shards" bars (and the hub's)
    # would otherwise be printed into the chapter's page; the runner's own bar stays in the terminal.
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    # The "python3" kernelspec runs `python` from PATH: make that this interpreter (the venv's).
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        executed = pm.execute_notebook(
            notebook,
            str(tmp),
            parameters=coerced,
            kernel_name=KERNEL_NAME,
            progress_bar=progress,
            cwd=str(REPO_ROOT),
            log_output=False,
        )
    except PapermillExecutionError as error:
        failed = output_dir / f"{name}.failed.ipynb"
        if tmp.exists():
            os.replace(tmp, failed)
        first_line = (error.source or "").strip().splitlines()[:1]
        raise NotebookExecutionError(
            f"notebook {source.relative_to(REPO_ROOT) if source.is_relative_to(REPO_ROOT) else source} failed "
            f"in cell {error.cell_index} (In [{error.exec_count}]: {first_line[0] if first_line else ''!s}): "
            f"{error.ename}: {error.evalue}\n(executed copy with the traceback: {failed})"
        ) from None
    finally:
        for key, before in saved.items():
            if before is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = before
    duration = time.time() - started
    effective = {p.name: p.default for p in notebook_parameters(notebook).values()} | coerced
    record = {
        "notebook": name,
        "source": str(source.relative_to(REPO_ROOT)) if source.is_relative_to(REPO_ROOT) else str(source),
        "parameters": effective,
        "overridden": sorted(coerced),
        "results": collect(executed),
        "inputs": collect_inputs(executed),
        "finished_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_s": round(duration, 1),
        "host": {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "versions": _versions(),
        "git": _git_state(),
        "executed_notebook": str(target.relative_to(REPO_ROOT)) if target.is_relative_to(REPO_ROOT) else str(target),
    }
    strip_bookkeeping(executed)  # lifted into the record above; not for the reader's page
    # Executed notebook first, results last: a results file implies its notebook is in place.
    nbformat.write(executed, tmp)
    os.replace(tmp, target)
    write_json_atomic(results_dir / f"{name}.json", record)
    return record


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vrp_utils.run",
        description="Execute a jupytext notebook with papermill, checking parameters; write the executed notebook and its results JSON.",
    )
    parser.add_argument("notebook", help="path or name of a notebook in notebooks/ (e.g. 01_attention)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a notebook parameter (repeatable); value converted to the default's type")
    parser.add_argument("--output-dir", type=Path, help="where the executed notebook goes (default: book/generated, or runs/<name>-<hash> with -p)")
    parser.add_argument("--into-book", action="store_true", help="with -p: write into the book and results/ anyway")
    parser.add_argument("--list-parameters", action="store_true", help="print the notebook's parameters and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        source = resolve_notebook(args.notebook)
        if args.list_parameters:
            for p in notebook_parameters(read_notebook(source)).values():
                print(f"{p.name} = {p.default!r}  ({_type_label(p)}) {p.help}")
            return 0
        given: dict[str, Any] = {}
        for name, value in args.parameter:
            if name in given:
                raise NotebookParameterError(f"parameter {name!r} given twice")
            given[name] = value
        output_dir, results_dir = args.output_dir, None
        if args.into_book:
            output_dir, results_dir = output_dir or GENERATED_DIR, RESULTS_DIR
        record = execute(source, given, output_dir=output_dir, results_dir=results_dir, progress=not args.no_progress)
    except (FileNotFoundError, NotebookParameterError, NotebookExecutionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2 if isinstance(error, NotebookParameterError) else 1
    print(f"{record['notebook']}: ran in {record['duration_s']} s -> {record['executed_notebook']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
