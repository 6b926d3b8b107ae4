"""Task rules (issue 25): how each task judges an answer and what its first token decides.

- each task's rule: presence is POPE's parse, counting is ``count_correct``; a sampled answer's class is the
  normalised one ("2" = "two"), so S_SC is a majority over normalised answers;
- what a first token decides under the counting rule (``"none"`` or open), by a table of cases;
"""

from __future__ import annotations

import pytest

from vrp_utils.analysis import consistency
from vrp_utils.data.counts import can_become_count, count_correct, first_token_count
from vrp_utils.data.pope import parse_answer
from vrp_utils.data.tasks import TASKS, get_task, task_rules


# ------------------------------------------------------------------------------------------------ the rules
@pytest.mark.parametrize(("answer", "label", "rule"), [
    ("Yes, there is.", "yes", "pope"), ("No.", "no", "pope"), ("Not really", "no", "pope"), ("Maybe", "no", "strict"),
])
def test_presence_is_popes_parse(answer, label, rule):
    presence = get_task("presence")
    assert presence.correct(answer, label, rule) == (parse_answer(answer, rule=rule, on_fail="none") == label)
    assert presence.answer_class(answer, rule) == (parse_answer(answer, rule=rule, on_fail="none") or "none")


@pytest.mark.parametrize("answer", ["2", "two", "Two.", " 2 ", "3", "2 apples", "", "yes", "twenty"])
def test_counting_is_count_correct_and_classes_are_normalised(answer):
    counting = get_task("counting")
    assert counting.correct(answer, "2", "pope") == count_correct(answer, 2)
    assert counting.answer_class(answer, "pope") in {"2", "3", "20", "none"}
    assert consistency.s_sc([[counting.answer_class(a, "pope") for a in ("2", "two", "Two.", "3")]], 4).tolist() == [0.75]


def test_every_task_has_a_declared_rule_in_the_store_identity_and_an_unknown_one_is_named():
    from vrp_utils.extract.engine import ExtractionSettings, store_settings

    assert set(task_rules()) == set(TASKS) == {"presence", "counting"}
    assert store_settings(ExtractionSettings())["task_rules"] == task_rules()
    assert get_task(None).name == "presence"
    with pytest.raises(ValueError, match="unknown task 'spatial'; choose from 'presence', 'counting'"):
        get_task("spatial")


@pytest.mark.parametrize(("text", "is_end", "decided"), [
    ("", True, "none"),  # the end token: an empty answer is no count
    ("There", False, "none"), ("yes", False, "none"), ("2a", False, "none"), ("twenty-", False, "none"),
    ("seventy", False, "none"), ("2 apples", False, "none"), ("2..", False, "none"),
    ("2", False, None), ("two", False, None), ("Two.", False, None), ("tw", False, None), (" ", False, None),
    ("seven", False, None), ("2 ", False, None), ("007", False, None), ("T", False, None), ("!", False, "none"),
])
def test_what_a_first_token_decides_under_the_counting_rule(text, is_end, decided):
    assert first_token_count(text, is_end) == decided
    assert get_task("counting").first_token(text, is_end) == decided
    if not is_end:
        assert can_become_count(text) == (decided is None)
