"""Summarise one module's mutmut results: score overall and on non-message mutants; survivors with diffs.

Run by benchmarks/mutation.sh after ``mutmut run`` (reads mutants/<module>.py.meta, calls ``mutmut show``).
A *message* mutant changes only the text of string literals that contain a space (error messages,
warnings), or replaces a raised exception's or a warning's formatted message by None; a mutant of a
one-word literal (a key, a rule name, "yes") is not a message mutant. Survivors are listed with their
diffs for the reader to judge; the classification is a heuristic, not a proof of harmlessness.
"""

from __future__ import annotations

import io
import json
import sys
import tokenize
from collections import Counter
from pathlib import Path

MODULES = {
    "pope": "vrp_utils/data/pope.py",
    "stats": "vrp_utils/analysis/stats.py",
    "concentration": "vrp_utils/analysis/concentration.py",
    "store": "vrp_utils/extract/store.py",
    "attention": "vrp_utils/extract/attention.py",
}
def status(code: int | None) -> str:
    if code is None:
        return "not checked"
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[code]


def _skeleton(lines: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """Tokens of the code with string contents blanked, and the string literals."""
    code = "\n".join(line[1:] for line in lines)
    tokens, strings = [], []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.STRING:
                strings.append(tok.string)
                tokens.append((tok.type, '""'))
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.COMMENT):
                tokens.append((tok.type, tok.string))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return [(-1, code)], []
    return tokens, strings


def is_message_mutant(diff: str) -> bool:
    minus = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    plus = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    if not minus or len(minus) != len(plus):
        return False
    # an exception or warning whose message (a formatted string) was replaced: raise X(None), warn(None)
    for old, new in zip(minus, plus):
        old, new = old[1:].strip(), new[1:].strip()
        if old != new and old.startswith(("raise ", "warnings.warn(")) and new.endswith("(None)") \
                and old.split("(")[0] == new.split("(")[0] and ('f"' in old or "'" in old or '"' in old):
            return True
    # compare line by line, each statement fragment dedented
    old_tokens, old_strings = _skeleton(["-" + line[1:].strip() for line in minus])
    new_tokens, new_strings = _skeleton(["+" + line[1:].strip() for line in plus])
    if old_tokens != new_tokens or not old_strings:
        return False
    changed = [(a, b) for a, b in zip(old_strings, new_strings) if a != b]
    return bool(changed) and all(" " in a.strip("'\"fr") for a, _ in changed)


def main(module: str, names_only: bool = False) -> None:
    path = MODULES[module]
    meta = Path("mutants") / f"{path}.meta"
    data = json.loads(meta.read_text())
    codes: dict[str, int | None] = data["exit_code_by_key"]
    counts = Counter(status(c) for c in codes.values())
    survivors = sorted(k for k, c in codes.items() if status(c) not in ("killed", "timeout", "caught by type check"))
    if names_only:
        print("\n".join(survivors))
        return
    from mutmut.mutation.diff_apply import get_diff_for_mutant  # in process: one `mutmut show` per mutant is slow

    diffs = {name: get_diff_for_mutant(name, path=Path(path)) for name in survivors}
    message = {k for k in survivors if is_message_mutant(diffs[k])}
    total = len(codes)
    killed = counts["killed"] + counts["timeout"] + counts["caught by type check"]
    n_message_all = sum(1 for k in codes if k in message)  # message survivors only (killed ones not diffed)
    print(f"# {path}: {total} mutants; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    print(f"score: {killed}/{total} killed = {killed / total:.1%}")
    non_message = total - n_message_all
    print(f"score without the {n_message_all} surviving message-only mutants: {killed}/{non_message} = "
          f"{killed / non_message:.1%}")
    print()
    for name in survivors:
        tag = "message" if name in message else status(codes[name])
        print(f"## {name} [{tag}]")
        print(diffs[name].strip())
        print()


if __name__ == "__main__":
    main(sys.argv[1], names_only="--names" in sys.argv[2:])
