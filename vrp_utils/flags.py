"""Weak models, flagged wherever their numbers appear: ``weak = flags.weak_models(model_names)`` once per chapter,
then ``plots.caption(..., weak=weak)`` on each figure and ``flags.footnote(weak)`` under each table.

Why: a model that has not learned the task (below the zoo's band, or no better than a shortcut that never looks at
the objects) still yields correlations, AUROCs and ablation effects; read without a warning they describe a model
that answers close to chance. The rule is the zoo's target (:mod:`vrp_utils.models.release`): a model is **weak**
when its POPE random accuracy is below the band's lower end (:data:`~vrp_utils.models.release.RANDOM_BAND`), or
when its accuracy in any setting is not above the best shortcut baseline of that setting (``results/baselines.json``,
or the baselines computed from the benchmark when that file is absent or from another benchmark build).
A model's accuracies come from its model card (``model_card.json`` beside its weights, as ``make zoo`` writes
it); a model without a card (a hub checkpoint) is not checked, and :func:`footnote` says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vrp_utils.models.release import RANDOM_BAND, SETTINGS
from vrp_utils.paths import BENCHMARK_DIR, RESULTS_DIR

BADGE = "\u26a0"  # a warning sign beside a weak model's name


@dataclass(frozen=True)
class Best:
    """The best shortcut baseline of one setting."""

    accuracy: float
    baseline: str


def best_baselines(rows: Sequence[Mapping]) -> dict[str, Best]:
    """The best shortcut baseline per setting, from rows of (baseline, setting, accuracy)."""
    best: dict[str, Best] = {}
    for row in rows:
        setting, accuracy = str(row["setting"]), float(row["accuracy"])
        if setting not in best or accuracy > best[setting].accuracy:
            best[setting] = Best(accuracy, str(row["baseline"]))
    return best


def baseline_rows(results_dir: Path = RESULTS_DIR, benchmark_dir: Path = BENCHMARK_DIR) -> list[dict]:
    """The shortcut baselines of ``benchmark_dir``: ``results_dir/baselines.json`` when it was written from the same
    benchmark build (its ``build_key``), else computed now (about 5 s)."""
    path = Path(results_dir) / "baselines.json"
    manifest = Path(benchmark_dir) / "manifest.json"
    build_key = json.loads(manifest.read_text()).get("build_key") if manifest.is_file() else None
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("build_key") == build_key and saved.get("rows"):
            return saved["rows"]
    from vrp_utils.data.baselines import baseline_table

    return baseline_table(benchmark_dir).reset_index()[["baseline", "setting", "accuracy"]].to_dict("records")


def weakness(accuracy: Mapping[str, float], best: Mapping[str, Best]) -> list[str]:
    """Why a model with these POPE accuracies (``{setting: accuracy}``) is weak; empty when it is not."""
    low, _ = RANDOM_BAND
    reasons = []
    if "random" in accuracy and accuracy["random"] < low:
        reasons.append(f"random accuracy {accuracy['random']:.3f}, below the zoo's band "
                       f"({RANDOM_BAND[0]:.2f}-{RANDOM_BAND[1]:.2f})")
    for setting in SETTINGS:
        if setting in accuracy and setting in best and accuracy[setting] <= best[setting].accuracy:
            reasons.append(f"{setting} accuracy {accuracy[setting]:.3f}, not above the shortcut baseline "
                           f"{best[setting].baseline} ({best[setting].accuracy:.3f})")
    return reasons


def card_accuracy(model: str | Path) -> dict[str, float] | None:
    """``{setting: accuracy}`` from the model's card (``model_card.json``), None where it has none."""
    from vrp_utils.models.loading import resolve_model_dir

    card = resolve_model_dir(model) / "model_card.json"
    if not card.is_file():
        return None
    metrics = json.loads(card.read_text()).get("metrics") or {}
    return {s: float(m["accuracy"]) for s, m in metrics.items() if isinstance(m, dict) and "accuracy" in m}


@dataclass(frozen=True)
class Weak:
    """A chapter's check of its models: ``reasons[model]`` for each weak one, ``unchecked`` those without a card."""

    reasons: dict[str, list[str]]
    unchecked: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.reasons or self.unchecked)

    def __contains__(self, model: object) -> bool:
        return model in self.reasons

    def label(self, model: str) -> str:
        """The model's name, with the badge when it is weak."""
        return f"{model} {BADGE}" if model in self.reasons else model

    def sentence(self, models: Sequence[str] | None = None) -> str:
        """One sentence per weak model among ``models`` (all when None), and one for the unchecked; "" when none."""
        names = [m for m in self.reasons if models is None or m in models]
        parts = [f"{BADGE} **{m}** is a weak model ({'; '.join(self.reasons[m])}): its numbers describe a model "
                 "that has not learned the task well; read them with care." for m in names]
        unchecked = [m for m in self.unchecked if models is None or m in models]
        if unchecked:
            parts.append(f"Not checked against the zoo's band (no model card): {', '.join(unchecked)}.")
        return " ".join(parts)


def weak_models(models: Sequence[str | Path], results_dir: Path = RESULTS_DIR,
                benchmark_dir: Path = BENCHMARK_DIR) -> Weak:
    """Check each model (zoo name, directory or hub id) against the band and the shortcut baselines."""
    best: dict[str, Best] | None = None
    reasons: dict[str, list[str]] = {}
    unchecked = []
    for model in models:
        accuracy = card_accuracy(model)
        if accuracy is None:
            unchecked.append(str(model))
            continue
        if best is None:
            best = best_baselines(baseline_rows(results_dir, benchmark_dir))
        found = weakness(accuracy, best)
        if found:
            reasons[str(model)] = found
    return Weak(reasons, tuple(unchecked))


def weak_from_results(zoo_accuracy: Mapping[str, float], baselines: Mapping[str, float]) -> Weak:
    """The same check from chapter 00's published results (``zoo_accuracy`` and ``baselines``, keyed
    ``name/setting``): what the pages generated from the results read."""
    accuracy: dict[str, dict[str, float]] = {}
    for key, value in zoo_accuracy.items():
        name, setting = key.rsplit("/", 1)
        accuracy.setdefault(name, {})[setting] = float(value)
    best = best_baselines([{"baseline": k.rsplit("/", 1)[0], "setting": k.rsplit("/", 1)[1], "accuracy": v}
                           for k, v in baselines.items()])
    return Weak({name: r for name, acc in accuracy.items() if (r := weakness(acc, best))})


def footnote(weak: Weak, models: Sequence[str] | None = None) -> None:
    """Display, under a table or figure, the note on each weak model it shows (nothing when there is none)."""
    text = weak.sentence(models)
    if text:
        from IPython.display import Markdown, display

        display(Markdown(text))
