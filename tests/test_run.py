"""The papermill runner: parameter checking, failing cells, atomic outputs (real kernels, no mocks)."""

from __future__ import annotations

import json
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


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vrp_utils.run", *args], capture_output=True, text=True)


def test_parameters_are_read_from_the_text_notebook(demo):
    params = run.notebook_parameters(run.read_notebook(demo))
    assert {name: p.default for name, p in params.items()} == {"n": 3, "label": "x", "rate": 0.5, "flag": False}


def test_unknown_parameter_is_refused_with_the_valid_names(demo):
    result = cli(str(demo), "-p", "no_such_param", "1")
    assert result.returncode != 0
    assert "no_such_param" in result.stderr
    for name in ("n", "label", "rate", "flag"):
        assert name in result.stderr


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
