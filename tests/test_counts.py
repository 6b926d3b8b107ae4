"""The counting answer rule: digits and number words are equal, anything else is wrong."""

from __future__ import annotations

import pytest

from vrp_utils.data.counts import count_correct, parse_count

CASES = [
    ("2", 2), ("two", 2), ("Two.", 2), ("TWO", 2), (" 2 ", 2), ("2.", 2), ("two!", 2), ("Two .", 2),
    ("0", 0), ("zero", 0), ("twenty", 20), ("12", 12), ("Twelve.", 12), ("007", 7),
    ("2 apples", None), ("There are two.", None), ("two apples", None), ("2.5", None), ("-1", None),
    ("1,000", None), ("a few", None), ("", None), (".", None), ("yes", None), ("twenty-one", None),
    ("２", None),  # a full-width digit: not ASCII, not a number here
    ("2..", None), ("two?", None),
]


@pytest.mark.parametrize("text, count", CASES)
def test_parse_count(text, count):
    assert parse_count(text) == count


def test_count_correct_is_an_exact_match():
    assert count_correct("Two.", 2) and count_correct("2", 2)
    assert not count_correct("3", 2) and not count_correct("two apples", 2) and not count_correct("", 0)


@pytest.mark.parametrize("truth", [-1, 2.0, True, "2"])
def test_a_bad_true_count_is_named(truth):
    with pytest.raises(ValueError, match="true count"):
        count_correct("2", truth)


def test_an_answer_that_is_not_text_is_named():
    with pytest.raises(TypeError, match="must be text"):
        parse_count(2)
