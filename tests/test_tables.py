"""vrp_utils.tables on constructed frames, against hand-written strings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from vrp_utils import tables


def _frame() -> pd.DataFrame:
    return pd.DataFrame({
        "model": ["zoo-llava", "zoo-qwen2-vl", "zoo-paligemma"],
        "layer": [0.0, 1.0, 1.0],
        "value": [0.8213, -0.0123, 0.5],
        "ci_low": [0.8011, -0.0456, np.nan],
        "ci_high": [0.8402, 0.0210, np.nan],
        "p_holm": [0.000012, 0.3973456, 0.0412],
        "n": [1725.0, 1725.0, 1080.0],
        "empty": [np.nan, None, np.nan],
        "method": ["bootstrap over images", "bootstrap over images", None],
    }, index=[280, 284, 271])


COLUMNS = {"model": "model", "layer": "layer", "value": "R_pb [95% CI]", "p_holm": "p (Holm)", "n": "n (inputs)",
           "empty": "nothing", "method": "method"}


def test_a_results_frame_becomes_readable_strings():
    table, captions = tables.format_table(_frame(), COLUMNS, estimates={"value": tables.Estimate("ci_low", "ci_high", signed=True)})
    assert list(table.columns) == ["model", "layer", "R_pb [95% CI]", "p (Holm)", "n (inputs)"]  # empty: gone
    assert list(table.index) == [0, 1, 2]
    assert table.to_dict(orient="records") == [
        {"model": "zoo-llava", "layer": "0", "R_pb [95% CI]": "+0.821 [+0.801, +0.840]", "p (Holm)": "< 1e-4", "n (inputs)": "1,725"},
        {"model": "zoo-qwen2-vl", "layer": "1", "R_pb [95% CI]": "-0.012 [-0.046, +0.021]", "p (Holm)": "0.40", "n (inputs)": "1,725"},
        {"model": "zoo-paligemma", "layer": "1", "R_pb [95% CI]": "+0.500", "p (Holm)": "0.041", "n (inputs)": "1,080"},
    ]
    assert captions == ["method: bootstrap over images"]
    partial = pd.DataFrame({"signal": ["a", "b"], "only": ["positive", None]})
    assert tables.format_table(partial, {"signal": "signal", "only": "only on"})[0]["only on"].tolist() == ["positive", "–"]
    numbers = pd.DataFrame({"setting": ["random", "popular"], "questions": [1080, 1080]})
    table, captions = tables.format_table(numbers, {"setting": "setting", "questions": "questions"}, note="POPE-style")
    assert list(table.columns) == ["setting", "questions"] and captions == ["POPE-style"]  # numbers stay in the table


def test_p_values_points_and_zero():
    assert [tables.format_p(p) for p in (0.3973456, 0.000123, 3e-7, 1.0, 0.05, None, np.nan)] == \
        ["0.40", "0.00012", "< 1e-4", "1.0", "0.050", "–", "–"]
    spec = tables.points()
    assert tables.format_estimate(1.2, -0.31, 2.66, spec) == "+1.2 [-0.3, +2.7]"
    assert tables.format_estimate(0.012, -0.003, 0.027, tables.points(scale=100)) == "+1.2 [-0.3, +2.7]"
    assert tables.format_estimate(-0.0004, -0.01, 0.02, tables.Estimate("a", "b", digits=3, signed=True)) == "0.000 [-0.010, +0.020]"
    assert tables.format_estimate(np.nan, 0.1, 0.2, spec) == "–"


def test_rows_are_sorted_cut_to_the_top_and_say_so():
    frame = pd.DataFrame({"test": [f"t{i}" for i in range(30)], "effect": [(-1) ** i * i / 100 for i in range(30)],
                          "flag": [i % 2 == 0 for i in range(30)]})
    table, captions = tables.format_table(frame, {"test": "test", "effect": "effect", "flag": "significant"},
                                          sort=lambda t: t["effect"].abs(), top=3)
    assert table["test"].tolist() == ["t29", "t28", "t27"]
    assert table["effect"].tolist() == ["-0.290", "0.280", "-0.270"]
    assert table["significant"].tolist() == ["no", "yes", "no"]
    table, _ = tables.format_table(pd.DataFrame({"ok": [True, None, False]}, dtype=object), {"ok": "ok"})
    assert table["ok"].tolist() == ["yes", "–", "no"]
    assert captions[-1].startswith("3 of 30 rows shown, by ")
    table, captions = tables.format_table(frame, {"test": "test", "effect": "effect"}, sort="effect", ascending=True, top=2)
    assert table["test"].tolist() == ["t29", "t27"] and "effect, smallest first" in captions[-1]


def test_a_constant_column_is_kept_when_asked_and_unknown_columns_are_named():
    frame = pd.DataFrame({"model": ["a", "a"], "x": [0.5, 0.25]})
    table, captions = tables.format_table(frame, {"model": "model", "x": "x"}, keep=("model",))
    assert list(table.columns) == ["model", "x"] and captions == []
    with pytest.raises(KeyError, match="no_such"):
        tables.format_table(frame, {"no_such": "y"})


def test_markdown_and_csv(tmp_path):
    frame = _frame()
    path = tables.write_csv(frame, "01_attention", "rpb", tmp_path)
    assert path.name == "01_attention-rpb.csv"
    back = pd.read_csv(path)
    assert len(back) == 3 and list(back.columns) == list(frame.columns) and math.isclose(back["p_holm"][1], 0.3973456)
    table, captions = tables.format_table(frame, {"model": "model", "method": "method", "value": "a|b"})
    text = tables.to_markdown(table, captions, f"tables/{path.name}", len(frame))
    assert text == (
        "| model | a\\|b |\n|---|---|\n| zoo-llava | 0.821 |\n| zoo-qwen2-vl | -0.012 |\n| zoo-paligemma | 0.500 |\n\n"
        "method: bootstrap over images; [All 3 rows as CSV](tables/01_attention-rpb.csv)."
    )
    with pytest.raises(ValueError):
        tables.write_csv(frame, "01_attention", "R_pb table", tmp_path)


def test_headers_mix_shared_names_and_declared_pairs():
    assert tables.headers("model", ("value", "AUROC [95% CI]"), "n") == {"model": "model", "value": "AUROC [95% CI]", "n": "n (inputs)"}
    with pytest.raises(KeyError):
        tables.headers("no_such_column")


def test_whole_numbers_in_an_object_column_print_as_integers():
    """A layer column holds None on the controls' rows, so pandas keeps it as objects: still "1", not "1.0"."""
    frame = pd.DataFrame({"model": ["a", "b", "c"], "layer": pd.Series([0.0, None, 1.0], dtype=object),
                          "mixed": pd.Series([1.0, "x", 2.0], dtype=object)})
    table, _ = tables.format_table(frame, {"model": "model", "layer": "layer", "mixed": "mixed"})
    assert table["layer"].tolist() == ["0", tables.MISSING, "1"]
    assert table["mixed"].tolist() == ["1.0", "x", "2.0"]
