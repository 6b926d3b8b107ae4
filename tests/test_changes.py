"""vrp_utils.analysis.changes on small constructed tables, against hand counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from vrp_utils.analysis import changes


def _table() -> pd.DataFrame:
    """Two settings sharing their yes-questions (ids 0-3) with their own no-questions (4-7, 8-11), as POPE's do."""
    rows = []
    for setting, no_ids in (("random", range(4, 8)), ("adversarial", range(8, 12))):
        for i in [*range(4), *no_ids]:
            rows.append({"distinct_id": i, "setting": setting, "label": "yes" if i < 4 else "no",
                         "image_file": f"img{i % 6}.png", "correct": i not in (3, 9), "parsed": "yes" if i < 3 else "no"})
    return pd.DataFrame(rows)


def _after(correct: dict[int, bool], parsed: dict[int, str]) -> pd.DataFrame:
    return pd.DataFrame({"distinct_id": list(range(12)), "correct_after": [correct.get(i, i not in (3, 9)) for i in range(12)],
                         "parsed_after": [parsed.get(i, "yes" if i < 3 else "no") for i in range(12)]})


def test_balanced_change_weights_each_label_half_where_distinct_does_not():
    # The intervention turns two yes-answers into "no" (0 and 1 now wrong) and fixes one no-question (9).
    after = _after({0: False, 1: False, 9: True}, {0: "no", 1: "no"})
    rows = {(r["scope"], r["subset"]): r for r in changes.accuracy_changes(_table(), after, ["random", "adversarial"], n_boot=50)}
    # Distinct inputs: 4 yes, 8 no. Balanced: (-2/4 + 1/8) / 2; unweighted: (-2 + 1) / 12.
    assert rows[("balanced", "all")]["value"] == pytest.approx(0.5 * (-2 / 4 + 1 / 8))
    assert rows[("distinct", "all")]["value"] == pytest.approx(-1 / 12)
    # Each setting is 50/50 already: random (ids 0-7) -2/8, adversarial (0-3, 8-11) -1/8.
    assert rows[("random", "all")]["value"] == pytest.approx(-2 / 8)
    assert rows[("adversarial", "all")]["value"] == pytest.approx(-1 / 8)
    assert rows[("balanced", "all")]["yes_ratio_change"] == pytest.approx(0.5 * (-2 / 4 + 0))
    assert rows[("distinct", "all")]["yes_ratio_change"] == pytest.approx(-2 / 12)
    assert ("balanced", "positive") not in rows and ("distinct", "positive") in rows
    assert rows[("balanced", "all")]["n_correct_to_wrong_yes"] == 2 and rows[("balanced", "all")]["n_wrong_to_correct_no"] == 1
    assert rows[("balanced", "all")]["n"] == 12 and rows[("random", "all")]["n"] == 8


def test_unanswered_inputs_are_counted_and_left_out():
    after = _after({0: False}, {0: "no"}).astype({"correct_after": object})
    after.loc[after["distinct_id"] == 5, ["correct_after", "parsed_after"]] = [np.nan, None]
    rows = changes.accuracy_changes(_table(), after, ["random"], n_boot=20)
    assert {r["n_error_rows"] for r in rows} == {1}
    assert next(r for r in rows if r["scope"] == "distinct" and r["subset"] == "all")["n"] == 11


def test_condition_difference_is_paired_and_balanced():
    table = _table()
    top = _after({0: False, 1: False, 2: False}, {})
    random = _after({0: False}, {})
    diff = changes.condition_difference(table, top, random, n_boot=50)
    # a minus b: yes-questions 2 more lost of 4, no-questions equal.
    assert diff["value"] == pytest.approx(0.5 * (-2 / 4))
    assert (diff["n_b_right_a_wrong_yes"], diff["n_b_wrong_a_right_yes"]) == (2, 0)
    assert diff["accuracy_a_yes"] == pytest.approx(0 / 4) and diff["accuracy_b_yes"] == pytest.approx(2 / 4)
    assert diff["scope"] == "balanced"


def test_an_intervention_table_with_a_duplicate_or_missing_column_is_refused():
    after = _after({}, {})
    with pytest.raises(ValueError, match="more than one row for a distinct input"):
        changes.accuracy_changes(_table(), pd.concat([after, after.head(1)]), ["random"], n_boot=20)
    with pytest.raises(KeyError, match="parsed_after"):
        changes.accuracy_changes(_table(), after.drop(columns="parsed_after"), ["random"], n_boot=20)
