"""The book's numbers on another CPU kernel path: the released weights, re-extracted under torch's portable
kernels (``ATEN_CPU_CAPABILITY=default``, what no CPU of ours runs natively), give chapter 01's numbers within
``make verify``'s tolerances of the reference. A CI-sized stand-in for a build on another kind of machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vrp_utils.paths import BENCHMARK_DIR, REPO_ROOT
from vrp_utils.verify import TOLERANCES, load_rules, rule_for

REFERENCE = REPO_ROOT / "results" / "reference" / "01_attention.json"
#: What names a row of chapter 01's result tables (every other field is a measured value).
IDENTITY = ("model", "setting", "scope", "subset", "span", "from_layer", "layer", "head", "metric", "outcome", "quantity")
#: Holm's adjustment runs over every model's tests: one model's family is smaller, so its adjusted p differs.
NOT_PER_MODEL = {"p_holm"}


def _rows(results: dict, model: str) -> dict[tuple, tuple[str, dict]]:
    """``{(table, identity): (quantity prefix, row)}`` for every row of ``model`` in the result tables."""
    rows = {}
    for table, value in results.items():
        if not isinstance(value, list):
            continue
        for index, row in enumerate(value):
            if isinstance(row, dict) and row.get("model") == model:
                key = (table, tuple((k, row.get(k)) for k in IDENTITY if k in row))
                assert key not in rows, f"two rows of {table} share {key}"
                rows[key] = (f"01_attention/results/{table}/{index}", row)
    return rows


def _leaves(row: dict, prefix: str = ""):
    """``(path, value)`` for every non-dict value of a row, nested fields as ``outer/inner`` (as verify names them)."""
    for field, value in row.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{field}/")
        else:
            yield f"{prefix}{field}", value


def test_leaves_name_nested_fields_as_verify_does():
    assert list(_leaves({"value": 1.0, "envelope": {"ci_low": -0.1, "n": 3}})) == [
        ("value", 1.0), ("envelope/ci_low", -0.1), ("envelope/n", 3)]


@pytest.mark.built
@pytest.mark.kernel_paths
def test_chapter_01_on_the_portable_kernels_matches_the_reference(tmp_path):
    model = "zoo-llava"
    data = tmp_path / "data"
    data.mkdir()
    (data / "benchmark").symlink_to(BENCHMARK_DIR)  # the same benchmark; features extracted afresh under data/
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "VRP_DATA_DIR": str(data)}
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                           env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "DEFAULT"
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "vrp_utils.run", "01_attention", "-p", "models", model,
                           "--output-dir", str(out), "--no-progress"], env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any((data / "features").iterdir()), "the chapter must have extracted its features under the portable kernels"
    new = _rows(json.loads((out / "01_attention.json").read_text())["results"], model)
    reference = _rows(json.loads(REFERENCE.read_text())["results"], model)
    assert new.keys() == reference.keys()
    rules = load_rules(TOLERANCES)
    compared, outside = 0, []
    for key, (name, ref_row) in reference.items():
        new_row = new[key][1]
        new_leaves = dict(_leaves(new_row))
        for field, ref in _leaves(ref_row):
            if field in NOT_PER_MODEL or field in IDENTITY:
                continue
            quantity = f"{name}/{field}"
            rule = rule_for(quantity, ref, rules)
            assert rule is not None, quantity
            value = new_leaves.get(field)
            if rule.kind == "ignore":
                continue
            compared += 1
            if rule.kind == "abs" and isinstance(ref, float) and isinstance(value, float):
                if abs(value - ref) > rule.tol:
                    outside.append((quantity, ref, value, rule.describe()))
            elif value != ref:
                outside.append((quantity, ref, value, rule.describe()))
    assert compared > 1000
    assert not outside, outside[:10]
