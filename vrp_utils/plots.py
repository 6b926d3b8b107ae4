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


def caption(notebook: str, model: str, split: str, n: int, extra: str = "") -> str:
    """The line every figure carries: which notebook, model, split and n made it."""
    text = f"{notebook} · model: {model} · split: {split} · n = {n:,}"
    return f"{text} · {extra}" if extra else text


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
