"""Task types and their declared answer rules: which answers are right, and into which class a sample falls.

Why one registry: a question's task decides how its answer is judged (``correct`` in a feature store),
which normalised class a sampled answer counts for in self-consistency, and what a first answer token
already decides for the exact S_SC limit. Every one of these reads the task's rule from here, so a rule
is declared once and its identity (:func:`task_rules`) goes into every feature store's identity: a
store judged under another rule is never reused.

- ``presence`` (POPE): yes/no by :func:`vrp_utils.data.pope.parse_answer` under the extraction's
  ``answer_rule`` (``"pope"`` by default, or ``"strict"``); right when the parse equals the label.
  Rows without a task (POPE files, the embedded benchmark) are presence questions.
- ``counting``: :mod:`vrp_utils.data.counts`: right when the answer states exactly the true count,
  digits or number words ("2" = "two" = "Two."); anything else is wrong. ``answer_rule`` does not apply.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vrp_utils.data.counts import count_correct, first_token_count, parse_count
from vrp_utils.data.pope import first_token_decision, parse_answer

#: The task of a row that names none (every POPE row).
DEFAULT_TASK = "presence"
#: The class of an answer that the task's rule cannot read (a strict-rule answer without yes/no, a non-count).
NO_CLASS = "none"


@dataclass(frozen=True)
class Task:
    """One task type: its declared rule and the functions that apply it."""

    name: str
    #: The rule's declared identity (bump the version when the rule changes what it accepts).
    rule: str
    #: A question file's answer -> the label stored (raises ValueError naming what is expected).
    canonical_label: Callable[[Any], str]
    #: (answer text, answer_rule) -> the answer's class under the rule, or None where the rule reads none.
    normalise: Callable[[str, str], str | None]
    #: (answer text, label, answer_rule) -> right or wrong.
    correct: Callable[[str, str, str], bool]
    #: (first token's text, is it the end token) -> the class it decides whatever follows, or None.
    first_token: Callable[[str, bool], str | None]

    def answer_class(self, answer: str, answer_rule: str) -> str:
        """The class a sampled answer counts for in S_SC (:data:`NO_CLASS` where the rule reads none)."""
        return self.normalise(answer, answer_rule) or NO_CLASS


def _yes_no_label(value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in ("yes", "no"):
        raise ValueError(f"expected 'yes' or 'no', got {value!r}")
    return value.strip().lower()


def _count_label(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    count = parse_count(value) if isinstance(value, str) else None
    if count is None:
        raise ValueError(f"expected a whole number >= 0 (a JSON integer, digits or a number word), got {value!r}")
    return str(count)


def _count_class(answer: str, answer_rule: str) -> str | None:
    count = parse_count(answer)
    return None if count is None else str(count)


TASKS: Mapping[str, Task] = {
    task.name: task for task in (
        Task("presence", "yes/no by parse_answer(answer_rule) == label; v1", _yes_no_label,
             lambda answer, rule: parse_answer(answer, rule=rule, on_fail="none"),
             lambda answer, label, rule: parse_answer(answer, rule=rule, on_fail="none") == label,
             lambda text, is_end: first_token_decision(text, is_end)),
        Task("counting", "exact count: parse_count(answer) == label, digits or words 0-20; v1", _count_label,
             _count_class, lambda answer, label, rule: count_correct(answer, int(label)),
             lambda text, is_end: first_token_count(text, is_end)),
    )
}


def get_task(name: str | None) -> Task:
    """The task called ``name`` (None: :data:`DEFAULT_TASK`); an unknown name is refused naming the choices."""
    name = DEFAULT_TASK if name is None else name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(map(repr, TASKS))}")
    return TASKS[name]


def task_rules() -> dict[str, str]:
    """Every task's declared rule, by task name: the part of a feature store's identity that says how
    ``correct`` was judged."""
    return {name: task.rule for name, task in TASKS.items()}
