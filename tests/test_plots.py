"""The book's figures are legible at text width: panels wrap at two a row, fonts at least the body text's
size on the shown image, legends off the data, one colour per model."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import matplotlib.text
import pandas as pd
import pytest

from vrp_utils import plots


@pytest.fixture(autouse=True)
def book_style():
    with plt.rc_context():
        plots.set_style()
        yield
        plt.close("all")


def _estimates(facets, hues, hue="metric") -> pd.DataFrame:
    rows = [{"panel": f, hue: h, "layer": layer, "value": 0.1 * i + 0.01 * layer, "ci_low": 0.1 * i - 0.05,
             "ci_high": 0.1 * i + 0.05}
            for f in facets for i, h in enumerate(hues) for layer in range(4)]
    return pd.DataFrame(rows)


def _overlaps_data(legend, ax) -> bool:
    box = legend.get_window_extent()
    return box.overlaps(ax.get_window_extent())


@pytest.mark.parametrize("count", [1, 3, 4, 5])
def test_estimate_lines_wraps_at_two_panels_a_row_and_keeps_the_legend_off_the_data(count):
    facets = [f"model {i}" for i in range(count)]
    table = _estimates(facets, ["entropy", "ck_text", "gini"])
    long_caption = plots.caption("01_attention", ", ".join(facets), "random and pooled", 1725, "map step0; 95% CI: bootstrap over images (1000)")
    figure = plots.estimate_lines(table, x="layer", hue="metric", facet="panel", title=long_caption, hlines=[
        {"facet": facets[0], "y": 0.3, "label": "control", "color": "0.2", "linestyle": ":"}])
    figure.canvas.draw()
    data_axes = [ax for ax in figure.axes if ax.lines]
    assert len(data_axes) == count
    assert len({round(ax.get_position().x0, 3) for ax in data_axes}) == min(2, count)  # at most two columns
    assert figure.get_figwidth() * plots.DPI <= plots.TEXT_WIDTH_PX  # shown at its own size
    assert plots.smallest_text_px(figure) >= plots.BODY_TEXT_PX
    legends = [lg for ax in figure.axes for lg in [ax.get_legend()] if lg] + list(figure.legends)
    assert len(legends) == 1 and {t.get_text() for t in legends[0].get_texts()} == {"entropy", "ck_text", "gini", "control"}
    assert not any(_overlaps_data(legends[0], ax) for ax in data_axes)
    # the caption is wrapped inside the figure's width
    title = figure._suptitle
    assert title.get_window_extent().width <= figure.bbox.width


def test_each_model_has_one_colour_everywhere():
    assert plots.model_colour("zoo-llava") == plots.MODEL_COLOURS["zoo-llava"]
    assert len(set(plots.MODEL_COLOURS.values())) == len(plots.MODEL_COLOURS)
    assert plots.model_colour("my/own-model") == plots.model_colour("my/own-model")
    assert plots.model_colour("my/own-model") not in plots.MODEL_COLOURS.values()
    models = ["zoo-qwen2-vl", "zoo-llava"]
    figure = plots.estimate_lines(_estimates(["a", "b"], models, hue="model"), x="layer", hue="model", facet="panel")
    colours = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in figure.axes[0].lines if not line.get_label().startswith("_")}
    assert colours == {m: plots.MODEL_COLOURS[m].lower() for m in models}


def test_smallest_text_px_scales_a_figure_wider_than_the_column():
    figure = plt.figure(figsize=(2 * plots.TEXT_WIDTH_PX / plots.DPI, 2))
    figure.text(0.5, 0.5, "x", fontsize=plots.FONT_PT)
    assert plots.smallest_text_px(figure) == pytest.approx(plots.FONT_PT * plots.DPI / 72 / 2)


def test_spread_keeps_a_gap_and_moves_only_what_collides():
    values = [0.50, 0.505, 0.51, 0.80, 0.30]
    out = plots.spread(values, 0.02)
    ranked = sorted(out)
    assert min(b - a for a, b in zip(ranked, ranked[1:])) >= 0.02 - 1e-12
    assert out[3] == 0.80 and out[4] == 0.30  # far from the others: left where they are
    assert list(pd.Series(out).rank()) == list(pd.Series(values).rank())  # order kept


def test_cost_scatter_numbers_crowded_points_without_overlap_and_keys_them():
    rows = [{"model": m, "signal": f"signal_{i}", "cost": 2e-4 if i < 9 else None, "auroc": 0.5 + 0.004 * i,
             "low": 0.47 + 0.004 * i, "high": 0.53 + 0.004 * i} for m in ("zoo-llava", "zoo-paligemma", "zoo-qwen2-vl") for i in range(12)]
    table = pd.DataFrame(rows)
    figure = plots.cost_scatter(table, facet="model", label="signal", x="cost", y="auroc", low="low", high="high", floor=1e-5,
                                xlabel="extra seconds per input (log)", ylabel="AUROC", title="t")
    figure.canvas.draw()
    assert plots.smallest_text_px(figure) >= plots.BODY_TEXT_PX
    for ax in figure.axes[:3]:
        labels = [t for t in ax.texts if (t.get_gid() or "").startswith("label:")]
        assert len(labels) == 12
        boxes = [matplotlib.text.Text.get_window_extent(t) for t in labels]  # the number, not its leader line
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    key = figure.axes[3].texts[0].get_text()
    assert all(f"{i + 1:>2}  signal_{i}" in key for i in range(12))


def test_estimate_lines_marks_a_layer_and_its_interval_in_each_panel_and_the_legend():
    facets = ["model 0", "model 1"]
    table = _estimates(facets, ["probe"])
    marks = [{"facet": f, "x": x, "label": "reliability layer", "span": (x - 1, x), "span_label": "its 95% CI"}
             for f, x in zip(facets, (1, 3))]
    figure = plots.estimate_lines(table, x="layer", hue="metric", facet="panel", vlines=marks)
    data_axes = [ax for ax in figure.axes if ax.lines]
    for ax, x in zip(data_axes, (1, 3)):
        assert any(list(line.get_xdata()) == [x, x] for line in ax.lines)  # the mark, in its own panel
        assert len(ax.patches) == 1  # the interval's band (spans are patches)
        # the data's own bands keep their columns (a span never replaces the low/high column names)
        assert any(c.get_paths() for c in ax.collections)
    legend = figure.legends[0]
    assert {t.get_text() for t in legend.get_texts()} == {"probe", "reliability layer", "its 95% CI"}


@pytest.mark.parametrize("size, with_interval", [(3, True), (6, False)])
def test_annotated_heatmaps_drop_the_interval_text_where_the_cells_are_too_narrow(size, with_interval):
    order = list(range(size))
    table = pd.DataFrame([{"model": "m", "train": i, "test": j, "value": 0.7, "ci_low": 0.65, "ci_high": 0.75}
                          for i in order for j in order])
    figure = plots.annotated_heatmaps(table, facet="model", row="train", column="test", order=order)
    texts = [t.get_text() for t in figure.axes[0].texts]
    assert len(texts) == size * size and all(("[0.65, 0.75]" in t) == with_interval for t in texts)
    assert plots.smallest_text_px(figure) >= plots.BODY_TEXT_PX
    figure.canvas.draw()
    cell = figure.axes[0].get_window_extent().width / size
    assert max(t.get_window_extent().width for t in figure.axes[0].texts) <= cell  # each annotation fits its cell


def test_one_panel_with_a_long_legend_and_caption_keeps_both_off_the_data():
    """One model (no spare panel): 14 legend entries go below and a five-line caption above, the axes kept whole."""
    hues = [f"series {i}" for i in range(10)]
    table = _estimates(["/a/long/path/to/a/model/directory/zoo-llava"], hues)
    hlines = [{"facet": table["panel"].iloc[0], "y": 0.1 * i, "label": f"control {i}"} for i in range(4)]
    figure = plots.estimate_lines(table, x="layer", hue="metric", facet="panel", hlines=hlines, title=" ".join(["caption words"] * 40))
    figure.canvas.draw()
    ax = [a for a in figure.axes if a.lines][0]
    legend = figure.legends[0]
    assert not _overlaps_data(legend, ax)
    assert not figure._suptitle.get_window_extent().overlaps(ax.get_window_extent())
    assert ax.get_window_extent().height > 1.5 * plots.DPI  # the panel keeps its height
