"""PaliGemma (``PaliGemmaForConditionalGeneration``): SigLIP, image tokens prepended, prefix-LM."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, ProcessorMixin

from .base import IGNORE_INDEX, FamilyAdapter


class PaliGemmaAdapter(FamilyAdapter):
    """Prefix = ``<image>`` + question (the processor adds BOS and ``\\n``); suffix = answer + EOS.

    Training inputs go through the processor's own ``suffix`` path so that
    ``token_type_ids`` mark the answer as the causal suffix (the prefix attends
    bidirectionally); ``labels`` are the processor's.
    """

    model_type = "paligemma"
    model_class = PaliGemmaForConditionalGeneration
    processor_class = PaliGemmaProcessor

    def prompt(self, processor: ProcessorMixin, question: str) -> str:
        return f"{processor.image_token}{question}"

    def answer_text(self, processor: ProcessorMixin, answer: str) -> str:
        return f"{answer}{processor.tokenizer.eos_token}"

    def follow_up_prompt(self, processor: ProcessorMixin, question: str) -> str:
        # PaliGemma has no chat format: a later question follows the previous answer's EOS in the causal suffix.
        return question

    def _encode_with_tails(
        self, processor: ProcessorMixin, images: list[Image.Image], prompts: list[str], tails: list[str]
    ) -> BatchFeature:
        # The processor appends EOS to the suffix itself; token_type_ids then mark every turn after the
        # first question as causal suffix. Labels are replaced by the caller (answers only).
        eos = processor.tokenizer.eos_token
        suffixes = [t[: -len(eos)] if t.endswith(eos) else t for t in tails]
        return self._encode(processor, images, prompts, suffix=suffixes)

    def _encode(self, processor: ProcessorMixin, images: list[Image.Image], texts: list[str], **kwargs) -> BatchFeature:
        # PaliGemmaProcessor builds its labels with np.array(); from torch tensors that warns (numpy 2
        # copy keyword). Ask for numpy and convert once.
        out = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="np", **kwargs)
        return BatchFeature(data=dict(out), tensor_type="pt")

    def _encode_training(
        self, processor: ProcessorMixin, images: list[Image.Image], questions: list[str], answers: list[str]
    ) -> BatchFeature:
        prompts = [self.prompt(processor, q) for q in questions]
        inputs = self._encode(processor, images, prompts, suffix=answers)
        labels = torch.as_tensor(inputs["labels"])
        for i, answer in enumerate(answers):
            n = len(processor.tokenizer(self.answer_text(processor, answer), add_special_tokens=False)["input_ids"])
            labelled = (labels[i] != IGNORE_INDEX).nonzero().flatten()
            if labelled.numel() != n or (n and int(labelled[0]) != labels.shape[1] - n):
                raise ValueError(
                    f"example {i}: the processor labelled {labelled.numel()} tokens for answer {answer!r}, "
                    f"expected the last {n}"
                )
        inputs["labels"] = labels
        return inputs

    def patch_grid(self, inputs: BatchFeature, index: int) -> tuple[int, int]:
        height, width = inputs["pixel_values"][index].shape[-2:]
        patch = self.config.vision_config.patch_size
        return int(height) // patch, int(width) // patch

    def patch_boxes(self, image_size: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
        # SiglipImageProcessor squashes the whole image to a square: tokens tile the full image.
        width, height = image_size
        return self._grid_boxes(0.0, 0.0, width, height, grid)

    def _check_geometry(self, processor: ProcessorMixin) -> None:
        ip = processor.image_processor
        vision = self.config.vision_config
        size = dict(ip.size or {})
        if not ip.do_resize or getattr(ip, "do_center_crop", False) or size.get("height") != size.get("width"):
            raise ValueError(
                "paligemma: patch_boxes assumes the whole image is resized to a square without cropping; "
                f"the image processor has do_resize={ip.do_resize}, size={size}"
            )
        if size["height"] != vision.image_size:
            raise ValueError(f"paligemma: processor size {size['height']} != vision image_size {vision.image_size}")
        expected = (vision.image_size // vision.patch_size) ** 2
        if processor.image_seq_length != expected:
            raise ValueError(f"paligemma: processor image_seq_length {processor.image_seq_length} != {expected}")
