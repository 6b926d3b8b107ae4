"""Which image tokens cover which pixels: token-to-box geometry from what a feature store holds.

Why one module: the attention analyses (in-box mass), masking (which pixels to blank) and the
overlays all need "which patch of the original image does image token k see". The family adapter
is the only code that knows it (LLaVA's centre crop, PaliGemma's squash, Qwen2-VL's 2x2 merge);
everything here goes through ``adapter.patch_boxes(image_size, grid)`` and never branches on the
family. The inputs are the store's own columns: ``grid_rows``, ``grid_cols``, ``image_width``,
``image_height`` and the example's ``boxes``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np


def token_boxes(adapter: Any, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """``[rows*cols, 4]`` (x0, y0, x1, y1) in original-image pixels, one per image token, row-major."""
    boxes = np.asarray(adapter.patch_boxes(tuple(int(v) for v in image_size), tuple(int(v) for v in grid)), dtype=np.float64)
    if boxes.shape != (grid[0] * grid[1], 4):
        raise ValueError(f"adapter returned patch boxes of shape {boxes.shape} for a {grid} grid")
    return boxes


def object_boxes(boxes: str | Sequence[dict[str, Any]], category: str | None) -> list[tuple[float, float, float, float]]:
    """The bounding boxes of ``category`` among an example's boxes (a list, or the store's JSON text)."""
    if isinstance(boxes, str):
        boxes = json.loads(boxes)
    return [tuple(float(v) for v in box["bbox"]) for box in boxes if box["category"] == category]


def token_box_overlap(
    adapter: Any, image_size: tuple[int, int], grid: tuple[int, int], boxes: Sequence[tuple[float, float, float, float]]
) -> np.ndarray:
    """``[rows*cols]`` bool: True where the token's patch overlaps any of ``boxes`` with positive area."""
    cells = token_boxes(adapter, image_size, grid)
    inside = np.zeros(len(cells), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        width = np.minimum(cells[:, 2], x1) - np.maximum(cells[:, 0], x0)
        height = np.minimum(cells[:, 3], y1) - np.maximum(cells[:, 1], y0)
        inside |= (width > 0) & (height > 0)
    return inside


def pixel_mask(
    adapter: Any, image_size: tuple[int, int], grid: tuple[int, int], tokens: Sequence[int] | np.ndarray
) -> np.ndarray:
    """``[height, width]`` bool: the original-image pixels whose centre lies in a selected token's patch.

    Pixel (x, y) covers [x, x+1) x [y, y+1); it belongs to a patch when its centre does, so patches
    tile the image without overlap. Where the processor does not resample (the embedded benchmark's
    images), masking token k's pixels changes exactly the model's input patch k.
    """
    width, height = (int(v) for v in image_size)
    cells = token_boxes(adapter, image_size, grid)
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= len(cells)):
        raise ValueError(f"token index out of range 0..{len(cells) - 1}: {tokens.tolist()}")
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in cells[tokens]:
        mask[np.ix_((ys >= y0) & (ys < y1), (xs >= x0) & (xs < x1))] = True
    return mask
