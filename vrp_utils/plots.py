"""One style for every figure of the book, and the few plotting helpers the notebooks call.

Why here and not in notebooks: notebooks hold narrative, parameters and plotting *calls*; the
drawing code is shared so that every chapter looks the same and is tested once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

PALETTE = "colorblind"


def set_style() -> None:
    """The book's figure style (deterministic, offline fonts)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "font.family": "DejaVu Sans", "svg.hashsalt": "vrp"})


def caption(notebook: str, model: str, split: str, n: int, extra: str = "", *, weak: Any = None) -> str:
    """The line every figure carries: which notebook, model, split and n made it. ``weak``
    (:func:`vrp_utils.flags.weak_models`) adds a warning naming each weak model the caption's ``model`` names."""
    text = f"{notebook} · model: {model} · split: {split} · n = {n:,}"
    text = f"{text} · {extra}" if extra else text
    named = [m for m in (weak.reasons if weak else ()) if m in model]
    if named:
        text += " · \u26a0 weak model: " + ", ".join(f"{m} ({weak.reasons[m][0]})" for m in named)
    return text


def show_examples(rows: Sequence[dict[str, Any]], columns: int = 4, title: str | None = None) -> plt.Figure:
    """Benchmark images with their object boxes and the question asked about each."""
    count = len(rows)
    if count == 0:
        raise ValueError("show_examples needs at least one row")
    lines = (count + columns - 1) // columns
    figure, axes = plt.subplots(lines, columns, figsize=(2.6 * columns, 2.9 * lines), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(np.asarray(row["image"].convert("RGB")), interpolation="nearest")
        for box in row.get("boxes") or []:
            x0, y0, x1, y1 = box["bbox"]
            asked = box["category"] == row.get("object")
            ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False,
                                       edgecolor="#d62728" if asked else "#ffffff", linewidth=1.6 if asked else 0.8))
        ax.set_title(f"{row['question']}\nlabel: {row['label']}", fontsize=7.5)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def estimate_lines(
    table: Any, x: str, hue: str, facet: str, value: str = "value", low: str = "ci_low", high: str = "ci_high",
    reference: float | None = 0.0, ylabel: str = "", title: str | None = None, facet_order: Sequence[str] | None = None,
) -> plt.Figure:
    """One panel per ``facet``: a line per ``hue`` over ``x`` with its CI as a band (points where x has one value)."""
    facets = list(facet_order) if facet_order is not None else list(dict.fromkeys(table[facet]))
    hues = list(dict.fromkeys(table[hue]))
    colours = dict(zip(hues, sns.color_palette(PALETTE, len(hues))))
    figure, axes = plt.subplots(1, len(facets), figsize=(3.6 * len(facets), 3.3), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], facets):
        part = table[table[facet] == name]
        for h in hues:
            line = part[part[hue] == h].sort_values(x)
            if line.empty:
                continue
            xs = line[x].to_numpy(dtype=float)
            ax.plot(xs, line[value], marker="o", color=colours[h], label=str(h))
            ax.fill_between(xs, line[low].astype(float), line[high].astype(float), color=colours[h], alpha=0.18, linewidth=0)
            if len(xs) == 1:  # a band needs two x values: draw the interval as a bar
                ax.vlines(xs, line[low].astype(float), line[high].astype(float), color=colours[h], linewidth=2)
        if reference is not None:
            ax.axhline(reference, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_title(str(name), fontsize=10)
        ax.set_xlabel(x)
        ax.set_xticks(sorted(set(table[x].astype(float))))
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    return figure


def attention_overlay(ax: plt.Axes, image: Any, weights: np.ndarray, boxes: np.ndarray, highlight: Sequence[Sequence[float]] = (),
                      title: str = "") -> None:
    """An image with a map drawn over each token's patch (``boxes`` from the adapter) and boxes outlined."""
    ax.imshow(np.asarray(image), interpolation="nearest")
    top = float(np.max(weights)) if len(weights) else 1.0
    for w, (x0, y0, x1, y1) in zip(weights, boxes):
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, color="#d55e00", alpha=0.75 * float(w) / top, linewidth=0))
    for x0, y0, x1, y1 in highlight:
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#0072b2", linewidth=1.5))
    ax.set_title(title, fontsize=7.5)
    ax.axis("off")
