"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): dynamic resolution, 2x2 patch merge, M-RoPE."""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import BatchFeature, ProcessorMixin, Qwen2VLForConditionalGeneration

from ..families import Qwen2VLImageTextProcessor
from .base import FamilyAdapter


class Qwen2VLAdapter(FamilyAdapter):
    """Chat-template prompt (system, user image + question, assistant generation prompt).

    The image is resized to a multiple of ``patch_size * merge_size`` (aspect
    kept); ``image_grid_thw // merge`` gives the merged token grid.
    """

    model_type = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLImageTextProcessor

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def prompt(self, processor: ProcessorMixin, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def answer_text(self, processor: ProcessorMixin, answer: str) -> str:
        return f"{answer}{processor.tokenizer.eos_token}"  # eos is <|im_end|>, the end of the assistant turn

    def follow_up_prompt(self, processor: ProcessorMixin, question: str) -> str:
        # The chat template's next user turn and generation prompt (its newlines are whitespace to the tokenizer).
        return f"\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"

    def patch_grid(self, inputs: BatchFeature, index: int) -> tuple[int, int]:
        grids = inputs["image_grid_thw"]
        if len(grids) != len(inputs["input_ids"]):
            raise ValueError(f"{len(grids)} image grids for {len(inputs['input_ids'])} examples; expected one image each")
        t, h, w = (int(v) for v in grids[index])
        if t != 1 or h % self.merge_size or w % self.merge_size:
            raise ValueError(f"image grid {(t, h, w)} is not a single frame divisible by merge {self.merge_size}")
        return h // self.merge_size, w // self.merge_size

    def patch_boxes(self, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        # smart_resize scales the whole image (no crop) to the grid: tokens tile the full image.
        width, height = image_size
        return self._grid_boxes(0.0, 0.0, width, height, grid)

    def _check_geometry(self, processor: ProcessorMixin) -> None:
        ip = processor.image_processor
        vision = self.config.vision_config
        if (ip.patch_size, ip.merge_size, ip.temporal_patch_size) != (
            vision.patch_size,
            vision.spatial_merge_size,
            vision.temporal_patch_size,
        ):
            raise ValueError(
                f"qwen2_vl: processor patch/merge/temporal {(ip.patch_size, ip.merge_size, ip.temporal_patch_size)} "
                f"!= vision config {(vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)}"
            )
        if not ip.do_resize:
            raise ValueError("qwen2_vl: patch_boxes assumes the processor resizes (do_resize=True)")

    def generation_kwargs(self, processor: ProcessorMixin, max_new_tokens: int = 8) -> dict[str, Any]:
        kwargs = super().generation_kwargs(processor, max_new_tokens)
        # Qwen2-VL-Instruct stops at <|im_end|> or <|endoftext|>.
        kwargs["eos_token_id"] = sorted({processor.tokenizer.eos_token_id, processor.tokenizer.pad_token_id})
        return kwargs
