"""LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP ViT, CLS dropped, ``<image>`` expanded in place."""

from __future__ import annotations

import numpy as np
from transformers import BatchFeature, LlavaForConditionalGeneration, LlavaProcessor, PretrainedConfig, ProcessorMixin

from .base import FamilyAdapter


class LlavaAdapter(FamilyAdapter):
    """Prompt ``USER: <image>\\n{question} ASSISTANT:``; image tokens cover a center square crop."""

    model_type = "llava"
    model_class = LlavaForConditionalGeneration
    processor_class = LlavaProcessor

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"llava: vision_feature_select_strategy={config.vision_feature_select_strategy!r} keeps the CLS "
                "token among the image tokens; only 'default' (CLS dropped, one token per patch) is supported"
            )

    def prompt(self, processor: ProcessorMixin, question: str) -> str:
        return f"USER: {processor.image_token}\n{question} ASSISTANT:"

    def answer_text(self, processor: ProcessorMixin, answer: str) -> str:
        return f" {answer}{processor.tokenizer.eos_token}"

    def follow_up_prompt(self, processor: ProcessorMixin, question: str) -> str:
        # llava-1.5's conversation format: "USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT:"
        return f"USER: {question} ASSISTANT:"

    def patch_grid(self, inputs: BatchFeature, index: int) -> tuple[int, int]:
        height, width = inputs["pixel_values"][index].shape[-2:]
        patch = self.config.vision_config.patch_size
        return int(height) // patch, int(width) // patch

    def patch_boxes(self, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        # CLIPImageProcessor resizes the shortest edge to the crop size and center-crops a square:
        # the tokens tile the centered min(W, H) square of the original image.
        width, height = image_size
        side = min(width, height)
        return self._grid_boxes((width - side) / 2, (height - side) / 2, side, side, grid)

    def _check_geometry(self, processor: ProcessorMixin) -> None:
        ip = processor.image_processor
        vision = self.config.vision_config
        crop = dict(ip.crop_size or {})
        size = dict(ip.size or {})
        if not (ip.do_resize and ip.do_center_crop and crop.get("height") == crop.get("width")
                and size.get("shortest_edge") == crop.get("height")):
            raise ValueError(
                "llava: patch_boxes assumes a shortest-edge resize to the crop size then a square center crop; "
                f"the image processor has do_resize={ip.do_resize}, do_center_crop={ip.do_center_crop}, "
                f"size={size}, crop_size={crop}"
            )
        if crop["height"] != vision.image_size or processor.patch_size != vision.patch_size:
            raise ValueError(
                f"llava: processor crop {crop['height']} / patch {processor.patch_size} != "
                f"vision tower image_size {vision.image_size} / patch_size {vision.patch_size}"
            )
        if processor.vision_feature_select_strategy != "default" or processor.num_additional_image_tokens != 1:
            raise ValueError(
                "llava: the processor must expand <image> to one token per patch (strategy 'default', "
                f"1 additional CLS token), got {processor.vision_feature_select_strategy!r}, "
                f"{processor.num_additional_image_tokens}"
            )
