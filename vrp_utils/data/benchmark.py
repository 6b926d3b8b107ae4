"""A POPE-style object-existence benchmark rendered procedurally with PIL.

Why it exists: the paper evaluates on POPE (COCO images, "Is there a X in the image?"), but we
cannot download COCO or hub models here. This module draws small scenes with known objects and
writes them in POPE's own file format, so the same loader (:func:`vrp_utils.data.pope.load_pope`)
reads either this benchmark or the real POPE files.

Design choices that matter for the analyses downstream:

* Each category is a distinct *shape*. Colour is drawn from one shared palette independently of
  the category (and sizes vary), so nothing but shape tells the categories apart.
* Scenes (kitchen, living room, street, park) weight categories differently, so objects co-occur
  as in COCO; this is what makes POPE's *popular* and *adversarial* negatives meaningful.
* Clutter (lines, blobs, squiggles that are not categories), overlap, small objects and pixel
  noise make small models err, more on small / occluded objects and on co-occurrence negatives.
* Negatives follow POPE's three strategies (``AoiDragon/POPE`` ``utils.py``): *random* (uniform
  among absent categories), *popular* (most frequent categories over the evaluation images), and
  *adversarial* (for the k-th positive, the absent category that co-occurs with it most often).
  Questions interleave positive/negative as in the official files.
* Same seed -> byte-identical files. Every image has its own RNG stream derived from
  ``(seed, split, index)``; PNGs carry no metadata; files are written atomically into a staging
  directory that replaces the output directory only once complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import PIL
from PIL import Image, ImageDraw
from tqdm import tqdm  # plain text bars: tqdm.auto would ask notebooks for ipywidgets

import vrp_utils
from vrp_utils.paths import BENCHMARK_DIR

#: Bump when the rendering or sampling changes in a way that changes output bytes.
GENERATOR_VERSION = "1"

#: Object categories: single lowercase words, each rendered as a distinct shape.
CATEGORIES: tuple[str, ...] = (
    "apple", "ball", "banana", "book", "bottle", "car", "chair", "clock", "cup",
    "flower", "fork", "house", "kite", "knife", "lamp", "plate", "tree", "umbrella",
)

#: Negative-sampling strategies of POPE; each is one evaluation split over the same images.
SETTINGS: tuple[str, ...] = ("random", "popular", "adversarial")

#: Natural answer forms used to build training targets for the tiny models.
ANSWER_FORMS: dict[str, list[str]] = {"yes": ["Yes.", "Yes, there is."], "no": ["No.", "No, there is not."]}

QUESTION_TEMPLATE = "Is there {article} {object} in the image?"

#: Scene types: (probability of the scene, category weights). Categories not listed get
#: ``_BASE_WEIGHT`` so that any object can appear anywhere, just rarely.
_BASE_WEIGHT = 0.15
SCENES: dict[str, tuple[float, dict[str, float]]] = {
    "kitchen": (0.30, {"cup": 3.0, "plate": 3.0, "fork": 2.5, "knife": 2.5, "bottle": 2.0,
                       "apple": 2.0, "banana": 2.0, "clock": 0.6, "chair": 0.8, "flower": 0.4}),
    "living_room": (0.25, {"chair": 3.0, "lamp": 3.0, "book": 3.0, "clock": 2.5, "cup": 1.0,
                           "flower": 1.0, "ball": 0.6, "bottle": 0.5, "umbrella": 0.4}),
    "street": (0.25, {"car": 3.0, "house": 3.0, "tree": 2.5, "umbrella": 2.0, "clock": 0.6,
                      "bottle": 0.6, "ball": 0.5, "lamp": 0.5}),
    "park": (0.20, {"tree": 3.0, "kite": 2.5, "ball": 2.5, "flower": 2.5, "umbrella": 1.0,
                    "bottle": 1.0, "apple": 1.0, "banana": 0.7, "house": 0.4}),
}

#: Shared object palette (RGB). Drawn independently of category.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (220, 40, 40), (240, 140, 30), (235, 210, 40), (140, 210, 50), (40, 150, 60),
    (30, 170, 160), (70, 150, 235), (40, 60, 190), (130, 60, 180), (235, 110, 170),
    (140, 90, 50), (150, 150, 150),
)

#: Width / height of each category's drawing box (before per-instance jitter).
_ASPECT: dict[str, float] = {
    "apple": 1.0, "ball": 1.0, "banana": 1.7, "book": 0.75, "bottle": 0.42, "car": 2.0,
    "chair": 0.7, "clock": 1.0, "cup": 1.15, "flower": 0.75, "fork": 0.34, "house": 1.0,
    "kite": 0.7, "knife": 0.26, "lamp": 0.7, "plate": 1.9, "tree": 0.8, "umbrella": 1.1,
}

#: How hard the scenes are: the fraction and pixel size of small objects, the size of the others,
#: how many clutter strokes go behind / in front of the objects, and the pixel noise (std range).
#: Tuned so that the tiny zoo models learn within their CPU budget yet still make errors.
DIFFICULTY: dict[str, tuple[float, float] | float] = {
    "small_fraction": 0.22,
    "small_size": (9.0, 13.0),
    "medium_size": (14.0, 25.0),
    "clutter_behind": (3, 8),
    "clutter_front": (0, 3),
    "noise_std": (4.0, 14.0),
}

_SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges that stay recognisable at 64 px
_SPLIT_CODES = {"eval": 1, "train": 2}
_STREAM_SCENE, _STREAM_RENDER, _STREAM_QUESTIONS = 0, 1, 2

Color = tuple[int, int, int]
Box = tuple[float, float, float, float]


# --------------------------------------------------------------------------------------------
# Text helpers (shared with the tokenizer of the tiny models)
# --------------------------------------------------------------------------------------------

def article_for(word: str) -> str:
    """POPE's article rule: "an" before a vowel letter, else "a"."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def question_text(category: str) -> str:
    """The POPE question for ``category``, e.g. ``"Is there an apple in the image?"``."""
    return QUESTION_TEMPLATE.format(article=article_for(category), object=category)


_WORD_RE = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def words(text: str) -> list[str]:
    """Lowercased word tokens with punctuation as separate tokens ("Yes, there is." -> 5 tokens)."""
    return _WORD_RE.findall(text.lower())


def vocabulary() -> list[str]:
    """Every word of every benchmark question and answer form, sorted (the tiny models' vocab)."""
    texts = [question_text(c) for c in CATEGORIES]
    texts += [form for forms in ANSWER_FORMS.values() for form in forms]
    return sorted({w for t in texts for w in words(t)})


# --------------------------------------------------------------------------------------------
# Scene layout
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlacedObject:
    category: str
    box: Box  # supersampled pixel coordinates of the drawing box
    color: Color


@dataclass(frozen=True)
class SceneSpec:
    """Everything needed to render one image (layout is decided before any pixel is drawn)."""

    split: str
    index: int
    scene: str
    objects: tuple[PlacedObject, ...]

    @property
    def image_name(self) -> str:
        return f"{self.split}_{self.index:06d}.png"

    @property
    def categories(self) -> list[str]:
        """Distinct categories present, in drawing order of first appearance."""
        return list(dict.fromkeys(o.category for o in self.objects))


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """Independent stream per (seed, split, image, purpose): order-free and reproducible."""
    return np.random.default_rng([seed, _SPLIT_CODES[split], index, stream])


def _overlap_fraction(a: Box, b: Box) -> float:
    """Intersection area over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller


def _object_box(rng: np.random.Generator, category: str, size_px: float, image_size: int) -> tuple[float, float]:
    """Width, height (in output pixels) for an instance whose larger side is ``size_px``."""
    aspect = _ASPECT[category] * float(rng.uniform(0.88, 1.14))
    if aspect >= 1:
        return size_px, size_px / aspect
    return size_px * aspect, size_px


def sample_scene(seed: int, split: str, index: int, image_size: int) -> SceneSpec:
    """Choose the scene type, its categories, their sizes, colours and positions."""
    rng = _rng(seed, split, index, _STREAM_SCENE)
    scene_names = list(SCENES)
    scene_probs = np.array([SCENES[s][0] for s in scene_names])
    scene = scene_names[rng.choice(len(scene_names), p=scene_probs / scene_probs.sum())]
    weights = np.array([SCENES[scene][1].get(c, _BASE_WEIGHT) for c in CATEGORIES])
    n_categories = int(rng.choice([3, 4, 5], p=[0.4, 0.35, 0.25]))
    chosen = list(rng.choice(len(CATEGORIES), size=n_categories, replace=False, p=weights / weights.sum()))
    instances = [CATEGORIES[i] for i in chosen]
    if rng.random() < 0.12:  # occasionally a second instance of a present category
        instances.append(instances[int(rng.integers(len(instances)))])

    s = _SUPERSAMPLE
    scale = image_size / 64.0
    placed: list[PlacedObject] = []
    for category in instances:
        # Mostly medium objects, some small ones (the hard positives).
        small = rng.random() < DIFFICULTY["small_fraction"]
        size = float(rng.uniform(*DIFFICULTY["small_size"]) if small else rng.uniform(*DIFFICULTY["medium_size"])) * scale
        max_overlap = 0.30
        for attempt in range(200):
            if attempt and attempt % 40 == 0:  # crowded: shrink and tolerate more overlap
                size *= 0.85
                max_overlap += 0.1
            w, h = _object_box(rng, category, size, image_size)
            x0 = float(rng.uniform(1, image_size - 1 - w))
            y0 = float(rng.uniform(1, image_size - 1 - h))
            box = (x0 * s, y0 * s, (x0 + w) * s, (y0 + h) * s)
            if all(_overlap_fraction(box, p.box) <= max_overlap for p in placed):
                break
        color = PALETTE[int(rng.integers(len(PALETTE)))]
        placed.append(PlacedObject(category, box, color))
    return SceneSpec(split=split, index=index, scene=scene, objects=tuple(placed))


def pixel_bbox(box: Box, image_size: int) -> list[int]:
    """Supersampled drawing box -> ``[x0, y0, x1, y1]`` integer output pixels (x1, y1 exclusive)."""
    s = _SUPERSAMPLE
    x0, y0 = math.floor(box[0] / s), math.floor(box[1] / s)
    x1, y1 = math.ceil(box[2] / s), math.ceil(box[3] / s)
    return [max(0, x0), max(0, y0), min(image_size, x1), min(image_size, y1)]


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

def _shade(c: Color, f: float) -> Color:
    return tuple(int(round(v * f)) for v in c)  # type: ignore[return-value]


def _tint(c: Color, f: float) -> Color:
    return tuple(int(round(v + (255 - v) * f)) for v in c)  # type: ignore[return-value]


@dataclass
class _Pen:
    """Colours and line width of one instance: fill, dark details, light details."""

    fill: Color
    dark: Color
    light: Color
    width: int
    flip: bool = False


def _draw_apple(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    top = y0 + 0.18 * h
    d.ellipse((x0, top, x0 + 0.62 * w, y1), fill=p.fill, outline=p.dark, width=p.width)
    d.ellipse((x0 + 0.38 * w, top, x1, y1), fill=p.fill, outline=p.dark, width=p.width)
    d.ellipse((x0 + 0.2 * w, top + 0.12 * h, x1 - 0.2 * w, y1 - 0.04 * h), fill=p.fill)
    cx = x0 + 0.5 * w
    d.line((cx, top + 0.1 * h, cx + 0.04 * w, y0), fill=p.dark, width=max(p.width, int(0.07 * w)))
    d.ellipse((cx + 0.06 * w, y0 + 0.02 * h, cx + 0.34 * w, y0 + 0.16 * h), fill=p.dark)


def _draw_ball(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse(b, fill=p.fill, outline=p.dark, width=p.width)
    cx, cy = x0 + w / 2, y0 + h / 2
    d.line((cx, y0, cx, y1), fill=p.dark, width=p.width)
    d.line((x0, cy, x1, cy), fill=p.dark, width=p.width)
    d.arc((x0 - 0.45 * w, y0 + 0.05 * h, x0 + 0.45 * w, y1 - 0.05 * h), -60, 60, fill=p.dark, width=p.width)
    d.arc((x1 - 0.45 * w, y0 + 0.05 * h, x1 + 0.45 * w, y1 - 0.05 * h), 120, 240, fill=p.dark, width=p.width)


def _draw_banana(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx, r_out = x0 + w / 2, w / 2
    # Crescent: an outer lower arc and an inner, flatter one; tips dark.
    outer = [(cx + r_out * math.cos(t), y0 + 0.05 * h + 0.95 * h * math.sin(t))
             for t in np.linspace(math.radians(10), math.radians(170), 24)]
    inner = [(cx + 0.8 * r_out * math.cos(t), y0 + 0.05 * h + 0.5 * h * math.sin(t))
             for t in np.linspace(math.radians(165), math.radians(15), 24)]
    pts = outer + inner
    if p.flip:
        pts = [(x, y1 - (y - y0)) for x, y in pts]
    d.polygon(pts, fill=p.fill, outline=p.dark, width=p.width)
    for tip in (outer[0], outer[-1]):
        tx, ty = tip if not p.flip else (tip[0], y1 - (tip[1] - y0))
        rr = 0.06 * w
        d.ellipse((tx - rr, ty - rr, tx + rr, ty + rr), fill=p.dark)


def _draw_book(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle((x0 + 0.1 * w, y0 + 0.04 * h, x1, y1), fill=p.light, outline=p.dark, width=p.width)  # pages
    d.rectangle((x0, y0, x1 - 0.1 * w, y1 - 0.04 * h), fill=p.fill, outline=p.dark, width=p.width)  # cover
    d.rectangle((x0, y0, x0 + 0.2 * w, y1 - 0.04 * h), fill=p.dark)  # spine
    d.rectangle((x0 + 0.34 * w, y0 + 0.2 * h, x1 - 0.22 * w, y0 + 0.36 * h), fill=p.light)  # title


def _draw_bottle(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    neck = 0.2 * w
    d.polygon([(cx - neck, y0 + 0.14 * h), (cx + neck, y0 + 0.14 * h), (cx + neck, y0 + 0.3 * h),
               (x1, y0 + 0.45 * h), (x1, y1), (x0, y1), (x0, y0 + 0.45 * h), (cx - neck, y0 + 0.3 * h)],
              fill=p.fill, outline=p.dark, width=p.width)
    d.rectangle((cx - neck - 0.04 * w, y0, cx + neck + 0.04 * w, y0 + 0.14 * h), fill=p.dark)  # cap
    d.rectangle((x0 + p.width, y0 + 0.58 * h, x1 - p.width, y0 + 0.78 * h), fill=p.light)  # label


def _draw_car(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cab = [(x0 + 0.22 * w, y0 + 0.45 * h), (x0 + 0.32 * w, y0), (x0 + 0.68 * w, y0), (x0 + 0.8 * w, y0 + 0.45 * h)]
    if p.flip:
        cab = [(x1 - (x - x0), y) for x, y in cab]
    d.polygon(cab, fill=p.fill, outline=p.dark, width=p.width)
    wx0, wx1 = (x0 + 0.34 * w, x0 + 0.66 * w)
    d.rectangle((wx0, y0 + 0.12 * h, wx1, y0 + 0.42 * h), fill=p.light)  # windows
    d.line((x0 + 0.5 * w, y0 + 0.12 * h, x0 + 0.5 * w, y0 + 0.42 * h), fill=p.dark, width=p.width)
    d.rounded_rectangle((x0, y0 + 0.4 * h, x1, y0 + 0.8 * h), radius=0.08 * h, fill=p.fill,
                        outline=p.dark, width=p.width)
    r = 0.2 * h
    for wx in (x0 + 0.24 * w, x0 + 0.76 * w):
        d.ellipse((wx - r, y1 - 2 * r, wx + r, y1), fill=p.dark)
        d.ellipse((wx - 0.4 * r, y1 - 1.4 * r, wx + 0.4 * r, y1 - 0.6 * r), fill=p.light)


def _draw_chair(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0

    def fx(x: float) -> float:
        return x1 - (x - x0) if p.flip else x

    bar = 0.18 * w
    rect = lambda a, c, e, f: d.rectangle((min(fx(a), fx(e)), c, max(fx(a), fx(e)), f), fill=p.fill,
                                          outline=p.dark, width=p.width)
    rect(x0, y0, x0 + bar, y1)  # back + back leg
    rect(x0, y0 + 0.5 * h, x1, y0 + 0.64 * h)  # seat
    rect(x1 - bar, y0 + 0.5 * h, x1, y1)  # front leg
    rect(x0 + bar, y0 + 0.1 * h, x0 + 1.9 * bar, y0 + 0.2 * h)  # back rail


def _draw_clock(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    ring = max(p.width, int(0.12 * w))
    d.ellipse(b, fill=p.light, outline=p.fill, width=ring)
    d.ellipse(b, outline=p.dark, width=p.width)
    cx, cy = x0 + w / 2, y0 + h / 2
    for a in range(0, 360, 90):
        t = math.radians(a)
        d.line((cx + 0.28 * w * math.cos(t), cy + 0.28 * h * math.sin(t),
                cx + 0.36 * w * math.cos(t), cy + 0.36 * h * math.sin(t)), fill=p.dark, width=p.width)
    hand = max(p.width, int(0.07 * w))
    d.line((cx, cy, cx, cy - 0.3 * h), fill=p.dark, width=hand)
    d.line((cx, cy, cx + 0.22 * w, cy + 0.08 * h), fill=p.dark, width=hand)


def _draw_cup(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0

    def fx(x: float) -> float:
        return x1 - (x - x0) if p.flip else x

    hx0, hx1 = sorted((fx(x0 + 0.5 * w), fx(x1)))
    d.ellipse((hx0, y0 + 0.22 * h, hx1, y0 + 0.72 * h), outline=p.dark, width=max(p.width, int(0.12 * h)))
    body = [(fx(x0), y0 + 0.08 * h), (fx(x0 + 0.76 * w), y0 + 0.08 * h), (fx(x0 + 0.66 * w), y1),
            (fx(x0 + 0.1 * w), y1)]
    d.polygon(body, fill=p.fill, outline=p.dark, width=p.width)
    lx0, lx1 = sorted((fx(x0), fx(x0 + 0.76 * w)))
    d.ellipse((lx0, y0, lx1, y0 + 0.16 * h), fill=p.dark)  # rim / coffee


def _draw_flower(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + 0.32 * h
    d.line((cx, cy, cx, y1), fill=p.dark, width=max(p.width, int(0.08 * w)))
    d.ellipse((cx, y0 + 0.68 * h, cx + 0.38 * w, y0 + 0.8 * h), fill=p.dark)  # leaf
    pr = 0.17 * w
    for k in range(6):
        t = math.radians(60 * k + 15)
        px, py = cx + 0.32 * w * math.cos(t), cy + 0.28 * h * math.sin(t) * 0.9
        d.ellipse((px - pr, py - pr, px + pr, py + pr), fill=p.fill, outline=p.dark, width=p.width)
    cr = 0.16 * w
    d.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=p.light, outline=p.dark, width=p.width)


def _draw_fork(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    d.rounded_rectangle((cx - 0.2 * w, y0 + 0.42 * h, cx + 0.2 * w, y1), radius=0.15 * w, fill=p.fill,
                        outline=p.dark, width=p.width)
    d.rounded_rectangle((x0, y0 + 0.3 * h, x1, y0 + 0.46 * h), radius=0.2 * w, fill=p.fill,
                        outline=p.dark, width=p.width)
    tine = w / 7
    for k in range(4):
        tx = x0 + tine * 2 * k
        d.rectangle((tx, y0, tx + tine, y0 + 0.36 * h), fill=p.fill, outline=p.dark, width=max(1, p.width // 2))


def _draw_house(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rectangle((x0 + 0.1 * w, y0 + 0.42 * h, x1 - 0.1 * w, y1), fill=p.fill, outline=p.dark, width=p.width)
    d.polygon([(x0, y0 + 0.45 * h), (x0 + 0.5 * w, y0), (x1, y0 + 0.45 * h)], fill=p.dark)
    dx = x0 + (0.55 if p.flip else 0.25) * w
    d.rectangle((dx, y0 + 0.66 * h, dx + 0.2 * w, y1), fill=p.dark)  # door
    wx = x0 + (0.2 if p.flip else 0.58) * w
    d.rectangle((wx, y0 + 0.55 * h, wx + 0.2 * w, y0 + 0.72 * h), fill=p.light, outline=p.dark, width=p.width)


def _draw_kite(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    top, mid, bot = y0, y0 + 0.25 * h, y0 + 0.7 * h
    d.polygon([(cx, top), (x1, mid), (cx, bot), (x0, mid)], fill=p.fill, outline=p.dark, width=p.width)
    d.line((cx, top, cx, bot), fill=p.dark, width=p.width)
    d.line((x0, mid, x1, mid), fill=p.dark, width=p.width)
    sign = -1 if p.flip else 1
    tail = [(cx, bot)] + [(cx + sign * (0.16 * w if k % 2 else -0.1 * w), bot + (k + 1) * (y1 - bot) / 4)
                          for k in range(4)]
    d.line(tail, fill=p.dark, width=p.width, joint="curve")
    for k in (1, 3):
        bx, by = tail[k]
        d.polygon([(bx, by - 0.05 * h), (bx + 0.1 * w, by), (bx, by + 0.05 * h), (bx - 0.1 * w, by)], fill=p.fill)


def _draw_knife(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.rounded_rectangle((x0 + 0.1 * w, y0 + 0.6 * h, x1 - 0.1 * w, y1), radius=0.3 * w, fill=p.dark)  # handle
    edge = (x0, x1) if not p.flip else (x1, x0)
    blade = [(edge[0], y0 + 0.6 * h), (edge[1], y0 + 0.6 * h), (edge[1], y0 + 0.25 * h), (edge[0], y0)]
    d.polygon(blade, fill=p.fill, outline=p.dark, width=p.width)
    d.rectangle((x0, y0 + 0.57 * h, x1, y0 + 0.63 * h), fill=p.light)  # bolster


def _draw_lamp(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    d.line((cx, y0 + 0.38 * h, cx, y1 - 0.06 * h), fill=p.dark, width=max(p.width, int(0.1 * w)))
    d.ellipse((x0 + 0.15 * w, y1 - 0.12 * h, x1 - 0.15 * w, y1), fill=p.dark)  # base
    d.polygon([(cx - 0.22 * w, y0), (cx + 0.22 * w, y0), (x1, y0 + 0.4 * h), (x0, y0 + 0.4 * h)],
              fill=p.fill, outline=p.dark, width=p.width)  # shade
    d.ellipse((cx - 0.12 * w, y0 + 0.36 * h, cx + 0.12 * w, y0 + 0.48 * h), fill=p.light)  # bulb


def _draw_plate(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    d.ellipse(b, fill=p.fill, outline=p.dark, width=p.width)
    d.ellipse((x0 + 0.18 * w, y0 + 0.2 * h, x1 - 0.18 * w, y1 - 0.2 * h), fill=p.light, outline=p.dark,
              width=p.width)


def _draw_tree(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    d.rectangle((cx - 0.11 * w, y0 + 0.55 * h, cx + 0.11 * w, y1), fill=p.dark)  # trunk
    for (ex0, ey0, ex1, ey1) in ((0.0, 0.22, 0.6, 0.68), (0.4, 0.22, 1.0, 0.68), (0.18, 0.0, 0.82, 0.5)):
        d.ellipse((x0 + ex0 * w, y0 + ey0 * h, x0 + ex1 * w, y0 + ey1 * h), fill=p.fill, outline=p.dark,
                  width=p.width)
    d.ellipse((x0 + 0.12 * w, y0 + 0.16 * h, x1 - 0.12 * w, y0 + 0.6 * h), fill=p.fill)  # merge canopy


def _draw_umbrella(d: ImageDraw.ImageDraw, b: Box, p: _Pen) -> None:
    x0, y0, x1, y1 = b
    w, h = x1 - x0, y1 - y0
    cx = x0 + w / 2
    shaft = max(p.width, int(0.06 * w))
    d.line((cx, y0 + 0.3 * h, cx, y1 - 0.12 * h), fill=p.dark, width=shaft)
    sign = -1 if p.flip else 1
    hx0, hx1 = sorted((cx, cx + sign * 0.24 * w))
    d.arc((hx0, y1 - 0.24 * h, hx1, y1), 0, 180, fill=p.dark, width=shaft)  # J hook
    d.pieslice((x0, y0, x1, y0 + 1.1 * h), 180, 360, fill=p.fill, outline=p.dark, width=p.width)
    scallop = w / 4
    for k in range(4):
        sx = x0 + k * scallop
        d.pieslice((sx, y0 + 0.47 * h, sx + scallop, y0 + 0.63 * h), 180, 360, fill=p.dark)
    d.line((cx, y0, cx, y0 + 0.55 * h), fill=p.dark, width=p.width)


_DRAWERS: dict[str, Callable[[ImageDraw.ImageDraw, Box, _Pen], None]] = {
    "apple": _draw_apple, "ball": _draw_ball, "banana": _draw_banana, "book": _draw_book,
    "bottle": _draw_bottle, "car": _draw_car, "chair": _draw_chair, "clock": _draw_clock,
    "cup": _draw_cup, "flower": _draw_flower, "fork": _draw_fork, "house": _draw_house,
    "kite": _draw_kite, "knife": _draw_knife, "lamp": _draw_lamp, "plate": _draw_plate,
    "tree": _draw_tree, "umbrella": _draw_umbrella,
}
assert set(_DRAWERS) == set(CATEGORIES)


def _random_color(rng: np.random.Generator) -> Color:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _draw_clutter(d: ImageDraw.ImageDraw, rng: np.random.Generator, canvas: int, n: int, thin: bool) -> None:
    """Things that are not categories: polylines, squiggles, irregular blobs, dots."""
    s = _SUPERSAMPLE
    for _ in range(n):
        kind = rng.choice(["line", "squiggle", "blob", "dots"], p=[0.3, 0.25, 0.3, 0.15])
        color = PALETTE[int(rng.integers(len(PALETTE)))] if rng.random() < 0.6 else _random_color(rng)
        if kind == "line":
            pts = [tuple(rng.uniform(0, canvas, 2)) for _ in range(2)]
            d.line(pts, fill=color, width=int(rng.integers(1, 2 if thin else 4)) * s // 2 + 1)
        elif kind == "squiggle":
            x, y = rng.uniform(0, canvas, 2)
            pts = [(x, y)]
            for _ in range(int(rng.integers(3, 7))):
                x, y = x + rng.normal(0, 6 * s), y + rng.normal(0, 6 * s)
                pts.append((x, y))
            d.line(pts, fill=color, width=s if thin else 2 * s, joint="curve")
        elif kind == "blob" and not thin:
            cx, cy = rng.uniform(0, canvas, 2)
            r = rng.uniform(2, 7) * s
            k = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * math.pi, k))
            radii = r * rng.uniform(0.45, 1.3, k)
            d.polygon([(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)], fill=color)
        else:
            for _ in range(int(rng.integers(3, 9))):
                x, y = rng.uniform(0, canvas, 2)
                r = rng.uniform(0.5, 1.5) * s
                d.ellipse((x - r, y - r, x + r, y + r), fill=color)


def render_scene(spec: SceneSpec, seed: int, image_size: int) -> Image.Image:
    """Pixels for ``spec``: background, clutter, objects, front clutter, then noise."""
    rng = _rng(seed, spec.split, spec.index, _STREAM_RENDER)
    s = _SUPERSAMPLE
    canvas = image_size * s
    # Background: a random two-colour gradient, independent of scene and objects.
    c0 = np.array(_random_color(rng), dtype=np.float64)
    c1 = np.clip(c0 + rng.normal(0, 40, 3), 0, 255)
    t = np.linspace(0, 1, canvas)[:, None]
    ramp = (c0 * (1 - t) + c1 * t).astype(np.uint8)  # (canvas, 3)
    vertical = rng.random() < 0.5
    bg = np.broadcast_to(ramp[None, :, :] if vertical else ramp[:, None, :], (canvas, canvas, 3))
    img = Image.fromarray(np.ascontiguousarray(bg), "RGB")
    d = ImageDraw.Draw(img)
    _draw_clutter(d, rng, canvas, int(rng.integers(*DIFFICULTY["clutter_behind"])), thin=False)
    bg_mean = (c0 + c1) / 2
    width = max(1, int(round(s * image_size / 64)))
    for obj in spec.objects:
        color = obj.color
        # Contrast with the background is required, but the fix is a palette rotation that does not
        # depend on the category, so colour stays uninformative about category.
        k = PALETTE.index(color)
        while np.linalg.norm(np.array(color) - bg_mean) < 90:
            k = (k + 5) % len(PALETTE)
            color = PALETTE[k]
        pen = _Pen(fill=color, dark=_shade(color, 0.4), light=_tint(color, 0.65), width=width,
                   flip=bool(rng.random() < 0.5))
        _DRAWERS[obj.category](d, obj.box, pen)
    _draw_clutter(d, rng, canvas, int(rng.integers(*DIFFICULTY["clutter_front"])), thin=True)
    small = img.resize((image_size, image_size), Image.Resampling.BOX)
    arr = np.asarray(small, dtype=np.float64)
    arr = arr + rng.normal(0.0, rng.uniform(*DIFFICULTY["noise_std"]), arr.shape)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed compression)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# POPE question sampling
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SetStatistics:
    """Per-image presence frequency and pairwise co-occurrence over a set of images (POPE's
    ``generate_ground_truth_objects`` / ``compute_co_occurrence``)."""

    frequency: dict[str, int]
    co_occurrence: dict[str, dict[str, int]]

    @classmethod
    def from_category_sets(cls, category_sets: Iterable[Sequence[str]]) -> "SetStatistics":
        frequency: Counter[str] = Counter()
        co: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
        for cats in category_sets:
            present = set(cats)
            frequency.update(present)
            for a in present:
                co[a].update(present - {a})
        return cls({c: frequency[c] for c in CATEGORIES}, {a: dict(co[a]) for a in CATEGORIES})

    def popular_order(self) -> list[str]:
        """Categories by decreasing frequency (ties: alphabetical)."""
        return sorted(CATEGORIES, key=lambda c: (-self.frequency[c], c))

    def co_occurrence_order(self, category: str) -> list[str]:
        """Categories that co-occur with ``category`` at least once, most often first (ties: alphabetical)."""
        row = self.co_occurrence[category]
        return sorted((c for c, n in row.items() if n > 0), key=lambda c: (-row[c], c))


def _negatives(setting: str, positives: Sequence[str], present: set[str], stats: SetStatistics | None,
               rng: np.random.Generator) -> list[str]:
    """One negative per positive, following POPE's ``pope()`` loop (deterministic tie-breaks).

    ``stats`` (over the evaluation images) is needed for popular/adversarial only."""
    if setting in ("popular", "adversarial") and stats is None:
        raise ValueError(f"{setting} negatives need set statistics")
    chosen: list[str] = []
    for pos in positives:
        taken = present | set(chosen)
        candidates: list[str] = []
        if setting == "popular":
            candidates = [c for c in stats.popular_order() if c not in taken]  # type: ignore[union-attr]
        elif setting == "adversarial":
            candidates = [c for c in stats.co_occurrence_order(pos) if c not in taken]  # type: ignore[union-attr]
        elif setting != "random":
            raise ValueError(f"unknown POPE setting {setting!r}; expected one of {SETTINGS}")
        if candidates:
            chosen.append(candidates[0])
        else:  # random, or POPE's fallback when no candidate is left
            absent = [c for c in CATEGORIES if c not in taken]
            chosen.append(absent[int(rng.integers(len(absent)))])
    return chosen


def _positives(spec: SceneSpec, rng: np.random.Generator, k: int = 3) -> list[str]:
    cats = spec.categories
    order = rng.permutation(len(cats))[:k]
    return [cats[i] for i in order]


def _question_rows(spec: SceneSpec, positives: Sequence[str], negatives: Sequence[str],
                   first_id: int) -> list[dict]:
    rows = []
    for k, (pos, neg) in enumerate(zip(positives, negatives)):
        for j, (obj, label) in enumerate(((pos, "yes"), (neg, "no"))):
            rows.append({"question_id": first_id + 2 * k + j, "image": spec.image_name,
                         "text": question_text(obj), "label": label})
    return rows


# --------------------------------------------------------------------------------------------
# Building the benchmark directory
# --------------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonl(rows: Iterable[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=False) + "\n" for r in rows).encode()


def build_key(seed: int, n_eval_images: int, n_train_images: int, image_size: int) -> dict:
    """What determines the output bytes; a manifest with the same key means nothing to rebuild."""
    return {
        "seed": seed, "n_eval_images": n_eval_images, "n_train_images": n_train_images,
        "image_size": image_size, "generator_version": GENERATOR_VERSION,
        "generator_source_sha256": _sha256(Path(__file__).read_bytes()),
        "pillow": PIL.__version__, "numpy": np.__version__,
    }


def is_up_to_date(out_dir: str | Path, key: dict) -> bool:
    """True when ``out_dir`` holds a complete build for ``key`` (manifest matches, files intact)."""
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("build_key") != key:
        return False
    for rel, digest in manifest.get("files", {}).items():
        f = out_dir / rel
        if not f.is_file() or _sha256(f.read_bytes()) != digest:
            return False
    return True


@dataclass
class BuildResult:
    out_dir: Path
    rebuilt: bool
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


def build_benchmark(out_dir: str | Path = BENCHMARK_DIR, seed: int = 0, n_eval_images: int = 180,
                    n_train_images: int = 4000, image_size: int = 64, progress: bool = True,
                    force: bool = False) -> Path:
    """Build the benchmark into ``out_dir`` (idempotent: skips when an identical build is there).

    Output: ``images/{eval,train}_NNNNNN.png``, ``pope_{random,popular,adversarial}.jsonl`` (eval
    images only), ``train.jsonl`` (disjoint training images, random negatives), ``boxes.jsonl``
    (one line per image of both splits: image, split, scene, objects with category and bbox) and
    ``manifest.json`` (parameters, categories, per-file sha256). Returns ``out_dir``.
    """
    return build_benchmark_verbose(out_dir, seed, n_eval_images, n_train_images, image_size,
                                   progress=progress, force=force).out_dir


def build_benchmark_verbose(out_dir: str | Path = BENCHMARK_DIR, seed: int = 0, n_eval_images: int = 180,
                            n_train_images: int = 4000, image_size: int = 64, progress: bool = True,
                            force: bool = False) -> BuildResult:
    """:func:`build_benchmark`, also saying whether it rebuilt, how long it took, and counts."""
    import time

    if n_eval_images < 1 or n_train_images < 0:
        raise ValueError(f"need n_eval_images >= 1 and n_train_images >= 0, got {n_eval_images}, {n_train_images}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px for objects to be recognisable, got {image_size}")
    out_dir = Path(out_dir)
    key = build_key(seed, n_eval_images, n_train_images, image_size)
    if not force and is_up_to_date(out_dir, key):
        return BuildResult(out_dir, rebuilt=False)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "manifest.json").exists():
        raise FileExistsError(f"{out_dir} is not empty and has no manifest.json; refusing to replace it")

    start = time.perf_counter()
    staging = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    (staging / "images").mkdir(parents=True)
    files: dict[str, str] = {}

    def emit(rel: str, data: bytes) -> None:
        _atomic_write(staging / rel, data)
        files[rel] = _sha256(data)

    try:
        eval_specs = [sample_scene(seed, "eval", i, image_size) for i in range(n_eval_images)]
        train_specs = [sample_scene(seed, "train", i, image_size) for i in range(n_train_images)]
        all_specs = eval_specs + train_specs
        bar = tqdm(all_specs, desc="rendering benchmark", unit="img", disable=not progress)
        for spec in bar:
            emit(f"images/{spec.image_name}", png_bytes(render_scene(spec, seed, image_size)))

        stats = SetStatistics.from_category_sets(s.categories for s in eval_specs)
        counts: dict[str, int] = {}
        for setting in SETTINGS:
            rows: list[dict] = []
            for spec in eval_specs:
                q_rng = _rng(seed, "eval", spec.index, _STREAM_QUESTIONS)
                positives = _positives(spec, q_rng)  # same positives in every setting, as in POPE
                neg_rng = np.random.default_rng([seed, _SPLIT_CODES["eval"], spec.index, _STREAM_QUESTIONS,
                                                 1 + SETTINGS.index(setting)])
                negatives = _negatives(setting, positives, set(spec.categories), stats, neg_rng)
                rows += _question_rows(spec, positives, negatives, first_id=len(rows) + 1)
            emit(f"pope_{setting}.jsonl", _jsonl(rows))
            counts[setting] = len(rows)

        rows = []
        for spec in train_specs:
            q_rng = _rng(seed, "train", spec.index, _STREAM_QUESTIONS)
            positives = _positives(spec, q_rng)
            negatives = _negatives("random", positives, set(spec.categories), None, q_rng)
            rows += _question_rows(spec, positives, negatives, first_id=len(rows) + 1)
        emit("train.jsonl", _jsonl(rows))
        counts["train"] = len(rows)

        boxes = [{"image": s.image_name, "split": s.split, "scene": s.scene,
                  "objects": [{"category": o.category, "bbox": pixel_bbox(o.box, image_size)} for o in s.objects]}
                 for s in all_specs]
        emit("boxes.jsonl", _jsonl(boxes))

        manifest = {
            "name": "vrp synthetic POPE-style benchmark",
            "build_key": key,
            "vrp_utils_version": vrp_utils.__version__,
            "categories": list(CATEGORIES),
            "settings": list(SETTINGS),
            "scenes": {name: {"probability": p, "weights": w, "base_weight": _BASE_WEIGHT}
                       for name, (p, w) in SCENES.items()},
            "answer_forms": ANSWER_FORMS,
            "counts": {"eval_images": n_eval_images, "train_images": n_train_images, "questions": counts},
            "eval_frequency": stats.frequency,
            "files": dict(sorted(files.items())),
        }
        _atomic_write(staging / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())

        # Swap the finished build in; the old one is removed only after the new one is in place.
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(out_dir, rebuilt=True, seconds=time.perf_counter() - start, counts=counts)


# --------------------------------------------------------------------------------------------
# Visual check
# --------------------------------------------------------------------------------------------

def category_sheet(path: str | Path, image_size: int = 64, per_category: int = 6, seed: int = 0,
                   zoom: int = 2) -> Path:
    """Save a grid PNG: one row per category, ``per_category`` isolated instances on plain
    backgrounds at ``image_size`` px (scaled by ``zoom``), to check shapes are recognisable."""
    s = _SUPERSAMPLE
    cell = image_size
    sheet = Image.new("RGB", (cell * per_category, cell * len(CATEGORIES)), (255, 255, 255))
    rng = np.random.default_rng(seed)
    for r, cat in enumerate(CATEGORIES):
        for c in range(per_category):
            canvas = Image.new("RGB", (cell * s, cell * s), _random_color(rng))
            d = ImageDraw.Draw(canvas)
            size = [10.0, 14.0, 18.0, 22.0, 25.0, 12.0][c % 6] * image_size / 64
            w, h = _object_box(rng, cat, size, image_size)
            x0, y0 = (cell - w) / 2, (cell - h) / 2
            color = PALETTE[int(rng.integers(len(PALETTE)))]
            pen = _Pen(color, _shade(color, 0.4), _tint(color, 0.65), max(1, s * image_size // 64), bool(c % 2))
            _DRAWERS[cat](d, (x0 * s, y0 * s, (x0 + w) * s, (y0 + h) * s), pen)
            sheet.paste(canvas.resize((cell, cell), Image.Resampling.BOX), (c * cell, r * cell))
    sheet = sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def scene_sheet(path: str | Path, root: str | Path = BENCHMARK_DIR, n: int = 24, columns: int = 6,
                zoom: int = 3) -> Path:
    """Save a grid of the first ``n`` evaluation images of a built benchmark (zoomed) for eyeballing."""
    root = Path(root)
    names = sorted(p.name for p in (root / "images").glob("eval_*.png"))[:n]
    if not names:
        raise FileNotFoundError(f"no eval images under {root / 'images'}; build the benchmark first")
    first = Image.open(root / "images" / names[0])
    cell = first.width
    rows = math.ceil(len(names) / columns)
    sheet = Image.new("RGB", (cell * columns, cell * rows), (255, 255, 255))
    for k, name in enumerate(names):
        sheet.paste(Image.open(root / "images" / name).convert("RGB"), ((k % columns) * cell, (k // columns) * cell))
    sheet = sheet.resize((sheet.width * zoom, sheet.height * zoom), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
