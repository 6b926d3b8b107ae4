"""The papermill runner: parameter checking, failing cells, atomic outputs (real kernels, no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vrp_utils import run

HEADER = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  name: python3
  display_name: Python 3
  language: python
---
"""


def write_notebook(path: Path, body: str) -> Path:
    path.write_text(HEADER + textwrap.dedent(body))
    return path


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    return write_notebook(
        tmp_path / "demo.md",
        """
        # Demo

        ```{code-cell}
        :tags: [parameters]

        n = 3
        label = "x"
        rate = 0.5
        flag = False
        ```

        ```{code-cell}
        from vrp_utils.results import publish
        if n > 100:
            raise ValueError(f"n={n} is too large")
        publish({"n": n, "square": n * n, "label": label, "rate": rate, "flag": flag})
        ```
        """,
    )


REPO_ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    # This checkout's runner, whichever checkout the interpreter's editable install points at.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "vrp_utils.run", *args], capture_output=True, text=True, env=env)


def test_parameters_are_read_from_the_text_notebook(demo):
    params = run.notebook_parameters(run.read_notebook(demo))
    assert {name: p.default for name, p in params.items()} == {"n": 3, "label": "x", "rate": 0.5, "flag": False}


def test_unknown_parameter_is_refused_with_the_valid_names(demo):
    result = cli(str(demo), "-p", "no_such_param", "1", "--no-progress")
    assert result.returncode == 2  # documented: 2 for a parameter error, 1 for a failing notebook
    assert result.stderr == (
        "error: notebook 'demo' has no parameter named 'no_such_param'; valid parameters: "
        "n (int, default 3), label (str, default 'x'), rate (float, default 0.5), flag (bool, default False)\n"
    )
    assert result.stdout == ""


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def fake_book(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The runner's book, results and runs directories moved under tmp_path, each book file already published."""
    dirs = {"generated": tmp_path / "book" / "generated", "results": tmp_path / "results", "runs": tmp_path / "runs"}
    dirs["generated"].mkdir(parents=True)
    dirs["results"].mkdir()
    (dirs["generated"] / "demo.ipynb").write_text('{"published": "chapter"}')
    (dirs["generated"] / "other.ipynb").write_text('{"another": "chapter"}')
    (dirs["results"] / "demo.json").write_text('{"results": {"n": 3, "square": 9}}\n')
    monkeypatch.setattr(run, "GENERATED_DIR", dirs["generated"])
    monkeypatch.setattr(run, "RESULTS_DIR", dirs["results"])
    monkeypatch.setattr(run, "RUNS_DIR", dirs["runs"])
    return dirs


def test_run_with_parameters_goes_under_runs_and_leaves_the_book_untouched(demo, fake_book):
    book, results, runs = fake_book["generated"], fake_book["results"], fake_book["runs"]
    before = {"book": _tree(book.parent), "results": _tree(results)}
    assert run.main([str(demo), "-p", "n", "5", "--no-progress"]) == 0
    assert {"book": _tree(book.parent), "results": _tree(results)} == before  # byte for byte, no new files
    (run_dir,) = runs.iterdir()
    assert run_dir.name == f"demo-{run._run_label({'n': 5})}"
    assert sorted(_tree(run_dir)) == ["demo.ipynb", "demo.json"]
    record = json.loads((run_dir / "demo.json").read_text())
    assert record["results"]["square"] == 25 and record["overridden"] == ["n"]
    assert record["executed_notebook"] == str(run_dir / "demo.ipynb")

    # Controls: the same fixture does reach the book when it should (so the check above can fail):
    # a default run, and -p with --into-book, write the chapter and results/.
    assert run.main([str(demo), "--no-progress"]) == 0
    assert json.loads((results / "demo.json").read_text())["results"]["square"] == 9
    assert (book / "demo.ipynb").read_bytes() != before["book"]["generated/demo.ipynb"]
    assert run.main([str(demo), "-p", "n", "6", "--into-book", "--no-progress"]) == 0
    assert json.loads((results / "demo.json").read_text())["results"]["square"] == 36
    assert (book / "other.ipynb").read_bytes() == before["book"]["generated/other.ipynb"]
    assert len(list(runs.iterdir())) == 1


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("n", "abc", "expects an int"), ("rate", "fast", "expects a float"), ("flag", "maybe", "expects a bool")],
)
def test_ill_typed_values_are_refused(demo, name, value, expected):
    with pytest.raises(run.NotebookParameterError, match=expected):
        run.check_parameters(run.read_notebook(demo), {name: value}, "demo")


def test_values_are_coerced_to_the_default_type(demo):
    coerced = run.check_parameters(run.read_notebook(demo), {"n": "7", "rate": "1", "flag": "true", "label": "y"}, "demo")
    assert coerced == {"n": 7, "rate": 1.0, "flag": True, "label": "y"}
    assert isinstance(coerced["rate"], float)


def test_a_none_parameter_declared_str_takes_text(tmp_path):
    """``questions: str = None``: a file name is taken as text (not read as a Python literal); an undeclared None
    parameter still takes only literals, so a typo there stays an error."""
    notebook = run.read_notebook(write_notebook(tmp_path / "files.md", """
        ```{code-cell}
        :tags: [parameters]

        questions: str = None  # question files, comma-separated
        limit = None           # questions per file
        ```
        """))
    assert run.check_parameters(notebook, {"questions": "my_counts.jsonl,b.jsonl", "limit": "8"}, "files") == {
        "questions": "my_counts.jsonl,b.jsonl", "limit": 8}
    with pytest.raises(run.NotebookParameterError, match="'limit' expects a Python literal"):
        run.check_parameters(notebook, {"limit": "my_counts.jsonl"}, "files")
    with pytest.raises(run.NotebookParameterError, match=r"questions \(str or None, default None\)"):
        run.check_parameters(notebook, {"typo": "1"}, "files")


def test_run_writes_executed_notebook_and_results(demo, tmp_path):
    out = tmp_path / "out"
    record = run.execute(demo, {"n": "4"}, output_dir=out, results_dir=out, progress=False)
    assert record["results"] == {"n": 4, "square": 16, "label": "x", "rate": 0.5, "flag": False}
    assert record["parameters"] == {"n": 4, "label": "x", "rate": 0.5, "flag": False}
    assert record["overridden"] == ["n"]
    on_disk = json.loads((out / "demo.json").read_text())
    assert on_disk["results"]["square"] == 16
    assert (out / "demo.ipynb").is_file()
    assert not list(out.glob(".*"))  # no temporary files left behind


def test_failing_cell_exits_nonzero_naming_notebook_and_cell(demo, tmp_path):
    out = tmp_path / "out"
    (out).mkdir()
    (out / "demo.ipynb").write_text("previous good run")
    result = cli(str(demo), "-p", "n", "400", "--output-dir", str(out), "--no-progress")
    assert result.returncode == 1
    assert "demo.md failed in cell" in result.stderr
    assert "ValueError: n=400 is too large" in result.stderr
    # the previous executed notebook is untouched; the failed copy is kept apart for debugging
    assert (out / "demo.ipynb").read_text() == "previous good run"
    assert (out / "demo.failed.ipynb").is_file()
    assert not (out / "demo.json").exists()


def test_missing_notebook_is_a_clear_error():
    result = cli("no_such_notebook")
    assert result.returncode != 0
    assert "no_such_notebook" in result.stderr and "not found" in result.stderr


def test_results_must_be_json(tmp_path):
    from vrp_utils.results import _jsonable

    import numpy as np

    assert _jsonable({"a": np.float32(0.5), "b": np.arange(3), "c": float("nan")}) == {"a": 0.5, "b": [0, 1, 2], "c": None}
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        _jsonable({"a": object()})


def test_run_records_declared_inputs_and_the_git_commit(tmp_path):
    notebook = write_notebook(
        tmp_path / "inputs.md",
        """
        ```{code-cell}
        from vrp_utils.results import publish, publish_inputs
        publish({"x": 1})
        publish_inputs(data={"benchmark": "aaaa"}, models={"zoo-llava": "bbbb"})
        publish_inputs(models={"zoo-qwen2-vl": "cccc"})
        ```
        """,
    )
    out = tmp_path / "out"
    record = run.execute(notebook, {}, output_dir=out, results_dir=out, progress=False)
    assert record["results"] == {"x": 1}  # inputs stay out of the published results
    assert record["inputs"] == {"data": {"benchmark": "aaaa"}, "models": {"zoo-llava": "bbbb", "zoo-qwen2-vl": "cccc"}}
    assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
