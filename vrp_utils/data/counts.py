"""Correctness of a counting answer (issue 25): an exact match after normalisation.

Declared before any counting result: an answer is right when, stripped of surrounding white space and of one
closing ``.`` or ``!``, and case folded, it is a whole number written in digits or as an English number word
from zero to twenty, equal to the true count ("2" = "two" = "Two."). Anything else ("2 apples", "2.5", "a few",
an empty answer) is wrong, and :func:`parse_count` says so by returning ``None``.
"""

from __future__ import annotations

import re

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


#: What may follow the number in a count answer (after leading white space): white space, then at most one
#: closing ``.`` or ``!`` and white space. Every prefix of such a tail is itself one.
_TAIL = re.compile(r"\s*(?:[.!]\s*)?")


def can_become_count(text: str) -> bool:
    """Whether some continuation of ``text`` (an answer's beginning) is an answer :func:`parse_count` reads."""
    head = text.lstrip().casefold()
    if not head:
        return True
    digits = len(head) - len(head.lstrip("0123456789"))
    if digits:
        return _TAIL.fullmatch(head[digits:]) is not None
    return any(word.startswith(head) or (head.startswith(word) and _TAIL.fullmatch(head[len(word):]) is not None)
               for word in NUMBER_WORDS)


def first_token_count(text: str, is_end: bool = False) -> str | None:
    """What a first answer token decides under the counting rule: ``"none"`` (the answer cannot be a count,
    whatever follows) or ``None`` (later tokens decide).

    Why a count token never decides: under exact match "2" may still become "2 apples" or "25", so its mass
    is left to the resolve samples, as POPE's yes-words are (``vrp_utils.extract.sampling``). The end token
    (an empty answer) and any text no count starts with ("There", "yes", "2a") decide ``"none"``.
    """
    if is_end:
        return "none"
    return None if can_become_count(text) else "none"


def count_correct(text: str, truth: int) -> bool:
    """Whether the answer ``text`` states exactly the true count ``truth``."""
    if isinstance(truth, bool) or not isinstance(truth, int) or truth < 0:
        raise ValueError(f"the true count must be a whole number >= 0; got {truth!r}")
    return parse_count(text) == truth
