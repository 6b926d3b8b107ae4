"""Shortcut baselines: table shape, sanity of each baseline, and that the benchmark keeps them weak."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vrp_utils.data import benchmark as bm
from vrp_utils.data.__main__ import main as cli_main
from vrp_utils.data.baselines import (
    BASELINES, baseline_table, colour_histogram, edge_statistics, image_features, write_baselines,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Enough training questions for the per-object models, enough eval questions (480 per
    # setting) for the "weak" check to mean something; builds in a few seconds.
    return bm.build_benchmark(tmp_path_factory.mktemp("bench") / "b", seed=7, n_eval_images=80,
                              n_train_images=600, progress=False)


@pytest.fixture(scope="module")
def table(root: Path) -> pd.DataFrame:
    return baseline_table(root)


def test_features() -> None:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[:, 8:] = 255  # one vertical edge: gradient along x -> orientation bin 0
    hist = colour_histogram(rgb)
    assert hist.shape == (64,) and hist.sum() == pytest.approx(1.0)
    assert hist[0] == pytest.approx(0.5) and hist[63] == pytest.approx(0.5)
    edges = edge_statistics(rgb)
    assert edges[:8].sum() == pytest.approx(1.0) and edges[0] == pytest.approx(1.0)
    assert np.all(edge_statistics(np.full((8, 8, 3), 90, np.uint8))[:8] == 0)
    assert image_features(rgb).shape == (64 + 8 + 2,)


def test_table_shape_and_sanity(table: pd.DataFrame) -> None:
    assert list(table.index.names) == ["baseline", "setting"]
    assert list(table.index) == [(b, s) for b in BASELINES for s in bm.SETTINGS]
    assert {"accuracy", "f1", "yes_ratio", "n"} <= set(table.columns)
    assert (table["n"] == 480).all()
    # Scored over all n questions: accuracy and yes_ratio are whole counts out of n (not, e.g., over one class).
    for column in ("accuracy", "yes_ratio"):
        counts = table[column] * table["n"]
        np.testing.assert_allclose(counts, counts.round(), atol=1e-6, err_msg=column)
    always = table.loc["always_yes"]
    assert (always["accuracy"] == 0.5).all() and (always["yes_ratio"] == 1.0).all()
    assert always["f1"].to_numpy() == pytest.approx(2 / 3)


def test_baselines_stay_weak(table: pd.DataFrame) -> None:
    """No shortcut (prior, colour, global edges) answers the benchmark: all well below what seeing
    the objects gives. Guards the generator against leaking the answer through a cue."""
    assert (table["accuracy"] <= 0.72).all(), table
    # Colour is independent of category, so the colour shortcut is at chance.
    assert (table.loc["characteristic_colour", "accuracy"].between(0.4, 0.62)).all(), table
    # The prior helps a little on random negatives and hurts on popular ones (as in POPE).
    text = table.loc["text_only", "accuracy"]
    assert text["popular"] < text["random"]


def test_cli_writes_json(root: Path, table: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "baselines.json"
    assert cli_main(["baselines", "--root", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| ('text_only', 'popular')" in printed and str(out) in printed
    payload = json.loads(out.read_text())
    assert payload["build_key"]["seed"] == 7
    again = pd.DataFrame(payload["rows"]).set_index(["baseline", "setting"])
    pd.testing.assert_frame_equal(again, table, check_dtype=False)
    assert cli_main(["baselines", "--root", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def _interrupted_write_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the write fail after the bytes went out (a full disk at fsync, a kill), as a real writer can."""

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", fail)


def test_write_baselines_is_atomic(table: pd.DataFrame, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_baselines(table, tmp_path / "sub" / "b.json", root=root)
    old = path.read_bytes()
    assert pd.DataFrame(json.loads(old)["rows"]).shape[0] == len(table) and not list(path.parent.glob(".*.tmp"))
    with monkeypatch.context() as patch:
        _interrupted_write_text(patch)
        with pytest.raises(OSError, match="No space left"):
            write_baselines(table.iloc[:2], path, root=root)
    assert path.read_bytes() == old  # readers never see the half-written table


def test_interrupted_write_baselines_leaves_no_temporary(table: pd.DataFrame, root: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "b.json"
    with monkeypatch.context() as patch:
        _interrupted_write_text(patch)
        with pytest.raises(OSError):
            write_baselines(table, path, root=root)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
