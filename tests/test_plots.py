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
