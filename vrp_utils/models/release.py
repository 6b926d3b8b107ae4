"""The released zoo: the three trained models, committed under ``zoo/`` with a checksum manifest.

Why: the zoo's training is chaotic across CPU kinds (the same code and seed gave zoo-qwen2-vl POPE random
accuracy 0.785 on an AVX-512 Xeon and 0.631 on an AVX2 EPYC), while the same weights give the same answers
on every kernel path. So the book reads released weights, as a paper with code releases its checkpoints,
and retraining is a command of its own whose models are compared with the release before they may
replace it::

    python -m vrp_utils.models.release check          # every released file against zoo/MANIFEST.json
    python -m vrp_utils.models.release compare DIR    # a retrain's cards beside the release's; in the band?
    python -m vrp_utils.models.release publish DIR    # replace the release with a retrain that is in the band

The band (:func:`band_problems`) is the zoo's target: POPE random accuracy 0.70-0.92, adversarial the
lowest setting, every setting above the best shortcut baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vrp_utils.paths import BENCHMARK_DIR, RETRAIN_DIR, ZOO_DIR

MANIFEST_NAME = "MANIFEST.json"
CARDS_NAME = "zoo.json"
#: The zoo's target (issue 3): errors to predict, and no shortcut that answers as well.
RANDOM_BAND = (0.70, 0.92)
SETTINGS = ("random", "popular", "adversarial")


class ReleaseError(ValueError):
    """The released zoo is missing, changed or corrupt, or a retrain may not replace it."""


def _restore_hint(release_dir: Path) -> str:
    return (f"restore the released files with `git checkout -- {_shown(release_dir)}/`, or publish a checked retrain "
            "with `python -m vrp_utils.models.release publish DIR` (see `make zoo`)")


def _shown(path: Path) -> str:
    from vrp_utils.paths import REPO_ROOT

    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(release_dir: Path = ZOO_DIR) -> dict[str, Any]:
    """The release's manifest, refused with the file's name when it is missing or malformed."""
    path = Path(release_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ReleaseError(f"{_shown(path)} is missing: the released zoo cannot be checked; {_restore_hint(release_dir)}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ReleaseError(f"{_shown(path)} is not valid JSON ({error}); {_restore_hint(release_dir)}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("models"), dict):
        raise ReleaseError(f"{_shown(path)} lacks its 'files' and 'models' tables; {_restore_hint(release_dir)}")
    return manifest


def check_release(release_dir: Path = ZOO_DIR, models: Iterable[str] | None = None,
                  benchmark_dir: Path | None = None) -> dict[str, Any]:
    """Check the released files (all models, or ``models``) against the manifest's sha256; return the manifest.

    Refuses, naming every offending file and the command that restores it: a listed file that is missing or
    whose bytes differ, and a file in a model's folder that the manifest does not list. With ``benchmark_dir``,
    also refuses a benchmark other than the one the release was trained and evaluated on.
    """
    release_dir = Path(release_dir)
    manifest = read_manifest(release_dir)
    chosen = list(manifest["models"]) if models is None else list(models)
    unknown = sorted(set(chosen) - set(manifest["models"]))
    if unknown:
        raise ReleaseError(f"{unknown} not in the released zoo {_shown(release_dir)} (it has: {', '.join(manifest['models'])})")
    files: dict[str, str] = manifest["files"]
    problems = []
    for relative, digest in sorted(files.items()):
        if relative.split("/")[0] not in chosen and models is not None:
            continue
        path = release_dir / relative
        if not path.is_file():
            problems.append(f"{_shown(path)}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{_shown(path)}: sha256 differs from {MANIFEST_NAME} (changed or corrupt)")
    for name in chosen:
        folder = release_dir / name
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file() and path.relative_to(release_dir).as_posix() not in files:
                problems.append(f"{_shown(path)}: not part of the release (not in {MANIFEST_NAME})")
    if problems:
        raise ReleaseError(f"the released zoo fails its manifest ({_shown(release_dir / MANIFEST_NAME)}):\n  "
                           + "\n  ".join(problems) + f"\n{_restore_hint(release_dir)}")
    if benchmark_dir is not None:
        built = benchmark_fingerprint(Path(benchmark_dir))
        if built != manifest.get("benchmark"):
            raise ReleaseError(
                f"the released zoo was trained and evaluated on benchmark {manifest.get('benchmark')}, but "
                f"{_shown(Path(benchmark_dir))} is {built}: the benchmark's code or parameters changed. Retrain on it "
                "(`make zoo`) and publish the retrain, or restore the benchmark's code")
    return manifest


def benchmark_fingerprint(benchmark_dir: Path = BENCHMARK_DIR) -> str:
    """The benchmark's identity (its manifest lists every file's sha256), as the zoo's cards record it."""
    manifest = Path(benchmark_dir) / "manifest.json"
    if not manifest.is_file():
        raise ReleaseError(f"benchmark manifest {_shown(manifest)} missing: build it first with `make data`")
    return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]


def read_cards(zoo_dir: Path) -> dict[str, dict[str, Any]]:
    """The model cards of a zoo folder (``zoo.json``, as ``python -m vrp_utils.models.zoo build`` writes it)."""
    path = Path(zoo_dir) / CARDS_NAME
    if not path.is_file():
        raise ReleaseError(f"{_shown(path)} is missing: not a built zoo (train one with `make zoo`)")
    try:
        return json.loads(path.read_text())["models"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ReleaseError(f"{_shown(path)}: cannot read its 'models' ({error})") from None


def best_baselines(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The best shortcut baseline's accuracy per setting (rows of ``results/baselines.json``)."""
    best: dict[str, float] = {}
    for row in rows:
        best[row["setting"]] = max(best.get(row["setting"], 0.0), float(row["accuracy"]))
    return best


def band_problems(cards: dict[str, dict[str, Any]], best: dict[str, float]) -> list[str]:
    """Why each model is outside the zoo's band (empty when all are in it).

    In the band: POPE random accuracy within :data:`RANDOM_BAND`, adversarial the lowest of the three
    settings, and every setting above the best shortcut baseline ``best[setting]``.
    """
    low, high = RANDOM_BAND
    problems = []
    for name, card in cards.items():
        accuracy = {s: card["metrics"][s]["accuracy"] for s in SETTINGS}
        if not low <= accuracy["random"] <= high:
            problems.append(f"{name}: random accuracy {accuracy['random']:.3f} outside {low:.2f}-{high:.2f}")
        if accuracy["adversarial"] > min(accuracy["random"], accuracy["popular"]):
            problems.append(f"{name}: adversarial accuracy {accuracy['adversarial']:.3f} is not the lowest "
                            f"(random {accuracy['random']:.3f}, popular {accuracy['popular']:.3f})")
        for setting in SETTINGS:
            if accuracy[setting] <= best[setting]:
                problems.append(f"{name}: {setting} accuracy {accuracy[setting]:.3f} not above the best shortcut "
                                f"baseline ({best[setting]:.3f})")
    return problems


def _kernel(card: dict[str, Any]) -> str:
    provenance = card.get("provenance") or {}
    return f"{provenance.get('cpu', '?')}, {provenance.get('cpu_capability', '?')}"


def compare(retrain_dir: Path, release_dir: Path = ZOO_DIR, best: dict[str, float] | None = None,
            benchmark_dir: Path = BENCHMARK_DIR) -> tuple[str, list[str]]:
    """A retrain's cards beside the release's (markdown) and the retrain's band problems (baselines of ``benchmark_dir``
    unless ``best`` gives them)."""
    retrained = read_cards(retrain_dir)
    released = read_cards(release_dir)
    if best is None:
        best = best_baselines(_baseline_rows(benchmark_dir))
    lines = [f"retrain {_shown(Path(retrain_dir))} vs release {_shown(Path(release_dir))} (POPE accuracy; "
             "best shortcut baseline: " + ", ".join(f"{s} {best[s]:.3f}" for s in SETTINGS) + ")", "",
             "| model | seed (release / retrain) | setting | release | retrain | retrain - release |", "|---|---|---|---|---|---|"]
    for name, card in retrained.items():
        before = released.get(name)
        for i, setting in enumerate(SETTINGS):
            new = card["metrics"][setting]["accuracy"]
            old = before["metrics"][setting]["accuracy"] if before else None
            seeds = f"{before['spec']['seed'] if before else '-'} / {card['spec']['seed']}"
            head = f"| {name} | {seeds} |" if i == 0 else "| | |"
            lines.append(f"{head} {setting} | {'-' if old is None else f'{old:.3f}'} | {new:.3f} | "
                         f"{'-' if old is None else f'{new - old:+.3f}'} |")
    lines += ["", "trained on: " + "; ".join(f"{name} {_kernel(card)}" for name, card in retrained.items()),
              "released from: " + "; ".join(f"{name} {_kernel(card)}" for name, card in released.items())]
    return "\n".join(lines), band_problems(retrained, best)


def _baseline_rows(benchmark_dir: Path = BENCHMARK_DIR) -> list[dict[str, Any]]:
    from vrp_utils.data.baselines import baseline_table

    table = baseline_table(benchmark_dir).reset_index()
    return table[["baseline", "setting", "accuracy"]].to_dict("records")


def publish(source_dir: Path, release_dir: Path = ZOO_DIR, best: dict[str, float] | None = None,
            command: str = "python -m vrp_utils.models.release publish") -> dict[str, Any]:
    """Replace the release with the models of ``source_dir``, only if every one is in the band; write the manifest.

    The new release is assembled beside the old one and swapped in by renames, so an interrupted publish
    leaves the old release (or the new one) whole, never a mixture.
    """
    from vrp_utils.models.zoo import ZOO

    source_dir, release_dir = Path(source_dir), Path(release_dir)
    cards = read_cards(source_dir)
    missing = sorted(set(ZOO) - set(cards))
    if missing:
        raise ReleaseError(f"{_shown(source_dir)} lacks {missing}: a release holds every zoo model ({', '.join(ZOO)})")
    without = sorted(name for name, card in cards.items() if not card.get("provenance"))
    if without:
        raise ReleaseError(f"{without} in {_shown(source_dir)} have no training provenance in their cards: retrain them "
                           "with the current code (`make zoo`)")
    benchmarks = {card["training"]["benchmark"] for card in cards.values()}
    if len(benchmarks) != 1:
        raise ReleaseError(f"the models of {_shown(source_dir)} were trained on different benchmarks: {sorted(benchmarks)}")
    problems = band_problems(cards, best if best is not None else best_baselines(_baseline_rows()))
    if problems:
        raise ReleaseError("not published: outside the zoo's band:\n  " + "\n  ".join(problems))
    staging = release_dir.with_name(f".{release_dir.name}.new")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in ZOO:
        shutil.copytree(source_dir / name, staging / name)
    (staging / CARDS_NAME).write_text(json.dumps({"models": {n: cards[n] for n in ZOO}}, indent=2, sort_keys=True) + "\n")
    files = {path.relative_to(staging).as_posix(): sha256_file(path)
             for path in sorted(staging.rglob("*")) if path.is_file()}
    manifest = {
        "about": "The released zoo the book is built from. `python -m vrp_utils.models.release check` compares every "
                 "file with its sha256 below; `make zoo` retrains into data/zoo-retrain and never writes here.",
        "published_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "published_with": command,
        "benchmark": benchmarks.pop(),
        "size_bytes": sum((staging / f).stat().st_size for f in files),
        "models": {
            name: {
                "architecture": card["architecture"], "parameters": card["parameters"], "seed": card["spec"]["seed"],
                "fingerprint": card["fingerprint"],
                "accuracy": {s: card["metrics"][s]["accuracy"] for s in SETTINGS},
                "training_seconds": card["training"]["build_seconds"],
                "provenance": card["provenance"],
            }
            for name in ZOO for card in [cards[name]]
        },
        "files": files,
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    retired = release_dir.with_name(f".{release_dir.name}.old")
    if retired.exists():
        shutil.rmtree(retired)
    if release_dir.exists():
        release_dir.rename(retired)
    staging.rename(release_dir)
    if retired.exists():
        shutil.rmtree(retired)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vrp_utils.models.release", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check every released file against zoo/MANIFEST.json (and the benchmark)")
    check.add_argument("--release", type=Path, default=ZOO_DIR)
    check.add_argument("--benchmark", type=Path, default=BENCHMARK_DIR,
                       help="also check that the release was trained on this benchmark (default: data/benchmark)")
    comparison = sub.add_parser("compare", help="a retrain's cards beside the release's; exit 1 if it is outside the band")
    comparison.add_argument("retrain", type=Path, nargs="?", default=RETRAIN_DIR)
    comparison.add_argument("--release", type=Path, default=ZOO_DIR)
    comparison.add_argument("--benchmark", type=Path, default=BENCHMARK_DIR, help="whose shortcut baselines set the band")
    publishing = sub.add_parser("publish", help="replace the release with a retrain that is in the band")
    publishing.add_argument("retrain", type=Path, nargs="?", default=RETRAIN_DIR)
    publishing.add_argument("--release", type=Path, default=ZOO_DIR)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            manifest = check_release(args.release, benchmark_dir=args.benchmark)
            print(f"released zoo OK: {len(manifest['files'])} files match {_shown(args.release / MANIFEST_NAME)} "
                  f"({manifest['size_bytes'] / 2**20:.1f} MiB; benchmark {manifest['benchmark']})")
        elif args.command == "compare":
            text, problems = compare(args.retrain, args.release, benchmark_dir=args.benchmark)
            print(text)
            print("\n" + ("in the band: every model" if not problems else "OUTSIDE the band:\n  " + "\n  ".join(problems)))
            return 1 if problems else 0
        else:
            words = argv if argv is not None else sys.argv[1:]
            manifest = publish(args.retrain, args.release, command=shlex.join(["python", "-m", "vrp_utils.models.release", *words]))
            print(f"published {', '.join(manifest['models'])} to {_shown(args.release)} "
                  f"({manifest['size_bytes'] / 2**20:.1f} MiB); commit it: git add {_shown(args.release)}")
    except ReleaseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
