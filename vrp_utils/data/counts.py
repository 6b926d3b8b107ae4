"""Correctness of a counting answer (issue 25): an exact match after normalisation.

Declared before any counting result: an answer is right when, stripped of surrounding white space and of one
closing ``.`` or ``!``, and case folded, it is a whole number written in digits or as an English number word
from zero to twenty, equal to the true count ("2" = "two" = "Two."). Anything else ("2 apples", "2.5", "a few",
an empty answer) is wrong, and :func:`parse_count` says so by returning ``None``.
"""

from __future__ import annotations

NUMBER_WORDS: dict[str, int] = {word: value for value, word in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"))}


def parse_count(text: str) -> int | None:
    """The count an answer states, or ``None`` when it is not exactly a number (see the module's rule)."""
    if not isinstance(text, str):
        raise TypeError(f"an answer must be text; got {type(text).__name__}")
    answer = text.strip().casefold()
    if answer[-1:] in (".", "!"):
        answer = answer[:-1].rstrip()
    if answer.isascii() and answer.isdigit():
        return int(answer)
    return NUMBER_WORDS.get(answer)


def count_correct(text: str, truth: int) -> bool:
    """Whether the answer ``text`` states exactly the true count ``truth``."""
    if isinstance(truth, bool) or not isinstance(truth, int) or truth < 0:
        raise ValueError(f"the true count must be a whole number >= 0; got {truth!r}")
    return parse_count(text) == truth
