"""Shortcut baselines for the POPE-style benchmark: how far can one get *without* seeing objects?

Why: a benchmark where the prior over asked objects, global colour or edge statistics answer the
question would let a "reliability probe" learn the shortcut instead of the model's perception.
Each baseline is fitted on the training split and scored on every evaluation setting; all should
stay near chance (50-65% accuracy). Baselines:

* ``always_yes``: answers "yes" (accuracy 0.5 by construction; the F1 reference).
* ``text_only``: logistic regression on the asked object alone (the question's prior).
* ``image_stats``: logistic regression on global colour histogram + edge statistics of the image,
  concatenated with the asked-object one-hot (an additive model: image features can only shift
  the yes-rate of a whole image).
* ``image_stats_per_object``: one logistic regression per asked object on the same image
  statistics (the interaction model: "does the colour/edge profile look like a cup?").
* ``characteristic_colour``: for each category, the colour bin most over-represented inside its
  training boxes; "yes" if the image has at least a fitted fraction of pixels of that colour.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import datasets
import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from vrp_utils.atomic import atomic_write_json
from vrp_utils.data.benchmark import CATEGORIES, SETTINGS
from vrp_utils.data.pope import load_benchmark, load_train, pope_metrics
from vrp_utils.paths import BENCHMARK_DIR, RESULTS_DIR

COLOUR_LEVELS = 4  # per RGB channel -> 64 histogram bins
ORIENTATION_BINS = 8
BASELINES = ("always_yes", "text_only", "image_stats", "image_stats_per_object", "characteristic_colour")


def colour_bins(rgb: np.ndarray) -> np.ndarray:
    """Per-pixel index of the ``COLOUR_LEVELS**3`` colour bin of an ``(H, W, 3)`` uint8 array."""
    q = (rgb.astype(np.int64) * COLOUR_LEVELS) // 256
    return (q[..., 0] * COLOUR_LEVELS + q[..., 1]) * COLOUR_LEVELS + q[..., 2]


def colour_histogram(rgb: np.ndarray) -> np.ndarray:
    """Normalised colour histogram (fraction of pixels per bin)."""
    counts = np.bincount(colour_bins(rgb).ravel(), minlength=COLOUR_LEVELS**3)
    return counts / counts.sum()


def edge_statistics(rgb: np.ndarray) -> np.ndarray:
    """Sobel edge statistics of the grey image: magnitude-weighted orientation histogram
    (``ORIENTATION_BINS``, orientation mod 180 degrees), mean magnitude, fraction of strong edges."""
    grey = rgb.astype(np.float64).mean(axis=2)
    gx, gy = ndimage.sobel(grey, axis=1), ndimage.sobel(grey, axis=0)
    mag = np.hypot(gx, gy)
    theta = np.mod(np.arctan2(gy, gx), np.pi)
    hist, _ = np.histogram(theta, bins=ORIENTATION_BINS, range=(0, np.pi), weights=mag)
    hist = hist / max(hist.sum(), 1e-12)
    return np.concatenate([hist, [mag.mean() / 1000.0, (mag > 200).mean()]])


def image_features(rgb: np.ndarray) -> np.ndarray:
    """Colour histogram + edge statistics: the global "image statistics" of the shortcut baselines."""
    return np.concatenate([colour_histogram(rgb), edge_statistics(rgb)])


def _image_arrays(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    """``image_file -> RGB array`` for each distinct image of ``ds`` (decoded once)."""
    table = ds.select_columns(["image_file", "image"]).with_format("arrow")[:]  # no per-row decoding
    names = table.column("image_file").to_pylist()
    paths = table.column("image").combine_chunks().field("path").to_pylist()
    arrays: dict[str, np.ndarray] = {}
    for name, path in zip(names, paths):
        if name not in arrays:
            with Image.open(path) as im:
                arrays[name] = np.asarray(im.convert("RGB"))
    return arrays


class _Split:
    """Questions of one split with image features attached (rows align with the dataset)."""

    def __init__(self, ds: datasets.Dataset):
        self.ds = ds
        self.arrays = _image_arrays(ds)
        feats = {name: image_features(arr) for name, arr in self.arrays.items()}
        self.image_file = np.asarray(ds["image_file"], dtype=object)
        self.objects = np.asarray(ds["object"], dtype=object)
        self.labels = np.asarray(ds["label"], dtype=object)
        self.y = (self.labels == "yes").astype(int)
        self.features = np.stack([feats[f] for f in self.image_file])
        self.colour_fraction = np.stack([colour_histogram(self.arrays[f]) for f in self.image_file])


def _characteristic_bins(train: _Split) -> dict[str, int]:
    """Per category, the colour bin most over-represented inside its boxes vs all boxes."""
    per_cat: dict[str, list[np.ndarray]] = {c: [] for c in CATEGORIES}
    seen: set[str] = set()
    for name, boxes in zip(train.ds["image_file"], train.ds["boxes"]):
        if name in seen:
            continue
        seen.add(name)
        arr = train.arrays[name]
        for obj in boxes:
            x0, y0, x1, y1 = obj["bbox"]
            crop = arr[y0:y1, x0:x1]
            if crop.size:
                per_cat[obj["category"]].append(colour_histogram(crop))
    overall = np.mean([h for hs in per_cat.values() for h in hs], axis=0)
    return {c: int(np.argmax(np.mean(hs, axis=0) - overall)) for c, hs in per_cat.items() if hs}


def _fit_threshold(scores: np.ndarray, y: np.ndarray) -> float:
    """Threshold maximising training accuracy of ``score >= t``."""
    candidates = np.unique(scores)
    accs = [((scores >= t) == y).mean() for t in candidates]
    return float(candidates[int(np.argmax(accs))])


def _fit_predictors(train: _Split, seed: int) -> dict[str, Callable[["_Split"], np.ndarray]]:
    """Fit every baseline on ``train``; return name -> function(split) -> yes/no array."""
    onehot = OneHotEncoder(categories=[list(CATEGORIES)], handle_unknown="ignore", sparse_output=False)
    onehot.fit(train.objects.reshape(-1, 1))

    def obj_matrix(split: _Split) -> np.ndarray:
        return onehot.transform(split.objects.reshape(-1, 1))

    def to_yes_no(pred: np.ndarray) -> np.ndarray:
        return np.where(np.asarray(pred).astype(bool), "yes", "no")

    text_model = LogisticRegression(max_iter=2000, random_state=seed).fit(obj_matrix(train), train.y)

    scaler = StandardScaler().fit(train.features)
    stats_model = LogisticRegression(max_iter=5000, random_state=seed).fit(
        np.hstack([scaler.transform(train.features), obj_matrix(train)]), train.y)

    per_object = {}
    for c in CATEGORIES:
        mask = train.objects == c
        if mask.any() and len(set(train.y[mask])) == 2:
            per_object[c] = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, random_state=seed)).fit(
                train.features[mask], train.y[mask])

    def per_object_predict(split: _Split) -> np.ndarray:
        pred = np.zeros(len(split.objects), dtype=int)
        for c in np.unique(split.objects):
            mask = split.objects == c
            if c in per_object:
                pred[mask] = per_object[c].predict(split.features[mask])
            else:  # object never asked in training: fall back to the text-only prior
                pred[mask] = text_model.predict(obj_matrix(split)[mask])
        return pred

    bins = _characteristic_bins(train)
    train_scores = np.array([train.colour_fraction[i, bins.get(o, 0)] for i, o in enumerate(train.objects)])
    threshold = _fit_threshold(train_scores, train.y)

    def colour_predict(split: _Split) -> np.ndarray:
        scores = np.array([split.colour_fraction[i, bins.get(o, 0)] for i, o in enumerate(split.objects)])
        return scores >= threshold

    return {
        "always_yes": lambda split: np.full(len(split.objects), "yes", dtype=object),
        "text_only": lambda split: to_yes_no(text_model.predict(obj_matrix(split))),
        "image_stats": lambda split: to_yes_no(stats_model.predict(
            np.hstack([scaler.transform(split.features), obj_matrix(split)]))),
        "image_stats_per_object": lambda split: to_yes_no(per_object_predict(split)),
        "characteristic_colour": lambda split: to_yes_no(colour_predict(split)),
    }


def baseline_table(root: str | Path = BENCHMARK_DIR, settings: Iterable[str] = SETTINGS, seed: int = 0) -> pd.DataFrame:
    """Score every baseline on every evaluation setting of the benchmark at ``root``.

    Returns a DataFrame indexed by (baseline, setting) with columns accuracy, precision, recall,
    f1, yes_ratio, n. Fitting uses only the training split.
    """
    train = _Split(load_train(root))
    predictors = _fit_predictors(train, seed)
    records = []
    for setting in settings:
        split = _Split(load_benchmark(setting, root))
        for name in BASELINES:
            m = pope_metrics(split.labels, predictors[name](split))
            records.append({"baseline": name, "setting": setting, **{k: m[k] for k in
                            ("accuracy", "precision", "recall", "f1", "yes_ratio", "n")}})
    return pd.DataFrame.from_records(records).set_index(["baseline", "setting"]).sort_index(
        level=[0, 1], key=lambda idx: idx.map({**{b: i for i, b in enumerate(BASELINES)},
                                               **{s: i for i, s in enumerate(SETTINGS)}}))


def write_baselines(table: pd.DataFrame, path: str | Path = RESULTS_DIR / "baselines.json",
                    root: str | Path = BENCHMARK_DIR) -> Path:
    """Save the table (records) with the benchmark's build key, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = Path(root) / "manifest.json"
    build_key = json.loads(manifest_path.read_text())["build_key"] if manifest_path.is_file() else None
    payload = {"benchmark": str(Path(root)), "build_key": build_key,
               "rows": table.reset_index().to_dict(orient="records")}
    atomic_write_json(path, payload, indent=1)
    return path
