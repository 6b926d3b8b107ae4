"""Token-to-pixel geometry through the family adapters, on all three families' real processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vrp_utils.analysis.geometry import object_boxes, pixel_mask, token_box_overlap, token_boxes
from vrp_utils.data.benchmark import CATEGORIES

QUESTION = f"Is there a {CATEGORIES[0]} in the image?"
#: Image sizes each family's processor takes without resampling (zoo v2 reads 96 px; LLaVA: short side = crop, so
#: the centre crop is exercised with a wider image).
SIZES = {"zoo-llava": (120, 96), "zoo-paligemma": (96, 96), "zoo-qwen2-vl": (96, 96)}
#: The benchmark's own size, which each processor resizes to 96 px (bicubic).
BENCHMARK_SIZES = {"zoo-llava": (80, 64), "zoo-paligemma": (64, 64), "zoo-qwen2-vl": (64, 64)}


def _input_patches(loaded, inputs) -> torch.Tensor:
    """``[tokens, values]``: the model's input pixels of each image token, in token order."""
    pixels = inputs["pixel_values"]
    grid = loaded.adapter.patch_grid(inputs, 0)
    if pixels.dim() == 4:  # [1, C, H, W] (LLaVA, PaliGemma): one square patch per token, row-major
        _, channels, height, width = pixels.shape
        ph, pw = height // grid[0], width // grid[1]
        blocks = pixels[0].reshape(channels, grid[0], ph, grid[1], pw).permute(1, 3, 0, 2, 4)
        return blocks.reshape(grid[0] * grid[1], -1)
    # Qwen2-VL: flattened patches, merge x merge consecutive rows per merged token, row-major
    return pixels.reshape(grid[0] * grid[1], -1)


def _masking_changes(loaded, size: tuple[int, int], pick_tokens) -> tuple[tuple[int, int], dict[int, set[int]]]:
    """The token grid of a random ``size`` image, and for each token k of ``pick_tokens(grid)`` the image tokens whose
    input pixels change when k's pixel mask is blacked out before the processor."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    inputs = loaded.adapter.build_inputs(loaded.processor, [Image.fromarray(image)], [QUESTION])
    grid = loaded.adapter.patch_grid(inputs, 0)
    before = _input_patches(loaded, inputs)
    changes = {}
    for k in pick_tokens(grid):
        masked = image.copy()
        masked[pixel_mask(loaded.adapter, size, grid, [k])] = 0
        after = _input_patches(loaded, loaded.adapter.build_inputs(loaded.processor, [Image.fromarray(masked)], [QUESTION]))
        changes[k] = set((before != after).any(dim=1).nonzero().flatten().tolist())
    return grid, changes


@pytest.mark.parametrize("name", list(SIZES))
def test_masking_token_k_changes_exactly_input_patch_k(name, tiny_loaded):
    _, changes = _masking_changes(tiny_loaded(name), SIZES[name], lambda g: (0, g[0] * g[1] // 2 + 1, g[0] * g[1] - 1))
    assert all(changed == {k} for k, changed in changes.items()) and len(changes) == 3


@pytest.mark.parametrize("name", list(SIZES))
def test_masking_a_token_of_a_resized_image_reaches_only_its_neighbours(name, tiny_loaded):
    """The benchmark's 64 px images are resized to 96 px by the processor, whose bicubic kernel carries a masked
    token's edge into the tokens beside it: chapter 02 masks token k and, faintly, a ring around it (stated on its
    page). The ring is bounded: only tokens sharing an edge or corner with k change."""
    grid, changes = _masking_changes(tiny_loaded(name), BENCHMARK_SIZES[name],
                                     lambda g: (g[0] * g[1] // 2 + g[1] // 2,))  # an inner token
    (k, changed), = changes.items()
    row, col = divmod(k, grid[1])
    ring = {r * grid[1] + c for r in range(row - 1, row + 2) for c in range(col - 1, col + 2)}
    assert k in changed and changed <= ring and len(changed) > 1


@pytest.mark.parametrize("name", list(SIZES))
def test_pixel_masks_of_all_tokens_tile_the_seen_region_once(name, tiny_loaded):
    loaded = tiny_loaded(name)
    size = SIZES[name]
    image = Image.new("RGB", size)
    grid = loaded.adapter.patch_grid(loaded.adapter.build_inputs(loaded.processor, [image], [QUESTION]), 0)
    per_token = np.stack([pixel_mask(loaded.adapter, size, grid, [k]) for k in range(grid[0] * grid[1])])
    assert per_token.sum(0).max() == 1  # no pixel in two patches
    seen = per_token.any(0)
    if name == "zoo-llava":  # the centre 96x96 square of a 120x96 image: 12 columns cropped each side
        assert seen[:, 12:108].all() and not seen[:, :12].any() and not seen[:, 108:].any()
    else:
        assert seen.all()


def test_token_box_overlap_by_hand(tiny_loaded):
    adapter = tiny_loaded("zoo-paligemma").adapter  # 64 px image, 8x8 grid of 8 px patches
    assert np.allclose(token_boxes(adapter, (64, 64), (8, 8))[9], [8, 8, 16, 16])
    inside = token_box_overlap(adapter, (64, 64), (8, 8), [(10.0, 10.0, 17.0, 16.0)])
    assert np.flatnonzero(inside).tolist() == [9, 10]  # touches cells (1,1) and (1,2); y1 = 16 only touches row 2's edge
    assert not token_box_overlap(adapter, (64, 64), (8, 8), []).any()


def test_object_boxes_reads_the_store_json_and_picks_the_category():
    boxes = '[{"category": "cup", "bbox": [1, 2, 3, 4]}, {"category": "fork", "bbox": [5, 6, 7, 8]}]'
    assert object_boxes(boxes, "fork") == [(5.0, 6.0, 7.0, 8.0)]
    assert object_boxes(boxes, "apple") == []


def test_pixel_mask_refuses_a_token_outside_the_grid(tiny_loaded):
    with pytest.raises(ValueError, match="out of range"):
        pixel_mask(tiny_loaded("zoo-paligemma").adapter, (64, 64), (8, 8), [64])
