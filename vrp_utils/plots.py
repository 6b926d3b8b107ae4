"""One style for every figure of the book, and the few plotting helpers the notebooks call.

Why here and not in notebooks: notebooks hold narrative, parameters and plotting *calls*; the
drawing code is shared so that every chapter looks the same and is tested once.

Legible at text width: the book shows an image at most :data:`TEXT_WIDTH_PX` wide (its content
column at a 1400 px window, measured in headless Chromium), and its body text is
:data:`BODY_TEXT_PX` high. Figures are drawn :data:`TEXT_WIDTH_IN` wide at :data:`DPI`, so they are
shown at their own size, with fonts of at least :data:`FONT_PT` points (>= the body text), at most
two panels per row, and legends outside the axes or in an empty panel. :func:`smallest_text_px`
measures what a reader sees.
"""

from __future__ import annotations

import math
import textwrap
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns

PALETTE = "colorblind"
#: The book's content column (px) and body text height (px) at a 1400 px window (Chromium, 2026-12).
TEXT_WIDTH_PX = 772
BODY_TEXT_PX = 16
DPI = 110
#: Figure width (inches) shown at its own size in the content column.
TEXT_WIDTH_IN = 7.0
#: The smallest font on any figure: 11 pt at 110 dpi is 16.8 px.
FONT_PT = 11
#: Okabe & Ito's colour-blind-safe palette (Okabe & Ito 2008, "Color Universal Design").
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
#: One colour per model in every chapter; a model not named here gets a fixed colour from its name
#: (:func:`model_colour`).
MODEL_COLOURS: dict[str, str] = {
    "zoo-llava": OKABE_ITO[0],
    "zoo-paligemma": OKABE_ITO[1],
    "zoo-qwen2-vl": OKABE_ITO[2],
    "pooled": "#333333",
}


def model_colour(name: str) -> str:
    """The model's colour: :data:`MODEL_COLOURS`, else one of the palette's other colours chosen by the name's hash."""
    if name in MODEL_COLOURS:
        return MODEL_COLOURS[name]
    spare = [c for c in OKABE_ITO if c not in MODEL_COLOURS.values()]
    return spare[zlib.crc32(str(name).encode()) % len(spare)]


def colours_for(names: Sequence[str], by_model: bool = False) -> dict[str, Any]:
    """A colour per name: the models' own colours (``by_model``), else the colour-blind palette in order."""
    names = list(dict.fromkeys(names))
    if by_model:
        return {n: model_colour(n) for n in names}
    return dict(zip(names, sns.color_palette(PALETTE, len(names))))


def set_style() -> None:
    """The book's figure style (deterministic, offline fonts, every text at least :data:`FONT_PT`)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    plt.rcParams.update({
        "figure.dpi": DPI, "savefig.dpi": DPI, "font.family": "DejaVu Sans", "svg.hashsalt": "vrp",
        "font.size": FONT_PT, "axes.titlesize": FONT_PT + 1, "axes.labelsize": FONT_PT, "xtick.labelsize": FONT_PT,
        "ytick.labelsize": FONT_PT, "legend.fontsize": FONT_PT, "legend.title_fontsize": FONT_PT,
        "figure.titlesize": FONT_PT,
    })


def caption(notebook: str, model: str, split: str, n: int, extra: str = "", *, weak: Any = None) -> str:
    """The line every figure carries: which notebook, model, split and n made it. ``weak``
    (:func:`vrp_utils.flags.weak_models`) adds a warning naming each weak model the caption's ``model`` names."""
    text = f"{notebook} · model: {model} · split: {split} · n = {n:,}"
    text = f"{text} · {extra}" if extra else text
    named = [m for m in (weak.reasons if weak else ()) if m in model]
    if named:
        text += " · \u26a0 weak model: " + ", ".join(f"{m} ({weak.reasons[m][0]})" for m in named)
    return text


def wrap(text: str, width: float = TEXT_WIDTH_IN, size: float = FONT_PT) -> str:
    """``text`` broken into lines that fit ``width`` inches at ``size`` points (about 0.55 em a character)."""
    chars = max(12, int(width * 72 / (0.55 * size)))
    return "\n".join(textwrap.fill(part, chars, break_on_hyphens=False) for part in str(text).split("\n"))


def set_title(figure: plt.Figure, title: str | None) -> None:
    """The figure's caption line(s) on top, wrapped to the figure's width."""
    if title:
        text = wrap(title, figure.get_figwidth())
        # room for the lines beyond the two a figure's height already allows (constrained layout keeps the axes' size)
        figure.set_figheight(figure.get_figheight() + max(0, text.count("\n") - 1) * 1.4 * FONT_PT / 72)
        figure.suptitle(text, fontsize=FONT_PT)


def panels(count: int, columns: int = 2, panel_height: float = 2.9, width: float = TEXT_WIDTH_IN,
           **subplots: Any) -> tuple[plt.Figure, np.ndarray]:
    """A text-width figure of ``count`` panels, at most ``columns`` per row; the axes as a flat array
    (unused slots are switched off, the first of them kept for a legend: ``figure.spare_axes``)."""
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width, panel_height * rows + 0.6), squeeze=False,
                                layout="constrained", **subplots)
    flat = axes.ravel()
    for ax in flat[count:]:
        ax.axis("off")
    figure.spare_axes = list(flat[count:])
    return figure, flat[:count]


def legend_outside(figure: plt.Figure, handles: Sequence[Any], labels: Sequence[str], title: str | None = None) -> None:
    """One legend for the figure that covers no data: in a spare panel if there is one, else below the axes."""
    if not handles:
        return
    spare = getattr(figure, "spare_axes", [])
    if spare:
        spare[0].legend(handles, labels, loc="center", frameon=False, title=title)
    else:
        rows = math.ceil(len(labels) / 2) + (1 if title else 0)
        figure.set_figheight(figure.get_figheight() + rows * 1.5 * FONT_PT / 72)  # the legend's own room below the axes
        figure.legend(handles, labels, loc="outside lower center", ncol=min(2, len(labels)), frameon=False, title=title)


def smallest_text_px(figure: plt.Figure, shown_width_px: float = TEXT_WIDTH_PX) -> float:
    """The height in screen px of the smallest visible text when the saved figure is shown at most
    ``shown_width_px`` wide (the book scales a wider image down): compare with :data:`BODY_TEXT_PX`."""
    dpi = plt.rcParams["savefig.dpi"]
    dpi = figure.dpi if dpi == "figure" else float(dpi)
    saved = figure.get_figwidth() * dpi
    scale = min(1.0, shown_width_px / saved)
    sizes = [t.get_fontsize() for t in figure.findobj(plt.Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * dpi / 72 * scale if sizes else math.inf


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
    columns: int = 2, hlines: Sequence[Mapping[str, Any]] = (), legend_title: str | None = None,
    vlines: Sequence[Mapping[str, Any]] = (),
) -> plt.Figure:
    """One panel per ``facet`` (at most ``columns`` a row): a line per ``hue`` over ``x`` with its CI as a band
    (an interval bar where x has one value). Models (``hue="model"``) take their :data:`MODEL_COLOURS`.

    ``hlines``: extra horizontal lines, each ``{"facet", "y", "label", "color", "linestyle"}``, drawn in their
    panel and named in the one legend, which sits in a spare panel or below the axes (never on data).
    ``vlines``: vertical marks, each ``{"facet", "x", "label", "color", "linestyle"}`` and optionally ``"span":
    (low, high)``, an interval of x shaded behind the data and named in the legend as ``"span_label"``.
    """
    facets = list(facet_order) if facet_order is not None else list(dict.fromkeys(table[facet]))
    hues = list(dict.fromkeys(table[hue]))
    colours = colours_for(hues, by_model=hue == "model")
    figure, axes = panels(len(facets), columns, sharey=True)
    handles: dict[str, Any] = {}
    ticks = sorted(set(table[x].astype(float)))
    for ax, name in zip(axes, facets):
        part = table[table[facet] == name]
        for h in hues:
            line = part[part[hue] == h].sort_values(x)
            if line.empty:
                continue
            xs = line[x].to_numpy(dtype=float)
            handles[str(h)], = ax.plot(xs, line[value], marker="o", color=colours[h], label=str(h))
            ax.fill_between(xs, line[low].astype(float), line[high].astype(float), color=colours[h], alpha=0.18, linewidth=0)
            if len(xs) == 1:  # a band needs two x values: draw the interval as a bar
                ax.vlines(xs, line[low].astype(float), line[high].astype(float), color=colours[h], linewidth=2)
        for extra in hlines:
            if extra["facet"] == name:
                handles[extra["label"]] = ax.axhline(extra["y"], color=extra.get("color", "0.25"), linestyle=extra.get("linestyle", "--"),
                                                     linewidth=1.4, label=extra["label"])
        for mark in vlines:
            if mark["facet"] != name:
                continue
            if mark.get("span") is not None:
                start, end = mark["span"]
                handles[mark.get("span_label", f"{mark['label']} (interval)")] = ax.axvspan(
                    start - 0.15, end + 0.15, color=mark.get("color", "0.25"), alpha=0.12, linewidth=0, zorder=0)
            handles[mark["label"]] = ax.axvline(mark["x"], color=mark.get("color", "0.25"), linestyle=mark.get("linestyle", "-."),
                                                linewidth=1.4, label=mark["label"])
        if reference is not None:
            ax.axhline(reference, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_title(str(name))
        ax.set_xlabel(x)
        ax.set_xticks(ticks)
        ax.tick_params(labelleft=True)
    for i, ax in enumerate(axes):
        if i % max(1, min(columns, len(facets))) == 0:
            ax.set_ylabel(ylabel)
    legend_outside(figure, list(handles.values()), list(handles), legend_title)
    set_title(figure, title)
    return figure


def attention_overlay(ax: plt.Axes, image: Any, weights: np.ndarray, boxes: np.ndarray, highlight: Sequence[Sequence[float]] = (),
                      title: str = "", grid_lines: bool = True) -> list[plt.Rectangle]:
    """An image with a map drawn over each token's patch (``boxes`` from the adapter, in original-image pixels:
    pixel x covers [x, x+1)) and ``highlight`` boxes outlined; the token rectangles, in token order.

    Each token's rectangle covers exactly its patch (``gid`` ``token:k``), outlined thinly when ``grid_lines``,
    so the token grid's true geometry shows (a centre crop, Qwen2-VL's merged 2x2 cells).
    """
    ax.imshow(np.asarray(image), interpolation="nearest")
    weights = np.asarray(weights, dtype=float)
    top = float(np.max(weights)) if len(weights) and np.max(weights) > 0 else 1.0
    drawn = []
    for k, (w, (x0, y0, x1, y1)) in enumerate(zip(weights, boxes)):
        rect = plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, facecolor=(0.835, 0.369, 0.0, 0.75 * float(w) / top),
                             edgecolor=(1, 1, 1, 0.45) if grid_lines else "none", linewidth=0.5, gid=f"token:{k}")
        ax.add_patch(rect)
        drawn.append(rect)
    for x0, y0, x1, y1 in highlight:
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="#0072b2", linewidth=2.0,
                                   gid="object"))
    if title:
        ax.set_title(title, fontsize=FONT_PT, loc="left")
    ax.axis("off")
    return drawn


def attention_gallery(examples: Sequence[Mapping[str, Any]], columns: int = 2, title: str | None = None) -> plt.Figure:
    """Examples (from :func:`vrp_utils.analysis.gallery.attention_examples`) at most ``columns`` a row: each the image
    with its map over the token patches, the queried object's box in blue, and its question, answer and confidence."""
    if not examples:
        raise ValueError("attention_gallery needs at least one example")
    figure, axes = panels(len(examples), columns, panel_height=3.6)
    for ax, ex in zip(axes, examples):
        verdict = "right" if ex["correct"] else "wrong"
        text = (f"{ex['stratum']}\n{ex['question']}\nanswer {ex['answer']!r}: {verdict} (truth {ex['label']})\n"
                f"|yes-no margin| {ex['confidence']:.2f}")
        attention_overlay(ax, ex["image"], ex["weights"], ex["token_boxes"], ex["object_boxes"], wrap(text, TEXT_WIDTH_IN / columns))
    set_title(figure, title)
    return figure


def masked_gallery(examples: Sequence[Mapping[str, Any]], title: str | None = None) -> plt.Figure:
    """One row per example (from :func:`vrp_utils.analysis.gallery.masked_examples`) under its question: the image
    unmasked, then as the model received it under each condition, each titled with the model's answer to it."""
    if not examples:
        raise ValueError("masked_gallery needs at least one example")
    count = max(len(ex["views"]) for ex in examples)
    size = TEXT_WIDTH_IN / count
    titles = [[f"{v['condition']}\n" + wrap(f"{v['answer']!r} {'right' if v['correct'] else 'wrong'}", size * 0.95) for v in ex["views"]]
              for ex in examples]
    heights = [size + 0.2 * (1 + max(t.count("\n") + 1 for t in row)) + 0.2 for row in titles]
    figure = plt.figure(figsize=(TEXT_WIDTH_IN, sum(heights) + 0.5), layout="constrained")
    rows = np.atleast_1d(figure.subfigures(len(examples), 1, height_ratios=heights))
    for sub, ex, row_titles in zip(rows, examples, titles):
        sub.suptitle(wrap(f"{ex['stratum']}: {ex['question']} (truth: {ex['label']})", TEXT_WIDTH_IN), fontsize=FONT_PT, x=0.0, ha="left")
        axes = sub.subplots(1, count, squeeze=False)[0]
        for ax in axes:
            ax.axis("off")
        for ax, view, text in zip(axes, ex["views"], row_titles):
            ax.imshow(np.asarray(view["image"]), interpolation="nearest")
            ax.set_title(text, fontsize=FONT_PT)
    set_title(figure, title)
    return figure


def annotated_heatmaps(table: Any, facet: str, row: str, column: str, order: Sequence[str], value: str = "value",
                       low: str = "ci_low", high: str = "ci_high", vmin: float = 0.5, vmax: float = 1.0,
                       xlabel: str = "", ylabel: str = "", facet_titles: Mapping[str, str] | None = None,
                       title: str | None = None, interval: bool | None = None) -> plt.Figure:
    """One heatmap per ``facet`` stacked at text width, each cell annotated "value [low, high]" in the body font
    (``interval`` False: the value alone; None: the interval only where at most 4 columns leave it room);
    rows and columns in ``order``."""
    facets = list(dict.fromkeys(table[facet]))
    figure, axes = panels(len(facets), columns=1, panel_height=0.45 * len(order) + 0.5, sharex=True)
    order = list(order)
    for i, (ax, name) in enumerate(zip(axes, facets)):
        part = table[table[facet] == name]
        grid = part.pivot(index=row, columns=column, values=value).loc[order, order].astype(float)
        with_interval = len(order) <= 4 if interval is None else interval
        text = part.assign(_t=[f"{v:.2f} [{lo:.2f}, {hi:.2f}]" if with_interval else f"{v:.2f}"
                               for v, lo, hi in zip(part[value], part[low], part[high])])
        labels = text.pivot(index=row, columns=column, values="_t").loc[order, order]
        sns.heatmap(grid, annot=labels, fmt="", vmin=vmin, vmax=vmax, cmap="viridis", cbar=False, ax=ax,
                    annot_kws={"fontsize": FONT_PT})
        ax.set_title((facet_titles or {}).get(name, str(name)), loc="left")
        ax.set_ylabel(ylabel)
        ax.set_xlabel(xlabel if i == len(facets) - 1 else "")
        ax.tick_params(axis="y", rotation=0)
    set_title(figure, title)
    return figure


def spread(values: Sequence[float], gap: float) -> np.ndarray:
    """Positions as close as possible to ``values`` (in their order) with at least ``gap`` between any two:
    where labels would collide, they are pushed apart evenly about their mean (for labels beside clustered points)."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="stable")
    # clusters of labels closer than gap are laid out evenly around their centre, merging until none overlap
    groups = [[float(values[i])] for i in order]
    centres = [g[0] for g in groups]
    merged = True
    while merged:
        merged = False
        for i in range(len(groups) - 1):
            top_i = centres[i] + gap * (len(groups[i]) - 1) / 2
            bottom_next = centres[i + 1] - gap * (len(groups[i + 1]) - 1) / 2
            if bottom_next - top_i < gap - 1e-12:
                groups[i] += groups.pop(i + 1)
                centres.pop(i + 1)
                centres[i] = float(np.mean(groups[i]))
                merged = True
                break
    out = np.empty(len(values))
    k = 0
    for g, c in zip(groups, centres):
        for j in range(len(g)):
            out[order[k]] = c + gap * (j - (len(g) - 1) / 2)
            k += 1
    return out


def cost_scatter(table: Any, facet: str, label: str, x: str, y: str, low: str, high: str, floor: float,
                 fronts: Mapping[str, Sequence[str]] | None = None, reference: float | None = 0.5, xlabel: str = "",
                 ylabel: str = "", title: str | None = None) -> plt.Figure:
    """A scatter per ``facet`` (at most two a row) of ``y`` with its CI against ``x`` on a log scale (values below
    ``floor`` drawn at it), each point numbered, the numbers spread apart with leader lines where points crowd,
    and a key of numbers to ``label`` in a spare panel (or below); ``fronts[facet]``: labels joined by a step line."""
    names = list(dict.fromkeys(table[label]))
    number = {n: i + 1 for i, n in enumerate(names)}
    facets = list(dict.fromkeys(table[facet]))
    figure, axes = panels(len(facets), 2, panel_height=3.4, sharey=True)
    for ax, name in zip(axes, facets):
        part = table[table[facet] == name].copy()
        part["_x"] = part[x].fillna(floor).clip(lower=floor).astype(float)
        colour = model_colour(name)
        ax.errorbar(part["_x"], part[y], yerr=[part[y] - part[low], part[high] - part[y]], fmt="o", ms=4, lw=1,
                    color=colour, gid="points")
        if fronts and fronts.get(name):
            front = part.set_index(label).loc[list(fronts[name])]
            ax.plot(front["_x"], front[y], color="0.3", lw=1, drawstyle="steps-post")
        if reference is not None:
            ax.axhline(reference, color="0.5", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(str(name))
        ax.set_xlabel(xlabel)
        ax.tick_params(labelleft=True)
        ax.margins(x=0.25)
        low_y, high_y = float(np.nanmin(table[low])), float(np.nanmax(table[high]))
        ax.set_ylim(low_y - 0.03, high_y + 0.03)
    for i, ax in enumerate(axes):
        if i % 2 == 0:
            ax.set_ylabel(ylabel)
    figure.draw_without_rendering()  # the laid-out axes' heights, to keep numbers one text line apart
    for ax, name in zip(axes, facets):
        part = table[table[facet] == name].copy()
        part["_x"] = part[x].fillna(floor).clip(lower=floor).astype(float)
        bottom, top = ax.get_ylim()
        gap = 1.3 * FONT_PT / 72 * figure.dpi / ax.get_window_extent().height * (top - bottom)
        # points at about the same x (within a tenth of a decade) share a column of labels to their right
        columns = np.round(np.log10(part["_x"].to_numpy()) / 0.1)
        for col in np.unique(columns):
            members = part[columns == col].sort_values(y)
            # too many for one column of labels within the axes: alternate them right and left of the points
            sides = [1] if len(members) * gap <= 0.9 * (top - bottom) else [1, -1]
            for k, side in enumerate(sides):
                group = members.iloc[k::len(sides)]
                ys = spread(group[y].to_numpy(float), gap)
                ys += max(0.0, bottom + gap / 2 - ys.min()) - max(0.0, ys.max() - (top - gap / 2))  # inside the axes if it fits
                for (_, r), ly in zip(group.iterrows(), ys):
                    ax.annotate(str(number[r[label]]), (r["_x"], r[y]), xytext=(r["_x"] * 10 ** (0.18 * side), ly), textcoords="data",
                                fontsize=FONT_PT, va="center", ha="left" if side > 0 else "right", gid=f"label:{r[label]}",
                                arrowprops={"arrowstyle": "-", "color": "0.55", "lw": 0.6, "shrinkA": 0, "shrinkB": 2}
                                ).set_in_layout(False)
    key = [f"{number[n]:>2}  {n}" for n in names]
    half = (len(key) + 1) // 2
    text = "\n".join(key) if figure.spare_axes else "\n".join(
        f"{a:<28}{b}" for a, b in zip(key[:half], key[half:] + [""]))
    if figure.spare_axes:
        figure.spare_axes[0].text(0.05, 0.5, text, va="center", ha="left", fontsize=FONT_PT, family="DejaVu Sans Mono",
                                  transform=figure.spare_axes[0].transAxes)
    else:
        figure.text(0.02, 0.0, text, va="top", ha="left", fontsize=FONT_PT, family="DejaVu Sans Mono")
    set_title(figure, title)
    return figure
