"""Generated tables of the README: ``python -m vrp_utils.readme [--check]``.

Why: the README's zoo and baseline tables must be what the code measured, not typed numbers.
Each table lives between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers and is
rewritten from the released zoo's cards (``zoo/zoo.json``) and the build's ``results/baselines.json``;
``--check`` fails when the committed README differs from what the build produced.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from vrp_utils.paths import REPO_ROOT, RESULTS_DIR, ZOO_DIR

README = REPO_ROOT / "README.md"


def zoo_block(zoo_json: Path = ZOO_DIR / "zoo.json") -> str:
    from vrp_utils.models.zoo import zoo_table

    cards = json.loads(zoo_json.read_text())["models"]
    sizes = sorted({m["n"] for card in cards.values() for m in card["metrics"].values()})
    # A release may mix machines (a model retrained alone): each machine names its models.
    machines: dict[str, list[str]] = {}
    for name, card in cards.items():
        machines.setdefault(f"{card['provenance']['cpu']} ({card['provenance']['cpu_capability']} kernels)", []).append(name)
    where = (f" on {next(iter(machines))}" if len(machines) == 1 else
             ": " + "; ".join(f"{' and '.join(names)} on {machine}" for machine, names in sorted(machines.items())))
    return (
        f"The released zoo the book's figures come from (`zoo/`, trained by `make zoo`{where}, one CPU thread per "
        "model; POPE metrics of greedy answers parsed with POPE's rule, "
        f"{' / '.join(f'{n:,}' for n in sizes)} questions per setting):\n\n"
        + zoo_table(cards)
    )


def baselines_block(baselines_json: Path = RESULTS_DIR / "baselines.json") -> str:
    rows = json.loads(baselines_json.read_text())["rows"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    lines = [
        "Shortcut baselines (fitted on the training split, accuracy per setting; `python -m vrp_utils.data baselines`):",
        "",
        "| baseline | " + " | ".join(settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    by_name: dict[str, dict[str, float]] = {}
    for row in rows:
        by_name.setdefault(row["baseline"], {})[row["setting"]] = row["accuracy"]
    for name, values in by_name.items():
        lines.append(f"| {name} | " + " | ".join(f"{values[s]:.3f}" for s in settings) + " |")
    return "\n".join(lines)


BLOCKS = {"zoo-table": zoo_block, "baselines": baselines_block}


def render(text: str) -> str:
    """``text`` with every generated block replaced by its freshly generated content."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
        text = pattern.sub(lambda m: m[1] + make() + "\n" + m[2], text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.readme", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if README.md differs from the generated tables")
    args = parser.parse_args(argv)
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("error: README.md's generated tables differ from the build; run `python -m vrp_utils.readme`", file=sys.stderr)
            return 1
        return 0
    if fresh != current:
        README.write_text(fresh)
        print("README.md tables updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
